"""The docker source against a real dockerd: Immich's containers found by compose label or image,
their state, health and restarts followed through the events stream, and the ML verdict read from
a replay container's json-file log, across exporter restarts and container recreation."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from types import MappingProxyType
from typing import Any, Callable

import pytest

from immich_gpu_exporter import config as configmod
from immich_gpu_exporter.core import CollectResult, Snapshot, SourceState
from immich_gpu_exporter.metrics import check_sample
from immich_gpu_exporter.mllog import MLState, Parser
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.docker import DockerSource
from tests.support import replay
from tests.support.journal import FIXTURES

ML = "immich_machine_learning"
SPEED = 20.0  # the typed fixtures span ~10 s; the real captures replay at their own speed elsewhere


def hub() -> Hub:
    snap = Snapshot(1, MappingProxyType({"nvml": SourceState("nvml")}), MappingProxyType({}))
    return Hub(lambda: snap)


def make(dockerd, tmp_path: pathlib.Path, **cfg: Any) -> DockerSource:
    values = dict(docker_socket=dockerd.socket, docker_interval=60.0, state_directory=str(tmp_path / "state"))
    values.update(cfg)
    return DockerSource(configmod.defaults().replace(**values), hub())


def values(result: CollectResult, name: str) -> dict[tuple, float]:
    for s in result.samples:
        check_sample(s)
    return {tuple(v for _, v in s.labels): s.value for s in result.samples if s.name == name}


def infos(result: CollectResult) -> dict[str, dict[str, str]]:
    return {dict(s.labels)["container"]: dict(s.labels) for s in result.samples if s.name == "immich_container_info"}


async def until(src: DockerSource, cond: Callable[[CollectResult], bool], timeout: float = 60.0) -> CollectResult:
    """collect() until `cond` holds; a deadline only so that a broken build fails instead of hanging."""
    deadline = time.monotonic() + timeout
    while True:
        r = await src.collect()
        if cond(r):
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached; last samples: {[(s.name, s.labels, s.value) for s in r.samples][:40]}")
        await asyncio.sleep(0.1)


async def started(src: DockerSource) -> DockerSource:
    src.bind_wake(asyncio.Event())
    await src.start()
    return src


def journal_verdict(name: str) -> tuple[Any, Any, bool, int]:
    """The oracle: the same capture read the journal way (Parser + MLState over its entries)."""
    parser, ml = Parser(), MLState()
    for e in replay.load_journal(FIXTURES / name):
        for ev in parser.feed(e):
            ml.apply(ev)
    for ev in parser.flush():
        ml.apply(ev)
    return ml.effective, ml.preferred, ml.cpu_fallback, sum(ml.model_loads.values())


def ml_entries(fixture: str) -> list[dict]:
    return [e for e in replay.load_journal(FIXTURES / fixture) if e.get("_SYSTEMD_UNIT") != "immich-server.service"]


@pytest.fixture(scope="module")
def images(dockerd):  # type: ignore[no-untyped-def]
    ml = replay.build_replay_image(dockerd)
    server = dockerd.scratch_image(f"{replay.SERVER_IMAGE}:v3.1.0", {})
    plain = dockerd.scratch_image("igx-test/busybox:1", {})
    return {"ml": ml, "server": server, "plain": plain}


@pytest.fixture
def clean(dockerd):  # type: ignore[no-untyped-def]
    yield
    ids = dockerd.cli("ps", "-aq").stdout.split()
    if ids:
        dockerd.cli("rm", "-f", *ids)


def log_line_count(dockerd, name: str) -> int:
    r = dockerd.cli("logs", name)
    return len(r.stdout.splitlines()) + len(r.stderr.splitlines())


# --- discovery and state ------------------------------------------------------------------------------

async def test_immich_containers_are_found_by_label_or_image_and_their_state_follows_events(
        dockerd, images, clean, tmp_path):
    replay.run_replay(dockerd, images["ml"], ML, replay.replay_lines(ml_entries("cuda_ok.export")), SPEED)
    # the server found by image alone (no compose label), with a health check
    dockerd.cli("run", "-d", "--name", "immich_server", "--network", "none", "--health-cmd", "true",
                "--health-interval", "1s", images["server"], "sleep", "600")
    # by compose label alone, with an unrelated image; and a container that is not Immich's
    dockerd.cli("run", "-d", "--name", "immich-ml-2", "--network", "none", "--label",
                "com.docker.compose.service=immich-machine-learning", images["plain"], "sleep", "600")
    dockerd.cli("run", "-d", "--name", "immich_redis", "--network", "none", "--label",
                "com.docker.compose.service=redis", images["plain"], "sleep", "600")
    src = await started(make(dockerd, tmp_path))
    try:
        r = await until(src, lambda r: values(r, "immich_container_health").get(("immich_server", "healthy")) == 1)
        info = infos(r)
        assert set(info) == {ML, "immich_server", "immich-ml-2"}
        assert info[ML] == dict(container=ML, component="ml", flavour="cuda", gpu_access="none",
                                image=f"{replay.ML_IMAGE}:v3.1.0-cuda", log_driver="json-file",
                                service="immich-machine-learning")
        assert (info["immich_server"]["component"], info["immich_server"]["service"]) == ("server", "")
        assert info["immich-ml-2"]["component"] == "ml"
        state = values(r, "immich_container_state")
        assert state[("immich_server", "running")] == 1 and state[("immich_server", "exited")] == 0
        # a stop reaches us through the events stream: the safety-net poll is 60 s away
        dockerd.cli("stop", "-t", "0", "immich_server")
        r = await until(src, lambda r: values(r, "immich_container_state").get(("immich_server", "exited")) == 1,
                        timeout=30)
        dockerd.cli("rm", "immich-ml-2", "-f")
        r = await until(src, lambda r: "immich-ml-2" not in infos(r))
        assert "immich_redis" not in {k[0] for k in values(r, "immich_container_state")}
    finally:
        await src.close()


async def test_restarts_by_the_restart_policy_are_counted(dockerd, images, clean, tmp_path):
    dockerd.cli("run", "-d", "--name", "immich_server", "--network", "none", "--restart", "on-failure:3",
                images["server"], "sh", "-c", "sleep 0.2; exit 1")
    src = await started(make(dockerd, tmp_path, docker_interval=0.5))
    try:
        r = await until(src, lambda r: values(r, "immich_container_restarts_total").get(("immich_server",)) == 3
                        and values(r, "immich_container_state")[("immich_server", "exited")] == 1)
        assert values(r, "immich_container_start_timestamp_seconds")[("immich_server",)] > 0
    finally:
        await src.close()


async def test_no_socket_means_no_docker_here_not_a_down_source(tmp_path):
    cfg = configmod.defaults().replace(docker_socket=str(tmp_path / "nope.sock"), state_directory=str(tmp_path))
    src = DockerSource(cfg, hub())
    await src.start()
    r = await src.collect()
    assert r.samples == () and r.facts["present"] is False
    await src.close()


# --- the ML verdict from the container's log ------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["cuda_create_failed.export", "cuda_ok.export", "ep_fallback.export"])
async def test_verdict_from_the_container_log_is_the_journals_verdict(dockerd, images, clean, tmp_path, fixture):
    lines = replay.replay_lines(ml_entries(fixture))
    replay.run_replay(dockerd, images["ml"], ML, lines, SPEED)
    effective, preferred, fallback, loads = journal_verdict(fixture)
    src = await started(make(dockerd, tmp_path))
    try:
        r = await until(src, lambda r: values(r, "immich_ml_log_entries_total")
                        and sum(values(r, "immich_ml_log_entries_total").values()) >= len(lines)
                        and sum(values(r, "immich_ml_model_loads_total").values()) >= loads)
        await asyncio.sleep(0.3)  # the last Rich record is flushed after a quiet moment
        r = await src.collect()
        assert values(r, "immich_ml_cpu_fallback") == {(): float(fallback)}
        assert values(r, "immich_ml_execution_provider")[(effective,)] == 1
        assert values(r, "immich_ml_preferred_execution_provider")[(preferred,)] == 1
        assert r.facts["effective_provider"] == effective
        assert sum(values(r, "immich_ml_log_entries_total").values()) == log_line_count(dockerd, ML)
    finally:
        await src.close()


async def test_restart_of_the_exporter_neither_loses_nor_double_counts_lines(dockerd, images, clean, tmp_path):
    # retimed (synthetic timing): 50 ms apart, and a 2 s pause after the 10th line, while no exporter runs
    lines = [(i * 50_000 + (2_000_000 if i >= 10 else 0), who, fd, text)
             for i, (_, who, fd, text) in enumerate(replay.replay_lines(ml_entries("cuda_create_failed.export")))]
    replay.run_replay(dockerd, images["ml"], ML, lines, 1.0)
    first = await started(make(dockerd, tmp_path))
    try:
        await until(first, lambda r: first.lines_read >= 10)
    finally:
        await first.close()  # persists positions and state together
    seen_by_first = first.lines_read
    assert seen_by_first < len(lines), "the first exporter must stop in the middle of the log"
    while log_line_count(dockerd, ML) < len(lines):  # the rest arrives while no exporter runs
        await asyncio.sleep(0.2)
    second = await started(make(dockerd, tmp_path))
    try:
        r = await until(second, lambda r: sum(values(r, "immich_ml_log_entries_total").values()) >= len(lines))
        await asyncio.sleep(0.5)
        r = await second.collect()
        assert sum(values(r, "immich_ml_log_entries_total").values()) == len(lines) == log_line_count(dockerd, ML)
        assert second.lines_read == len(lines) - seen_by_first
        assert values(r, "immich_container_log_gaps_total") == {(ML,): 0}
        assert values(r, "immich_ml_cpu_fallback") == {(): 1.0}
    finally:
        await second.close()


async def test_lines_rotated_away_while_the_exporter_was_down_are_a_counted_gap(dockerd, images, clean, tmp_path):
    # a chatty ML container with a tiny json-file log: rotation drops what nobody read
    dockerd.cli("run", "-d", "--name", ML, "--network", "none", "--label",
                "com.docker.compose.service=immich-machine-learning", "--log-opt", "max-size=2k",
                "--log-opt", "max-file=2", images["plain"], "sh", "-c",
                "echo first; sleep 2; i=0; while [ $i -lt 400 ]; do echo line $i; i=$((i+1)); done; sleep 600")
    first = await started(make(dockerd, tmp_path))
    try:
        await until(first, lambda r: first.lines_read >= 1)
    finally:
        await first.close()
    await asyncio.sleep(3)
    second = await started(make(dockerd, tmp_path))
    try:
        r = await until(second, lambda r: values(r, "immich_container_log_gaps_total").get((ML,)) == 1
                        and second.lines_read > 0)
        # what the daemon still had was read, and only that
        total = sum(values(r, "immich_ml_log_entries_total").values())
        assert total == 1 + second.lines_read
        assert second.lines_read <= log_line_count(dockerd, ML)
    finally:
        await second.close()


async def test_a_recreated_container_is_followed_under_its_new_id(dockerd, images, clean, tmp_path):
    old = replay.replay_lines(ml_entries("cuda_ok.export"))
    replay.run_replay(dockerd, images["ml"], ML, old, SPEED)
    src = await started(make(dockerd, tmp_path))
    try:
        r = await until(src, lambda r: sum(values(r, "immich_ml_log_entries_total").values()) >= len(old))
        assert values(r, "immich_ml_cpu_fallback") == {(): 0.0}
        # `docker compose up -d` after a change: the container is removed and created anew, same name
        dockerd.cli("rm", "-f", ML)
        new = replay.replay_lines(ml_entries("cuda_create_failed.export"))
        replay.run_replay(dockerd, images["ml"], ML, new, SPEED)
        r = await until(src, lambda r: sum(values(r, "immich_ml_log_entries_total").values()) >= len(old) + len(new)
                        and values(r, "immich_ml_cpu_fallback") == {(): 1.0})
        assert sum(values(r, "immich_ml_log_entries_total").values()) == len(old) + len(new)
        state = json.loads(src.serialise())
        assert list(state["positions"]) == [dockerd.inspect(ML)["Id"]]
    finally:
        await src.close()


# --- real captures of Immich's ML service, replayed in containers --------------------------------------
# tests/fixtures/real-ml/<variant>/ (captured by running the real service; see its README): journal.json
# or unit.export, and for some variants docker.jsonl with the streams Docker saw. Each is replayed with its
# own timing (sped up 4x) and judged against the same capture read the journal way; where the variant
# says what the truth is, against that too.
EXPECTED = {  # variant -> (effective provider, cpu_fallback); from the capture recipe's variants
    "cpu": ("CPUExecutionProvider", False),
    "gpu": ("CPUExecutionProvider", True),
    "gpu-nodriver": ("CPUExecutionProvider", True),
    "gpu-docker": ("CPUExecutionProvider", True),
    "openvino": ("OpenVINOExecutionProvider", False),
}
CAPTURES = replay.real_captures()


def capture_journal(folder: pathlib.Path) -> list[dict]:
    for name in ("journal.json", "unit.export"):
        if (folder / name).exists():
            return [e for e in replay.load_journal(folder / name)
                    if e.get("_SYSTEMD_UNIT") in (None, "immich-machine-learning.service")]
    return []


if CAPTURES:  # generated once the captures are merged; until then there is nothing to replay
    @pytest.mark.parametrize("folder", CAPTURES, ids=[p.name for p in CAPTURES])
    async def test_real_capture_replayed_in_a_container_is_judged_like_its_journal(
            dockerd, images, clean, tmp_path, folder):
        entries = capture_journal(folder)
        parser, ml = Parser(), MLState()
        for e in entries:
            for ev in parser.feed(e):
                ml.apply(ev)
        for ev in parser.flush():
            ml.apply(ev)
        docker_log = folder / "docker.jsonl"
        lines = replay.replay_lines_docker(docker_log) if docker_log.exists() else replay.replay_lines(entries)
        replay.run_replay(dockerd, images["ml"], ML, lines, 4.0)
        src = await started(make(dockerd, tmp_path))
        try:
            r = await until(src, lambda r: sum(values(r, "immich_ml_log_entries_total").values()) >= len(lines),
                            timeout=max(60.0, lines[-1][0] / 4e6 + 30))
            await asyncio.sleep(0.5)
            r = await src.collect()
            assert r.facts["effective_provider"] == ml.effective
            assert values(r, "immich_ml_cpu_fallback") == {(): float(ml.cpu_fallback)}
            if folder.name in EXPECTED:
                assert (ml.effective, ml.cpu_fallback) == EXPECTED[folder.name]
        finally:
            await src.close()
