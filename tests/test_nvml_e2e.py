"""The real exporter, as a subprocess, against the gcc-built fake libnvidia-ml.so.1.

The dynamic loader reads LD_LIBRARY_PATH at process start only, so each case starts the
exporter (`--once` or the daemon) with the fake's directory and a scenario file. Attribution
cases place real processes into real cgroups named like Immich's units and containers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import uuid

import pytest
from aiohttp import web

from tests.support import exposition as ex
from tests.support.nvml import CgroupTree, Scenario, build_fake_nvml, env_for
from tests.support.proc import Exporter, run_cli, wait_for

ONLY_NVML = ["--no-collector.systemd", "--no-collector.journal", "--no-collector.immich"]
CID_ML = "a1" * 32
CID_X = "b2" * 32
POD = "5e0b6d1c-8f2a-4b3c-9d4e-1a2b3c4d5e6f"


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory):
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))


@pytest.fixture(scope="module")
def fake_lib_535(tmp_path_factory):
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml535"), driver_535=True)


@pytest.fixture
def scenario(tmp_path):
    return Scenario(tmp_path / "scenario.txt")


def once(lib, scen, *args, env=None):
    scen.write()
    r = run_cli(["--once", *ONLY_NVML, *args], env={**env_for(lib, scen), **(env or {})})
    assert r.returncode == 0, r.stderr
    return ex.parse(r.stdout), r.stderr


def up(parsed):
    return ex.value(parsed, "immich_gpu_exporter_source_up", source="nvml")


class ThreadedServer:
    """An aiohttp app in its own thread and loop, on a unix socket or a loopback port."""

    def __init__(self, app: web.Application, unix: str | None = None) -> None:
        self.app, self.unix, self.port = app, unix, 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.UnixSite(self.runner, self.unix) if self.unix else web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        if not self.unix:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())

    def __enter__(self) -> "ThreadedServer":
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def docker_app(names: dict[str, str]) -> web.Application:
    async def inspect(request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        if cid in names:
            return web.json_response({"Id": cid, "Name": "/" + names[cid]})
        return web.json_response({"message": "No such container"}, status=404)
    app = web.Application()
    app.router.add_get("/containers/{id}/json", inspect)
    return app


# --- attribution end to end ---------------------------------------------------------------------

def test_once_attributes_gpu_use_to_units_containers_and_components(fake_lib, scenario, tmp_path):
    """Real processes in real cgroups named like the NixOS units, Docker and Kubernetes
    containers; their PIDs scripted into NVML; names resolved over a Docker API socket."""
    top = f"igx-test-{uuid.uuid4().hex[:8]}"
    ml_unit = "system.slice/system-immich.slice/immich-machine-learning.service"
    with CgroupTree(top) as cg, ThreadedServer(docker_app({CID_ML: "immich_machine_learning"}),
                                               unix=str(tmp_path / "docker.sock")):
        arbiter = cg.spawn(ml_unit, nice=0, memlock=64 * 1024)  # gunicorn: no GPU
        worker = cg.spawn(ml_unit + "/worker", nice=-10)  # in a child cgroup: the unit's subtree
        server = cg.spawn("system.slice/system-immich.slice/immich-server.service")
        docker_ml = cg.spawn(f"system.slice/docker-{CID_ML}.scope")
        docker_x = cg.spawn(f"system.slice/docker-{CID_X}.scope")
        pod = cg.spawn(f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice/"
                       f"cri-containerd-{'c3' * 32}.scope")
        bare = cg.spawn("loose")
        scenario.compute(worker, 800 * 2**20).sample(worker, 0.5, 40, 10).sample(worker, 0.2, 60, 20)
        scenario.graphics(server, 64 * 2**20).sample(server, 0.3, 0, 0, 30, 15)
        scenario.compute(docker_ml, 500 * 2**20).sample(docker_ml, 0.4, 25, 5)
        scenario.compute(docker_x, 100 * 2**20).compute(pod, 50 * 2**20).compute(bare, 10 * 2**20)
        m, err = once(fake_lib, scenario, "--gpu.pid-labels", f"--docker.socket={tmp_path / 'docker.sock'}")

    assert up(m) == 1, err
    g = {"gpu": "0", "uuid": scenario.gpus[0].uuid}
    ml = dict(g, component="ml", unit="immich-machine-learning.service", container="")
    assert ex.value(m, "immich_gpu_process_memory_used_bytes", **ml) == 800 * 2**20
    assert ex.value(m, "immich_gpu_process_sm_utilization_ratio", **ml) == pytest.approx(0.6)  # newest sample
    assert ex.value(m, "immich_gpu_process_memory_utilization_ratio", **ml) == pytest.approx(0.2)
    assert ex.value(m, "immich_gpu_processes", **ml) == 1
    srv = dict(g, component="server", unit="immich-server.service", container="")
    assert ex.value(m, "immich_gpu_process_memory_used_bytes", **srv) == 64 * 2**20
    assert ex.value(m, "immich_gpu_process_encoder_utilization_ratio", **srv) == pytest.approx(0.3)
    assert ex.value(m, "immich_gpu_process_decoder_utilization_ratio", **srv) == pytest.approx(0.15)
    dml = dict(g, component="ml", unit="", container="immich_machine_learning")
    assert ex.value(m, "immich_gpu_process_memory_used_bytes", **dml) == 500 * 2**20
    assert ex.value(m, "immich_gpu_process_sm_utilization_ratio", **dml) == pytest.approx(0.25)
    # unresolvable container: short id, component other; the pod's container likewise; a loose process: all empty
    assert ex.value(m, "immich_gpu_process_memory_used_bytes", **g, component="other", unit="",
                    container=CID_X[:12]) == 100 * 2**20
    assert ex.value(m, "immich_gpu_process_memory_used_bytes", **g, component="other", unit="",
                    container=("c3" * 32)[:12]) == 50 * 2**20
    assert ex.value(m, "immich_gpu_process_memory_used_bytes", **g, component="other", unit="",
                    container="") == 10 * 2**20
    assert ex.value(m, "immich_gpu_pid_memory_used_bytes", pid=str(bare), comm="sleep", component="other") == 10 * 2**20
    # tuning in force: the unit's whole subtree, the non-GPU arbiter included
    pl = {"component": "ml", "unit": "immich-machine-learning.service", "container": ""}
    assert ex.value(m, "immich_process_nice", **pl) == -10
    assert ex.value(m, "immich_process_memlock_limit_bytes", **pl) == 64 * 1024  # the arbiter's, the lowest
    assert ex.value(m, "immich_process_resident_memory_bytes", **pl) > 0
    assert ex.value(m, "immich_process_nice", component="ml", unit="", container="immich_machine_learning") == 0
    assert ex.series(m, "immich_process_nice").keys().isdisjoint(
        {k for k in ex.series(m, "immich_process_nice") if ("component", "other") in k})
    assert arbiter not in (worker, server)


# --- NVML behaviour ---------------------------------------------------------------------------------

def test_once_reports_gpus_and_merges_compute_and_graphics(fake_lib, scenario):
    scenario.compute(os.getpid(), 300).graphics(os.getpid(), 300).compute(1, 200)
    m, _ = once(fake_lib, scenario, "--gpu.pid-labels")
    gpu = scenario.gpus[0]
    assert ex.series(m, "immich_gpu_info") == {frozenset({("gpu", "0"), ("uuid", gpu.uuid), ("name", gpu.name),
                                                          ("driver_version", "550.54.15")}): 1}
    assert ex.value(m, "immich_gpu_utilization_ratio", gpu="0") == pytest.approx(0.37)
    assert ex.value(m, "immich_gpu_memory_used_bytes", gpu="0") == gpu.used
    assert ex.value(m, "immich_gpu_memory_total_bytes", gpu="0") == gpu.total
    assert ex.value(m, "immich_gpu_pid_memory_used_bytes", pid=str(os.getpid())) == 300  # not 600
    assert ex.value(m, "immich_gpu_processes", component="other", unit="", container="") == 2


def test_once_na_memory_gives_no_memory_series_but_counts_the_process(fake_lib, scenario):
    scenario.compute(os.getpid(), None)
    m, _ = once(fake_lib, scenario, "--gpu.pid-labels")
    assert ex.series(m, "immich_gpu_process_memory_used_bytes") == {}
    assert ex.series(m, "immich_gpu_pid_memory_used_bytes") == {}
    assert ex.value(m, "immich_gpu_processes", component="other") == 1


def test_once_535_driver_struct_is_read_with_its_own_layout(fake_lib_535, scenario):
    """nvidia-ml-py alone mis-strides the 32-byte structs of 535-era drivers (second PID reads as 0)."""
    scenario.compute(os.getpid(), 4000).compute(1, 5000)
    m, err = once(fake_lib_535, scenario, "--gpu.pid-labels")
    pids = {dict(k)["pid"]: v for k, v in ex.series(m, "immich_gpu_pid_memory_used_bytes").items()}
    assert pids == {str(os.getpid()): 4000, "1": 5000}
    assert "535-era" in err


def test_once_falls_back_to_processes_utilization_info(fake_lib, scenario):
    scenario.compute(os.getpid(), 10).sample(os.getpid(), 0.3, 55, 7, 1, 2)
    scenario.fail("nvmlDeviceGetProcessUtilization", "not_supported")
    m, _ = once(fake_lib, scenario)
    assert ex.value(m, "immich_gpu_process_sm_utilization_ratio", component="other") == pytest.approx(0.55)
    assert ex.value(m, "immich_gpu_process_decoder_utilization_ratio", component="other") == pytest.approx(0.02)
    scenario.fail("nvmlDeviceGetProcessUtilization", "function_not_found")
    m, _ = once(fake_lib, scenario)
    assert ex.value(m, "immich_gpu_process_sm_utilization_ratio", component="other") == pytest.approx(0.55)


def test_once_without_any_process_utilisation_keeps_memory(fake_lib, scenario):
    scenario.compute(os.getpid(), 10).sample(os.getpid(), 0.3, 55)
    scenario.fail("nvmlDeviceGetProcessUtilization", "not_supported")
    scenario.fail("nvmlDeviceGetProcessesUtilizationInfo", "not_supported")
    m, _ = once(fake_lib, scenario)
    assert up(m) == 1
    assert ex.series(m, "immich_gpu_process_sm_utilization_ratio") == {}
    assert ex.value(m, "immich_gpu_process_memory_used_bytes", component="other") == 10


def test_once_old_samples_are_not_reported_as_current(fake_lib, scenario):
    scenario.compute(os.getpid(), 10).sample(os.getpid(), 3600, 90)  # an hour old: before the cursor
    m, _ = once(fake_lib, scenario)
    assert ex.value(m, "immich_gpu_process_sm_utilization_ratio", component="other") == 0


def test_once_non_fatal_nvml_error_is_counted_and_the_source_stays_up(fake_lib, scenario):
    scenario.compute(os.getpid(), 10).fail("nvmlDeviceGetUtilizationRates", "no_permission")
    m, _ = once(fake_lib, scenario)
    assert up(m) == 1
    assert ex.value(m, "immich_gpu_exporter_source_errors_total", source="nvml", reason="no_permission") == 1
    assert ex.series(m, "immich_gpu_utilization_ratio") == {}
    assert ex.value(m, "immich_gpu_process_memory_used_bytes", component="other") == 10


@pytest.mark.parametrize("function,error,reason", [
    ("nvmlInitWithFlags", "driver_not_loaded", "driver_not_loaded"),
    ("nvmlInitWithFlags", "lib_rm_version_mismatch", "lib_rm_version_mismatch"),
    ("nvmlDeviceGetCount_v2", "gpu_is_lost", "gpu_is_lost"),
    ("nvmlDeviceGetComputeRunningProcesses_v3", "uninitialized", "uninitialized"),
    ("nvmlDeviceGetProcessUtilization", "gpu_is_lost", "gpu_is_lost"),
    ("nvmlDeviceGetCount_v2", "unknown", "unknown"),
])
def test_once_fatal_nvml_errors_take_the_source_down_with_a_reason(fake_lib, scenario, function, error, reason):
    scenario.compute(os.getpid(), 10).sample(os.getpid(), 0.1, 5).fail(function, error)
    m, _ = once(fake_lib, scenario)
    assert up(m) == 0
    assert ex.value(m, "immich_gpu_exporter_source_errors_total", source="nvml", reason=reason) == 1
    assert ex.series(m, "immich_gpu_info") == {}


def test_once_without_nvml_library_source_down_others_unaffected(fake_lib, scenario, tmp_path):
    """Same config with and without the library: only the NVML source differs."""
    async def ping(request: web.Request) -> web.Response:
        return web.json_response({"res": "pong"})
    app = web.Application()
    app.router.add_get("/api/server/ping", ping)
    scenario.compute(os.getpid(), 10).write()
    with ThreadedServer(app) as srv:
        args = ["--once", "--no-collector.systemd", "--no-collector.journal", f"--immich.url=http://127.0.0.1:{srv.port}"]
        with_lib = run_cli(args, env=env_for(fake_lib, scenario))
        without = run_cli(args, env=env_for(None, scenario))
    assert with_lib.returncode == 0 and without.returncode == 0, without.stderr
    a, b = ex.parse(with_lib.stdout), ex.parse(without.stdout)
    assert up(a) == 1 and up(b) == 0
    assert ex.value(b, "immich_gpu_exporter_source_errors_total", source="nvml", reason="library_not_found") == 1
    assert "libnvidia-ml.so.1 not found" in without.stderr

    def others(p):
        return {k: v for k, v in p.items() if not k[0].startswith("immich_gpu") and "nvml" not in dict(k[1]).values()
                and not k[0].startswith("immich_gpu_exporter_source_") and not k[0].startswith("immich_process")}
    assert others(a) == others(b) and others(a)
    assert ex.value(b, "immich_gpu_exporter_source_up", source="immich") == \
        ex.value(a, "immich_gpu_exporter_source_up", source="immich")


# --- the daemon: errors leave it serving ------------------------------------------------------------

DAEMON = [*ONLY_NVML, "--nvml.interval=0.2", "--nvml.retry-interval=1", "--collection.timeout=2"]


def scrape(e: Exporter):
    return ex.parse(e.metrics())


def test_daemon_gpu_lost_mid_run_then_recovered(fake_lib, scenario):
    scenario.compute(os.getpid(), 10).write()
    with Exporter(DAEMON, env=env_for(fake_lib, scenario)) as e:
        wait_for(lambda: up(scrape(e)) == 1, what="nvml up")
        for function, error, reason in [
            ("nvmlDeviceGetUtilizationRates", "gpu_is_lost", "gpu_is_lost"),
            ("nvmlDeviceGetCount_v2", "driver_not_loaded", "driver_not_loaded"),
            ("nvmlDeviceGetCount_v2", "lib_rm_version_mismatch", "lib_rm_version_mismatch"),
            ("nvmlDeviceGetGraphicsRunningProcesses_v3", "uninitialized", "uninitialized"),
        ]:
            scenario.fail(function, error).write()
            m = wait_for(lambda: (lambda m: m if up(m) == 0 else None)(scrape(e)), what=f"down on {reason}")
            assert ex.value(m, "immich_gpu_exporter_source_errors_total", source="nvml", reason=reason) >= 1
            assert ex.series(m, "immich_gpu_info") == {}
            scenario.clear_fails().write()
            m = wait_for(lambda: (lambda m: m if up(m) == 1 else None)(scrape(e)), timeout=15, what="re-init")
            assert ex.value(m, "immich_gpu_process_memory_used_bytes", component="other") == 10
        assert e.proc is not None and e.proc.poll() is None


def test_daemon_library_installed_later_is_picked_up(fake_lib, scenario, tmp_path):
    """library_not_found is retried every nvml.retry-interval: drivers get installed later."""
    later = tmp_path / "driver-later"
    later.mkdir()
    scenario.compute(os.getpid(), 10).write()
    with Exporter(DAEMON, env=env_for(later, scenario)) as e:
        m = wait_for(lambda: (lambda m: m if ex.value(m, "immich_gpu_exporter_source_errors_total", source="nvml",
                                                        reason="library_not_found") else None)(scrape(e)))
        assert up(m) == 0
        shutil.copy(fake_lib / "libnvidia-ml.so.1", later / "libnvidia-ml.so.1")
        wait_for(lambda: up(scrape(e)) == 1, timeout=15, what="nvml up after the library appeared")


def test_daemon_no_new_samples_keep_the_last_value_and_gone_processes_disappear(fake_lib, scenario):
    first, second = os.getpid(), os.getppid()
    scenario.compute(first, 10).write()
    with Exporter([*DAEMON, "--gpu.pid-labels"], env=env_for(fake_lib, scenario)) as e:
        # the sample is taken once the exporter runs: one taken before its start may be older than the
        # window its first utilisation query asks for (a slow start on a loaded machine)
        scenario.sample(first, 0.05, 40).write()
        wait_for(lambda: ex.value(scrape(e), "immich_gpu_pid_sm_utilization_ratio", pid=str(first)) == 0.4)
        ts0 = ex.value(scrape(e), "immich_gpu_exporter_source_last_success_timestamp_seconds", source="nvml")
        # several cycles later the driver still says NotFound (nothing newer than the cursor)
        m = wait_for(lambda: (lambda m: m if ex.value(m, "immich_gpu_exporter_source_last_success_timestamp_seconds",
                                                      source="nvml") > ts0 + 0.5 else None)(scrape(e)))
        assert ex.value(m, "immich_gpu_pid_sm_utilization_ratio", pid=str(first)) == 0.4
        # the ML worker restarted after its idle timeout: new PID, the old one is gone
        scenario.lines.clear()
        scenario.compute(second, 20).write()
        m = wait_for(lambda: (lambda m: m if ex.value(m, "immich_gpu_pid_memory_used_bytes", pid=str(second))
                              else None)(scrape(e)))
        assert ex.value(m, "immich_gpu_pid_memory_used_bytes", pid=str(first)) is None
        assert ex.value(m, "immich_gpu_pid_sm_utilization_ratio", pid=str(first)) is None
        assert ex.value(m, "immich_gpu_process_memory_used_bytes", component="other") == 20


# --- the GPU smoke script's checker, against the fake -------------------------------------------------

def test_gpu_smoke_checker_passes_on_an_attributed_load_and_fails_on_a_missing_one(fake_lib, scenario):
    import subprocess
    import sys
    from tests.support.proc import ROOT
    with CgroupTree(f"igx-test-{uuid.uuid4().hex[:8]}") as cg:
        load = cg.spawn("system.slice/immich-machine-learning.service")
        scenario.compute(load, 512 * 2**20).sample(load, 0.2, 70, 30)
        scenario.write()
        r = run_cli(["--once", *ONLY_NVML, "--gpu.pid-labels"], env=env_for(fake_lib, scenario))

    def check(*args):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke_check.py"), *args],
                              input=r.stdout, capture_output=True, text=True)
    ok = check("--pid", str(load), "--unit", "immich-machine-learning.service", "--component", "ml",
               "--need-utilization")
    assert ok.returncode == 0, ok.stdout
    assert "FAIL" not in ok.stdout and ok.stdout.count("PASS") == 7
    bad = check("--pid", str(load), "--unit", "immich-server.service", "--component", "server")
    assert bad.returncode == 1 and "FAIL PID" in bad.stdout
    gone = check("--pid", "999999999")
    assert gone.returncode == 1 and "FAIL load PID 999999999" in gone.stdout


UNIT_PIDS_PROBE = r"""
import asyncio, json, sys
from types import MappingProxyType
from immich_gpu_exporter import config
from immich_gpu_exporter.core import Snapshot, SourceState
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.nvml import NvmlSource
facts = {"unit_pids": {"immich-server.service": tuple(json.loads(sys.argv[1])), "postgresql.service": (1,)}}
snap = Snapshot(1, MappingProxyType({"systemd": SourceState("systemd", up=True, facts=MappingProxyType(facts))}), {})
async def main():
    src = NvmlSource(config.load({}, None, {}), Hub(lambda: snap))
    r = await src.collect()
    await src.close()
    print(json.dumps({"samples": [[s.name, dict(s.labels), s.value] for s in r.samples],
                      "facts": {k: list(v) if isinstance(v, tuple) else v for k, v in r.facts.items()}}))
asyncio.run(main())
"""


def test_systemd_unit_pids_give_tuning_metrics_without_gpu_processes(fake_lib, scenario):
    """The server unit has no GPU process; its PIDs from the systemd source's facts still give
    immich_process_* for it. Non-Immich units are not reported. The facts are published."""
    import json
    import subprocess
    import sys
    from tests.support.proc import ROOT, exporter_env
    with CgroupTree(f"igx-test-{uuid.uuid4().hex[:8]}") as cg:
        a = cg.spawn("x", nice=3)
        b = cg.spawn("x", nice=5)
        ml = cg.spawn("system.slice/immich-machine-learning.service")
        scenario.compute(ml, 700).write()
        r = subprocess.run([sys.executable, "-c", UNIT_PIDS_PROBE, json.dumps([a, b])], capture_output=True,
                           text=True, env=exporter_env(env_for(fake_lib, scenario)), cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    nice = {(lab["component"], lab["unit"]): v for n, lab, v in out["samples"] if n == "immich_process_nice"}
    assert nice == {("server", "immich-server.service"): 3, ("ml", "immich-machine-learning.service"): 0}
    assert out["facts"] == {"component_gpu_memory": {"ml": 700, "server": 0}, "gpu_pids": [ml]}
