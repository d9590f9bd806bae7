"""CPU cost of one NVML collection cycle: immich-gpu-exporter's NVML source vs nvitop-exporter.

Both run against the same gcc-built fake libnvidia-ml.so.1 (tests/support/fake_nvml.c), in the
same run, on a host where ~2,000 other processes exist (spawned here as `sleep`, bounded by
their own timeout and killed at the end). The GPU processes are real processes placed in a real
cgroup named like the NixOS ML unit (with a non-GPU "arbiter" process). Ours is two sources since
issue 12: the processes source (finding the unit by walking the host's cgroup tree, its members,
their /proc facts and the tuning metrics) and the NVML source (GPU use, labelled through the
processes source's facts); both are measured, each with its own cycle. nvitop-exporter's `update_device()` is what its loop
calls per GPU each interval; we also report it with zero GPU processes to isolate its
per-process part.

Sample timestamps lie in the future, so nvitop (1-second window) and we (cursor reset when the
cursor is ahead of the clock) both receive all N samples every cycle.

    sudo /work/main/.venv/bin/python bench/bench_nvml.py [--cycles 200] [--others 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.nvml import CgroupTree, Gpu, Scenario, build_fake_nvml  # noqa: E402

OURS = r"""
import asyncio, json, sys, time
from types import MappingProxyType
from immich_gpu_exporter import config
from immich_gpu_exporter.core import Snapshot, SourceState
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.nvml import NvmlSource
from immich_gpu_exporter.sources.processes import ProcessesSource
cycles = int(sys.argv[1])
cfg = config.load({"collector.systemd": False, "collector.journal": False, "collector.immich": False,
                   "systemd.cgroup-root": sys.argv[2], "docker.socket": "/nonexistent/docker.sock"}, None, {})
snap = None
async def timed(src):
    for _ in range(10):
        r = await src.collect()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(cycles):
        r = await src.collect()
    c1, w1 = time.process_time(), time.perf_counter()
    await src.close()
    return r, (c1 - c0) / cycles * 1e3, (w1 - w0) / cycles * 1e3
async def main():
    global snap
    procs = ProcessesSource(cfg, Hub(lambda: None))  # no systemd facts: the unit is found by the walk
    r, p_cpu, p_wall = await timed(procs)
    state = SourceState("processes", up=True, facts=MappingProxyType(dict(r.facts)))
    snap = Snapshot(1, MappingProxyType({"processes": state}), MappingProxyType({}))
    nvml = NvmlSource(cfg, Hub(lambda: snap))  # steady state: every GPU PID is in the processes fact
    n, n_cpu, n_wall = await timed(nvml)
    print(json.dumps({"cpu_ms": n_cpu, "wall_ms": n_wall, "series": len(n.samples),
                      "gpu_pids": len(n.facts["gpu_pids"]), "proc_cpu_ms": p_cpu, "proc_wall_ms": p_wall,
                      "proc_series": len(r.samples), "members": len(r.facts["identities"]),
                      "cgroup_dirs": procs.scanned_dirs}))
asyncio.run(main())
"""

# The NVML source before issue 12 (one source that also read the tuning), for a same-run comparison:
# `--before DIR` runs it from DIR, a copy of the tree at that commit (`git archive cfdfce1 | tar -x -C DIR`).
BEFORE = r"""
import asyncio, json, sys, time
from immich_gpu_exporter import config
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.nvml import NvmlSource
cycles = int(sys.argv[1])
cfg = config.load({"collector.systemd": False, "collector.journal": False, "collector.immich": False}, None, {})
async def main():
    src = NvmlSource(cfg, Hub(lambda: None))
    for _ in range(10):
        r = await src.collect()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(cycles):
        r = await src.collect()
    c1, w1 = time.process_time(), time.perf_counter()
    await src.close()
    print(json.dumps({"cpu_ms": (c1 - c0) / cycles * 1e3, "wall_ms": (w1 - w0) / cycles * 1e3,
                      "series": len(r.samples)}))
asyncio.run(main())
"""

NVITOP = r"""
import json, sys, time
from prometheus_client import CollectorRegistry
from nvitop import Device
from nvitop_exporter import PrometheusExporter
cycles = int(sys.argv[1])
devices = Device.all()
exp = PrometheusExporter(devices, hostname="bench", registry=CollectorRegistry())
for _ in range(10):
    exp.update_device(devices[0])
c0, w0 = time.process_time(), time.perf_counter()
for _ in range(cycles):
    exp.update_device(devices[0])
