"""End to end: the exporter reads a real journal in which CUDA fails to start, a real Prometheus
evaluates the shipped rules (with the `for:` durations shortened), and a real Alertmanager receives
ImmichMLCPUFallback."""

from __future__ import annotations

import pathlib


from tests.support.alertmanager import Alertmanager
from tests.support.exposition import value
from tests.support.journal import write_journal
from tests.support.prometheus import Prometheus, shortened_rules
from tests.support.proc import Exporter, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[1]



def test_cpu_fallback_reaches_a_real_alertmanager(tmp_path):
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    # the REAL Immich v3.1.0 ML service on onnxruntime-gpu without the CUDA libraries (tests/fixtures/real-ml)
    real = pathlib.Path(__file__).resolve().parent / "fixtures/real-ml/v3.1.0-gpu-nixpkgs/unit.export"
    write_journal(journal_dir / "system.journal", real.read_bytes())
    args = [f"--journal.directory={journal_dir}", f"--state.directory={tmp_path / 'state'}",
            "--no-collector.nvml", "--no-collector.systemd", "--no-collector.immich"]
    with Exporter(args) as ex:
        wait_for(lambda: value(ex.metrics(), "immich_ml_cpu_fallback") == 1, 10, what="fallback detected")
        with Alertmanager(tmp_path) as am, Prometheus(tmp_path, {"immich-gpu-exporter": [ex.address]},
                                                      rule_files=[shortened_rules(tmp_path)],
                                                      alertmanager_url=am.address) as prom:
            firing = prom.wait_for_alert("ImmichMLCPUFallback", timeout=40)
            assert firing["labels"]["condition"] == "log"

            def received():
                return [a for a in am.alerts() if a["labels"].get("alertname") == "ImmichMLCPUFallback"]

            got = wait_for(received, 30, what="ImmichMLCPUFallback in Alertmanager")
            alert = got[0]
            assert alert["status"]["state"] == "active"
            assert alert["labels"]["severity"] == "warning" and alert["labels"]["job"] == "immich-gpu-exporter"
            assert "fell back to the CPU" in alert["annotations"]["summary"]
            assert alert["annotations"]["runbook"] == "docs/alerts.md#immichmlcpufallback"
            # the exporter is healthy, so its own health alerts stay silent
            names = {a["labels"]["alertname"] for a in am.alerts()}
            assert not names & {"ImmichGPUExporterAbsent", "ImmichGPUExporterDown"}
