"""Remote machine learning, as pure data: which provider is in force when the ML service runs on
another host.

Immich can send its ML work to another machine (a desktop with the GPU), even to a list of machines
it fails over between. The verdict (preferred and effective provider, CPU fallback) is made where
the ML service's log is: by the exporter on that host. The exporter on the server host, which sees
the job queues, needs that verdict to label the seconds per job with the provider in force, exactly
as one exporter does on one host. This module owns the two pure steps of that:

* `parse_verdict(text)`: the ML host exporter's /metrics text -> `Verdict` (a line scan of a few
  families, bounded; no full exposition parser on this path);
* `serving_index(health)`: which of Immich's ML URLs serves the work. Immich's log does not say
  (it logs failures and health changes only), so it is inferred the way Immich picks: the first URL
  of its list that answers its health check (`/ping`). docs/remote-ml.md states this inference.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Sequence

# A provider name as the ML host exports it (the label value is already bounded there).
_NAME = re.compile(r"[A-Za-z0-9_.:+@-]{1,80}")
_SAMPLE = re.compile(r'^(?P<name>[a-z_:][a-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)')
_LABEL = re.compile(r'(?P<k>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<v>(?:[^"\\]|\\.)*)"')
MAX_LINES = 200_000  # a /metrics of a real exporter has a few thousand; never scan without bound
WANTED = ("immich_ml_execution_provider", "immich_ml_preferred_execution_provider", "immich_ml_cpu_fallback",
          "immich_gpu_exporter_source_up", "immich_gpu_exporter_build_info")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the ML host's exporter says about its ML service right now."""

    effective: str | None = None
    preferred: str | None = None
    cpu_fallback: bool | None = None
    journal_up: bool | None = None  # None: that exporter has no journal source
    role: str | None = None


def _labels(text: str | None) -> dict[str, str]:
    return {m.group("k"): m.group("v") for m in _LABEL.finditer(text or "")}


def parse_verdict(text: str) -> Verdict:
    """The few families that carry the verdict, from a text exposition; anything else is skipped."""
    effective = preferred = role = None
    fallback: bool | None = None
    journal_up: bool | None = None
    for n, line in enumerate(text.splitlines()):
        if n >= MAX_LINES:
            break
        if not line.startswith(WANTED):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        if math.isnan(value):
            continue
        name, labels = m.group("name"), _labels(m.group("labels"))
        if name == "immich_ml_execution_provider" and value == 1 and _NAME.fullmatch(labels.get("provider", "")):
            effective = labels["provider"]
        elif name == "immich_ml_preferred_execution_provider" and value == 1 \
                and _NAME.fullmatch(labels.get("provider", "")):
            preferred = labels["provider"]
        elif name == "immich_ml_cpu_fallback":
            fallback = value == 1
        elif name == "immich_gpu_exporter_source_up" and labels.get("source") == "journal":
            journal_up = value == 1
        elif name == "immich_gpu_exporter_build_info" and labels.get("role"):
            role = labels["role"][:16]
    return Verdict(effective, preferred, fallback, journal_up, role)


def serving_index(health: Sequence[bool | None]) -> int | None:
    """Index of the ML URL Immich sends work to: the first healthy one (None if none is)."""
    for i, ok in enumerate(health):
        if ok:
            return i
    return None


def pair(ml_urls: Sequence[str], exporter_urls: Sequence[str]) -> list[tuple[str, str | None]]:
    """Immich's ML URLs with the exporter of each host, by position; one exporter for several URLs
    (the same host under two names) pairs with all of them."""
    if len(exporter_urls) == 1:
        return [(u, exporter_urls[0]) for u in ml_urls]
    return [(u, exporter_urls[i] if i < len(exporter_urls) else None) for i, u in enumerate(ml_urls)]


def host_label(url: str) -> str:
    """A URL as a label value: scheme, host and port only (never user or password, never a path)."""
    rest = url.split("://", 1)
    scheme, rest_s = (rest[0], rest[1]) if len(rest) == 2 else ("http", rest[0])
    hostport = rest_s.split("/", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{hostport}"[:200]


def unique(items: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for i in items:
        if i not in seen:
            seen.append(i)
    return seen
