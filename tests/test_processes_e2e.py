"""immich_process_* do not depend on NVML: the real exporter (`--once`) with NVML absent (no
library), disabled (--no-collector.nvml) and working (the gcc-built fake libnvidia-ml.so.1 with the
ML worker on the GPU) publishes the same series for

- the ML unit of a real systemd in namespaces (tests/support/nested_systemd.py): a gunicorn-like
  arbiter that forks a worker, Nice=-10, LimitMEMLOCK=infinity; its PIDs from the systemd source,
  or, with the systemd collector off, from the processes source's own walk of the cgroup tree;
- a container's processes in a real cgroup (`docker-<id>.scope`), named and placed by the Docker
  API (a real aiohttp server on a unix socket answering with the compose labels).
"""

from __future__ import annotations

import uuid

import pytest

from tests.support import exposition as ex
from tests.support.nested_systemd import NestedSystemd, nested_systemd  # noqa: F401  (registers the fixture)
from tests.support.nvml import CgroupTree, Scenario, build_fake_nvml, env_for
from tests.support.proc import run_cli, wait_for
from tests.test_nvml_e2e import ThreadedServer
from tests.test_docker_api import COMPOSE_ML, ID as CID

pytestmark = pytest.mark.integration

ML_UNIT = "immich-machine-learning.service"
PROCESS_SERIES = ("immich_process_nice", "immich_process_memlock_limit_bytes", "immich_process_resident_memory_bytes",
                  "immich_process_cpu_seconds_total")
MODES = ("absent", "disabled", "working")
OTHERS = ["--no-collector.journal", "--no-collector.immich"]

# gunicorn as nixpkgs runs it, reduced to what matters here: the arbiter forks one worker.
FORKING_ML = "import os, time\nif os.fork() == 0:\n    time.sleep(1000)\nelse:\n    time.sleep(1000)\n"


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory):
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))


def once(mode: str, lib, scen: Scenario, args: list[str], env: dict[str, str]) -> dict:
    scen.write()
    extra = ["--no-collector.nvml"] if mode == "disabled" else []
    r = run_cli(["--once", *OTHERS, *extra, *args],
                env={**env, **env_for(lib if mode == "working" else None, scen)})
    assert r.returncode == 0, r.stderr
    m = ex.parse(r.stdout)
    nvml_up = ex.value(m, "immich_gpu_exporter_source_up", source="nvml")
    assert nvml_up == {"absent": 0, "disabled": None, "working": 1}[mode], r.stderr
    assert ex.value(m, "immich_gpu_exporter_source_up", source="processes") == 1, r.stderr
    return m


def process_view(m: dict) -> dict:
    """The immich_process_* series by labels; the values that cannot move between runs (nice, memlock)."""
    return {(name, lab): (m[(name, lab)] if name in PROCESS_SERIES[:2] else None)
            for (name, lab) in m if name in PROCESS_SERIES}


def test_ml_unit_gets_every_process_series_with_nvml_absent_disabled_or_working(nested_systemd: NestedSystemd,
                                                                                fake_lib, tmp_path):
    ns = nested_systemd
    script = ns.base / "forking_ml.py"
    script.write_text(FORKING_ML)
    ns.add_unit(ML_UNIT, f"[Service]\nExecStart=/usr/bin/python3 {script}\nNice=-10\nLimitMEMLOCK=infinity\n")
    ns.start_unit(ML_UNIT)
    pids = wait_for(lambda: (p := ns.unit_host_pids(ML_UNIT)) and len(p) == 2 and p, 20, what="arbiter and worker")
    worker = max(pids)
    scen = Scenario(tmp_path / "scenario.txt").compute(worker, 900 * 2**20).sample(worker, 0.2, 55)
    base = [f"--systemd.unit={ML_UNIT}", f"--systemd.cgroup-root={ns.cgroup}",
            f"--state.directory={tmp_path / 'state'}"]
    env = {"DBUS_SYSTEM_BUS_ADDRESS": ns.bus_address}
    lab = {"component": "ml", "unit": ML_UNIT, "container": ""}

    views = {}
    for mode in MODES:
        m = once(mode, fake_lib, scen, base, env)
        for name in PROCESS_SERIES:
            assert ex.value(m, name, **lab) is not None, (mode, name)
        assert ex.value(m, "immich_process_nice", **lab) == -10, mode
        # both processes: the arbiter has no GPU memory, it is there through the unit's PIDs
        assert ex.value(m, "immich_process_resident_memory_bytes", **lab) > 2 * 4 * 2**20, mode
        if mode == "working":
            assert ex.value(m, "immich_gpu_process_memory_used_bytes", **lab) == 900 * 2**20
            assert ex.value(m, "immich_gpu_processes", **lab) == 1
        else:
            assert ex.series(m, "immich_gpu_processes") == {}
        views[mode] = process_view(m)
    assert views["absent"] == views["disabled"] == views["working"]

    # without the systemd collector the processes source finds the unit by walking the cgroup tree
    m = once("absent", fake_lib, scen, ["--no-collector.systemd", *base[1:]], env)
    assert process_view(m) == views["absent"]


def test_container_gets_every_process_series_under_its_name_with_nvml_absent_disabled_or_working(
        fake_lib, tmp_path):
    sock = tmp_path / "docker.sock"
    with CgroupTree(f"igx-test-{uuid.uuid4().hex[:8]}") as cg, \
            ThreadedServer(_docker_app(), unix=str(sock)):
        scope = f"system.slice/docker-{CID}.scope"
        cg.spawn(scope, nice=0, memlock=64 * 1024)  # the container's init
        worker = cg.spawn(scope + "/worker", nice=-5)  # a child cgroup of the container
        cg.spawn("system.slice/docker-" + "ee" * 32 + ".scope")  # a stranger's container: not Immich
        scen = Scenario(tmp_path / "scenario.txt").compute(worker, 700 * 2**20)
        args = ["--no-collector.systemd", f"--systemd.cgroup-root={cg.top}", f"--docker.socket={sock}",
                f"--state.directory={tmp_path / 'state'}"]
        lab = {"component": "ml", "unit": "", "container": "immich_machine_learning"}
        views = {}
        for mode in MODES:
            m = once(mode, fake_lib, scen, args, {})
            for name in PROCESS_SERIES:
                assert ex.value(m, name, **lab) is not None, (mode, name)
            assert ex.value(m, "immich_process_nice", **lab) == -5
            assert ex.value(m, "immich_process_memlock_limit_bytes", **lab) == 64 * 1024
            assert {dict(k)["container"] for k in ex.series(m, "immich_process_nice")} == {"immich_machine_learning"}
            if mode == "working":
                assert ex.value(m, "immich_gpu_process_memory_used_bytes", **lab, gpu="0") == 700 * 2**20
            views[mode] = process_view(m)
    assert views["absent"] == views["disabled"] == views["working"]


def _docker_app():
    from aiohttp import web

    async def inspect(request: web.Request) -> web.Response:
        if request.match_info["id"] == CID:
            return web.json_response(COMPOSE_ML)
        cid = request.match_info["id"]
        return web.json_response({"Id": cid, "Name": "/frigate",
                                  "Config": {"Image": "ghcr.io/blakeblackshear/frigate:stable", "Labels": {}}})
    app = web.Application()
    app.router.add_get("/containers/{id}/json", inspect)
    return app
