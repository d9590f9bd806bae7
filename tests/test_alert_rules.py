"""The shipped alert rules: promtool check, and promtool unit tests for every alert (fire and no-fire).

tests/prometheus/rules_test.yml runs as shipped (`promtool test rules tests/prometheus/rules_test.yml`,
as a user who edits the rules would run it): it carries the expected labels and annotations of each
firing alert; tests/prometheus/fill_annotations.py writes the annotations from the rule file.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy/prometheus/immich-gpu-exporter.rules.yml"
TESTS = ROOT / "tests/prometheus/rules_test.yml"
FILL = ROOT / "tests/prometheus/fill_annotations.py"


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_rules_pass_promtool_check():
    r = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_fire_and_no_fire_cases_and_a_runbook_section():
    spec = yaml.safe_load(TESTS.read_text())
    fired, silent = set(), set()
    for t in spec["tests"]:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    runbook = (ROOT / "docs/alerts.md").read_text().lower()
    for r in _rules():
        assert r["alert"] in fired, f"{r['alert']} has no test where it fires"
        assert r["alert"] in silent, f"{r['alert']} has no test where it stays silent"
        assert {"summary", "description", "runbook"} <= set(r["annotations"]), r["alert"]
        assert f"## {r['alert'].lower()}" in runbook, f"docs/alerts.md lacks a section for {r['alert']}"


def test_promtool_unit_tests_pass_on_the_file_as_shipped():
    # from another directory: rule_files resolve against the test file's own directory
    r = subprocess.run(["promtool", "test", "rules", str(TESTS)], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_shipped_file_carries_the_annotations_of_the_rule_file():
    r = subprocess.run([sys.executable, str(FILL), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_promtool_unit_tests_can_fail(tmp_path):
    """Guard against a harness that always passes: a wrong label, then a wrong annotation, must fail."""
    spec = yaml.safe_load(TESTS.read_text())
    spec["rule_files"] = [str(RULES)]
    exp = spec["tests"][0]["alert_rule_test"][1]["exp_alerts"][0]
    for broken in ({**exp, "exp_labels": {"severity": "warning"}},
                   {**exp, "exp_annotations": {**exp["exp_annotations"], "summary": "something else"}}):
        spec["tests"][0]["alert_rule_test"][1]["exp_alerts"] = [broken]
        path = tmp_path / "rules_test.yml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        r = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
        assert r.returncode != 0
        assert "FAILED" in r.stdout + r.stderr
