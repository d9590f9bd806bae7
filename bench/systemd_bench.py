"""Benchmark of the systemd source against a real (nested) systemd, with node_exporter's systemd
collector as the named peer, measured in the same run on the same units.

1. Scrape latency of /metrics with 5 watched units: ours serves cached bytes (collection runs in
   the background); node_exporter --collector.systemd talks D-Bus during each scrape.
2. Change latency: from `systemctl start/stop` returning to the new state on our /metrics
   (signal path; the poll interval is set to 60 s so polling cannot be what answers).

Run as root from the repo root:  python bench/systemd_bench.py [--out bench/RESULTS-systemd.md]
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.exposition import value  # noqa: E402
from tests.support.nested_systemd import start_nested_systemd, stop_nested_systemd  # noqa: E402
from tests.support.proc import Exporter, free_port, wait_for  # noqa: E402

UNITS = ["immich-server.service", "immich-machine-learning.service", "nvidia-container-toolkit-cdi-generator.service",
         "postgresql.service", "redis-immich.service"]
UNIT_TEXT = "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sleep 100000\nRestart=on-failure\nNice=5\nLimitMEMLOCK=infinity\n"


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def timed_scrapes(url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        get(url)
        out.append(time.perf_counter() - t)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--out", type=pathlib.Path)
    a = ap.parse_args()
    base = pathlib.Path(tempfile.mkdtemp(prefix="sdbench-"))
    ns = start_nested_systemd(base, {u: UNIT_TEXT for u in UNITS}, UNITS)
    node = ours = None
    try:
        ours = Exporter(["--no-collector.nvml", "--no-collector.journal", "--no-collector.immich",
                         "--systemd.interval=60", f"--systemd.cgroup-root={ns.cgroup}",
                         *[f"--systemd.unit={u}" for u in UNITS]],
                        env={"DBUS_SYSTEM_BUS_ADDRESS": ns.bus_address}, log_path=base / "ours.log").start()
        port = free_port()
        node = subprocess.Popen(
            ["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
             "--collector.systemd", "--collector.systemd.enable-restarts-metrics",
             "--collector.systemd.unit-include=(" + "|".join(u.replace(".", r"\.") for u in UNITS) + ")"],
            env={"DBUS_SYSTEM_BUS_ADDRESS": ns.bus_address, "PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL, stderr=open(base / "node.log", "wb"))
        node_url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: b'node_systemd_unit_state{name="immich-server.service",state="active"' in get(node_url)
                 and b'state="active",type="simple"} 1' in get(node_url), 20, what="node_exporter sees the units")
        wait_for(lambda: all(value(ours.metrics(), "immich_unit_state", unit=u, state="active") == 1 for u in UNITS),
                 20, what="ours sees the units")

        timed_scrapes(ours.url + "/metrics", 10)
        timed_scrapes(node_url, 10)
        s_ours = timed_scrapes(ours.url + "/metrics", a.scrapes)
        s_node = timed_scrapes(node_url, a.scrapes)

        unit = "immich-machine-learning.service"
        lat = []
        for i in range(a.changes):
            target = "inactive" if i % 2 == 0 else "active"
            (ns.stop_unit if target == "inactive" else ns.start_unit)(unit)
            t = time.perf_counter()
            while value(get(ours.url + "/metrics").decode(), "immich_unit_state", unit=unit, state=target) != 1:
                time.sleep(0.002)
                if time.perf_counter() - t > 10:
                    raise TimeoutError("change not seen")
            lat.append(time.perf_counter() - t)
    finally:
        if ours is not None:
            ours.stop()
        if node is not None:
            node.terminate()
            node.wait(5)
        stop_nested_systemd(ns)

    ms = lambda x: f"{x * 1000:.2f}"  # noqa: E731
    lines = [
        "# systemd source: benchmark results",
        "",
        f"Machine: {platform.node()} ({platform.machine()}, Python {platform.python_version()}), "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        "Real systemd 252 in the nested-systemd fixture, 5 watched units, same run for both exporters.",
        "Command: `python bench/systemd_bench.py` (root).",
        "",
        f"## Scrape latency of /metrics ({a.scrapes} sequential scrapes each)",
        "",
        "| exporter | median ms | p95 ms | max ms |",
        "|---|---|---|---|",
        f"| immich-gpu-exporter (cached, collected in background) | {ms(statistics.median(s_ours))} | "
        f"{ms(pct(s_ours, .95))} | {ms(max(s_ours))} |",
        f"| node_exporter 1.5 `--collector.systemd` only (D-Bus at scrape time) | {ms(statistics.median(s_node))} | "
        f"{ms(pct(s_node, .95))} | {ms(max(s_node))} |",
        "",
        f"## Change latency ({a.changes} start/stop changes, poll interval 60 s so only signals can answer)",
        "",
        "From `systemctl start|stop` returning to the new `immich_unit_state` on /metrics (polled every 2 ms):",
        f"median {ms(statistics.median(lat))} ms, max {ms(max(lat))} ms. node_exporter has no push path: its "
        "value is as fresh as the scrape that reads it, at the scrape-time cost above.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
