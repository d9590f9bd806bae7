"""The delay from the first evidence of a CPU fallback (or a crash) to the exporter's verdict, on the real captures.

    PYTHONPATH=. python bench/bench_verdict.py [RUNS]

Two parts, both over every real capture in tests/fixtures/real-ml/ that has a fallback or a crash:

1. Journal time (from the capture itself, no clock of ours): when the evidence the verdict uses reached the
   journal, against the peer, the EP Error block of the same worker ("Falling back to [...]"), which was
   the evidence the exporter used before: how long after the first evidence it arrived, and the longest wait
   for any worker's first block (with the nixpkgs launch that is the rebooted worker's, flushed only at
   `systemctl stop`). Without PYTHONUNBUFFERED, that wait is how long a block-based verdict was wrong.
2. Wall clock through the real daemon: the exporter follows a real journal directory; the capture's
   entries before the first evidence are written, then the evidence entry; measured from the moment
   systemd-journal-remote is started to write it until /metrics shows the verdict (cpu_fallback 1, or for a crash
   immich_ml_session_crashes_total 1). Both clocks start just before systemd-journal-remote is run to
   append the entry. Peer in the same run: a plain `journalctl --follow -o json` on the same directory,
   until it prints that entry (the floor: nothing that reads the journal can see it sooner).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.exposition import value  # noqa: E402
from tests.support.journal import write_journal  # noqa: E402
from tests.support.proc import Exporter  # noqa: E402

REAL_ML = ROOT / "tests" / "fixtures" / "real-ml"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ONLY_JOURNAL = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.immich"]


def captures() -> list[pathlib.Path]:
    out = []
    for m in sorted(REAL_ML.glob("*/manifest.json")):
        t = json.loads(m.read_text())["truth"]
        if (t["fallback"] or t["crash"]) and (m.parent / "unit.export").exists():
            out.append(m.parent)
    return out


def split_export(data: bytes) -> list[bytes]:
    """The export's entries as raw byte blocks (each ends with the blank line)."""
    out, i, start = [], 0, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if not line:
            out.append(data[start:nl + 1])
            start = i = nl + 1
        elif b"=" in line:
            i = nl + 1
        else:
            n = int.from_bytes(data[nl + 1:nl + 9], "little")
            i = nl + 9 + n + 1
    return out


def parse_export(data: bytes) -> list[dict[str, bytes]]:
    entries = []
    for block in split_export(data):
        e, i = {}, 0
        while i < len(block) - 1:
            nl = block.index(b"\n", i)
            line = block[i:nl]
            if b"=" in line:
                k, v = line.split(b"=", 1)
                e[k.decode()] = v
                i = nl + 1
            else:
                n = int.from_bytes(block[nl + 1:nl + 9], "little")
                e[line.decode()] = block[nl + 9:nl + 9 + n]
                i = nl + 9 + n + 1
        entries.append(e)
    return entries


def journal_time(fx: pathlib.Path) -> dict[str, float | str]:
    m = json.loads((fx / "manifest.json").read_text())
    ev = m["truth"]["first_evidence"]
    entries = parse_export((fx / "unit.export").read_bytes())
    text = [(int(e["__REALTIME_TIMESTAMP"]), e.get("_PID", b"").decode(),
             ANSI.sub("", e.get("MESSAGE", b"").decode("utf-8", "replace"))) for e in entries]
    first_block = next((t for t, _, x in text if t >= ev["realtime_us"] and x.startswith("Falling back to")), None)
    # every block against its session's native line (the worker's latest ORT error before it)
    waits, native = [], {}
    for t, p, x in text:
        if "[E:onnxruntime" in x or "[W:onnxruntime" in x:
            native[p] = t
        elif x.startswith("Falling back to") and p in native:
            waits.append((t - native.pop(p)) / 1e6)
    return {"capture": fx.name, "unbuffered": m["env"].get("PYTHONUNBUFFERED", "-"),
            "first_block_after_s": None if first_block is None else (first_block - ev["realtime_us"]) / 1e6,
            "longest_worker_wait_s": max(waits) if waits else None}


def wall_clock(fx: pathlib.Path, runs: int) -> tuple[list[float], list[float]]:
    m = json.loads((fx / "manifest.json").read_text())
    crash = m["truth"]["crash"]
    ev = m["truth"]["first_evidence"]
    blocks = split_export((fx / "unit.export").read_bytes())
    cut = ev["index"]
    ours, peer = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as d:
            jdir = pathlib.Path(d) / "journal"
            jdir.mkdir()
            jfile = jdir / "ml.journal"
            write_journal(jfile, b"".join(blocks[:cut]))
            args = [*ONLY_JOURNAL, f"--journal.directory={jdir}", f"--state.directory={d}/state",
                    f"--journal.nvidia-driver-path={jdir}"]  # the host check off the path: log evidence only
            with Exporter(args) as exp:
                deadline = time.monotonic() + 20
                while value(exp.metrics(), "immich_ml_preferred_execution_provider",
                            provider="CUDAExecutionProvider") != 1:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{fx.name}: the exporter never read the entries before the evidence")
                    time.sleep(0.02)
                follower = subprocess.Popen(["journalctl", "--follow", "-o", "json", f"--directory={jdir}",
                                             "--lines=0", "--no-pager"], stdout=subprocess.PIPE)
                time.sleep(0.3)  # journalctl has set up its inotify watch
                t0 = time.monotonic()  # both clocks start before the entry is written
                write_journal(jfile, blocks[cut])
                seen = None
                while True:
                    now = time.monotonic()
                    if seen is None and select.select([follower.stdout], [], [], 0)[0]:
                        follower.stdout.readline()
                        seen = now - t0
                    text = exp.metrics()
                    done = (value(text, "immich_ml_session_crashes_total") == 1 if crash
                            else value(text, "immich_ml_cpu_fallback") == 1)
                    if done:
                        ours.append(time.monotonic() - t0)
                        break
                    if now - t0 > 10:
                        raise RuntimeError(f"{fx.name}: no verdict within 10 s")
                    time.sleep(0.002)
                if seen is None:
                    select.select([follower.stdout], [], [], 5)
                    follower.stdout.readline()
                    seen = time.monotonic() - t0
                peer.append(seen)
                follower.kill()
                follower.wait()
    return ours, peer


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    fxs = captures()
    print("## 1. journal time: the peer (EP Error block) against the first evidence\n")
    print("| capture | PYTHONUNBUFFERED | first block after the first evidence | longest wait of a block for its session's ORT line |")
    print("|---|---|---|---|")
    for fx in fxs:
        r = journal_time(fx)
        fb = "no block" if r["first_block_after_s"] is None else f"{r['first_block_after_s']:.3f} s"
        lw = "-" if r["longest_worker_wait_s"] is None else f"{r['longest_worker_wait_s']:.3f} s"
        print(f"| {r['capture']} | {r['unbuffered']} | {fb} | {lw} |")
    print(f"\n## 2. wall clock, real daemon, {runs} runs each (median, max)\n")
    print("| capture | evidence entry -> /metrics verdict | peer: journalctl --follow prints it |")
    print("|---|---|---|")
    for fx in fxs:
        ours, peer = wall_clock(fx, runs)
        print(f"| {fx.name} | {statistics.median(ours) * 1000:.0f} ms (max {max(ours) * 1000:.0f}) | "
              f"{statistics.median(peer) * 1000:.0f} ms (max {max(peer) * 1000:.0f}) |")
    print(f"\nhost: {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
