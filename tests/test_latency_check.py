"""With telemetry off or incomplete, `check` and the landing page say exactly what to enable, and the
exporter exposes no latency series that would pretend (docs/latency.md).

The real `immich-gpu-exporter check --json` and the real daemon against the fake Immich, whose two
telemetry endpoints answer like the real server with IMMICH_TELEMETRY_INCLUDE=all (repository durations)
or =job (without them), or do not listen at all.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support.exposition import parse, value
from tests.support.fake_immich import FakeImmich, Key
from tests.support.immich_telemetry import TelemetrySim
from tests.support.proc import Exporter, free_port, http_get, run_cli, wait_for

pytestmark = pytest.mark.integration

KEY = "latency-check-key-77aa"
OFF = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.journal", "--no-collector.docker",
       "--no-collector.processes", "--immich.timeout=1"]


def latency_row(args: list[str]) -> dict:
    r = run_cli(["check", "--json", *OFF, *args], env={"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY}, timeout=60)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    (row,) = [c for c in json.loads(r.stdout)["checks"] if c["id"] == "latency_telemetry"]
    return row


def test_check_says_what_to_enable_for_each_process():
    sim = TelemetrySim()
    sim.record("api", "machine_learning", "encode_text", 12.0)
    sim.record("api", "search", "search_smart", 5.0)
    sim.record("microservices", "machine_learning", "encode_image", 40.0)
    with FakeImmich(keys={KEY: Key()}, latency=sim) as fake:
        base = [f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}"]
        # nothing configured: both URLs named
        row = latency_row(base)
        assert row["status"] == "WARN"
        assert "--immich.api-telemetry-url=http://SERVER:8081/metrics" in row["fix"]
        assert "--immich.telemetry-url=http://SERVER:8082/metrics" in row["fix"]
        # both configured and serving repository durations
        both = [*base, f"--immich.telemetry-url={fake.telemetry_url}", f"--immich.api-telemetry-url={fake.api_telemetry_url}"]
        row = latency_row(both)
        assert row["status"] == "PASS", row
        assert "encode_text 1" in row["finding"] and "search_smart 1" in row["finding"]
        assert "encode_image 1" in row["finding"]
        # the API process's telemetry does not answer (telemetry off, or its port not published)
        closed = f"http://127.0.0.1:{free_port()}/metrics"
        row = latency_row([*base, f"--immich.telemetry-url={fake.telemetry_url}", f"--immich.api-telemetry-url={closed}"])
        assert row["status"] == "WARN" and row["details"]["api"]["status"] == "unreachable"
        assert "IMMICH_TELEMETRY_INCLUDE=all" in row["fix"] and "8081" in row["fix"]
        assert "microservices" not in row["fix"]
    # telemetry without the repo group (IMMICH_TELEMETRY_INCLUDE=job)
    with FakeImmich(keys={KEY: Key()}, latency=None) as fake:
        row = latency_row([f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}",
                           f"--immich.telemetry-url={fake.telemetry_url}",
                           f"--immich.api-telemetry-url={fake.api_telemetry_url}"])
        assert row["status"] == "WARN"
        assert row["details"]["api"]["status"] == row["details"]["microservices"]["status"] == "no_repo"
        assert "add repo to the server's IMMICH_TELEMETRY_INCLUDE" in row["fix"]


def test_daemon_without_repo_durations_exposes_no_latency_series_and_says_why(tmp_path):
    with FakeImmich(keys={KEY: Key()}, latency=None) as fake, \
            Exporter([*OFF, f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}", "--immich.interval=0.2",
                      f"--immich.telemetry-url={fake.telemetry_url}",
                      f"--immich.api-telemetry-url={fake.api_telemetry_url}"],
                     env={"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY}, log_path=tmp_path / "e.log") as exp:
        wait_for(lambda: value(parse(exp.metrics()), "immich_server_telemetry_repo_enabled", worker="api") == 0, 15,
                 what="repo_enabled 0 for the API process")
        text = exp.metrics()
        assert value(parse(text), "immich_server_telemetry_repo_enabled", worker="microservices") == 0
        assert "immich_ml_call_duration_seconds" not in text and "immich_smart_search_query" not in text
        status, _, body = http_get(exp.url + "/")
        page = body.decode()
        assert "add repo to the server&#x27;s IMMICH_TELEMETRY_INCLUDE" in page, page
        assert "repository durations" in exp.logs()


def test_calls_made_while_the_exporter_was_stopped_are_counted_once_after_its_restart(tmp_path):
    """The latency histograms and the last reading of each process are kept in the state directory:
    a restart continues the counters (no reset), the calls made meanwhile are counted at the first poll,
    nothing twice; a corrupt state file is set aside with one warning."""
    sim = TelemetrySim()
    sim.record("api", "system_metadata", "get", 0.5)
    state = tmp_path / "state"
    with FakeImmich(keys={KEY: Key()}, latency=sim) as fake:
        args = [*OFF, f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}", "--immich.interval=0.2",
                f"--immich.api-telemetry-url={fake.api_telemetry_url}", f"--state.directory={state}"]
        count = lambda exp: value(parse(exp.metrics()), "immich_smart_search_query_duration_seconds_count",  # noqa: E731
                                  provider="")
        with Exporter(args, log_path=tmp_path / "one.log") as exp:
            wait_for(lambda: count(exp) == 0, 15, what="the series at 0")
            for ms in (5.0, 6.0, 7.0):
                sim.record("api", "search", "search_smart", ms)
            wait_for(lambda: count(exp) == 3, 15, what="three searches")
        assert (state / "latency-state.json").exists()
        for ms in (8.0, 9.0):  # while the exporter is stopped
            sim.record("api", "search", "search_smart", ms)
        with Exporter(args, log_path=tmp_path / "two.log") as exp:
            wait_for(lambda: count(exp) == 5, 15, what="the two searches made while it was stopped")
            time.sleep(0.6)
            m = parse(exp.metrics())
            assert count(exp) == 5
            assert value(m, "immich_smart_search_query_duration_seconds_sum", provider="") == pytest.approx(0.035)
            assert "resuming the latency histograms" in exp.logs()
        (state / "latency-state.json").write_text('{"version": 1, "latency": {"acc": "nope"}}')
        with Exporter(args, log_path=tmp_path / "three.log") as exp:
            wait_for(lambda: count(exp) == 0, 15, what="a fresh start after the corrupt state")
            assert exp.logs().count("unusable latency state") == 1
        assert (state / "latency-state.json.bad").exists()
