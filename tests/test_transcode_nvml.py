"""NVENC/NVDEC use of ffmpeg processes the Immich server starts is the server's.

Immich's server runs ffmpeg as a child process (fluent-ffmpeg spawns it); a child inherits its
parent's cgroup, so it sits in the server unit's (or container's) cgroup without anyone moving it.
Here a real parent process in a real cgroup forks a real child named `ffmpeg` that nobody places;
the gcc-built fake NVML reports encoder/decoder samples for the child's PID, and the exporter
(a subprocess, `--once`) must put them on the server component.
"""

from __future__ import annotations

import pathlib
import shutil
import uuid

import pytest

from tests.support import exposition as ex
from tests.support.nvml import CgroupTree, Scenario, build_fake_nvml
from tests.support.proc import wait_for
from tests.test_nvml_e2e import ThreadedServer, docker_app, once

CID_SERVER = "d4" * 32


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory):
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))


def spawn_server_with_ffmpeg(cg: CgroupTree, rel: str, tmp: pathlib.Path, name: str) -> tuple[int, int]:
    """A 'server' process in cgroup `rel` that forks an `ffmpeg` child; returns (server pid, ffmpeg pid)."""
    ffmpeg = tmp / name / "ffmpeg"
    ffmpeg.parent.mkdir()
    shutil.copy("/bin/sleep", ffmpeg)  # comm is the executable's name: "ffmpeg"
    pidfile = tmp / name / "ffmpeg.pid"
    server = cg.spawn(rel, ["sh", "-c", f'"{ffmpeg}" 300 & echo $! > "{pidfile}"; wait'])
    child = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, what="ffmpeg child"))
    cgroup = pathlib.Path(f"/proc/{child}/cgroup").read_text()
    assert cg.path(rel) in cgroup, "the child inherited its parent's cgroup"
    assert pathlib.Path(f"/proc/{child}/stat").read_text().split(") ")[1].split()[1] == str(server)  # its parent
    return server, child


def test_ffmpeg_children_of_the_server_unit_and_container_are_the_server_component(fake_lib, tmp_path):
    top = f"igx-ffmpeg-{uuid.uuid4().hex[:8]}"
    scenario = Scenario(tmp_path / "scenario.txt")
    with CgroupTree(top) as cg, ThreadedServer(docker_app({CID_SERVER: "immich_server"}),
                                               unix=str(tmp_path / "docker.sock")):
        _, unit_ffmpeg = spawn_server_with_ffmpeg(
            cg, "system.slice/system-immich.slice/immich-server.service", tmp_path, "unit")
        _, docker_ffmpeg = spawn_server_with_ffmpeg(cg, f"system.slice/docker-{CID_SERVER}.scope", tmp_path, "docker")
        # NVENC with NVDEC (-hwaccel cuda): a CUDA context, encoder and decoder busy, no SM work to speak of
        scenario.compute(unit_ffmpeg, 300 * 2**20).sample(unit_ffmpeg, 0.3, 2, 1, 45, 30)
        scenario.compute(docker_ffmpeg, 200 * 2**20).sample(docker_ffmpeg, 0.3, 1, 1, 20, 0)
        m, err = once(fake_lib, scenario, "--gpu.pid-labels", f"--docker.socket={tmp_path / 'docker.sock'}")

    assert ex.value(m, "immich_gpu_exporter_source_up", source="nvml") == 1, err
    g = {"gpu": "0", "uuid": scenario.gpus[0].uuid}
    unit = dict(g, component="server", unit="immich-server.service", container="")
    assert ex.value(m, "immich_gpu_process_encoder_utilization_ratio", **unit) == pytest.approx(0.45)
    assert ex.value(m, "immich_gpu_process_decoder_utilization_ratio", **unit) == pytest.approx(0.30)
    assert ex.value(m, "immich_gpu_process_memory_used_bytes", **unit) == 300 * 2**20
    assert ex.value(m, "immich_gpu_pid_memory_used_bytes", pid=str(unit_ffmpeg), comm="ffmpeg") == 300 * 2**20
    docker = dict(g, component="server", unit="", container="immich_server")
    assert ex.value(m, "immich_gpu_process_encoder_utilization_ratio", **docker) == pytest.approx(0.20)
    assert ex.value(m, "immich_gpu_process_decoder_utilization_ratio", **docker) == 0
    assert ex.value(m, "immich_gpu_pid_memory_used_bytes", pid=str(docker_ffmpeg), comm="ffmpeg") == 200 * 2**20
    # nothing of it lands on the ML component or on "other"
    assert not [k for k in ex.series(m, "immich_gpu_process_encoder_utilization_ratio")
                if ("component", "server") not in k]
