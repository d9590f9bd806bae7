"""Write the expected annotations of every firing alert into rules_test.yml.

promtool (2.42 and later) compares annotations too, so the file must carry them to pass as
shipped (`promtool test rules tests/prometheus/rules_test.yml`). After adding a test case or
changing an annotation in deploy/prometheus/immich-gpu-exporter.rules.yml, run

    python tests/prometheus/fill_annotations.py          # rewrite expectations that differ or are missing
    python tests/prometheus/fill_annotations.py --check  # exit 1 if any would change

Only the `exp_annotations:` blocks are touched (comments and layout stay): each is rendered from
the rule the case's labels select, with `{{ $labels.x }}` substituted as Prometheus does.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import yaml

HERE = pathlib.Path(__file__).resolve().parent
TESTS = HERE / "rules_test.yml"
RULES = HERE.parents[1] / "deploy/prometheus/immich-gpu-exporter.rules.yml"
_EXP = re.compile(r"^(\s*)- exp_labels:")


def render(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def expected_annotations(rules_text: str, tests_text: str) -> list[dict[str, str]]:
    """Annotations of each exp_alerts entry, in the order the entries appear in the file."""
    rules = [r for g in yaml.safe_load(rules_text)["groups"] for r in g["rules"] if "alert" in r]
    out = []
    for t in yaml.safe_load(tests_text)["tests"]:
        for case in t.get("alert_rule_test", []):
            for exp in case.get("exp_alerts") or []:
                labels = exp["exp_labels"]
                rule = [r for r in rules if r["alert"] == case["alertname"]
                        and all(labels.get(k) == v for k, v in r.get("labels", {}).items())]
                if len(rule) != 1:
                    raise SystemExit(f"{case['alertname']} {labels}: {len(rule)} rules match these labels")
                out.append({k: render(v, labels) for k, v in rule[0].get("annotations", {}).items()})
    return out


def fill(tests_text: str, rules_text: str) -> str:
    wanted = iter(expected_annotations(rules_text, tests_text))
    lines = tests_text.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        m = _EXP.match(line)
        if not m:
            continue
        indent = " " * (len(m.group(1)) + 2)
        if i < len(lines) and lines[i].startswith(indent + "exp_annotations:"):  # replace the old block
            i += 1
            while i < len(lines) and lines[i].startswith(indent + "  "):
                i += 1
        annotations = next(wanted)
        if annotations:
            out.append(f"{indent}exp_annotations:\n")
            out.extend(f"{indent}  {k}: {json.dumps(v, ensure_ascii=False)}\n" for k, v in annotations.items())
    return "".join(out)


def main(argv: list[str]) -> int:
    old = TESTS.read_text()
    new = fill(old, RULES.read_text())
    if "--check" in argv:
        if new != old:
            print(f"{TESTS}: expected annotations are missing or stale; run {sys.argv[0]}", file=sys.stderr)
            return 1
        return 0
    if new != old:
        TESTS.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
