"""The metric names the shipped dashboard and alert rules depend on (what demo mode must fill)."""

from __future__ import annotations

import re

import yaml

from . import dashboard
from .dashboard import ROOT

RULES = ROOT / "deploy/prometheus/immich-gpu-exporter.rules.yml"
_NAME = re.compile(r"\b(immich_[a-z0-9_]+)")


def dashboard_metrics() -> set[str]:
    d = dashboard.load()
    names = {n for _, _, expr in dashboard.queries(d) for n in _NAME.findall(expr)}
    for v in d["templating"]["list"]:  # the variables' label_values() queries
        names.update(_NAME.findall(v.get("definition", "")))
    return names


def rule_metrics() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {n for g in groups for r in g["rules"] for n in _NAME.findall(r["expr"])}


def used_metrics() -> set[str]:
    return dashboard_metrics() | rule_metrics()
