"""The immich source against the fake Immich on loopback: every scenario of the issue."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest

from immich_gpu_exporter.core import CollectResult, SourceDown
from tests.support.fake_immich import FakeImmich, Key, QueueSim
from tests.support.immich_source import KEY, Provider, collect, make_source, values

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@pytest.fixture
def fake():
    with FakeImmich() as f:
        yield f




async def test_v3_server_uses_api_queues_and_reports_every_queue(fake):
    src = make_source(fake)
    try:
        r = await collect(src)
    finally:
        await src.close()
    assert values(r, "immich_server_up") == {(): 1} and values(r, "immich_ml_up") == {(): 1}
    assert values(r, "immich_server_info") == {("3.1.0",): 1}
    assert values(r, "immich_server_feature_enabled")[("smartSearch",)] == 1
    jobs = values(r, "immich_queue_jobs")
    assert {q for q, _ in jobs} == set(fake.queue_counts(0))  # all 19 queues of v3.1.0
    assert {s for _, s in jobs} == {"waiting", "active", "delayed", "failed", "paused"}  # no "completed"
    assert values(r, "immich_queue_processed_method_info") == {("backlog",): 1}
    assert fake.api_requests("/api/queues") and not fake.api_requests("/api/jobs")
    assert r.errors == ()


async def test_old_server_with_only_api_jobs():
    with FakeImmich(version=(1, 140, 0, None)) as fake:
        src = make_source(fake)
        try:
            r1 = await collect(src)
            r2 = await collect(src)
        finally:
            await src.close()
        # the version is read first, so a pre-v2.4 server is never asked for /api/queues
        assert not fake.api_requests("/api/queues") and len(fake.api_requests("/api/jobs")) == 2
        assert values(r2, "immich_server_info") == {("1.140.0",): 1}
        queues = {q for q, _ in values(r2, "immich_queue_jobs")}
        assert "smartSearch" in queues and "ocr" not in queues  # ocr came in v2.2
        assert r1.errors == () and r2.errors == ()


async def test_server_without_queues_endpoint_falls_back_on_404_and_remembers():
    with FakeImmich(version=(3, 1, 0, None), with_queues_endpoint=False) as fake:
        src = make_source(fake)
        try:
            for _ in range(3):
                r = await collect(src)
        finally:
            await src.close()
        assert len(fake.api_requests("/api/queues")) == 1 and len(fake.api_requests("/api/jobs")) == 3
        assert values(r, "immich_queue_jobs")


async def test_non_admin_key_is_forbidden_and_logged_once(fake, caplog):
    fake.keys["user-key"] = Key(admin=False)
    src = make_source(fake, key="user-key")
    caplog.set_level(logging.INFO, "immich_gpu_exporter")
    try:
        for _ in range(2):
            with pytest.raises(SourceDown) as e:
                await collect(src)
            assert e.value.reason == "forbidden" and "queue.read" in e.value.detail
    finally:
        await src.close()
    lines = [r.getMessage() for r in caplog.records if "403" in r.getMessage()]
    assert len(lines) == 1 and "admin" in lines[0] and "queue.read" in lines[0]


async def test_key_with_only_job_read_uses_the_deprecated_endpoint(fake):
    fake.keys["old-key"] = Key(permissions=frozenset({"job.read"}))
    src = make_source(fake, key="old-key")
    try:
        r = await collect(src)
        await collect(src)
    finally:
        await src.close()
    assert values(r, "immich_queue_jobs") and len(fake.api_requests("/api/queues")) == 1


async def test_before_v1_137_the_key_needs_all():
    with FakeImmich(version=(1, 136, 0, None), keys={"scoped": Key(permissions=frozenset({"job.read"}))}) as fake:
        src = make_source(fake, key="scoped")
        try:
            await collect(src)  # learns the version, then fails
        except SourceDown as e:
            assert e.reason == "forbidden"
        with pytest.raises(SourceDown) as e:
            await collect(src)
        await src.close()
        assert "'all'" in e.value.detail


async def test_wrong_key_is_unauthorized(fake, caplog):
    src = make_source(fake, key="not-a-key")
    caplog.set_level(logging.INFO, "immich_gpu_exporter")
    try:
        with pytest.raises(SourceDown) as e:
            await collect(src)
    finally:
        await src.close()
    assert e.value.reason == "unauthorized"
    assert "not-a-key" not in e.value.detail and "not-a-key" not in caplog.text


async def test_without_a_key_the_open_endpoints_still_work(fake):
    src = make_source(fake, key=None)
    try:
        r = await collect(src)
    finally:
        await src.close()
    assert values(r, "immich_server_up") == {(): 1} and values(r, "immich_server_info")
    assert not values(r, "immich_queue_jobs") and not values(r, "immich_queue_processed_method_info")
    assert all("x-api-key" not in {k.lower() for k in req.headers} for req in fake.requests)


async def test_server_errors_are_counted_and_the_source_stays_up(fake):
    src = make_source(fake)
    try:
        await collect(src)
        fake.status["/api/queues"] = 500
        r = await collect(src)
    finally:
        await src.close()
    assert r.errors == ("http_5xx",)
    assert not values(r, "immich_queue_jobs")  # no stale gauges
    assert values(r, "immich_queue_active_job_seconds_total")  # counters stay
    assert values(r, "immich_server_up") == {(): 1}


async def test_an_answer_after_the_timeout_is_a_counted_timeout(fake):
    src = make_source(fake, immich_timeout=0.3)
    fake.delay["/api/queues"] = 1.5
    try:
        t0 = time.monotonic()
        r = await collect(src)
        took = time.monotonic() - t0
    finally:
        await src.close()
    assert r.errors == ("timeout",) and values(r, "immich_server_up") == {(): 1}
    assert took < src.timeout


async def test_garbage_json_is_counted(fake):
    fake.garbage.add("/api/queues")
    fake.garbage.add("/api/server/version")
    src = make_source(fake)
    try:
        r = await collect(src)
    finally:
        await src.close()
    assert sorted(r.errors) == ["bad_json", "bad_json"]
    assert not values(r, "immich_server_info") and values(r, "immich_server_feature_enabled")


async def test_unknown_queue_names_appear_and_malformed_entries_are_counted(fake):
    fake.extra_queues["aiCaptioning"] = {"active": 1, "completed": 0, "failed": 0, "delayed": 0, "waiting": 4,
                                         "paused": 0}
    src = make_source(fake)
    try:
        r = await collect(src)
        assert values(r, "immich_queue_jobs")[("aiCaptioning", "waiting")] == 4
        fake.broken_entries.add("ocr")
        r = await collect(src)
    finally:
        await src.close()
    assert r.errors == ("malformed_entry",)
    assert ("ocr", "waiting") not in values(r, "immich_queue_jobs")
    assert ("smartSearch", "waiting") in values(r, "immich_queue_jobs")


async def test_ml_service_down_keeps_the_source_up(fake):
    fake.ml_up = False
    src = make_source(fake)
    try:
        r = await collect(src)
    finally:
        await src.close()
    assert values(r, "immich_ml_up") == {(): 0} and values(r, "immich_server_up") == {(): 1}
    assert r.errors == ("ml_http_5xx",)


async def test_restart_mid_run_is_counted_and_creates_no_jump():
    t0 = time.monotonic() + 0.2
    sim = QueueSim("smartSearch", concurrency=2, arrivals=[t0] * 60, job_seconds=0.1)
    with FakeImmich(queues=[sim]) as fake:
        src = make_source(fake, immich_telemetry_url=fake.telemetry_url)
        try:
            for _ in range(8):
                await collect(src)
                await asyncio.sleep(0.1)
            before = values(await collect(src), "immich_queue_jobs_processed_total")[("", "smartSearch")]
            fake.go_down()
            with pytest.raises(SourceDown) as went_down:
                await collect(src)
            down = CollectResult(went_down.value.samples, errors=(went_down.value.reason,))
            await asyncio.sleep(0.3)
            fake.come_back()  # telemetry counters start over from 0
            results = []
            for _ in range(30):
                results.append(await collect(src))
                await asyncio.sleep(0.1)
        finally:
            await src.close()
        # an unreachable server takes the source down, but it keeps saying so and keeps its counters
        assert values(down, "immich_server_up") == {(): 0} and "unreachable" in down.errors
        assert values(down, "immich_queue_jobs_processed_total")[("", "smartSearch")] == before
        assert fake.telemetry_offset["smartSearch"] > 0  # Immich's counters really started over
        after = values(results[-1], "immich_queue_jobs_processed_total")[("", "smartSearch")]
        # no job counted twice despite the reset, no jump from the restarted counter; only the
        # jobs that finished while the server was unreachable are missing
        assert before < after <= 60
        lost = 60 - after
        assert lost <= sim.finished(time.monotonic()) - before


async def test_api_key_file_is_read_and_a_loose_mode_is_warned_once(fake, tmp_path, caplog):
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "\n")
    os.chmod(keyfile, 0o644)
    caplog.set_level(logging.WARNING, "immich_gpu_exporter")
    src = make_source(fake, key=None, immich_api_key_file=str(keyfile))
    try:
        r = await collect(src)
        await collect(src)
        assert values(r, "immich_queue_jobs")
        keyfile.unlink()
        with pytest.raises(SourceDown) as e:
            await collect(src)
    finally:
        await src.close()
    assert e.value.reason == "api_key_file"
    keyfile.write_text("two words\n")
    with pytest.raises(SourceDown) as e:
        await collect(src)
    assert e.value.reason == "api_key" and "two" not in e.value.detail
    warnings = [r.getMessage() for r in caplog.records if "readable by group or others" in r.getMessage()]
    assert len(warnings) == 1 and KEY not in caplog.text


async def test_seconds_per_job_by_provider_after_a_switch_over_real_http():
    """CPU batch, ML restarts on CUDA while idle, CUDA batch: two values under two labels.

    Real HTTP between the source and the fake, on one virtual clock shared by both (polls every
    50 ms of it): the accuracy is the timing code's, not the machine's load."""
    now = [0.0]

    def clock() -> float:
        return now[0]

    t0 = 0.3
    t_switch = t0 + 2.3  # the CPU batch has drained; the ML service comes back on CUDA
    cpu_jobs, cuda_jobs = 16, 80
    provider = Provider(CPU)

    def provider_at(t: float) -> str:
        return CPU if t < t_switch else CUDA

    sim = QueueSim("smartSearch", concurrency=2, provider_at=provider_at, job_seconds={CPU: 0.25, CUDA: 0.05},
                   arrivals=[t0] * cpu_jobs + [t_switch + 0.3] * cuda_jobs)
    with FakeImmich(queues=[sim], clock=clock) as fake:
        src = make_source(fake, provider=provider, clock=clock, immich_telemetry_url=fake.telemetry_url)
        try:
            while now[0] < sim.last_end + 0.4:
                provider.value = provider_at(now[0])
                r = await collect(src)
                now[0] += 0.05
        finally:
            await src.close()
    secs = values(r, "immich_queue_active_job_seconds_total")
    done = values(r, "immich_queue_jobs_processed_total")
    assert done[(CPU, "smartSearch")] == cpu_jobs and done[(CUDA, "smartSearch")] == cuda_jobs
    cpu = secs[(CPU, "smartSearch")] / cpu_jobs
    cuda = secs[(CUDA, "smartSearch")] / cuda_jobs
    assert cpu == pytest.approx(sim.truth(CPU), rel=0.10)
    assert cuda == pytest.approx(sim.truth(CUDA), rel=0.10)
    assert values(r, "immich_queue_processed_method_info") == {("telemetry",): 1}
    assert values(r, "immich_queue_last_run_jobs")[("smartSearch",)] == cuda_jobs
