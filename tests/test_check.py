"""`immich-gpu-exporter check`: every check reaches each of its outcomes against real artefacts.

Artefacts: the gcc-built fake libnvidia-ml.so.1, units in a real nested systemd (with and without
tuning, device access, environment), real journal files made by systemd-journal-remote, the fake
Immich API on loopback, and a host root of real files (`--root`) for /proc/modules, /dev, CDI specs
and Docker's daemon.json. `check` runs as a subprocess, as an operator runs it; its JSON is parsed.
Golden files: tests/golden/check-bare.{txt,json} (regenerate with UPDATE_GOLDEN=1, review the diff).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import time

import pytest

from immich_gpu_exporter import check as chk
from tests.support import journal as jr
from tests.support.fake_immich import FakeImmich, Key
from tests.support.nested_systemd import NestedSystemd, nested_systemd  # noqa: F401  (registers the fixture)
from tests.support.nvml import Gpu, Scenario, build_fake_nvml, env_for
from tests.support.proc import free_port, run_cli, wait_for

GOLDEN = pathlib.Path(__file__).parent / "golden"
ML_UNIT = "immich-machine-learning.service"
SERVER_UNIT = "immich-server.service"
KEY = "check-key-6c1d2e"
DEADLINE = 20.0
CHECK_IDS = ["role", "driver", "modules", "devices", "container_gpu", "services", "provider", "gpu_memory",
             "ml_features", "transcode", "tuning", "environment", "docker_ml", "latency_telemetry"]


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def bare_args(tmp: pathlib.Path) -> list[str]:
    """Every source pointed at nothing: an empty host root, an empty journal, no Immich."""
    (tmp / "root").mkdir(exist_ok=True)
    (tmp / "journal").mkdir(exist_ok=True)
    (tmp / "cgroup").mkdir(exist_ok=True)  # an empty cgroup tree: the processes source finds no Immich
    return [f"--root={tmp / 'root'}", f"--journal.directory={tmp / 'journal'}", f"--immich.url={closed_url()}",
            f"--systemd.cgroup-root={tmp / 'cgroup'}", f"--docker.socket={tmp / 'no-docker.sock'}",
            f"--immich.ml-url={closed_url()}", "--immich.timeout=0.5"]


BARE_ENV = {"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/bus"}


def check(args: list[str], env: dict[str, str] | None = None) -> tuple[int, dict[str, dict], str]:
    r = run_cli(["check", "--json", *args], env={**BARE_ENV, **(env or {})}, timeout=90)
    assert r.returncode in (0, 1), f"rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    doc = json.loads(r.stdout)
    assert doc["format"] == 1 and doc["exit_code"] == r.returncode
    by_id = {c["id"]: c for c in doc["checks"]}
    assert list(by_id) == CHECK_IDS, r.stdout
    return r.returncode, by_id, r.stderr


def statuses(by_id: dict[str, dict]) -> dict[str, str]:
    return {k: v["status"] for k, v in by_id.items()}


# --------------------------------------------------------------------------------------------------
# a bare machine: runs to the end, every SKIP/FAIL says what to do; golden table and JSON
# --------------------------------------------------------------------------------------------------

def _normalise(text: str) -> str:
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    text = re.sub(r"'127\.0\.0\.1', \d+", "'127.0.0.1', PORT", text)
    text = re.sub(r"/tmp/\S+?/(root|journal)\b", r"TMP/\1", text)
    return text


def test_bare_machine_runs_to_the_end_and_says_what_to_do(tmp_path: pathlib.Path) -> None:
    rc, by_id, stderr = check(bare_args(tmp_path) + ["--no-collector.nvml"])
    st = statuses(by_id)
    assert rc == 1, by_id  # no /dev/nvidia* is a failure
    assert st["driver"] == "SKIP" and "disabled" in by_id["driver"]["finding"]
    assert st["modules"] == "SKIP" and "not readable" in by_id["modules"]["finding"]
    assert st["devices"] == "FAIL" and by_id["devices"]["fix"]
    assert st["services"] == "SKIP" and "systemd is not reachable" in by_id["services"]["finding"]
    assert st["provider"] == "SKIP" and "Docker" in by_id["provider"]["fix"]  # no journal files at all
    assert st["ml_features"] == "SKIP" and by_id["ml_features"]["fix"]
    for c in by_id.values():
        assert c["status"] not in ("WARN", "FAIL") or c["fix"], c
        assert "Traceback" not in c["finding"]
    assert "Traceback" not in stderr and "WARNING source" not in stderr  # the table says it, once


def test_bare_machine_golden_table_and_json(tmp_path: pathlib.Path) -> None:
    args = bare_args(tmp_path) + ["--no-collector.nvml"]
    table = run_cli(["check", *args], env=BARE_ENV, timeout=90)
    js = run_cli(["check", "--json", *args], env=BARE_ENV, timeout=90)
    assert table.returncode == js.returncode == 1
    for name, got in (("check-bare.txt", table.stdout), ("check-bare.json", js.stdout)):
        got = _normalise(got)
        path = GOLDEN / name
        if os.environ.get("UPDATE_GOLDEN") == "1":
            path.write_text(got)
        assert got == path.read_text(), f"{name} differs; UPDATE_GOLDEN=1 regenerates it (review the diff)"


def test_usage_errors_exit_2() -> None:
    r = run_cli(["check", "--no-such-flag"], env=BARE_ENV)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error" in r.stderr
    r = run_cli(["check", "--collection.timeout=-1"], env=BARE_ENV)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


# --------------------------------------------------------------------------------------------------
# host files under --root: modules, device nodes, CDI and the NVIDIA runtime
# --------------------------------------------------------------------------------------------------

MODULES = {
    "pass": "nvidia_uvm 1875968 0 - Live 0x0 (PO)\nnvidia_drm 126976 0 - Live 0x0 (PO)\nnvidia 14299136 1 nvidia_uvm, Live 0x0 (PO)\n",
    "headless": "nvidia_uvm 1875968 0 - Live 0x0 (O)\nnvidia 14299136 1 nvidia_uvm, Live 0x0 (O)\n",
    "no_uvm": "nvidia 14299136 0 - Live 0x0 (PO)\nkvm 1142784 0 - Live 0x0\n",
    "no_nvidia": "kvm 1142784 0 - Live 0x0\next4 1073152 1 - Live 0x0\n",
}


def make_root(tmp: pathlib.Path, modules: str | None = None, nodes: tuple[str, ...] = (),
              files: dict[str, str] | None = None) -> pathlib.Path:
    root = tmp / "hostroot"
    root.mkdir()
    (root / "dev").mkdir()
    if modules is not None:
        (root / "proc").mkdir()
        (root / "proc" / "modules").write_text(modules)
        if any(line.split(" ", 1)[0] == "nvidia" for line in modules.splitlines()):
            (root / "sys" / "module" / "nvidia").mkdir(parents=True)  # as the kernel shows a loaded module
    for n in nodes:
        (root / "dev" / n).parent.mkdir(parents=True, exist_ok=True)
        (root / "dev" / n).write_text("")  # a listing is all check reads of a node
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def host_check(tmp: pathlib.Path, **kw) -> dict[str, dict]:
    root = make_root(tmp, **kw)
    ev = chk.Evidence(chk.Snapshot(0, {}, {}), (), chk.Host(str(root)), {})
    return {f.id: f.as_json() for f in chk.evaluate(ev)}


@pytest.mark.parametrize("case,status,words", [
    ("pass", "PASS", "nvidia and nvidia_uvm are loaded"),
    ("headless", "PASS", "not needed on a headless host"),
    ("no_uvm", "WARN", "first CUDA use"),
    ("no_nvidia", "FAIL", "not loaded"),
])
def test_kernel_modules(tmp_path: pathlib.Path, case: str, status: str, words: str) -> None:
    f = host_check(tmp_path, modules=MODULES[case])["modules"]
    assert (f["status"], words in f["finding"]) == (status, True), f


def test_kernel_modules_unreadable_is_a_skip(tmp_path: pathlib.Path) -> None:
    assert host_check(tmp_path)["modules"]["status"] == "SKIP"


def test_proc_modules_as_a_fifo_never_blocks(tmp_path: pathlib.Path) -> None:
    root = make_root(tmp_path)
    (root / "proc").mkdir()
    os.mkfifo(root / "proc" / "modules")
    f = chk.check_modules(chk.Evidence(chk.Snapshot(0, {}, {}), (), chk.Host(str(root)), {}))
    assert f.status == "SKIP"


@pytest.mark.parametrize("nodes,status", [
    (("nvidiactl", "nvidia0", "nvidia-uvm", "nvidia-uvm-tools"), "PASS"),
    (("nvidiactl", "nvidia0"), "WARN"),
    (("nvidia-uvm",), "FAIL"),
    ((), "FAIL"),
])
def test_device_nodes(tmp_path: pathlib.Path, nodes: tuple[str, ...], status: str) -> None:
    f = host_check(tmp_path, nodes=nodes)["devices"]
    assert f["status"] == status, f
    assert status == "PASS" or f["fix"]


CDI_SPEC = """---
cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
containerEdits:
  mounts:
  - hostPath: /usr/lib/x86_64-linux-gnu/libcuda.so.{v}
    containerPath: /usr/lib/x86_64-linux-gnu/libcuda.so.{v}
