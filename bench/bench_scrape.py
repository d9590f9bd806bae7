"""/metrics latency and throughput: immich-gpu-exporter vs node_exporter and vs the bare-bytes floor.

All three run on loopback in the same run; wrk (one thread, one connection, keep-alive) drives each
for the same duration, with and without `Accept-Encoding: gzip` (what Prometheus sends).
Our exporter serves >= 1,000 series from a synthetic source that changes every second, through
the real daemon, renderer and aiohttp app: a scrape reads bytes rendered when the values changed.
node_exporter collects at scrape time, so the two answer different questions at a scrape; the
second peer, the floor, is an aiohttp app serving our very body from memory
(bench/static_bytes_server.py): what cached bytes cost with nothing behind them. Prints a Markdown
table for BENCHMARKS.md.

    .venv/bin/python bench/bench_scrape.py [--series 1200] [--duration 5]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support.proc import free_port, wait_for  # noqa: E402


def wrk(url: str, duration: int, gzip: bool) -> dict[str, float]:
    args = ["wrk", "-t1", "-c1", f"-d{duration}s", "--latency", url]
    if gzip:
        args[1:1] = ["-H", "Accept-Encoding: gzip"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        v = float(m.group(1))
        return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"p50": ms("50"), "p99": ms("99"), "rps": rps}


def series_count(url: str) -> tuple[int, int]:
    body = urllib.request.urlopen(url, timeout=5).read()
    n = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    return n, len(body)


def start(cmd: list[str], url: str) -> subprocess.Popen:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def up() -> bool:
        if p.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited")
        try:
            return urllib.request.urlopen(url, timeout=1).status == 200
        except OSError:
            return False

    wait_for(up, 20, what=url)
    time.sleep(1.5)  # let the first renders settle
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=1200)
    ap.add_argument("--duration", type=int, default=5)
    a = ap.parse_args()
    for tool in ("wrk", "prometheus-node-exporter"):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing: apt-get install wrk prometheus-node-exporter")
    ours_port, node_port, floor_port = free_port(), free_port(), free_port()
    ours_url, node_url = f"http://127.0.0.1:{ours_port}/metrics", f"http://127.0.0.1:{node_port}/metrics"
    floor_url = f"http://127.0.0.1:{floor_port}/metrics"
    procs = []
    body = tempfile.NamedTemporaryFile(prefix="bench-scrape-", suffix=".prom")
    try:
        procs.append(start([sys.executable, "bench/synthetic_exporter.py", f"127.0.0.1:{ours_port}", str(a.series)],
                           ours_url))
        procs.append(start(["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{node_port}"], node_url))
        body.write(urllib.request.urlopen(ours_url, timeout=5).read())
        body.flush()
        procs.append(start([sys.executable, "bench/static_bytes_server.py", f"127.0.0.1:{floor_port}", body.name],
                           floor_url))
        rows = []
        for name, url in (("node_exporter " + node_version() + " (collects at scrape time)", node_url),
                          ("floor: aiohttp serving our body from memory", floor_url),
                          ("immich-gpu-exporter (cached bytes)", ours_url)):
            n, size = series_count(url)
            for gz in (False, True):
                r = wrk(url, a.duration, gz)
                rows.append((name, n, size, gz, r))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        body.close()
    node = {gz: r for name, _, _, gz, r in rows if name.startswith("node")}
    floor = {gz: r for name, _, _, gz, r in rows if name.startswith("floor")}
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, {a.duration} s per row, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print()
    print("| server | series | body | gzip | p50 | p99 | req/s | p50 vs node_exporter | p50 vs floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, size, gz, r in rows:
        ratio = r["p50"] / node[gz]["p50"]
        print(f"| {name} | {n} | {size / 1024:.1f} KiB | {'yes' if gz else 'no'} | {r['p50']:.3f} ms | "
              f"{r['p99']:.3f} ms | {r['rps']:.0f} | {ratio:.3f} (1/{1 / ratio:.0f}) | "
              f"{r['p50'] / floor[gz]['p50']:.2f} |")


def node_version() -> str:
    out = subprocess.run(["prometheus-node-exporter", "--version"], capture_output=True, text=True)
    m = re.search(r"version ([\d.]+)", out.stdout + out.stderr)
    return m.group(1) if m else "?"


if __name__ == "__main__":
    main()
