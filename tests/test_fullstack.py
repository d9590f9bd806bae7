"""The whole stack at once: the real exporter daemon with all four sources against real peers, proving
the seams between sources (facts passed through the daemon's hub) in the real process.

Peers: a real systemd in namespaces (tests/support/nested_systemd.py) running a fake Immich ML unit (a
gunicorn-like arbiter that forks a worker and logs Immich's real lines in Rich's format through the
real journald) and a fake Immich server unit; the gcc-built fake libnvidia-ml.so.1 scripted with the
HOST PIDs found in the ML unit's cgroup; the fake Immich API (tests/support/fake_immich.py) with a
smartSearch backlog draining.

Seams checked on /metrics:
- systemd -> nvml: the unit's PIDs (facts `unit_pids`) make `immich_process_*` cover the whole unit,
  the gunicorn arbiter without GPU memory included, also once no process of it is on the GPU;
- nvml -> journal: the ML component's GPU memory (facts `component_gpu_memory`) drives the CPU-fallback
  cross-check: memory present keeps `immich_ml_cpu_fallback` 0, none for the grace makes it 1;
- journal -> immich: the effective provider (facts `effective_provider`) labels the smartSearch
  job-seconds: CUDA while CUDA is effective, CPU after the fallback.
"""

from __future__ import annotations

import math
import resource
import time

import psutil
import pytest

from tests.support.exposition import parse, value
from tests.support.fake_immich import FakeImmich, Key, QueueSim
from tests.support.nested_systemd import NestedSystemd, nested_systemd  # noqa: F401  (registers the fixture)
from tests.support.nvml import Gpu, Scenario, build_fake_nvml, env_for
from tests.support.proc import Exporter, wait_for

pytestmark = pytest.mark.integration

ML_UNIT = "immich-machine-learning.service"
SERVER_UNIT = "immich-server.service"
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
KEY = "fullstack-key-5b1f0c7e9a"
ML_BYTES = 1536 * 2**20
SERVER_BYTES = 64 * 2**20
GRACE = 1.0
DEADLINE = 20.0  # a deadline for slow machines, never a speed assertion

# Immich ML as nixpkgs runs it (gunicorn started directly): the arbiter logs its start, forks a
# worker; the worker logs gunicorn's "Booting worker", uvicorn's startup and, on the first request,
# the model load and the provider list. Rich's layout off a terminal: "[%x %X] LEVEL    msg", 80
# columns, long messages word-wrapped onto continuation lines indented by 29 spaces (each a journal
# entry of its own). stdout goes to journald.
FAKE_ML = r'''
import os, textwrap, time

def log(level, msg):
    prefix = time.strftime("[%x %X] ") + level.ljust(8) + " "
    lines = textwrap.wrap(msg, 80 - len(prefix), break_long_words=False, break_on_hyphens=False)
    print("\n".join([prefix + lines[0]] + [" " * len(prefix) + line for line in lines[1:]]), flush=True)

log("INFO", "Starting gunicorn 23.0.0")
log("INFO", "Listening at: http://[::]:3003 (%d)" % os.getpid())
log("INFO", "Using worker: immich_ml.config.CustomUvicornWorker")
if os.fork() == 0:
    log("INFO", "Booting worker with pid: %d" % os.getpid())
    log("INFO", "Started server process [%d]" % os.getpid())
    log("INFO", "Waiting for application startup.")
    log("INFO", "Created in-memory cache with unloading after 300s of inactivity.")
    log("INFO", "Initialized request thread pool with 2 threads.")
    log("INFO", "Application startup complete.")
    log("INFO", "Loading visual model 'ViT-B-32__openai' to memory")
    log("INFO", "Setting execution providers to ['CUDAExecutionProvider', 'CPUExecutionProvider'], "
                "in descending order of preference")
while True:
    time.sleep(60)
'''

ML_UNIT_FILE = """[Unit]
Description=Immich machine learning (fake)
[Service]
ExecStart=/usr/bin/python3 -u {script}
Nice=-10
LimitMEMLOCK=infinity
"""

NEST_LINE = "[Nest] $$  - 07/30/2026, 12:00:00 PM     LOG [Api:Bootstrap] Immich Server is listening"
SERVER_UNIT_FILE = f"""[Unit]
Description=Immich server (fake)
[Service]
ExecStart=/bin/sh -c 'echo "{NEST_LINE}"; exec sleep 1000'
"""


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory: pytest.TempPathFactory):
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))


def has_cap_sys_resource() -> bool:
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE is capability 24
    return False


def ml_pids(ns: NestedSystemd) -> tuple[int, int]:
    """(arbiter, worker) host PIDs: the arbiter is the unit's MainPID, the worker the other process
    in the unit's cgroup.procs."""
    def both() -> tuple[int, int] | None:
        pids = ns.unit_host_pids(ML_UNIT)
        main = ns.host_pid(int(ns.unit_property(ML_UNIT, "MainPID")))
        others = [p for p in pids if p != main]
        return (main, others[0]) if main in pids and len(pids) == 2 else None
    return wait_for(both, DEADLINE, what="the ML unit's arbiter and worker")