"""
DRIVER_VERSION = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (nixbld@)\n"
                  "GCC version:  gcc version 15.3.0 (GCC)\n")  # as read on a real H200 host


@pytest.mark.parametrize("files,status", [
    ({"etc/cdi/nvidia.yaml": CDI_SPEC.format(v="580.159.04"), "proc/driver/nvidia/version": DRIVER_VERSION}, "PASS"),
    ({"var/run/cdi/nvidia-container-toolkit.json": CDI_SPEC.format(v="550.54.15"),
      "proc/driver/nvidia/version": DRIVER_VERSION}, "WARN"),
    ({"etc/docker/daemon.json": '{"runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": []}}}'},
     "PASS"),
    ({"etc/docker/daemon.json": '{"data-root": "/srv/docker"}'}, "SKIP"),
])
def test_container_gpu_access(tmp_path: pathlib.Path, files: dict[str, str], status: str) -> None:
    f = host_check(tmp_path, files=files)["container_gpu"]
    assert f["status"] == status, f
    if status == "WARN":
        assert "550.54.15" not in f["finding"] and "580.159.04" in f["finding"] and f["fix"]


# --------------------------------------------------------------------------------------------------
# NVML through the fake library
# --------------------------------------------------------------------------------------------------

def test_driver_pass_fail_and_skip(tmp_path: pathlib.Path, fake_lib: pathlib.Path) -> None:
    scen = Scenario(tmp_path / "nvml.txt", driver="580.159.04", gpus=[Gpu(name="NVIDIA H200", total=143771 * 2**20)])
    scen.write()
    _, by_id, _ = check(bare_args(tmp_path), env_for(fake_lib, scen))
    assert by_id["driver"]["status"] == "PASS", by_id["driver"]
    assert "580.159.04" in by_id["driver"]["finding"] and "NVIDIA H200 (140.4 GiB)" in by_id["driver"]["finding"]
    assert by_id["gpu_memory"]["status"] == "SKIP"  # NVML up, but no model loaded

    scen.fail("nvmlInitWithFlags", "driver_not_loaded").write()
    _, by_id, _ = check(bare_args(tmp_path), env_for(fake_lib, scen))
    assert by_id["driver"]["status"] == "FAIL" and by_id["driver"]["fix"], by_id["driver"]
    assert by_id["gpu_memory"]["status"] == "SKIP"

    _, by_id, _ = check(bare_args(tmp_path) + ["--no-collector.nvml"], env_for(fake_lib, scen))
    assert by_id["driver"]["status"] == "SKIP"


# --------------------------------------------------------------------------------------------------
# the journal: provider verdicts from real journal files
# --------------------------------------------------------------------------------------------------

PROVIDERS_CUDA = ("Setting execution providers to ['CUDAExecutionProvider', 'CPUExecutionProvider'], in descending "
                  "order of preference")


def journal_with(tmp: pathlib.Path, export: bytes) -> pathlib.Path:
    d = tmp / "journal"
    d.mkdir(parents=True, exist_ok=True)
    jr.write_journal(d / "system.journal", export)
    return d


def test_provider_fail_on_a_fallback_journal(tmp_path: pathlib.Path) -> None:
    # the real Immich v3.1.0 ML service with CUDA libraries but no driver (tests/fixtures/real-ml)
    export = (pathlib.Path(__file__).parent / "fixtures/real-ml/v3.1.0-gpu-nodriver-nixpkgs/unit.export").read_bytes()
    args = [a for a in bare_args(tmp_path) if not a.startswith("--journal.directory")]
    d = journal_with(tmp_path, export)
    _, by_id, _ = check(args + [f"--journal.directory={d}", "--no-collector.nvml"])
    f = by_id["provider"]
    assert f["status"] == "FAIL", f
    assert "CUDAExecutionProvider is preferred" in f["finding"] and f["fix"]
    assert f["details"]["cpu_fallback"] is True
    # the evidence: CUDA failure 35 while the session was created, in the ML unit's worker
    assert f["details"]["evidence"].startswith("cuda_failure of CUDAExecutionProvider of immich-machine-learning"), f


def test_provider_pass_warn_and_skip(tmp_path: pathlib.Path) -> None:
    args = [a for a in bare_args(tmp_path) if not a.startswith("--journal.directory")]
    # a host with the NVIDIA driver loaded (the journal's evidence H1 reads it under --root)
    (tmp_path / "root" / "sys" / "module" / "nvidia").mkdir(parents=True)
    ok = journal_with(tmp_path / "ok", jr.entries(["Loading visual model 'ViT-B-32__openai' to memory",
                                                   PROVIDERS_CUDA]))
    _, by_id, _ = check(args + [f"--journal.directory={ok}", "--no-collector.nvml"])
    assert by_id["provider"]["status"] == "PASS", by_id["provider"]
    assert by_id["provider"]["details"]["effective"] == "CUDAExecutionProvider"

    cpu = journal_with(tmp_path / "cpu", jr.entries([
        "Loading visual model 'ViT-B-32__openai' to memory",
        "Setting execution providers to ['CPUExecutionProvider'], in descending order of preference"]))
    _, by_id, _ = check(args + [f"--journal.directory={cpu}", "--no-collector.nvml"])
    assert by_id["provider"]["status"] == "WARN" and "CPU provider" in by_id["provider"]["finding"]

    _, by_id, _ = check(args + [f"--journal.directory={ok}", "--no-collector.nvml", "--no-collector.journal"])
    assert by_id["provider"]["status"] == "SKIP"


# --------------------------------------------------------------------------------------------------
# the Immich API
# --------------------------------------------------------------------------------------------------

def test_ml_features_every_outcome(tmp_path: pathlib.Path) -> None:
    with FakeImmich(keys={KEY: Key()}) as fake:
        args = [a for a in bare_args(tmp_path) if not a.startswith("--immich.")]
        args += [f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}", "--no-collector.nvml"]
        env = {"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY}
        _, by_id, _ = check(args, env)
        assert by_id["ml_features"]["status"] == "PASS", by_id["ml_features"]
        with fake.lock:
            fake.features_off = {"ocr"}
        _, by_id, _ = check(args, env)
        assert by_id["ml_features"]["status"] == "WARN" and "ocr" in by_id["ml_features"]["finding"]
        with fake.lock:
            fake.features_off = set()
            fake.ml_up = False
        _, by_id, _ = check(args, env)
        assert by_id["ml_features"]["status"] == "FAIL" and by_id["ml_features"]["fix"], by_id["ml_features"]
    _, by_id, _ = check(bare_args(tmp_path) + ["--no-collector.nvml"])
    assert by_id["ml_features"]["status"] == "SKIP"


# --------------------------------------------------------------------------------------------------
# units in a real systemd: services, device access, tuning, environment, GPU memory
# --------------------------------------------------------------------------------------------------

# A gunicorn-like ML service (the nixpkgs launch: gunicorn started directly): the arbiter forks a
# worker, the worker logs a model load and the provider list in Rich's layout. RENICE applies a
# nice value after start (what a manual `renice` or an old process would show).
FAKE_ML = r'''
import os, sys, time
if os.environ.get("RENICE"):
    os.setpriority(os.PRIO_PROCESS, 0, int(os.environ["RENICE"]))
def log(msg):
    print(time.strftime("[%x %X] ") + "INFO     " + msg, flush=True)
log("Starting gunicorn 23.0.0")
if os.fork() == 0:
    log("Booting worker with pid: %d" % os.getpid())
    log("Loading visual model 'ViT-B-32__openai' to memory")
    log("Setting execution providers to ['CUDAExecutionProvider', 'CPUExecutionProvider'], in descending order of preference")
while True:
    time.sleep(60)
'''


def ml_unit(script: pathlib.Path, extra: str = "") -> str:
    return f"""[Unit]