c1, w1 = time.process_time(), time.perf_counter()
n = sum(1 for m in exp.registry.collect() for s in m.samples)
print(json.dumps({"cpu_ms": (c1 - c0) / cycles * 1e3, "wall_ms": (w1 - w0) / cycles * 1e3, "series": n}))
"""


def run(code: str, lib: pathlib.Path, scen: pathlib.Path, cycles: int, root: pathlib.Path = ROOT,
        *args: str) -> dict:
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib), FAKE_NVML_SCENARIO=str(scen), PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", code, str(cycles), *args], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--others", type=int, default=2000)
    ap.add_argument("--sizes", default="0,1,10,100")
    ap.add_argument("--cgroups", type=int, default=150, help="other units' cgroups in the walked tree")
    ap.add_argument("--before", type=pathlib.Path, help="a copy of the tree before issue 12, measured in the same run")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-nvml-"))
    lib = build_fake_nvml(tmp / "lib")
    others: list[subprocess.Popen] = []
    rows = []
    with CgroupTree(f"igx-bench-{uuid.uuid4().hex[:8]}") as cg:
        try:
            for _ in range(args.others):
                others.append(subprocess.Popen(["sleep", "900"], stdin=subprocess.DEVNULL))
            unit = "system.slice/system-immich.slice/immich-machine-learning.service"
            # The walked tree: a host's worth of other units' cgroups, a few containers that are not
            # Immich's (no Docker socket: they stay short ids, asked once), and the ML unit.
            for i in range(args.cgroups):
                (cg.top / "system.slice" / f"other-{i}.service").mkdir(parents=True)
            for i in range(5):
                (cg.top / "system.slice" / f"docker-{i:02d}{'0' * 62}.scope").mkdir(parents=True)
            gpu_pids = [cg.spawn(unit) for _ in range(max(sizes))]
            cg.spawn(unit)  # the gunicorn arbiter: in the unit, not on the GPU
            nproc = len([p for p in os.listdir("/proc") if p.isdigit()])
            for n in sizes:
                # The unit holds this size's GPU processes and the arbiter, as a real ML unit would;
                # the other prepared processes wait in a neutral cgroup.
                for i, pid in enumerate(gpu_pids):
                    rel = unit if i < n else "parked"
                    (cg.top / rel).mkdir(parents=True, exist_ok=True)
                    (cg.top / rel / "cgroup.procs").write_text(str(pid))
                scen = Scenario(tmp / f"scenario-{n}.txt", gpus=[Gpu()])
                future = time.time_ns() // 1000 + 3600 * 10**6
                for pid in gpu_pids[:n]:
                    scen.compute(pid, 300 * 2**20)
                    scen.lines.append(f"sample 0 {pid} {future} 30 10 0 0")
                scen.write()
                ours = run(OURS, lib, scen.path, args.cycles, ROOT, str(cg.top))
                theirs = run(NVITOP, lib, scen.path, args.cycles)
                if args.before:
                    ours["before_cpu_ms"] = run(BEFORE, lib, scen.path, args.cycles, args.before)["cpu_ms"]
                rows.append((n, ours, theirs))
                print(f"n={n:>3} ours: nvml {ours['cpu_ms']:.3f} ms cpu/cycle ({ours['series']} series), processes "
                      f"{ours['proc_cpu_ms']:.3f} ms ({ours['members']} members, {ours['cgroup_dirs']} cgroup dirs "
                      f"walked)  nvitop-exporter {theirs['cpu_ms']:.3f} ms cpu/cycle ({theirs['series']} series)",
                      flush=True)
        finally:
            for p in others:
                p.kill()
            for p in others:
                p.wait()
    base = next((t["cpu_ms"] for n, _, t in rows if n == 0), 0.0)
    import platform

    import nvitop_exporter
    lines = [
        "# NVML and processes collection cycles: immich-gpu-exporter vs nvitop-exporter",
        "",
        f"`bench/bench_nvml.py --cycles {args.cycles} --others {args.others}"
        f" --cgroups {args.cgroups}{' --before DIR' if args.before else ''}`, {time.strftime('%Y-%m-%d')}, "
        f"Python {platform.python_version()}, nvitop-exporter {nvitop_exporter.__version__}, "
        f"{os.cpu_count()} CPUs (shared with other work), {nproc} processes on the host during the run. "
        "Both against the same fake libnvidia-ml.so.1 (one GPU), same scenario, same run; CPU time "
        "(`time.process_time`, all threads) per cycle, mean over the cycles after 10 warm-up cycles.",
        "",
        "| GPU processes | ours, NVML source: CPU ms/cycle | ours, processes source: CPU ms/cycle | ours, both | "
        "ours before the split (NVML source alone) | nvitop-exporter `update_device`: CPU ms/cycle | "
        "nvitop per-process part (minus 0-process cycle) | ours (both) / nvitop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, o, t in rows:
        both = o["cpu_ms"] + o["proc_cpu_ms"]
        before = f"{o['before_cpu_ms']:.2f}" if "before_cpu_ms" in o else "not run"
        lines.append(f"| {n} | {o['cpu_ms']:.2f} | {o['proc_cpu_ms']:.2f} | {both:.2f} | {before} | {t['cpu_ms']:.2f} | "
                     f"{t['cpu_ms'] - base:.2f} | {both / t['cpu_ms']:.2f} |")
    dirs = rows[-1][1]["cgroup_dirs"]
    lines += [
        "",
        "The NVML source, per cycle: the NVML calls, labelling each GPU process through the processes source's "
        "fact (the steady state: every GPU PID already known there; a PID not yet known costs one read of "
        "/proc/<pid>/stat and, once, its cgroup), the utilisation tracker and the samples. The processes source, "
        "per cycle: a walk of the cgroup tree for Immich's units and containers (no systemd facts given, so the "
        f"unit is found by the walk; {dirs} cgroup directories: {args.cgroups} other units, 5 foreign containers, "
        "the ML unit), the unit's members "
        "from cgroup.procs, /proc/<pid>/stat of each member (start time, nice, CPU, RSS; cgroup, name and memlock "
        "limit once per (pid, start time)), grouping, the CPU counters and the samples. Together they do what "
        "one NVML cycle did before the split (and more: Immich's processes are found without a GPU). "
        "nvitop-exporter reads each process's /proc files through psutil every cycle (host_snapshot) and sets "
        "per-PID gauges.",
        "",
        "Goal (issue 8): at most a third of nvitop-exporter's CPU cost at 100 GPU processes; issue 12: keep the "
        "NVML cycle cost of before the split (0.20 / 0.48 / 0.73 / 3.87 ms at 0 / 1 / 10 / 100 GPU processes on "
        "2026-11-26) or better.",
    ]
    out = ROOT / "bench" / "RESULTS-nvml.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
