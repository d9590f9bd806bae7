"""The processes source: which processes are Immich's, their /proc facts, CPU counters that survive
worker churn and exporter restarts, and the ML CPU seconds by provider.

Pure parts with tables; the cgroup walk over directory trees shaped like cgroupfs; the source itself
in-process against real processes in real cgroups (tests/support/nvml.py's CgroupTree), with the
walk scoped to the test's own cgroup by `systemd.cgroup-root`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import time
import uuid
from types import MappingProxyType

import pytest

from immich_gpu_exporter import attribution as attr
from immich_gpu_exporter import config as configmod
from immich_gpu_exporter.core import CollectResult, Snapshot, SourceState
from immich_gpu_exporter.docker_api import ContainerInfo
from immich_gpu_exporter.metrics import check_sample
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.processes import CpuTotals, ProcessesSource, ProcView, ProviderCpu, identity_of, \
    process_samples, scan_owners, scan_roots
from tests.support.nvml import CgroupTree
from tests.support.proc import wait_for

ML_UNIT = "immich-machine-learning.service"
SERVER_UNIT = "immich-server.service"
CID = "c0ffee" + "0" * 58
CID2 = "b2" * 32
PATTERNS = {"ml": (ML_UNIT, "immich_machine_learning"), "server": (SERVER_UNIT, "immich_server")}
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


# --- identity (pure) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("what,cgroup,unit,containers,expected", [
    ("NixOS unit", f"0::/system.slice/system-immich.slice/{ML_UNIT}\n", None, {},
     attr.Identity("ml", ML_UNIT, "")),
    ("systemd's word for the unit wins", "0::/system.slice/x.service\n", SERVER_UNIT, {},
     attr.Identity("server", SERVER_UNIT, "")),
    ("compose container named by the engine", f"0::/system.slice/docker-{CID}.scope\n", None,
     {CID: ContainerInfo(CID, "photos-ml-1", "ghcr.io/immich-app/immich-machine-learning:release",
                         {"com.docker.compose.service": "immich-machine-learning"})},
     attr.Identity("ml", "", "photos-ml-1")),
    ("container without an API answer: short id, other", f"0::/system.slice/docker-{CID}.scope\n", None, {},
     attr.Identity("other", "", CID[:12])),
    ("Quadlet container in the ML unit keeps the unit", f"0::/system.slice/{ML_UNIT}/libpod-payload-{CID}\n", None,
     {CID: ContainerInfo(CID, "systemd-immich-ml", "localhost/mine:1")}, attr.Identity("ml", ML_UNIT, "systemd-immich-ml")),
    ("a stranger", "0::/user.slice/user-1000.slice/session-2.scope\n", None, {}, attr.Identity("other", "session-2.scope", "")),
])
def test_identity_from_placement_engine_and_systemd(what, cgroup, unit, containers, expected):
    assert identity_of(attr.locate(cgroup), PATTERNS, containers, unit) == expected


# --- ML CPU by provider (pure) -------------------------------------------------------------------------

def starts(table):
    return lambda ticks: table[ticks]


def test_provider_cpu_first_observation_is_a_baseline_then_counts_to_the_earlier_provider():
    p = ProviderCpu()
    at = {1: 10.0, 2: 50.0}  # start ticks -> seconds since boot (identity here)
    assert p.observe(100.0, {(10, 1): 500.0}, starts(at), CPU) == 0  # a day's CPU already spent: not counted
    assert p.totals == {CPU: 0.0}
    assert p.observe(105.0, {(10, 1): 512.0}, starts(at), CUDA) == 12.0
    assert p.totals == {CPU: 12.0, CUDA: 0.0}  # spent while CPU was in force
    assert p.observe(110.0, {(10, 1): 513.0}, starts(at), CUDA) == 1.0
    assert p.totals == {CPU: 12.0, CUDA: 1.0}


def test_provider_cpu_new_worker_counts_whole_a_late_known_one_from_zero():
    p = ProviderCpu()
    at = {1: 10.0, 2: 103.0, 3: 50.0}
    p.observe(100.0, {(10, 1): 5.0}, starts(at), CUDA)
    # the worker exited (its last 0.x s unseen), a new one booted at 103 s and spent 4 s; a process that
    # started at 50 s is only now known to be ML's (membership appeared late): from zero, never twice
    added = p.observe(105.0, {(11, 2): 4.0, (12, 3): 70.0}, starts(at), CUDA)
    assert added == 4.0
    assert p.observe(110.0, {(11, 2): 6.0, (12, 3): 71.0}, starts(at), CUDA) == 3.0


def test_provider_cpu_unknown_provider_is_the_empty_label():
    p = ProviderCpu()
    p.observe(1.0, {}, starts({}), None)
    assert [(s.labels, s.value) for s in p.samples()] == [((("provider", ""),), 0.0)]


def test_provider_cpu_restart_resumes_without_loss_or_double_count():
    at = {1: 10.0, 2: 150.0}
    before = ProviderCpu()
    before.boot_id = "boot-a"
    before.observe(100.0, {(10, 1): 5.0}, starts(at), CPU)
    before.observe(105.0, {(10, 1): 9.0}, starts(at), CPU)
    saved = json.loads(json.dumps(before.dump()))
    # the exporter was down from 105 s to 200 s: the old worker spent 20 s more, a new one started at 150 s
    after = ProviderCpu()
    after.load(saved, "boot-a")
    assert after.totals == {CPU: 4.0}
    assert after.observe(200.0, {(10, 1): 29.0, (20, 2): 7.0}, starts(at), CUDA) == 27.0
    assert after.totals == {CPU: 31.0, CUDA: 0.0}


def test_provider_cpu_after_a_reboot_every_process_is_new():
    at = {1: 10.0}
    before = ProviderCpu()
    before.observe(100.0, {(10, 1): 5.0}, starts(at), CPU)
    before.observe(4000.0, {(10, 1): 900.0}, starts(at), CPU)
    after = ProviderCpu()
    after.load(before.dump(), "boot-b")  # same (pid, start) key, different boot: another process
    assert after.observe(30.0, {(10, 1): 3.0}, starts(at), CPU) == 3.0
    assert after.totals == {CPU: 898.0}


# --- the cgroup walk --------------------------------------------------------------------------------------

def make_tree(root, dirs):
    for d in dirs:
        (root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)


def test_walk_finds_units_and_containers_and_skips_their_subtrees(tmp_path):
    make_tree(tmp_path, [
        f"/system.slice/system-immich.slice/{ML_UNIT}/worker/docker-{'d1' * 32}.scope",  # never entered
        f"/system.slice/{SERVER_UNIT}",
        "/system.slice/postgresql.service",
        f"/system.slice/docker-{CID}.scope/init.scope/docker-{'d2' * 32}.scope",  # never entered
        f"/docker/{CID2}",
        f"/system.slice/immich-ml.service/libpod-payload-{CID2}",
        f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container",
        f"/kubepods/burstable/pod{'8d3f2a6e-1b4c-4d7e-9f0a-2b3c4d5e6f70'}/{'ab' * 32}",
        "/lxc.payload/photos",
    ])
    found, visited = scan_owners(str(tmp_path), "", lambda u: u in (ML_UNIT, SERVER_UNIT))
    owners = sorted((p.unit, p.container_id[:4], p.owner_cgroup) for p in found)
    assert owners == sorted([
        (ML_UNIT, "", f"/system.slice/system-immich.slice/{ML_UNIT}"),
        (SERVER_UNIT, "", f"/system.slice/{SERVER_UNIT}"),
        ("", CID[:4], f"/system.slice/docker-{CID}.scope"),
        ("", CID2[:4], f"/docker/{CID2}"),
        ("immich-ml.service", CID2[:4], f"/system.slice/immich-ml.service/libpod-payload-{CID2}"),  # Quadlet
        ("", CID[:4], f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope"),
        ("", "abab", f"/kubepods/burstable/pod8d3f2a6e-1b4c-4d7e-9f0a-2b3c4d5e6f70/{'ab' * 32}"),
        ("", "phot", "/lxc.payload/photos"),
    ])
    assert visited > len(owners)


def test_walk_stops_at_its_limit(tmp_path):
    make_tree(tmp_path, [f"/s{i}.slice" for i in range(50)])
    _, visited = scan_owners(str(tmp_path), "", lambda u: True, limit=10)
    assert visited <= 11


def test_scan_roots_walk_the_systemd_tree_once_and_one_controller():
    mounts = {"": "/sys/fs/cgroup/unified", "name=systemd": "/sys/fs/cgroup/systemd", "memory": "/m", "pids": "/p",
              "cpu,cpuacct": "/c"}
    assert scan_roots(mounts) == [("", "/sys/fs/cgroup/unified"), ("pids", "/p")]  # hybrid
    del mounts[""]
    assert scan_roots(mounts) == [("name=systemd", "/sys/fs/cgroup/systemd"), ("pids", "/p")]  # v1
    assert scan_roots({"": "/sys/fs/cgroup"}) == [("", "/sys/fs/cgroup")]  # unified


# --- the source in-process against real cgroups ------------------------------------------------------------

class Facts:
    """Other sources' facts, as the hub would show them."""

    def __init__(self, **by_source) -> None:
        self.by_source = by_source

    def snapshot(self) -> Snapshot:
        states = {n: SourceState(n, up=True, facts=MappingProxyType(f)) for n, f in self.by_source.items()}
        return Snapshot(1, MappingProxyType(states), MappingProxyType({}))