Description=Immich machine learning (fake, gunicorn launch)
[Service]
ExecStart=/usr/bin/python3 -u {script} gunicorn immich_ml.main:app -k immich_ml.config.CustomUvicornWorker
Nice=-10
{extra}
"""


SERVER_UNIT_FILE = """[Unit]
Description=Immich server (fake)
[Service]
ExecStart=/bin/sh -c 'exec sleep 1000'
"""


def unit_args(ns: NestedSystemd, tmp: pathlib.Path, root: pathlib.Path) -> list[str]:
    return [f"--systemd.unit={ML_UNIT}", f"--systemd.unit={SERVER_UNIT}", f"--systemd.cgroup-root={ns.cgroup}",
            f"--journal.directory={ns.journal_dir}", f"--root={root}", f"--immich.url={closed_url()}",
            f"--immich.ml-url={closed_url()}", "--immich.timeout=0.5", f"--docker.socket={tmp / 'no-docker.sock'}"]


def start_units(ns: NestedSystemd, ml_extra: str) -> tuple[int, int]:
    script = ns.base / "fake_ml.py"
    script.write_text(FAKE_ML)
    ns.add_unit(ML_UNIT, ml_unit(script, ml_extra), reload=False)
    ns.add_unit(SERVER_UNIT, SERVER_UNIT_FILE)
    ns.start_unit(SERVER_UNIT)
    ns.start_unit(ML_UNIT)

    def both() -> tuple[int, int] | None:
        pids = ns.unit_host_pids(ML_UNIT)
        main = ns.host_pid(int(ns.unit_property(ML_UNIT, "MainPID")))
        others = [p for p in pids if p != main]
        return (main, others[0]) if main in pids and len(pids) == 2 else None
    arbiter, worker = wait_for(both, DEADLINE, what="the ML unit's arbiter and worker")
    wait_for(lambda: "Setting execution providers" in ns.run("journalctl", "-u", ML_UNIT, "--no-pager").stdout,
             DEADLINE, what="the provider line in the journal")
    return arbiter, worker


GOOD_ENV = "Environment=PYTHONUNBUFFERED=1 COLUMNS=250 MACHINE_LEARNING_DEVICE_ID=0"


def test_units_healthy_host(nested_systemd: NestedSystemd, tmp_path: pathlib.Path, fake_lib: pathlib.Path) -> None:
    ns = nested_systemd
    _, worker = start_units(ns, GOOD_ENV)
    root = make_root(tmp_path, modules=MODULES["pass"], nodes=("nvidiactl", "nvidia0", "nvidia-uvm"))
    scen = Scenario(tmp_path / "nvml.txt", driver="580.159.04").compute(worker, 900 * 2**20)
    scen.write()
    rc, by_id, _ = check(unit_args(ns, tmp_path, root), {"DBUS_SYSTEM_BUS_ADDRESS": ns.bus_address,
                                                        **env_for(fake_lib, scen)})
    st = statuses(by_id)
    assert st == {"role": "PASS", "driver": "PASS", "modules": "PASS", "devices": "PASS", "container_gpu": "SKIP",
                  "services": "PASS", "provider": "PASS", "gpu_memory": "PASS", "ml_features": "SKIP",
                  "transcode": "SKIP", "tuning": "PASS", "environment": st["environment"],
                  "docker_ml": "SKIP", "latency_telemetry": "SKIP"}, json.dumps(by_id, indent=1)
    assert rc == 0
    assert "900 MiB" in by_id["gpu_memory"]["finding"]
    assert by_id["tuning"]["details"]["process_nice"] == -10
    # the environment is read from the unit (Environment=) and the launch from the command line;
    # /proc/PID/environ is readable here (root), so the processes' environment is used too
    env = by_id["environment"]
    assert env["details"]["launch"] == "gunicorn", env
    assert env["status"] == "PASS", env


def test_units_broken_host(nested_systemd: NestedSystemd, tmp_path: pathlib.Path, fake_lib: pathlib.Path) -> None:
    ns = nested_systemd
    extra = ("PrivateDevices=yes\nEnvironment=ONNXRUNTIME_PROVIDER=CUDAExecutionProvider "
             "MACHINE_LEARNING_DEVICE_IDS=0,1 RENICE=5")
    _, worker = start_units(ns, extra)
    ns.stop_unit(SERVER_UNIT)
    root = make_root(tmp_path, modules=MODULES["pass"], nodes=("nvidiactl", "nvidia0", "nvidia-uvm"))
    scen = Scenario(tmp_path / "nvml.txt", driver="580.159.04")  # nothing of the ML unit on the GPU
    scen.write()
    rc, by_id, _ = check(unit_args(ns, tmp_path, root), {"DBUS_SYSTEM_BUS_ADDRESS": ns.bus_address,
                                                        **env_for(fake_lib, scen)})
    st = statuses(by_id)
    assert rc == 1
    assert st["devices"] == "FAIL" and "PrivateDevices" in by_id["devices"]["finding"], by_id["devices"]
    assert st["services"] == "FAIL" and SERVER_UNIT in by_id["services"]["finding"], by_id["services"]
    assert st["gpu_memory"] == "FAIL" and "no GPU memory" in by_id["gpu_memory"]["finding"], by_id["gpu_memory"]
    assert st["tuning"] == "WARN" and "Nice=-10 configured, processes run at 5" in by_id["tuning"]["finding"], \
        by_id["tuning"]
    warnings = " ".join(by_id["environment"]["details"]["warnings"])
    assert st["environment"] == "WARN"
    assert "ONNXRUNTIME_PROVIDER" in warnings and "MACHINE_LEARNING_DEVICE_IDS is ignored" in warnings
    assert "beyond the 1 GPU" in warnings and "PYTHONUNBUFFERED" in warnings


def test_tuning_and_environment_skip_without_systemd(tmp_path: pathlib.Path) -> None:
    _, by_id, _ = check(bare_args(tmp_path) + ["--no-collector.nvml"])
    assert by_id["tuning"]["status"] == "SKIP" and by_id["environment"]["status"] == "SKIP"
    assert "not running" in by_id["tuning"]["finding"] or "down" in by_id["tuning"]["finding"]


def test_check_leaves_the_daemons_journal_state_alone(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    marker = state / "journal-state.json"
    marker.write_text('{"keep": "me"}')
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    check(bare_args(tmp_path) + ["--no-collector.nvml", f"--state.directory={state}"])
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    time.sleep(0)  # (check is synchronous: nothing writes after it returned)


# --------------------------------------------------------------------------------------------------
# roles (remote machine learning): each host says what it plays and what it cannot see from there
# --------------------------------------------------------------------------------------------------

def test_role_rows_on_each_host(tmp_path: pathlib.Path) -> None:
    _, by_id, _ = check(bare_args(tmp_path) + ["--no-collector.nvml"])
    assert by_id["role"]["status"] == "PASS" and by_id["role"]["finding"].startswith("all:")

    _, by_id, _ = check(bare_args(tmp_path) + ["--no-collector.nvml", "--deployment.role=ml"])
    assert by_id["role"]["finding"].startswith("ml:") and "server host" in by_id["role"]["finding"]
    assert by_id["ml_features"]["status"] == "SKIP" and "role ml" in by_id["ml_features"]["finding"]

    _, by_id, _ = check(bare_args(tmp_path) + ["--no-collector.nvml", "--deployment.role=server"])
    assert by_id["role"]["status"] == "WARN" and "--remote-ml.exporter-url" in by_id["role"]["fix"]
    assert by_id["provider"]["status"] == "SKIP" and "role server" in by_id["provider"]["finding"]
    assert by_id["gpu_memory"]["status"] == "SKIP" and "ML host" in by_id["gpu_memory"]["finding"]

    _, by_id, _ = check(bare_args(tmp_path) + ["--no-collector.nvml", "--deployment.role=server",
                                               f"--remote-ml.exporter-url={closed_url()}/metrics"])
    assert by_id["role"]["status"] == "WARN" and "does not answer" in by_id["role"]["finding"]


def test_role_server_names_the_serving_ml_host_and_its_provider(tmp_path: pathlib.Path) -> None:
    from aiohttp import web

    from tests.test_nvml_e2e import ThreadedServer  # an aiohttp app on a loopback port, in its own thread

    text = ('immich_gpu_exporter_source_up{source="journal"} 1\n'
            'immich_ml_execution_provider{provider="CUDAExecutionProvider"} 1\n')
    app = web.Application()

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=text)
    app.router.add_get("/metrics", handle)
    with FakeImmich(keys={KEY: Key()}) as fake, ThreadedServer(app) as exp:
        args = [a for a in bare_args(tmp_path) if not a.startswith("--immich.")]
        args += [f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}", "--no-collector.nvml",
                 "--deployment.role=server", f"--remote-ml.exporter-url=http://127.0.0.1:{exp.port}/metrics"]
        _, by_id, _ = check(args, {"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY})
    f = by_id["role"]
    assert f["status"] == "PASS", f
    assert fake.ml_url in f["finding"] and "CUDAExecutionProvider" in f["finding"]