def script_gpu(scen: Scenario, holders: dict[int, int]) -> None:
    scen.lines.clear()
    for pid, mem in holders.items():
        scen.compute(pid, mem)
    scen.gpus = [Gpu(used=sum(holders.values()) + 300 * 2**20)]
    scen.write()


def rss(pids: tuple[int, ...]) -> int:
    return sum(psutil.Process(p).memory_info().rss for p in pids)


@pytest.mark.parametrize("exporter_first", [False, True], ids=["units-then-exporter", "exporter-then-units"])
def test_all_four_sources_pass_facts_through_the_hub(nested_systemd: NestedSystemd, fake_lib, tmp_path,
                                                     exporter_first: bool) -> None:
    ns = nested_systemd
    script = ns.base / "fake_immich_ml.py"
    script.write_text(FAKE_ML)
    ns.add_unit(ML_UNIT, ML_UNIT_FILE.format(script=script), reload=False)
    ns.add_unit(SERVER_UNIT, SERVER_UNIT_FILE)
    scen = Scenario(tmp_path / "nvml-scenario.txt")
    script_gpu(scen, {})

    t0 = time.monotonic()
    smart = QueueSim("smartSearch", concurrency=2, job_seconds=0.5, arrivals=[t0] * 400)
    fake = FakeImmich(queues=[smart], keys={KEY: Key()})  # ports are chosen here, started below
    driver_file = tmp_path / "proc-driver-nvidia-version"
    driver_file.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04 (fake NVML's host)\n")
    exporter = Exporter([
        f"--systemd.unit={ML_UNIT}", f"--systemd.unit={SERVER_UNIT}", f"--systemd.cgroup-root={ns.cgroup}",
        "--systemd.interval=1",
        f"--journal.directory={ns.journal_dir}", f"--state.directory={tmp_path / 'state'}",
        f"--journal.fallback-grace={GRACE:g}", "--collection.interval=0.3",
        f"--journal.nvidia-driver-path={driver_file}",  # the fake NVML's host has the NVIDIA driver loaded
        "--nvml.interval=0.3",
        f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}", "--immich.interval=0.3", "--immich.timeout=1",
        "--log.level=debug",
    ], env={"DBUS_SYSTEM_BUS_ADDRESS": ns.bus_address, "IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY,
            **env_for(fake_lib, scen)}, log_path=tmp_path / "exporter.log")

    def metrics() -> dict:
        return parse(exporter.metrics())

    def why(m: dict | None = None) -> str:
        m = m if m is not None else metrics()
        picked = {k: v for k, v in m.items() if k[0].startswith(("immich_ml_", "immich_process_", "immich_unit_n",
                                                                  "immich_gpu_process_memory", "immich_queue_active",
                                                                  "immich_gpu_exporter_source_up"))}
        return "\n".join(f"{n}{dict(lab)} {v}" for (n, lab), v in sorted(picked.items(), key=str)) + \
            "\n--- exporter log tail ---\n" + exporter.logs()[-3000:]

    def until(pred, what: str):  # type: ignore[no-untyped-def]
        try:
            return wait_for(pred, DEADLINE, what=what)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{why() if exporter.proc else ''}") from None

    try:
        fake.start()
        if exporter_first:
            exporter.start()
            wait_for(lambda: value(metrics(), "immich_unit_state", unit=ML_UNIT, state="inactive") == 1,
                     DEADLINE, what="the ML unit seen inactive")
        ns.start_unit(SERVER_UNIT)
        ns.start_unit(ML_UNIT)
        arbiter, worker = ml_pids(ns)
        (server,) = wait_for(lambda: ns.unit_host_pids(SERVER_UNIT), DEADLINE, what="the server unit's process")
        script_gpu(scen, {worker: ML_BYTES, server: SERVER_BYTES})
        if not exporter_first:
            exporter.start()

        # -- 1. attribution; systemd's PIDs make the tuning cover the arbiter (no GPU memory) too ---------
        def attributed() -> dict | None:
            m = metrics()
            got = value(m, "immich_process_resident_memory_bytes", component="ml", unit=ML_UNIT)
            # /proc/<pid>/stat (ours) and statm (psutil's) read the kernel's per-CPU RSS counters apart by a few
            # pages; arbiter and worker are about the same size, so 10% still tells "both" from "worker only"
            both = rss((arbiter, worker))
            ok = value(m, "immich_gpu_process_memory_used_bytes", component="ml", unit=ML_UNIT) == ML_BYTES \
                and got is not None and abs(got - both) <= 0.1 * both and rss((worker,)) < 0.8 * both
            return m if ok else None
        m = until(attributed, "ML GPU memory and both ML processes attributed")
        assert value(m, "immich_gpu_processes", component="ml", unit=ML_UNIT) == 1, why(m)  # only the worker
        assert value(m, "immich_gpu_process_memory_used_bytes", component="server", unit=SERVER_UNIT) \
            == SERVER_BYTES, why(m)
        assert value(m, "immich_process_nice", component="ml", unit=ML_UNIT) == -10, why(m)
        # a fork changes no unit property (no D-Bus signal): the count follows at the next safety-net poll
        m = until(lambda: (mm := metrics()) and value(mm, "immich_unit_processes", unit=ML_UNIT) == 2 and mm,
                  "both ML processes counted in the unit")

        # -- 2. configured vs applied tuning on one /metrics ---------------------------------------------------
        assert value(m, "immich_unit_nice", unit=ML_UNIT) == -10, why(m)
        assert value(m, "immich_unit_memlock_limit_bytes", unit=ML_UNIT) == math.inf, why(m)
        applied = float(resource.prlimit(arbiter, resource.RLIMIT_MEMLOCK)[0])  # independent of /proc/<pid>/limits
        applied = math.inf if applied == resource.RLIM_INFINITY else applied
        assert value(m, "immich_process_memlock_limit_bytes", component="ml", unit=ML_UNIT) == applied, why(m)
        if not has_cap_sys_resource():  # systemd cannot raise the hard limit: infinity is not applied
            assert applied == resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] < math.inf

        # -- 3. the provider line through the real journald; NVML's ML memory keeps the fallback off --------
        m = until(lambda: (mm := metrics()) and value(mm, "immich_ml_preferred_execution_provider",
                                                      provider=CUDA) == 1 and mm, "the provider line from journald")
        assert value(m, "immich_ml_execution_provider", provider=CUDA) == 1, why(m)
        assert value(m, "immich_ml_model_loaded", model_type="visual", model_name="ViT-B-32__openai") == 1, why(m)

        # -- 5a. the journal's provider labels the ML queue's job-seconds ---------------------------------------
        # Waiting for CUDA job-seconds worth more than the grace (2 jobs active at all times) also lets the
        # journal cross-check NVML's ML memory for longer than the grace: the fallback must stay off.
        def cuda_seconds(mm: dict) -> float:
            return value(mm, "immich_queue_active_job_seconds_total", queue="smartSearch", provider=CUDA) or 0.0
        m = until(lambda: (mm := metrics()) and cuda_seconds(mm) > 2 * 2 * GRACE and mm,
                  "smartSearch job-seconds under CUDA")
        assert value(m, "immich_ml_cpu_fallback") == 0, why(m)
        assert value(m, "immich_ml_provider_errors_total", provider=CUDA, kind="no_gpu_memory") == 0, why(m)
        assert value(m, "immich_gpu_process_memory_used_bytes", component="ml", unit=ML_UNIT) == ML_BYTES, why(m)
        assert value(m, "immich_queue_active_job_seconds_total", queue="smartSearch", provider=CPU) is None, why(m)

        # -- 4. the ML unit leaves the GPU: after the grace, the journal source reports the CPU fallback --------
        script_gpu(scen, {server: SERVER_BYTES})
        m = until(lambda: (mm := metrics()) and value(mm, "immich_ml_cpu_fallback") == 1 and mm,
                  "the CPU fallback from NVML's empty ML memory")
        assert value(m, "immich_gpu_process_memory_used_bytes", component="ml", unit=ML_UNIT) is None, why(m)
        assert value(m, "immich_ml_provider_errors_total", provider=CUDA, kind="no_gpu_memory") == 1, why(m)
        assert value(m, "immich_ml_execution_provider", provider=CPU) == 1, why(m)
        assert value(m, "immich_ml_preferred_execution_provider", provider=CUDA) == 1, why(m)
        # no ML process on the GPU any more, yet the unit's processes still carry their tuning
        assert value(m, "immich_process_nice", component="ml", unit=ML_UNIT) == -10, why(m)
        assert value(m, "immich_process_memlock_limit_bytes", component="ml", unit=ML_UNIT) == applied, why(m)

        # -- 5b. after the fallback new job-seconds land under CPU; CUDA's counter stops -------------------------
        def cpu_seconds(mm: dict) -> float | None:
            return value(mm, "immich_queue_active_job_seconds_total", queue="smartSearch", provider=CPU)
        m = until(lambda: (mm := metrics()) and cpu_seconds(mm) is not None and mm, "a smartSearch series under CPU")
        cuda_frozen, cpu_first = cuda_seconds(m), cpu_seconds(m)
        m = until(lambda: (mm := metrics()) and cpu_seconds(mm) > cpu_first + 1.0 and mm,
                  "smartSearch job-seconds growing under CPU")
        assert cuda_seconds(m) == cuda_frozen, why(m)
        assert smart.counts(time.monotonic())["active"] == 2  # the backlog never ran dry: time went to CPU
        for source in ("nvml", "systemd", "journal", "immich"):
            assert value(m, "immich_gpu_exporter_source_up", source=source) == 1, why(m)
    finally:
        exporter.stop()
        fake.stop()
