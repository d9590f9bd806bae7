"""Docker probes for `check`: the ML image's flavour against the host's accelerators, the
container's GPU access, and the provider its own log shows (against a real dockerd)."""

from __future__ import annotations

import pytest

from immich_gpu_exporter import docker_api as d
from immich_gpu_exporter import docker_check as c
from tests.support import replay
from tests.support.journal import FIXTURES


def view(image: str, gpu_access: str = "none") -> d.ContainerView:
    return d.ContainerView("a" * 64, "immich_machine_learning", "immich-machine-learning", image, "running", "",
                           0, 0, None, 1, "json-file", False, gpu_access)


ML = "ghcr.io/immich-app/immich-machine-learning"


@pytest.mark.parametrize("image, acc, ok", [
    (f"{ML}:release-cuda", c.Accelerators(nvidia=True), True),
    (f"{ML}:release-cuda", c.Accelerators(dri=True), False),
    (f"{ML}:release", c.Accelerators(nvidia=True), False),  # a GPU host running the CPU image
    (f"{ML}:release", c.Accelerators(), True),
    (f"{ML}:release-openvino", c.Accelerators(dri=True), True),
    (f"{ML}:release-rocm", c.Accelerators(dri=True), False),
    (f"{ML}:release-armnn", c.Accelerators(), None),
])
def test_the_ml_image_flavour_must_fit_the_accelerator_present(image, acc, ok):
    assert c.flavour_fits(view(image), acc).ok is ok


@pytest.mark.parametrize("image, access, ok", [
    (f"{ML}:release-cuda", "device_request", True),
    (f"{ML}:release-cuda", "nvidia_runtime", True),
    (f"{ML}:release-cuda", "cdi", True),
    (f"{ML}:release-cuda", "none", False),  # the hwaccel.ml.yml extension was forgotten
    (f"{ML}:release-cuda", "dri", False),
    (f"{ML}:release-openvino", "dri", True),
    (f"{ML}:release-rocm", "dri+kfd", True),
    (f"{ML}:release", "none", True),
])
def test_a_gpu_image_needs_gpu_access(image, access, ok):
    assert c.access_fits(view(image, access)).ok is ok


def test_no_docker_socket_is_an_unknown_not_a_failure(tmp_path):
    import asyncio

    found = asyncio.run(c.probe(str(tmp_path / "none.sock")))
    assert [(f.check, f.ok) for f in found] == [("docker", None)] and c.summary(found)


async def test_probe_reads_the_fallback_from_the_ml_containers_log(dockerd, tmp_path):
    image = replay.build_replay_image(dockerd)
    entries = [e for e in replay.load_journal(FIXTURES / "cuda_create_failed.export")
               if e.get("_SYSTEMD_UNIT") != "immich-server.service"]
    lines = replay.spaced(replay.replay_lines(entries), 20_000)
    replay.run_replay(dockerd, image, "immich_machine_learning", lines, 1.0)
    try:
        while len(dockerd.cli("logs", "immich_machine_learning").stdout.splitlines()) + \
                len(dockerd.cli("logs", "immich_machine_learning").stderr.splitlines()) < replay.physical(lines):
            await __import__("asyncio").sleep(0.2)
        found = await c.probe(dockerd.socket, acc=c.Accelerators(nvidia=True))
        by = {f.check: f for f in found}
        assert by["ml_flavour"].ok is True
        assert by["ml_gpu_access"].ok is False and "gpu_access=none" in by["ml_gpu_access"].detail
        assert by["ml_provider"].ok is False and "CPU fallback" in by["ml_provider"].detail
        assert not c.summary(found)
    finally:
        dockerd.cli("rm", "-f", "immich_machine_learning")


def test_check_reports_the_ml_containers_flavour_access_and_fallback(dockerd, tmp_path):
    """`immich-gpu-exporter check` on a Docker host: one row from the docker source's cycle."""
    import json

    from tests.support.proc import run_cli

    image = replay.build_replay_image(dockerd)
    entries = [e for e in replay.load_journal(FIXTURES / "cuda_create_failed.export")
               if e.get("_SYSTEMD_UNIT") != "immich-server.service"]
    lines = replay.spaced(replay.replay_lines(entries), 20_000)
    replay.run_replay(dockerd, image, "immich_machine_learning", lines, 1.0)
    try:
        replay.wait_replayed(dockerd, "immich_machine_learning", replay.physical(lines))
        (tmp_path / "root" / "dev").mkdir(parents=True)
        (tmp_path / "root" / "dev" / "nvidiactl").touch()  # a host with an NVIDIA GPU
        r = run_cli(["check", "--json", f"--root={tmp_path / 'root'}", f"--docker.socket={dockerd.socket}",
                     "--no-collector.systemd", "--no-collector.journal", "--no-collector.immich",
                     "--no-collector.nvml"], timeout=90)
        row = {c["id"]: c for c in json.loads(r.stdout)["checks"]}["docker_ml"]
        assert row["status"] == "FAIL", row
        assert "gpu_access=none" in row["finding"] and "CPU fallback" in row["finding"]
        assert row["details"]["flavour"] == "cuda" and r.returncode == 1
    finally:
        dockerd.cli("rm", "-f", "immich_machine_learning")