def make_source(cg: CgroupTree, tmp_path, facts: Facts | None = None, daemon: bool = True, **cfg) -> ProcessesSource:
    values = dict(systemd_cgroup_root=str(cg.top), state_directory=str(tmp_path / "state"),
                  docker_socket=str(tmp_path / "no-docker.sock"))
    values.update(cfg)
    src = ProcessesSource(configmod.defaults().replace(**values), Hub((facts or Facts()).snapshot))
    if daemon:  # as the daemon does before start(); --once does not
        src.bind_wake(asyncio.Event())
    return src


def collect(src: ProcessesSource) -> CollectResult:
    async def go() -> CollectResult:
        return await asyncio.wait_for(src.collect(), 10)
    r = asyncio.run(go())
    for s in r.samples:
        check_sample(s)
    return r


def series(r: CollectResult, name: str) -> dict[tuple, float]:
    return {tuple(v for _, v in s.labels): s.value for s in r.samples if s.name == name}


@pytest.fixture
def cg():
    with CgroupTree(f"igx-test-{uuid.uuid4().hex[:8]}") as tree:
        yield tree


def test_units_come_from_systemd_facts_or_from_the_walk(cg, tmp_path):
    a = cg.spawn("x", nice=3)
    b = cg.spawn("x", nice=5)
    ml = cg.spawn(f"system.slice/{ML_UNIT}", nice=-5, memlock=64 * 1024)
    # systemd says the server unit is a and b (their cgroup has no unit name); the ML unit is found by the walk
    src = make_source(cg, tmp_path, Facts(systemd={"unit_pids": {SERVER_UNIT: (a, b), "postgresql.service": (1,)}}))
    asyncio.run(src.start())
    r = collect(src)
    nice = series(r, "immich_process_nice")
    assert nice == {("server", "", SERVER_UNIT): 3, ("ml", "", ML_UNIT): -5}  # labels: component, container, unit
    assert series(r, "immich_process_memlock_limit_bytes")[("ml", "", ML_UNIT)] == 64 * 1024
    assert all(v > 0 for v in series(r, "immich_process_resident_memory_bytes").values())
    assert set(series(r, "immich_process_cpu_seconds_total")) == set(nice)
    assert r.facts["identities"] == {a: attr.Identity("server", SERVER_UNIT, ""), b: attr.Identity("server", SERVER_UNIT, ""),
                                     ml: attr.Identity("ml", ML_UNIT, "")}
    assert r.facts["comms"][ml] == "sleep"
    assert series(r, "immich_ml_cpu_seconds_total") == {("",): 0.0}


