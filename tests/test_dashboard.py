"""The shipped dashboard: up to date with its generator, valid, unique ids and titles, and every
query parses (promtool) and names only metrics the exporter defines."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from immich_gpu_exporter.metrics import definition
from tests.support import dashboard
from tests.support.dashboard import ROOT

PROMQL_FUNCS_AND_WORDS = {"sum", "max", "min", "count", "by", "on", "rate", "increase", "time", "vector", "or",
                          "and", "unless", "label_replace", "max_over_time", "ignoring", "group_left"}


def test_json_is_generated_from_the_builder_and_up_to_date():
    r = subprocess.run([sys.executable, str(ROOT / "grafana/build_dashboard.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_ids_titles_and_grid_are_sound():
    d = dashboard.load()
    ps = dashboard.panels(d)
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in ps]
    assert len(titles) == len(set(titles)), [t for t in titles if titles.count(t) > 1]
    for p in ps:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and 0 <= g["x"] and g["x"] + g["w"] <= 24
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
    assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "immich", "instance", "gpu"}
    assert d["uid"] == "immich-gpu"


def test_every_query_names_only_defined_metrics_and_filters_by_installation_and_instance():
    for title, ref, expr in dashboard.queries(dashboard.load()):
        names = set(re.findall(r"\b(immich_[a-z0-9_]+)", expr))
        assert names, (title, expr)
        for n in names:
            assert definition(n) is not None, f"panel {title!r} uses undefined metric {n}"
        assert 'instance=~".*"' in expr, f"panel {title!r} ignores $instance"
        assert 'immich=~".*"' in expr, f"panel {title!r} ignores $immich (the installation of a two-host set-up)"


def test_every_query_parses_with_promtool(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"panel:q{i}", "expr": expr} for i, (_, _, expr) in enumerate(dashboard.queries())]}]}
    f = tmp_path / "dash_rules.yml"
    f.write_text(yaml.safe_dump(rules))
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
