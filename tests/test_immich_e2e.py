"""End to end: the real exporter daemon polls the fake Immich; a real Prometheus scrapes it and the
seconds-per-job PromQL of docs/immich.md gives the truth of the fake's schedule."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.support import exposition
from tests.support.fake_immich import FakeImmich, Key, QueueSim, drain_with_arrivals
from tests.support.proc import ROOT, Exporter, wait_for
from tests.support.prometheus import Prometheus, available

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not available(), reason="prometheus binary not installed")]

KEY = "e2e-secret-key-0123456789"
WRONG_KEY = "k-7f3a9c0d1e2b"


def docs_seconds_per_job_expr() -> str:
    """The first PromQL block of docs/immich.md's seconds-per-job section, verbatim."""
    text = (ROOT / "docs" / "immich.md").read_text()
    section = text.split("## Seconds per job by provider (PromQL)", 1)[1]
    return re.search(r"```promql\n(.*?)```", section, re.S).group(1).strip()


def exporter_args(fake: FakeImmich, telemetry: bool = True) -> list[str]:
    args = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.journal",
            f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}", "--immich.interval=0.2",
            "--immich.timeout=1", "--log.level=debug"]
    return args + ([f"--immich.telemetry-url={fake.telemetry_url}"] if telemetry else [])


def test_prometheus_computes_seconds_per_job_with_the_documented_promql(tmp_path):
    t0 = time.monotonic() + 8.0  # after the exporter and Prometheus have their first samples
    sim = QueueSim("smartSearch", concurrency=2, job_seconds=0.25,
                   arrivals=drain_with_arrivals(t0, 40, arrival_every=0.3, arrivals=10, arrivals_from=1.0))
    with FakeImmich(queues=[sim], keys={KEY: Key()}) as fake, \
            Exporter(exporter_args(fake), env={"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY},
                     log_path=tmp_path / "exporter.log") as exporter, \
            Prometheus(tmp_path, [exporter.address]) as prom:
        prom.wait_for_samples('immich_queue_active_job_seconds_total{queue="smartSearch"}')
        wait_for(lambda: time.monotonic() > sim.last_end + 3.0, timeout=60, interval=0.2, what="the drain")
        metrics = exporter.metrics()
        expr = docs_seconds_per_job_expr().replace("[1h]", "[5m]")
        result = prom.wait_for_query(expr, lambda r: any(x["metric"].get("queue") == "smartSearch" for x in r))
        method = prom.query("immich_queue_processed_method_info")
    row = next(x for x in result if x["metric"]["queue"] == "smartSearch")
    print(f"seconds per job via PromQL: {row['value']:.4f}, truth {sim.truth():.4f}")
    assert row["metric"].get("provider", "") == ""  # no journal source: provider unknown (empty label)
    assert row["value"] == pytest.approx(sim.truth(), rel=0.15)
    assert method[0]["metric"]["method"] == "telemetry"
    assert exposition.value(metrics, "immich_queue_jobs_processed_total", queue="smartSearch") == len(sim.jobs)
    assert exposition.value(metrics, "immich_queue_last_run_jobs", queue="smartSearch") == len(sim.jobs)
    assert exposition.value(metrics, "immich_queue_drain_eta_seconds", queue="smartSearch") == 0
    assert KEY not in metrics and KEY not in exporter.logs()
    lint = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_exporter_reports_a_refused_key_as_source_down_with_its_reason(tmp_path):
    with FakeImmich() as fake, \
            Exporter(exporter_args(fake, telemetry=False), env={"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": WRONG_KEY},
                     log_path=tmp_path / "exporter.log") as exporter:
        wait_for(lambda: exposition.value(exporter.metrics(), "immich_gpu_exporter_source_errors_total",
                                          source="immich", reason="unauthorized"), timeout=10)
        metrics = exporter.metrics()
        logs = exporter.logs()
    assert exposition.value(metrics, "immich_gpu_exporter_source_up", source="immich") == 0
    assert WRONG_KEY not in metrics and WRONG_KEY not in logs
    assert len(re.findall(r"HTTP 401", logs)) >= 1 and "admin" in logs
