"""The Immich source against a hostile or broken server: answer size, label cardinality, absurd
numbers (issue 14). The fake Immich (tests/support/fake_immich.py) on loopback, nothing mocked."""

from __future__ import annotations

import math
import tracemalloc
import uuid

import pytest

from immich_gpu_exporter import immich_api as api
from immich_gpu_exporter.sources.immich import MAX_ANSWER_BYTES, MAX_JOB_NAMES, MAX_QUEUE_LABELS
from tests.support.fake_immich import FakeImmich
from tests.support.immich_source import collect, make_source, values

COUNTS = {"active": 1, "completed": 0, "failed": 0, "delayed": 0, "waiting": 3, "paused": 0}


@pytest.fixture
def fake():
    with FakeImmich() as f:
        yield f


async def test_100_mb_answer_is_refused_without_buffering_it(fake):
    fake.huge["/api/queues"] = 100 << 20
    src = make_source(fake, immich_timeout=20)
    try:
        tracemalloc.start()
        r = await collect(src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await src.close()
    assert "too_large" in r.errors
    assert values(r, "immich_server_up") == {(): 1}  # the rest of the cycle still counts
    assert peak < 4 * MAX_ANSWER_BYTES, peak


async def test_new_random_queue_names_every_poll_stay_within_the_cap(fake):
    src = make_source(fake)
    try:
        for _ in range(5):
            fake.extra_queues = {f"q{uuid.uuid4().hex[:12]}": dict(COUNTS) for _ in range(2000)}
            r = await collect(src)
    finally:
        await src.close()
    queues = {labels[0] for labels in values(r, "immich_queue_paused")}
    assert len(queues - api.KNOWN_QUEUES) <= MAX_QUEUE_LABELS
    assert api.KNOWN_QUEUES & queues  # the real queues keep their labels
    assert values(r, "immich_gpu_exporter_immich_labels_dropped_total")[("queue",)] >= 5 * 2000 - MAX_QUEUE_LABELS


async def test_unknown_telemetry_job_names_are_capped_and_counted(fake):
    src = make_source(fake, immich_telemetry_url=fake.telemetry_url)
    try:
        for _ in range(4):
            fake.extra_telemetry = [f"immich_jobs_x{uuid.uuid4().hex}_success_total 5" for _ in range(500)]
            r = await collect(src)
    finally:
        await src.close()
    assert len(src._job_cap.admitted) <= MAX_JOB_NAMES
    assert values(r, "immich_gpu_exporter_immich_labels_dropped_total")[("job",)] >= 4 * 500 - MAX_JOB_NAMES
    assert len(src._unmapped_logged) <= MAX_JOB_NAMES


@pytest.mark.parametrize("bad", [1e308, 10**400, float("inf"), -1, 2.5, True, "7"])
def test_absurd_counts_are_rejected(bad):
    body = [{"name": "smartSearch", "isPaused": False, "statistics": {**COUNTS, "active": bad}},
            {"name": "ocr", "isPaused": False, "statistics": COUNTS}]
    decoded = api.decode_queues(body)
    assert [q.name for q in decoded.queues] == ["ocr"] and decoded.malformed == 1


async def test_a_count_of_1e308_never_turns_a_counter_into_inf(fake):
    src = make_source(fake, immich_telemetry_url=fake.telemetry_url)
    errors: list[str] = []
    try:
        for n in (1, 1e308, 2, 1e308, 3):
            fake.extra_queues = {"smartSearch": {**COUNTS, "active": n}}
            fake.extra_telemetry = [f"immich_jobs_smart_search_success_total {n}"]
            r = await collect(src)
            errors += r.errors
            for s in r.samples:
                assert math.isfinite(s.value), s
    finally:
        await src.close()
    assert "malformed_entry" in errors and "telemetry_malformed" in errors


def test_telemetry_value_beyond_reason_is_malformed():
    t = api.parse_telemetry("immich_jobs_smart_search_success_total 1e308\nimmich_jobs_ocr_success_total 3\n")
    assert t.malformed == 1 and dict(t.counters) == {("ocr", "success"): 3.0}
