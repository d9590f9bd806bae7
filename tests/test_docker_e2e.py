"""End to end on a Docker-only host: no Immich units, no journal source. The exporter daemon reads
Immich's containers from a real dockerd, the ML verdict from a replay container's json-file log,
GPU memory from the fake NVML for the container's real worker process, CPU and memory of the
containers through their real cgroups; a real Prometheus evaluates the shipped rules and a real
Alertmanager receives ImmichMLCPUFallback, raised from nothing but the container's log."""

from __future__ import annotations

import pytest

from tests.support import replay
from tests.support.alertmanager import Alertmanager
from tests.support.exposition import parse, value
from tests.support.journal import FIXTURES
from tests.support.nvml import Scenario, build_fake_nvml, env_for
from tests.support.prometheus import Prometheus
from tests.support.proc import Exporter, wait_for
from tests.support.prometheus import shortened_rules

ML = "immich_machine_learning"
SERVER = "immich-immich-server-1"  # compose's default name: matches no component.* glob, found by image
ML_BYTES = 1_234_567_890
DEADLINE = 60


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory: pytest.TempPathFactory):
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))


def test_docker_only_host_containers_verdict_gpu_cpu_and_the_fallback_alert(dockerd, fake_lib, tmp_path):
    ml_image = replay.build_replay_image(dockerd)
    server_image = dockerd.scratch_image(f"{replay.SERVER_IMAGE}:v3.1.0", {})
    fixture = "cuda_create_failed.export"
    entries = [e for e in replay.load_journal(FIXTURES / fixture) if e.get("_SYSTEMD_UNIT") != "immich-server.service"]
    try:
        lines = replay.spaced(replay.replay_lines(entries), 20_000)
        replay.run_replay(dockerd, ml_image, ML, lines, 1.0)
        dockerd.cli("run", "-d", "--name", SERVER, "--network", "none", "--label",
                    "com.docker.compose.service=immich-server", server_image, "sh", "-c",
                    "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 600")
        replay.wait_replayed(dockerd, ML, replay.physical(lines))
        scen = Scenario(tmp_path / "nvml.txt")
        scen.compute(replay.live_worker(dockerd.inspect(ML)["State"]["Pid"]), ML_BYTES).write()
        ex = Exporter([f"--docker.socket={dockerd.socket}", f"--state.directory={tmp_path / 'state'}",
                       "--no-collector.systemd", "--no-collector.journal", "--no-collector.immich",
                       "--collection.interval=0.3", "--nvml.interval=0.3", "--docker.interval=30",
                       "--log.level=debug"],
                      env=env_for(fake_lib, scen), log_path=tmp_path / "exporter.log")
        with ex:
            def ready():  # type: ignore[no-untyped-def]
                m = parse(ex.metrics())
                return m if value(m, "immich_ml_cpu_fallback") == 1 and \
                    (value(m, "immich_process_cpu_seconds_total", container=SERVER) or 0) > 0 and \
                    value(m, "immich_gpu_process_memory_used_bytes", container=ML) is not None else None
            try:
                m = wait_for(ready, DEADLINE, what="containers, verdict and per-container use")
            except TimeoutError as e:
                raise AssertionError(f"{e}\n{ex.metrics()}\n{ex.logs()[-3000:]}") from None
            # the containers and their states
            assert value(m, "immich_container_state", container=ML, state="running") == 1
            assert value(m, "immich_container_state", container=SERVER, state="running") == 1
            assert value(m, "immich_container_info", container=SERVER, component="server",
                         service="immich-server") == 1
            assert value(m, "immich_container_info", container=ML, flavour="cuda", log_driver="json-file") == 1
            # the verdict from the container's log
            assert value(m, "immich_ml_execution_provider", provider="CPUExecutionProvider") == 1
            assert value(m, "immich_ml_preferred_execution_provider", provider="CUDAExecutionProvider") == 1
            # GPU memory of the container's worker, attributed through its real cgroup
            assert value(m, "immich_gpu_process_memory_used_bytes", component="ml", container=ML) == ML_BYTES
            assert value(m, "immich_gpu_processes", component="ml", container=ML) == 1
            # CPU and memory of the whole container, master and worker, and of the server, which has no GPU process
            assert value(m, "immich_process_cpu_seconds_total", component="ml", container=ML) >= 0.3
            assert value(m, "immich_process_resident_memory_bytes", component="server", container=SERVER) > 0
            assert value(m, "immich_gpu_exporter_source_up", source="docker") == 1

            with Alertmanager(tmp_path) as am, Prometheus(tmp_path, {"immich-gpu-exporter": [ex.address]},
                                                          rule_files=[shortened_rules(tmp_path)],
                                                          alertmanager_url=am.address) as prom:
                firing = prom.wait_for_alert("ImmichMLCPUFallback", timeout=40)
                assert firing["labels"]["condition"] == "log"
                got = wait_for(lambda: [a for a in am.alerts() if a["labels"].get("alertname") ==
                                        "ImmichMLCPUFallback"], 30, what="ImmichMLCPUFallback in Alertmanager")
                assert got[0]["status"]["state"] == "active"
                # the dashboard's and rules' container labels: the ML container's series join its info
                rows = prom.query(f'immich_gpu_process_memory_used_bytes * on (container) group_left (flavour) '
                                  f'immich_container_info{{component="ml"}}')
                assert [(r["metric"]["container"], r["metric"]["flavour"]) for r in rows] == [(ML, "cuda")]
    finally:
        for name in (ML, SERVER):
            dockerd.cli("rm", "-f", name, check=False)
