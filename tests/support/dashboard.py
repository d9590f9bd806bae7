"""Reading the shipped Grafana dashboard: its panels' queries with the variables substituted."""

from __future__ import annotations

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "immich-gpu-dashboard.json"


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict | None = None) -> list[dict]:
    dash = dash or load()
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def substitute(expr: str, instance: str = ".*", gpu: str = ".*", range_: str = "5m", rate: str = "1m",
               immich: str = ".*") -> str:
    """Grafana's variables and built-ins as Grafana would expand them for a query."""
    expr = expr.replace("$__rate_interval", rate).replace("$__range", range_).replace("$__interval", "15s")
    expr = expr.replace("$immich", immich).replace("$instance", instance).replace("$gpu", gpu)
    assert "$" not in re.sub(r'"\$\d"', "", expr), f"unsubstituted variable in {expr}"
    return expr


def queries(dash: dict | None = None, **subst: str) -> list[tuple[str, str, str]]:
    """(panel title, refId, expanded expr) of every target of every panel."""
    out = []
    for p in panels(dash):
        for t in p.get("targets", []):
            out.append((p["title"], t["refId"], substitute(t["expr"], **subst)))
    return out
