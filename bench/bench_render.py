"""Time to render one snapshot: our hand-written text renderer vs client_python's generate_latest.

    PYTHONPATH=. .venv/bin/python bench/bench_render.py [--series 1200] [--rounds 300]

The snapshot is the one bench_scrape.py serves: the synthetic source of bench/synthetic_exporter.py
(N `immich_queue_jobs` series) plus the exporter's self-health series, collected once through the
real Daemon. Both sides start from that same snapshot and produce the same bytes (checked here
and in tests/test_exposition.py):

* ours: `metrics.grouped()` + `metrics.render_text()` (what the daemon runs on every snapshot change);
* client_python: `metrics.grouped()` + families (`CounterMetricFamily`/`GaugeMetricFamily`) +
  `prometheus_client.exposition.generate_latest()` on a private registry (what a client_python
  custom collector costs).

The rounds alternate between the two, so machine load hits both alike; the table gives the median
and the 10th/90th percentiles per render, and gzip (level 6, what /metrics serves to Prometheus)
of our bytes for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from importlib.metadata import version  # noqa: E402

from prometheus_client.exposition import generate_latest  # noqa: E402

from immich_gpu_exporter import metrics  # noqa: E402
from immich_gpu_exporter.daemon import Daemon  # noqa: E402
from synthetic_exporter import Synthetic  # noqa: E402


def snapshot(series: int):  # type: ignore[no-untyped-def]
    async def collect():  # type: ignore[no-untyped-def]
        d = Daemon([Synthetic(series)])
        await d.collect_source(d.sources[0])
        return d.snapshot
    return asyncio.run(collect())


def ours(snap) -> bytes:  # type: ignore[no-untyped-def]
    return metrics.render_text(metrics.grouped(snap))


def client_python(snap) -> bytes:  # type: ignore[no-untyped-def]
    return generate_latest(metrics._registry(metrics.families(snap)))


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, default=1200)
    ap.add_argument("--rounds", type=int, default=300)
    a = ap.parse_args()
    snap = snapshot(a.series)
    text = ours(snap)
    if text != client_python(snap):
        raise SystemExit("the two renderers disagree; tests/test_exposition.py says where")
    n = sum(1 for line in text.split(b"\n") if line and not line.startswith(b"#"))
    times: dict[str, list[float]] = {"ours": [], "client_python": [], "gzip": []}
    for _ in range(10):  # warm-up
        ours(snap), client_python(snap)
    for _ in range(a.rounds):
        for name, fn in (("ours", ours), ("client_python", client_python)):
            t0 = time.perf_counter()
            fn(snap)
            times[name].append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        gzip.compress(text, compresslevel=6, mtime=0)
        times["gzip"].append((time.perf_counter() - t0) * 1e3)
    load = os.getloadavg()[0]
    print(f"{n} series, {len(text) / 1024:.1f} KiB; Python {platform.python_version()}, prometheus_client "
          f"{version('prometheus_client')}, "
          f"{os.cpu_count()} CPUs, load average {load:.2f}, {a.rounds} alternating rounds, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print()
    print("| renderer | median ms | p10 ms | p90 ms | vs client_python (median) |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["client_python"])
    for name, label in (("client_python", "client_python `generate_latest` (families + registry)"),
                        ("ours", "ours: `render_text` (hand-written)"),
                        ("gzip", "gzip level 6 of our bytes (served to Prometheus)")):
        med = statistics.median(times[name])
        print(f"| {label} | {med:.2f} | {pct(times[name], 0.1):.2f} | {pct(times[name], 0.9):.2f} | "
              f"{med / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
