"""End to end: the exporter reads a real server journal, a real Prometheus scrapes it and evaluates
the shipped rules (only `for:` shortened): NVENC failing for every video fires
ImmichTranscodeFallback; healthy NVENC does not."""

from __future__ import annotations

import datetime
import re
import time

import pytest

from tests.support.exposition import value
from tests.support.journal import write_journal
from tests.support.prometheus import Prometheus, available
from tests.support.proc import Exporter, wait_for
from tests.support.prometheus import shortened_rules
from tests.test_transcode_journal import scenario, server_entries

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not available(), reason="prometheus is not installed")]


def run(tmp_path, name):
    jdir = tmp_path / "journal"
    jdir.mkdir()
    write_journal(jdir / "s.journal", server_entries(scenario("v3.1.0", name)))
    args = [f"--journal.directory={jdir}", f"--state.directory={tmp_path / 'state'}",
            "--no-collector.nvml", "--no-collector.systemd", "--no-collector.immich"]
    return Exporter(args)


def test_nvenc_failing_for_every_video_fires_the_alert(tmp_path):
    with run(tmp_path, "nvenc_fails_every_video") as ex:
        wait_for(lambda: value(ex.metrics(), "immich_transcode_fallback") == 1, 10, what="verdict")
        with Prometheus(tmp_path, {"immich-gpu-exporter": [ex.address]},
                        rule_files=[shortened_rules(tmp_path)]) as prom:
            alert = prom.wait_for_alert("ImmichTranscodeFallback", timeout=40)
            assert alert["labels"]["severity"] == "warning"
            assert alert["annotations"]["runbook"] == "docs/alerts.md#immichtranscodefallback"
            # what the dashboard shows for it: every video ended in software, 32 s each
            rows = prom.wait_for_query('immich_transcode_seconds_total{accel="disabled"} '
                                       '/ immich_transcode_completed_total{accel="disabled"}', timeout=10)
            assert rows[0]["value"] == pytest.approx(32.0, abs=0.01)


def rule_evaluated_after(prom, name, t):
    for g in prom.rules():
        for r in g.get("rules", []):
            if r.get("name") == name and r.get("lastEvaluation"):
                m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d{1,6})?", r["lastEvaluation"])
                assert m, r["lastEvaluation"]
                when = datetime.datetime.fromisoformat(m.group(1) + (m.group(2) or "") + "+00:00")
                return when.timestamp() > t
    return False


def test_healthy_nvenc_does_not_fire(tmp_path):
    with run(tmp_path, "nvenc_healthy") as ex:
        wait_for(lambda: value(ex.metrics(), "immich_transcode_completed_total", accel="nvenc",
                               decode="hardware") == 5, 10, what="five videos")
        with Prometheus(tmp_path, {"immich-gpu-exporter": [ex.address]},
                        rule_files=[shortened_rules(tmp_path)]) as prom:
            prom.wait_for_query("immich_transcode_fallback == 0", timeout=30)
            # the rule has been evaluated with the data for longer than its shortened for: (1 s)
            t = time.time() + 2.0
            wait_for(lambda: rule_evaluated_after(prom, "ImmichTranscodeFallback", t), 20, what="evaluations")
            assert not [a for a in prom.alerts() if a["labels"]["alertname"] == "ImmichTranscodeFallback"]
