"""Every panel of the shipped dashboard returns data from a real Prometheus that scraped the real
`immich-gpu-exporter demo` (a subprocess, sped up so one CPU-then-CUDA loop takes 20 s)."""

from __future__ import annotations

import math
import time

import pytest

from tests.support.demo import NOT_IN_DEMO_PREFIX
from tests.support import dashboard
from tests.support.prometheus import Prometheus, available
from tests.support.proc import Exporter, http_get

pytestmark = pytest.mark.integration

SPEED = 4  # 80 s of scenario in 20 s
RANGE = "5m"  # $__range: longer than the whole test, so it covers every sample


def panel_targets() -> list[tuple[str, str, str, bool]]:
    """(panel title, refId, expanded expr, instant?) of every query of every panel."""
    out = []
    for p in dashboard.panels():
        for t in p.get("targets", []):
            out.append((p["title"], t["refId"], dashboard.substitute(t["expr"], range_=RANGE), bool(t.get("instant"))))
    return out


def finite(rows: list[dict]) -> list[dict]:
    """Series that have at least one real number (an instant or a range result)."""
    keep = []
    for r in rows:
        values = [r["value"]] if "value" in r else [v for _, v in r["values"]]
        if any(math.isfinite(v) for v in values):
            keep.append(r)
    return keep


def seconds_per_job_bar() -> str:
    [expr] = [e for title, _, e, _ in panel_targets() if title == "Seconds per job by queue and provider"]
    return expr


def smart_search_by_provider(rows: list[dict]) -> dict[str, float]:
    return {r["metric"].get("provider", ""): r["value"] for r in rows
            if r["metric"].get("queue") == "smartSearch" and math.isfinite(r["value"])}


@pytest.mark.skipif(not available(), reason="prometheus is not installed")
def test_every_panel_returns_data_in_demo_mode_and_the_bar_shows_cpu_slower_than_cuda(tmp_path):
    started = time.time()
    with Exporter([f"--demo.speed={SPEED}"], command="demo", log_path=tmp_path / "exporter.log") as exporter, \
            Prometheus(tmp_path, [exporter.address]) as prom:
        # The daemon's HTTP front works as usual in demo mode, and says DEMO.
        status, _, page = http_get(exporter.url + "/")
        assert status == 200 and b"DEMO" in page
        # Data covering a CPU phase and a CUDA phase: the bar has both providers for smartSearch.
        prom.wait_for_query(seconds_per_job_bar(),
                            lambda rows: {"CPUExecutionProvider", "CUDAExecutionProvider"}
                            <= set(smart_search_by_provider(rows)), timeout=90)
        bar = smart_search_by_provider(prom.query(seconds_per_job_bar()))
        cpu, cuda = bar["CPUExecutionProvider"], bar["CUDAExecutionProvider"]
        assert cpu > cuda > 0, bar
        assert cpu / cuda > 2, bar  # the scenario runs smart search ~4x faster on CUDA

        end = time.time()
        empty = []
        for title, ref, expr, instant in panel_targets():
            # Grafana runs a timeseries panel's query over the time range, a stat/table/bar instantly.
            rows = prom.query(expr) if instant else prom.query_range(expr, started, end, 1.0)
            # the demo host has no containers and runs no Smart Search probe
            if not finite(rows) and not any(prefix in expr for prefix in NOT_IN_DEMO_PREFIX):
                empty.append(f"{title} [{ref}]: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty) + "\n" + exporter.logs()[-2000:]
        assert len(panel_targets()) >= 30
        # The dashboard's Data panel says DEMO for this instance (and live for an instance that is not).
        [data] = [e for title, _, e, _ in panel_targets() if title == "Data"]
        assert [r["value"] for r in prom.query(data)] == [1]
        assert [r["value"] for r in prom.query(data.replace('instance=~".*"', 'instance=~"elsewhere"'))] == [0]