def test_worker_churn_leaves_no_dead_pids_and_no_counter_reset(cg, tmp_path):
    """A gunicorn-like arbiter whose workers burn CPU and exit again and again."""
    script = tmp_path / "arbiter.py"
    script.write_text(
        "import os, time\n"
        "while True:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        end = time.monotonic() + 0.3\n"
        "        while time.monotonic() < end: pass\n"
        "        os._exit(0)\n"
        "    os.waitpid(pid, 0)\n"
        "    time.sleep(0.05)\n")
    arbiter = cg.spawn(f"system.slice/{ML_UNIT}", [sys.executable, str(script)])
    src = make_source(cg, tmp_path, Facts(journal={"effective_provider": CPU}))
    asyncio.run(src.start())
    cpu_before, ml_before, workers = 0.0, 0.0, set()
    deadline = time.monotonic() + 30
    while len(workers) < 4 and time.monotonic() < deadline:
        r = collect(src)
        live = set(r.facts["identities"])
        assert arbiter in live
        workers |= live - {arbiter}
        for pid in live:  # every PID in the fact was alive when read (none of a dead worker lingers)
            assert pid in (arbiter, *workers)
        cpu = series(r, "immich_process_cpu_seconds_total")[("ml", "", ML_UNIT)]
        ml = series(r, "immich_ml_cpu_seconds_total").get((CPU,), 0.0)
        assert cpu >= cpu_before and ml >= ml_before, (cpu, cpu_before, ml, ml_before)
        cpu_before, ml_before = cpu, ml
        time.sleep(0.15)
    assert len(workers) >= 4, "the arbiter's workers were never seen"
    os.kill(arbiter, signal.SIGSTOP)  # no more churn: what is left is the arbiter alone
    try:
        # the worker that was running finishes its 0.3 s and exits; the stopped arbiter cannot fork another
        r = wait_for(lambda: (rr := collect(src)) and set(rr.facts["identities"]) == {arbiter} and rr, 10,
                     what="only the arbiter left")
        total = series(r, "immich_process_cpu_seconds_total")[("ml", "", ML_UNIT)]
        assert total >= cpu_before
        # the truth: the arbiter's own CPU, that of the children it reaped (cutime, cstime) and that of
        # the last worker, a zombie the stopped arbiter cannot reap
        def ticks(pid: int, upto: int) -> int:
            with open(f"/proc/{pid}/stat") as f:
                return sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:upto])
        with open(f"/proc/{arbiter}/task/{arbiter}/children") as f:
            zombies = [int(x) for x in f.read().split()]
        truth = (ticks(arbiter, 15) + sum(ticks(z, 13) for z in zombies)) / os.sysconf("SC_CLK_TCK")
        # nothing counted twice (one tick of slack per worker for the tick rounding); the workers' CPU
        # went to the provider in force (what a worker spends after the last cycle before it exits is unseen)
        assert 0 < ml_before <= total <= truth + 0.01 * len(workers), (ml_before, total, truth)
    finally:
        os.kill(arbiter, signal.SIGCONT)


