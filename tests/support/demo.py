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


# The demo replays a NixOS-style host: Immich runs as systemd units, so it has no Immich containers
# and no immich_container_* series. Those panels and ImmichContainerFailed are exercised against a
# real dockerd instead (tests/test_docker_e2e.py, tests/test_docker_source.py, the promtool cases).
# The Smart Search probe is opt-in and talks to a real API (docs/probe.md): the demo host does not run it;
# tests/test_probe.py exercises its panel's metric.
NOT_IN_DEMO_PREFIX = ("immich_container_", "immich_smart_search_probe_")


def used_metrics() -> set[str]:
    """The metrics the dashboard and the rules use that the demo host can have."""
    return {n for n in dashboard_metrics() | rule_metrics() if not n.startswith(NOT_IN_DEMO_PREFIX)}
