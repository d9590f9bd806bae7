"""Plain data shared by every source: samples, per-source state and the snapshot.

Everything here is immutable. Sources build `Sample`s with `sample()`; the daemon wraps a
source's latest samples in a `SourceState`; the `Snapshot` maps source names to states and
is what gets rendered. Nothing in this module does I/O.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping

LabelPairs = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One exposed series: a metric name from `metrics.METRICS`, its labels and a value."""

    name: str
    labels: LabelPairs
    value: float


def sample(name: str, value: float, /, **labels: Any) -> Sample:
    """Build a sample; label values are stringified, `None` becomes the empty string."""
    return Sample(
        name,
        tuple(sorted((k, "" if v is None else str(v)) for k, v in labels.items())),
        float(value),
    )


class SourceDown(Exception):
    """Raised by a source's collect() when it cannot report: the source goes down.

    `reason` is a short, bounded label value (library_not_found, no_bus, timeout,
    unauthorized, ...); `detail` is a human-readable line for the log and the landing page;
    `samples` are series the source still publishes while down (an "is it up" gauge at 0,
    counters that must not vanish), usually none.
    """

    def __init__(self, reason: str, detail: str = "", samples: tuple["Sample", ...] = ()) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason
        # What the source can still say while down (e.g. immich_server_up 0); usually nothing.
        self.samples = tuple(samples)


EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclasses.dataclass(frozen=True, slots=True)
class CollectResult:
    """What one successful collection returns.

    `samples`: the source's series for this cycle (they replace the previous ones).
    `facts`: plain values other sources may read (for example the journal's effective
    provider, the systemd units' PIDs); published with the snapshot.
    `errors`: reasons of non-fatal errors in this cycle; each is counted in
    immich_gpu_exporter_source_errors_total but the source stays up.
    """

    samples: tuple[Sample, ...] = ()
    facts: Mapping[str, Any] = dataclasses.field(default_factory=lambda: EMPTY)
    errors: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class SourceState:
    """The published state of one source."""

    name: str
    up: bool = False
    last_success: float | None = None  # unix time of the last successful cycle
    duration: float | None = None  # seconds the last cycle took
    last_error: str = ""  # detail of the last failure, for the landing page
    last_reason: str = ""
    errors: Mapping[str, int] = dataclasses.field(default_factory=lambda: EMPTY)  # reason -> count
    samples: tuple[Sample, ...] = ()
    facts: Mapping[str, Any] = dataclasses.field(default_factory=lambda: EMPTY)
    cycles: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything /metrics shows, as of one moment."""

    version: int
    sources: Mapping[str, SourceState]
    build: Mapping[str, str]

    def facts(self, source: str) -> Mapping[str, Any]:
        state = self.sources.get(source)
        return state.facts if state is not None and state.up else EMPTY