def test_ml_cpu_counter_survives_an_exporter_restart(cg, tmp_path):
    """Everything the ML process spends after the first baseline is counted once: before the
    restart, while the exporter is stopped, and after."""
    burner = cg.spawn(f"system.slice/{ML_UNIT}", [sys.executable, "-c", "import time\nwhile True:\n"
                                                  "    e = time.monotonic() + 0.05\n"
                                                  "    while time.monotonic() < e: pass\n    time.sleep(0.05)\n"])
    facts = Facts(journal={"effective_provider": CUDA})

    def cpu() -> float:
        return attr.ProcessTable().lookup(burner).cpu_seconds

    def ml_seconds(r):
        return series(r, "immich_ml_cpu_seconds_total").get((CUDA,), 0.0)

    first = make_source(cg, tmp_path, facts)
    asyncio.run(first.start())
    c0_low = cpu()
    collect(first)  # the baseline
    c0_high = cpu()
    wait_for(lambda: cpu() > c0_high + 0.3, 20, what="CPU spent")
    assert ml_seconds(collect(first)) > 0
    asyncio.run(first.close())
    stopped = cpu()
    wait_for(lambda: cpu() > stopped + 0.3, 20, what="CPU spent while the exporter is stopped")
    second = make_source(cg, tmp_path, facts)
    asyncio.run(second.start())
    c1_low = cpu()
    r = collect(second)
    c1_high = cpu()
    assert c1_low - c0_high <= ml_seconds(r) <= c1_high - c0_low
    with open(tmp_path / "state" / "processes-state.json") as f:
        assert json.load(f)["version"] == 1


