"""Resident memory of the daemon: this checkout vs an earlier commit vs nvitop-exporter, in one run.

    PYTHONPATH=. .venv/bin/python bench/bench_rss.py [--before REF] [--nvitop PYTHON] [--seconds S]

Two situations, each exporter its own process on a loopback port:

* bare: every collector on, none of their sources present (this machine as it is: no NVIDIA driver,
  no system bus, no journal files, no Immich), which is what the Quick start gives on a fresh VM
  (nvitop-exporter exits without NVML, so it gets the fake GPU with no process on it);
* full: every source up: the gcc-built fake libnvidia-ml.so.1 (tests/support/nvml.py) scripted
  with the processes of a nested systemd (tests/support/nested_systemd.py) that runs the fake
  Immich ML and server units of tests/test_fullstack.py, whose output goes through its journald
  into the journal files the journal source follows, and the fake Immich API with an API key.

Once the exporter is ready (full: all four sources up), VmRSS is read from /proc/<pid>/status every
0.5 s for --seconds while /metrics is scraped with Prometheus's Accept header (OpenMetrics); the table gives the median and the maximum, and
RssAnon/RssFile of the last sample. `--before REF` runs the package as it was at REF (git archive)
with the same interpreter and libraries. The peer, nvitop-exporter 1.7.2 (the `bench` extra; best
in a scratch venv: `python3 -m venv /tmp/nv && /tmp/nv/bin/pip install nvitop-exporter==1.7.2`,
then `--nvitop /tmp/nv/bin/python`), serves the same fake GPU; it reads NVML only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.exposition import parse, value  # noqa: E402
from tests.support.fake_immich import FakeImmich, Key, QueueSim  # noqa: E402
from tests.support.nested_systemd import start_nested_systemd, stop_nested_systemd  # noqa: E402
from tests.support.nvml import Gpu, Scenario, build_fake_nvml, env_for  # noqa: E402
from tests.support.proc import exporter_env, free_port, http_get, wait_for  # noqa: E402
from tests.test_fullstack import FAKE_ML, KEY, ML_UNIT, ML_UNIT_FILE, SERVER_UNIT, SERVER_UNIT_FILE  # noqa: E402

SOURCES = ("nvml", "systemd", "journal", "immich")
# What Prometheus 2.x sends: OpenMetrics first, so a scrape here renders what a real scrape renders.
SCRAPE_HEADERS = {"Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                            "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                  "Accept-Encoding": "gzip"}


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0])
    return out


def measure(argv: list[str], env: dict[str, str], cwd: pathlib.Path, url: str, seconds: float,
            all_up: bool, log: pathlib.Path) -> dict[str, float]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[:3]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                status, _, body = http_get(url, timeout=2)
            except OSError:
                return False
            if status != 200:
                return False
            if not all_up:
                return True
            m = parse(body.decode())
            return all(value(m, "immich_gpu_exporter_source_up", source=s) == 1 for s in SOURCES)
        deadline = time.monotonic() + 60
        while not ready():  # not wait_for: an exporter that exited must end the wait at once
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[:3]} not ready after 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        time.sleep(2.0)  # past the first cycles (journal backfill, first Immich poll)
        samples = []
        last: dict[str, int] = {}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            http_get(url, headers=SCRAPE_HEADERS)
            last = status_kib(proc.pid)
            samples.append(last["VmRSS"])
            time.sleep(0.5)
        return {"median": statistics.median(samples) / 1024, "max": max(samples) / 1024,
                "anon": last["RssAnon"] / 1024, "file": last["RssFile"] / 1024}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def tree_at(ref: str) -> Iterator[pathlib.Path]:
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as d:
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", d], input=archive, check=True)
        yield pathlib.Path(d)


@contextlib.contextmanager
def full_stack(work: pathlib.Path, lib: pathlib.Path) -> Iterator[tuple[list[str], dict[str, str]]]:
    """Every source up; yields (our extra flags, extra environment)."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="nsd", dir="/tmp"))
    ns = start_nested_systemd(base, {})
    fake = None
    try:
        script = ns.base / "fake_immich_ml.py"
        script.write_text(FAKE_ML)
        ns.add_unit(ML_UNIT, ML_UNIT_FILE.format(script=script), reload=False)
        ns.add_unit(SERVER_UNIT, SERVER_UNIT_FILE)
        ns.start_unit(SERVER_UNIT)
        ns.start_unit(ML_UNIT)
        ml = wait_for(lambda: len(ns.unit_host_pids(ML_UNIT)) == 2 and ns.unit_host_pids(ML_UNIT), 20,
                      what="the ML unit's arbiter and worker")
        server = wait_for(lambda: ns.unit_host_pids(SERVER_UNIT), 20, what="the server unit's process")
        scen = Scenario(work / "nvml-scenario.txt")
        for pid in ml:
            scen.compute(pid, 1536 * 2**20)
        scen.compute(server[0], 64 * 2**20)
        scen.gpus = [Gpu(used=1900 * 2**20)]
        scen.write()
        now = time.monotonic()
        fake = FakeImmich(queues=[QueueSim("smartSearch", concurrency=2, job_seconds=0.5, arrivals=[now] * 400)],
                          keys={KEY: Key()})
        fake.start()
        flags = [f"--systemd.unit={ML_UNIT}", f"--systemd.unit={SERVER_UNIT}", f"--systemd.cgroup-root={ns.cgroup}",
                 f"--journal.directory={ns.journal_dir}", f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}"]
        env = {"DBUS_SYSTEM_BUS_ADDRESS": ns.bus_address, "IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY,
               **env_for(lib, scen)}
        yield flags, env
    finally:
        if fake is not None:
            fake.stop()
        stop_nested_systemd(ns)


