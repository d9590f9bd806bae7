"""A simulation of the Immich server's repository-method duration histograms, rendered as its
telemetry endpoints render them (OpenTelemetry's Prometheus exporter).

`TelemetrySim.record(worker, repo, method, ms)` is one call that took `ms`; `render(worker)` is the
text of that process's /metrics. The layout (HELP text, line order, labels, number spelling) is the
one of the real v3.1.0 server's telemetry captured in tests/fixtures/real-server/v3.1.0, and
tests/test_real_server_latency.py checks it against those captures, so the fake's families are the
real ones. Like the real server, a family appears only after its first call, and a restart empties
the process's histograms.
"""

from __future__ import annotations

import collections
import re
import threading

from immich_gpu_exporter.latency import IMMICH_BOUNDS

WORKERS = ("api", "microservices")
SCOPE = 'otel_scope_name="nestjs-otel"'


def snake_title(snake: str) -> str:
    return " ".join(w.capitalize() for w in snake.split("_"))


def number(v: float) -> str:
    """A value as the JavaScript exporter prints it: integers without a fraction."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class TelemetrySim:
    def __init__(self, bounds: tuple[float, ...] = IMMICH_BOUNDS, scope_labels: str = SCOPE) -> None:
        self.bounds = bounds
        self.scope_labels = scope_labels
        self._lock = threading.Lock()
        # worker -> (repo, method) -> list of observed ms
        self._seen: dict[str, dict[tuple[str, str], list[float]]] = {w: collections.defaultdict(list) for w in WORKERS}
        self.extra: dict[str, list[str]] = {w: [] for w in WORKERS}  # more lines (job counters, ...)

    def record(self, worker: str, repo: str, method: str, ms: float) -> None:
        with self._lock:
            self._seen[worker][(repo, method)].append(float(ms))

    def restart(self, worker: str) -> None:
        with self._lock:
            self._seen[worker] = collections.defaultdict(list)

    def observations(self, worker: str, repo: str, method: str) -> list[float]:
        with self._lock:
            return list(self._seen[worker].get((repo, method), ()))

    def render(self, worker: str, target_info: bool = True) -> str:
        with self._lock:
            seen = {k: list(v) for k, v in self._seen[worker].items() if v}
            extra = list(self.extra[worker])
        lines = ["# HELP target_info Target metadata", "# TYPE target_info gauge",
                 'target_info{service_name="immich",telemetry_sdk_language="nodejs",'
                 'telemetry_sdk_name="opentelemetry"} 1'] if target_info else []
        scope = self.scope_labels
        for (repo, method), values in sorted(seen.items()):
            name = f"immich_{repo}_repository_{method}_duration"
            lines.append(f"# HELP {name} The elapsed time in ms for the {snake_title(repo)} Repository to "
                         f"{method}")
            lines.append(f"# UNIT {name} ms")
            lines.append(f"# TYPE {name} histogram")
            lab = "{" + scope + "}" if scope else ""
            lines.append(f"{name}_count{lab} {len(values)}")
            lines.append(f"{name}_sum{lab} {number(sum(values))}")
            for b in self.bounds:
                n = sum(1 for v in values if v <= b)
                le = f'le="{number(b)}"'
                lines.append(f"{name}_bucket{{{scope + ',' if scope else ''}{le}}} {n}")
            lines.append(f"{name}_bucket{{{scope + ',' if scope else ''}le=\"+Inf\"}} {len(values)}")
        lines.extend(extra)
        return "\n".join(lines) + "\n"


def families(text: str) -> set[str]:
    """Names of the histogram families in an exposition text."""
    return set(re.findall(r"^# TYPE (\S+) histogram$", text, re.M))