def test_unwritable_state_directory_is_a_warning_not_a_failure(cg, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cg.spawn(f"system.slice/{ML_UNIT}")
    src = make_source(cg, tmp_path, state_directory=str(blocker / "sub"))
    asyncio.run(src.start())
    r = collect(src)
    assert series(r, "immich_process_nice")
    assert "not writable" in caplog.text


def test_cpu_totals_never_go_down_by_float_rounding():
    who = attr.Identity("ml", ML_UNIT, "")
    totals = CpuTotals()
    view = lambda pid, cpu: ProcView(pid, "python", who, 0, None, 1, cpu, start=pid)  # noqa: E731
    first = totals.update({who: [view(1, 0.1), view(2, 0.2), view(3, 0.3)]})[who]  # 0.6000000000000001
    assert (0.1 + (0.2 + 0.3)) < first  # the carried-forward sum in the other order is an ulp lower
    assert totals.update({who: [view(2, 0.2), view(3, 0.3)]})[who] >= first


def test_a_single_pass_reads_the_state_but_never_writes_it(cg, tmp_path):
    cg.spawn(f"system.slice/{ML_UNIT}")
    once = make_source(cg, tmp_path, daemon=False)
    asyncio.run(once.start())
    collect(once)
    asyncio.run(once.close())
    assert not (tmp_path / "state").exists()


# --- grouping and the CPU counter (pure) ------------------------------------------------------------

MLW = attr.Identity("ml", ML_UNIT, "")
SRVW = attr.Identity("server", SERVER_UNIT, "")

def test_process_samples_lowest_nice_and_memlock_summed_rss_and_cpu():
    out = process_samples({MLW: [ProcView(1, "gunicorn", MLW, 0, math.inf, 100, 1.5),
                                ProcView(2, "python", MLW, -10, 65536, 300, 2.0)],
                           SRVW: [ProcView(3, "node", SRVW, None)]})  # gone: no series
    for x in out:
        check_sample(x)
    vals = {x.name: x.value for x in out}
    assert vals == {"immich_process_nice": -10, "immich_process_memlock_limit_bytes": 65536,
                    "immich_process_resident_memory_bytes": 400, "immich_process_cpu_seconds_total": 3.5}



def test_cpu_counter_survives_worker_exits_and_membership_flicker():

    totals = CpuTotals()
    arbiter = ProcView(1, "gunicorn", MLW, 0, None, 100, 10.0, start=5)
    worker = lambda cpu, pid=2, start=7: ProcView(pid, "python", MLW, -10, None, 300, cpu, start=start)  # noqa: E731
    seen = [totals.update({MLW: [arbiter, worker(100.0)]})[MLW]]
    seen.append(totals.update({MLW: [arbiter, worker(150.0)]})[MLW])
    # idle shutdown: the worker is gone, a new one (new PID) has used little CPU so far
    seen.append(totals.update({MLW: [arbiter, worker(1.0, pid=3, start=900)]})[MLW])
    # the systemd source missed a cycle: only the GPU-less arbiter is a member for one cycle...
    seen.append(totals.update({MLW: [arbiter]})[MLW])
    # ...and the new worker is back, with its own CPU grown a bit: not counted twice
    seen.append(totals.update({MLW: [arbiter, worker(3.0, pid=3, start=900)]})[MLW])
    # PID 3 reused by another process (another start time): a new process, the old one is carried
    seen.append(totals.update({MLW: [arbiter, worker(0.5, pid=3, start=5000)]})[MLW])
    assert seen == [110.0, 160.0, 161.0, 161.0, 163.0, 163.5]
    assert all(b >= a for a, b in zip(seen, seen[1:]))
    # the whole group away for a cycle: no series, and it continues where it was
    assert MLW not in totals.update({})
    assert totals.update({MLW: [arbiter]})[MLW] == 163.5
