"""The shipped alert rules: promtool check, and promtool unit tests for every alert (fire and no-fire).

tests/prometheus/rules_test.yml lists the expected labels of each firing alert; the expected
annotations are filled in here from the rule file by substituting {{ $labels.x }}, so the test
file stays readable and a change of annotation text does not need two edits.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy/prometheus/immich-gpu-exporter.rules.yml"
TESTS = ROOT / "tests/prometheus/rules_test.yml"


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def _render(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def _with_annotations(tmp_path: pathlib.Path) -> pathlib.Path:
    spec = yaml.safe_load(TESTS.read_text())
    rules = _rules()
    for t in spec["tests"]:
        for case in t.get("alert_rule_test", []):
            for exp in case.get("exp_alerts", []):
                if "exp_annotations" in exp:
                    continue
                labels = exp["exp_labels"]
                candidates = [r for r in rules if r["alert"] == case["alertname"]
                              and all(labels.get(k) == v for k, v in r.get("labels", {}).items())]
                assert len(candidates) == 1, (case["alertname"], labels)
                exp["exp_annotations"] = {k: _render(v, labels) for k, v in candidates[0]["annotations"].items()}
    spec["rule_files"] = [str(RULES)]
    out = tmp_path / "rules_test.yml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


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


def test_promtool_unit_tests_pass(tmp_path):
    r = subprocess.run(["promtool", "test", "rules", str(_with_annotations(tmp_path))], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_can_fail(tmp_path):
    """Guard against a harness that always passes: flip one expectation and promtool must fail."""
    path = _with_annotations(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["tests"][0]["alert_rule_test"][0]["exp_alerts"] = [{"exp_labels": {"severity": "warning"}}]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    r = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode != 0
