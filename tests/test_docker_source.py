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
from immich_gpu_exporter import docker_api as d
from immich_gpu_exporter.core import CollectResult, Snapshot, SourceState
from immich_gpu_exporter.metrics import check_sample
from immich_gpu_exporter.mllog import MLState, Parser
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.docker import DockerSource
from tests.support import replay
from tests.support.journal import FIXTURES

ML = "immich_machine_learning"
SPEED = 1.0  # the typed fixtures, re-timed to 20 ms per write (replay.spaced): about 0.6 s each


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
    lines = replay.spaced(replay.replay_lines(ml_entries("cuda_ok.export")), 20_000)
    replay.run_replay(dockerd, images["ml"], ML, lines, SPEED)
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


async def test_a_socket_that_accepts_and_never_answers_is_a_timeout_not_a_dead_poll(tmp_path):
    """A hung dockerd (its socket accepts, nothing answers): a call ends with DockerUnavailable("timeout")
    after the client's timeout, so the source's poll goes on (it once died on the bare TimeoutError,
    leaving the source up with the last containers forever). The real hung dockerd: test_faults_docker.py."""
    import socket

    path = str(tmp_path / "hung.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)  # never accepted, never answered
    api = d.DockerClient(path, timeout=0.3)
    try:
        with pytest.raises(d.DockerUnavailable) as e:
            await api.containers()
        assert e.value.reason == "timeout"
    finally:
        await api.close()
        srv.close()


# --- the ML verdict from the container's log ------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["cuda_create_failed.export", "cuda_ok.export", "ep_fallback.export"])
async def test_verdict_from_the_container_log_is_the_journals_verdict(dockerd, images, clean, tmp_path, fixture):
    lines = replay.replay_lines(ml_entries(fixture))
    replay.run_replay(dockerd, images["ml"], ML, lines, SPEED)
    effective, preferred, fallback, loads = journal_verdict(fixture)
    src = await started(make(dockerd, tmp_path))
    try:
        r = await until(src, lambda r: values(r, "immich_ml_log_entries_total")
                        and sum(values(r, "immich_ml_log_entries_total").values()) >= replay.physical(lines)
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


@pytest.mark.parametrize("how", [["--log-driver", "local"], ["--tty"]], ids=["local-driver", "tty"])
async def test_verdict_from_a_local_driver_or_tty_container(dockerd, images, clean, tmp_path, how):
    """Docker's `local` log driver (compressed protobuf files) and a TTY container (one raw stream,
    CRLF line ends, no multiplexing) read the same as json-file."""
    lines = replay.spaced(replay.replay_lines(ml_entries("cuda_create_failed.export")), 20_000)
    replay.run_replay(dockerd, images["ml"], ML, lines, SPEED, extra=how)
    effective, preferred, fallback, _ = journal_verdict("cuda_create_failed.export")
    src = await started(make(dockerd, tmp_path))
    try:
        r = await until(src, lambda r: sum(values(r, "immich_ml_log_entries_total").values())
                        >= replay.physical(lines))
        await asyncio.sleep(0.3)
        r = await src.collect()
        assert (r.facts["effective_provider"], values(r, "immich_ml_cpu_fallback")) == \
            (effective, {(): float(fallback)})
        assert infos(r)[ML]["log_driver"] == ("local" if "local" in how else "json-file")
        assert sum(values(r, "immich_ml_log_entries_total").values()) == replay.physical(lines)
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
    assert seen_by_first < replay.physical(lines), "the first exporter must stop in the middle of the log"
    while log_line_count(dockerd, ML) < replay.physical(lines):  # the rest arrives while no exporter runs
        await asyncio.sleep(0.2)
    second = await started(make(dockerd, tmp_path))
    try:
        r = await until(second, lambda r: sum(values(r, "immich_ml_log_entries_total").values()) >= replay.physical(lines))
        await asyncio.sleep(0.5)
        r = await second.collect()
        assert sum(values(r, "immich_ml_log_entries_total").values()) == replay.physical(lines) == log_line_count(dockerd, ML)
        assert second.lines_read == replay.physical(lines) - seen_by_first
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
    old = replay.spaced(replay.replay_lines(ml_entries("cuda_ok.export")), 20_000)
    replay.run_replay(dockerd, images["ml"], ML, old, SPEED)
    src = await started(make(dockerd, tmp_path))
    try:
        r = await until(src, lambda r: sum(values(r, "immich_ml_log_entries_total").values()) >= replay.physical(old))
        assert values(r, "immich_ml_cpu_fallback") == {(): 0.0}
        # `docker compose up -d` after a change: the container is removed and created anew, same name
        dockerd.cli("rm", "-f", ML)
        new = replay.spaced(replay.replay_lines(ml_entries("cuda_create_failed.export")), 20_000)
        replay.run_replay(dockerd, images["ml"], ML, new, SPEED)
        r = await until(src, lambda r: sum(values(r, "immich_ml_log_entries_total").values()) >= replay.physical(old) + replay.physical(new)
                        and values(r, "immich_ml_cpu_fallback") == {(): 1.0})
        assert sum(values(r, "immich_ml_log_entries_total").values()) == replay.physical(old) + replay.physical(new)
        state = json.loads(src.serialise())
        assert list(state["positions"]) == [dockerd.inspect(ML)["Id"]]
    finally:
        await src.close()


# --- real captures of Immich's ML service, replayed in containers --------------------------------------
# tests/fixtures/real-ml/<variant>/ (captured by running the real service; see its README): unit.export,
# or docker.jsonl with the streams Docker saw. All are replayed at once, each with its own real timing
# (about 80 s for the longest), each followed by its own docker source that matches only its container.
# Judged against the capture's truth (manifest.json: the providers ONNX Runtime really gave each
# session, recorded inside the service) and against the same capture read the journal way.

def capture_entries(folder: pathlib.Path) -> list[dict]:
    if (folder / "unit.export").exists():
        return [e for e in replay.load_journal(folder / "unit.export")
                if e.get("_SYSTEMD_UNIT") == "immich-machine-learning.service"]
    return []


def capture_lines(folder: pathlib.Path) -> list[tuple[int, int, int, str]]:
    if (folder / "docker.jsonl").exists():
        return replay.replay_lines_docker(folder / "docker.jsonl")
    return replay.replay_lines(capture_entries(folder))


def journal_oracle(folder: pathlib.Path) -> MLState:
    parser, ml = Parser(), MLState()
    if (folder / "docker.jsonl").exists():  # the json-file view: the same lines as container entries
        entries = [d.journal_entry(ML, "stderr" if fd == 2 else "stdout", 1_000_000_000_000_000 + at * 1000, text)
                   for at, _, fd, text in replay.replay_lines_docker(folder / "docker.jsonl")]
    else:
        entries = capture_entries(folder)
    for e in entries:
        for ev in parser.feed(e):
            ml.apply(ev)
    for ev in parser.flush():
        ml.apply(ev)
    return ml


async def test_real_captures_replayed_in_containers_are_judged_by_their_truth(dockerd, images, clean, tmp_path):
    captures = replay.real_captures()
    assert captures, "tests/fixtures/real-ml holds the real captures"
    runs = []
    for i, folder in enumerate(captures):
        lines = capture_lines(folder)
        service = f"ml-{folder.name}"
        replay.run_replay(dockerd, images["ml"], f"ml{i}", lines, 1.0, service=service)
        src = make(dockerd, tmp_path / folder.name, docker_ml_service=(service,), docker_ml_image=(),
                   docker_server_service=(), docker_server_image=())
        runs.append((folder, lines, await started(src)))
    try:
        for folder, lines, src in runs:
            n = replay.physical(lines)
            r = await until(src, lambda r: sum(values(r, "immich_ml_log_entries_total").values()) >= n,
                            timeout=lines[-1][0] / 1e6 + 60)
        await asyncio.sleep(0.5)
        verdicts = {}
        for folder, lines, src in runs:
            r = await src.collect()
            truth = json.loads((folder / "manifest.json").read_text())["truth"]
            oracle = journal_oracle(folder)
            got = (r.facts.get("effective_provider"), values(r, "immich_ml_cpu_fallback").get(()))
            verdicts[folder.name] = got
            assert got == (oracle.effective, float(oracle.cpu_fallback)), folder.name
            if not truth["crash"]:
                assert got == (truth["sessions"][-1]["providers"][0], float(truth["fallback"])), folder.name
        assert len(verdicts) == len(captures)
    finally:
        for _, _, src in runs:
            await src.close()