def ours(tree: pathlib.Path, flags: list[str], env: dict[str, str], work: pathlib.Path, label: str,
         seconds: float, all_up: bool) -> dict[str, float]:
    port = free_port()
    state = work / f"state-{label}"
    argv = [sys.executable, "-m", "immich_gpu_exporter", f"--web.listen-address=127.0.0.1:{port}",
            f"--state.directory={state}", *flags]
    full_env = exporter_env(env)
    full_env["PYTHONPATH"] = str(tree)  # this tree's package, ahead of the editable install
    return measure(argv, full_env, tree, f"http://127.0.0.1:{port}/metrics", seconds, all_up,
                   work / f"{label}.log")


def nvitop(python: str, env: dict[str, str], work: pathlib.Path, label: str, seconds: float) -> dict[str, float]:
    port = free_port()
    argv = [python, "-m", "nvitop_exporter", "--bind-address", "127.0.0.1", "--port", str(port)]
    return measure(argv, {**os.environ, **env}, work, f"http://127.0.0.1:{port}/metrics", seconds, False,
                   work / f"{label}.log")


# What the daemon imports, in the order it does, and what each step adds to VmRSS (`--imports`).
IMPORTS = ["immich_gpu_exporter.config", "hashlib", "ssl", "asyncio", "prometheus_client.core",
           "immich_gpu_exporter.daemon", "aiohttp", "aiohttp.web", "immich_gpu_exporter.sources.nvml", "pynvml",
           "lxml.etree", "pystemd", "immich_gpu_exporter.sources.journal", "immich_gpu_exporter.sources.immich"]
IMPORT_COST = r"""
import importlib, re, sys
def rss():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
print(f"interpreter: {rss():.1f} MiB")
for name in sys.argv[1:]:
    before = rss()
    importlib.import_module(name)
    print(f"+{rss() - before:4.1f} MiB  {name}")
print(f"total: {rss():.1f} MiB")
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="cfdfce1", help="git ref of the 'before' column (default: cfdfce1, "
                                                        "main before the footprint work)")
    ap.add_argument("--nvitop", help="python of a venv with nvitop-exporter==1.7.2 (omit to skip the peer)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--imports", action="store_true", help="only print what each import adds to VmRSS")
    args = ap.parse_args()
    if args.imports:
        return subprocess.run([sys.executable, "-c", IMPORT_COST, *IMPORTS], cwd=ROOT).returncode
    rows: list[tuple[str, str, dict[str, float] | str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-rss-work-") as w, tree_at(args.before) as before:
        work = pathlib.Path(w)
        lib = build_fake_nvml(work / "fakenvml")
        idle_gpu = Scenario(work / "idle-gpu.txt").write()  # one GPU, no processes
        for situation in ("bare", "full"):
            ctx = full_stack(work, lib) if situation == "full" else contextlib.nullcontext(([], {}))
            with ctx as (flags, env):
                for label, tree in ((f"immich-gpu-exporter at {args.before}", before),
                                    ("immich-gpu-exporter (this checkout)", ROOT)):
                    rows.append((situation, label, ours(tree, flags, env, work, f"{situation}-{label[:25]}",
                                                        args.seconds, situation == "full")))
                    print(situation, label, rows[-1][2], flush=True)
                if args.nvitop:
                    # nvitop-exporter exits without NVML: bare, it gets the fake GPU with no process on it
                    peer_env = env if situation == "full" else env_for(lib, idle_gpu)
                    try:
                        r: dict[str, float] | str = nvitop(args.nvitop, peer_env, work, f"{situation}-nvitop",
                                                           args.seconds)
                    except RuntimeError as e:
                        r = str(e).splitlines()[-1][:120]
                    rows.append((situation, "nvitop-exporter 1.7.2 (NVML only" +
                                 (", fake GPU without processes)" if situation == "bare" else ")"), r))
                    print(situation, "nvitop", r, flush=True)
    print()
    print(f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; VmRSS sampled every 0.5 s for {args.seconds:g} s")
    print()
    print("| situation | exporter | VmRSS median MiB | VmRSS max MiB | RssAnon MiB | RssFile MiB |")
    print("|---|---|---|---|---|---|")
    for situation, label, r in rows:
        if isinstance(r, str):
            print(f"| {situation} | {label} | did not run: {r} | | | |")
        else:
            print(f"| {situation} | {label} | {r['median']:.1f} | {r['max']:.1f} | {r['anon']:.1f} | {r['file']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
