"""Journal pipeline throughput: entries/s from a journal file to metrics state, vs journalctl itself.

    PYTHONPATH=. python bench/bench_journal.py [ENTRIES] [RUNS]

Peer, measured in the same run over the same journal file: `journalctl -o json` piped to /dev/null
(the raw rate; also with the exact arguments the source uses). Ours: the journal source's own
`pump()` (journalctl subprocess + JSON decode + parser + MLState), then rendering the samples.
Goal: at least 80 % of journalctl's own rate (journalctl is the ceiling: we read what it prints).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from immich_gpu_exporter import config as configmod  # noqa: E402
from immich_gpu_exporter.sources.base import Hub  # noqa: E402
from immich_gpu_exporter.sources.journal import JournalSource  # noqa: E402
from tests.support.journal import Clock, entries, write_journal  # noqa: E402

C = " " * 29
# a realistic mix: Rich records (some wrapped), ORT native lines, EP fallback prints, lifecycle
CYCLE = [
    "[07/30/26 12:35:10] INFO     Loading visual model 'ViT-B-32__openai' to memory",
    "[07/30/26 12:35:10] INFO     Setting execution providers to",
    C + "['CUDAExecutionProvider', 'CPUExecutionProvider'], in",
    C + "descending order of preference",
    "2026-07-30 12:35:10.754300111 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1094 "
    "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*.",
    "[07/30/26 12:35:12] INFO     Created in-memory cache with unloading after 300s",
    C + "of inactivity.",
    "[07/30/26 12:35:12] INFO     Initialized request thread pool with 16 threads.",
    "[07/30/26 12:40:20] INFO     Shutting down due to inactivity.",
    "[07/30/26 12:40:21] INFO     Booting worker with pid: 4300",
]


def run_cmd_rate(args: list[str], n: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return n / (time.perf_counter() - t0)


def our_rate(src: JournalSource, args: list[str], n: int) -> float:
    async def go() -> None:
        await src.pump(args)
        src.flush()
        src.ml.samples()
    t0 = time.perf_counter()
    asyncio.run(go())
    dt = time.perf_counter() - t0
    assert src.entries_read == n, (src.entries_read, n)
    return n / dt


def python_side_rate(cfg: configmod.Config, src_args: list[str], n: int) -> float:
    """Our part alone (JSON decode + parser + state) over journalctl's captured output: the ceiling
    of the pipeline when journalctl and the exporter each have a free core."""
    out = subprocess.run(src_args, capture_output=True, check=True).stdout.decode()
    lines = [x for x in out.split("\n") if x]
    src = JournalSource(cfg, Hub(lambda: None))
    t0 = time.perf_counter()
    for i in range(0, len(lines), 500):  # chunks of about a pipe read
        src.apply_lines(lines[i:i + 500])
    src.flush()
    return n / (time.perf_counter() - t0)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp) / "j"
        d.mkdir()
        lines = (CYCLE * (n // len(CYCLE) + 1))[:n]
        t0 = time.perf_counter()
        written = write_journal(d / "bench.journal", entries(lines, clock=Clock()))
        gen = time.perf_counter() - t0
        assert written == n
        cfg = configmod.load({"journal.directory": str(d), "state.directory": str(pathlib.Path(tmp) / "st")}, None, {})
        probe = JournalSource(cfg, Hub(lambda: None))
        src_args = probe.base_args() + probe.matches()
        raw_args = ["journalctl", f"--directory={d}", "-o", "json"]
        raw, same, ours, py = [], [], [], []
        for _ in range(runs):
            raw.append(run_cmd_rate(raw_args, n))
            same.append(run_cmd_rate(src_args, n))
            ours.append(our_rate(JournalSource(cfg, Hub(lambda: None)), src_args, n))
            py.append(python_side_rate(cfg, src_args, n))
        med = statistics.median
        ratio = med(ours) / med(raw)
        size = os.path.getsize(d / "bench.journal")
        report = (
            f"entries: {n}, journal file {size / 1e6:.1f} MB (generated + systemd-journal-remote in {gen:.2f} s), "
            f"{runs} runs, median\n"
            f"journalctl -o json > /dev/null (raw peer):           {med(raw):9.0f} entries/s  {[round(x) for x in raw]}\n"
            f"journalctl with the source's arguments > /dev/null: {med(same):9.0f} entries/s  {[round(x) for x in same]}\n"
            f"source pipeline (journalctl | json | parser | state): {med(ours):9.0f} entries/s  {[round(x) for x in ours]}\n"
            f"python side alone (json | parser | state, no pipe): {med(py):9.0f} entries/s  {[round(x) for x in py]}\n"
            f"ours / raw journalctl: median {ratio:.0%}, best run {max(ours) / med(raw):.0%} (goal >= 80 %)\n"
            f"host: {os.cpu_count()} CPUs, load average before the run {os.getloadavg()[0]:.2f}\n"
        )
        print(report, end="")


if __name__ == "__main__":
    main()
