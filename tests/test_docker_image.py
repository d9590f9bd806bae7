"""The exporter as a container: deploy/docker/Dockerfile built here on a debootstrapped base, run
unprivileged with the settings of deploy/docker/compose.yml against the test dockerd, beside a
replayed ML container and a server container."""

from __future__ import annotations

import pytest

from tests.support import exporter_image as ei
from tests.support import replay
from tests.support.exposition import parse, value
from tests.support.journal import FIXTURES
from tests.support.nvml import Scenario, build_fake_nvml
from tests.support.proc import wait_for

ML = "immich_machine_learning"
ML_BYTES = 987_654_321
FETCH = ("import urllib.request,sys; "
         "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:10283/metrics', timeout=3).read().decode())")


@pytest.fixture(scope="module")
def exporter_image(dockerd):  # type: ignore[no-untyped-def]
    return ei.build_image(dockerd, ei.base_image(dockerd))


def test_the_image_runs_as_nobody_without_the_systemd_and_journal_sources(dockerd, exporter_image):
    r = dockerd.cli("run", "--rm", "--network", "none", "--entrypoint", "id", exporter_image)
    assert r.stdout.split()[:2] == ["uid=65534(nobody)", "gid=65534(nogroup)"]
    r = dockerd.cli("run", "--rm", "--network", "none", exporter_image, "--help")
    assert "immich-gpu-exporter" in r.stdout
    env = dockerd.cli("image", "inspect", "-f", "{{json .Config.Env}}", exporter_image).stdout
    assert "IMMICH_GPU_EXPORTER_COLLECTOR_SYSTEMD=false" in env


def test_the_compose_snippet_runs_the_image_against_dockerd(dockerd, exporter_image, tmp_path):
    ml_image = replay.build_replay_image(dockerd)
    entries = [e for e in replay.load_journal(FIXTURES / "cuda_create_failed.export")
               if e.get("_SYSTEMD_UNIT") != "immich-server.service"]
    lib = build_fake_nvml(tmp_path / "nvml")
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)  # the named volume: writable by the image's user
    key = tmp_path / "api-key"
    key.write_text("not-a-real-key\n")
    key.chmod(0o644)
    scen = Scenario(tmp_path / "scenario" / "nvml.txt")
    scen.path.parent.mkdir()
    service = ei.compose_service()
    try:
        lines = replay.spaced(replay.replay_lines(entries), 20_000)
        replay.run_replay(dockerd, ml_image, ML, lines, 1.0)
        replay.wait_replayed(dockerd, ML, replay.physical(lines))
        worker = replay.live_worker(dockerd.inspect(ML)["State"]["Pid"])
        scen.compute(worker, ML_BYTES).write()
        args = ei.run_args(service, socket=dockerd.socket, state_dir=str(state), secrets={"immich_api_key": str(key)},
                           env={"DOCKER_GID": ei.socket_gid(dockerd.socket)}, nvml_lib=str(lib / "libnvidia-ml.so.1"),
                           extra_env={"FAKE_NVML_SCENARIO": "/scenario/nvml.txt",
                                      "IMMICH_GPU_EXPORTER_NVML_INTERVAL": "0.5",
                                      "IMMICH_GPU_EXPORTER_COLLECTION_INTERVAL": "0.5"})
        args += ["-v", f"{scen.path.parent}:/scenario:ro"]
        dockerd.cli("run", "-d", *args, exporter_image)
        name = service["container_name"]

        last = [""]

        def scraped():  # type: ignore[no-untyped-def]
            r = dockerd.cli("exec", name, "/opt/immich-gpu-exporter/bin/python", "-c", FETCH, check=False)
            if r.returncode != 0:
                return None
            last[0] = r.stdout
            m = parse(r.stdout)
            return m if value(m, "immich_ml_cpu_fallback") == 1 and \
                value(m, "immich_gpu_process_memory_used_bytes", container=ML) is not None else None
        try:
            m = wait_for(scraped, 90, interval=0.5, what="the exporter container's verdict and attribution")
        except TimeoutError as e:
            logs = dockerd.cli("logs", name, check=False)
            raise AssertionError(f"{e}\n{logs.stdout[-2000:]}\n{logs.stderr[-3000:]}\n"
                                 + "\n".join(x for x in last[0].splitlines() if not x.startswith("#"))) from None
        # what the snippet's privileges are for: the socket (containers, logs), pid: host (the worker's
        # host PID from NVML read in /proc), the host's cgroups (the container's other processes)
        assert value(m, "immich_container_state", container=ML, state="running") == 1
        assert value(m, "immich_container_state", container=name, state="running") is None  # not Immich's
        assert value(m, "immich_gpu_process_memory_used_bytes", component="ml", container=ML) == ML_BYTES
        assert value(m, "immich_process_cpu_seconds_total", component="ml", container=ML) > 0
        assert value(m, "immich_gpu_exporter_source_up", source="docker") == 1
        assert value(m, "immich_gpu_exporter_source_up", source="nvml") == 1
        top = dockerd.cli("top", name, "-o", "user,pid,args").stdout
        assert "nobody" in top or "65534" in top, top
        # the state volume got the persisted positions (written at most every 2 s)
        wait_for(lambda: (state / "docker-state.json").exists(), 10, what="persisted docker state")
        assert "not-a-real-key" not in dockerd.cli("logs", name).stderr
    finally:
        dockerd.cli("rm", "-f", ML, service["container_name"], check=False)
