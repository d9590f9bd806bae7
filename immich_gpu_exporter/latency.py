"""ML call and Smart Search latency from the Immich server's own telemetry.

With `IMMICH_TELEMETRY_INCLUDE` holding `repo` (or `all`), every server process wraps each
repository method in an OpenTelemetry histogram (server/src/repositories/telemetry.repository.ts):
`immich.<repo>.repository.<method>.duration`, unit ms, Prometheus name
`immich_<repo>_repository_<method>_duration_{bucket,sum,count}`, Immich's own bucket boundaries
(0.1 ms ... 10 s), only successful calls recorded. A family appears only after its first call. The
API process (port 8081) serves the calls made while answering users (encode_text and the smart
search query); the microservices process (8082) those of the jobs (encode_image, detect_faces, ocr).

What is kept, per family:
- `machine_learning` repository: `encode_image`, `encode_text`, `detect_faces`, `ocr` are the calls
  to the ML service (`predict` and the health helpers are internal and ignored);
- `search` repository `search_smart`: the database half of a Smart Search request.

The exporter re-exports them as its own histograms, split by the ONNX execution provider in force
when it read them, the way seconds per job are split (docs/latency.md):

- **Start from the exporter's start.** The first reading of a process is a baseline; a family that
  appears later (its first call) is counted from zero, so no call after the baseline is lost.
- **Provider.** The increase between two polls goes to the provider in force at the earlier poll
  (the start of the interval), as for seconds per job; a provider seen for the first time gets its
  series at 0 at once, so that increase() sees its first calls. A server restart (a count that went
  down) counts the new values as the increase since the restart, like a counter reset.
- Buckets are Immich's boundaries in seconds. Boundaries that change (another server version) start
  the family's baseline again.

Pure: parsing and accumulation, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

from .core import Sample, sample
from .metrics import go_float

ML_CALLS = ("encode_image", "encode_text", "detect_faces", "ocr")
SMART_SEARCH = "search_smart"
WORKERS = ("api", "microservices")
# The calls each process makes: its series exist (at 0) from the first reading with the repo group
# on, before the first call, so that increase() sees every call.
WORKER_KEYS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "api": (("ml", "encode_text"), ("search", SMART_SEARCH)),
    "microservices": (("ml", "encode_image"), ("ml", "detect_faces"), ("ml", "ocr")),
}
# aggregationBoundaries of server/src/repositories/telemetry.repository.ts (ms); a family that
# shows other boundaries replaces them.
IMMICH_BOUNDS = (0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0,
                 1000.0, 2500.0, 5000.0, 7500.0, 10000.0)
MAX_BUCKETS = 64  # Immich has 21 boundaries; more is not a histogram we know
MAX_VALUE = 1e15

# A sample line of a repository-method duration histogram. The unit suffix is optional: newer
# OpenTelemetry Prometheus exporters append `_milliseconds` for unit "ms".
_LINE = re.compile(
    r"^immich_(?P<repo>machine_learning|search)_repository_(?P<method>[a-z0-9_]{1,64}?)_duration"
    r"(?:_milliseconds)?_(?P<part>bucket|sum|count)(?P<rest>[{\s].*)$")
_ANY_REPO = re.compile(r"^immich_[a-z0-9_]{1,128}?_repository_[a-z0-9_]{1,128}?_duration(?:_milliseconds)?_count[{\s]")
_LE = re.compile(r'(?:^|,)\s*le="([^"]*)"')
_VALUE = re.compile(r"^(?:\{(?P<labels>(?:[^\"}]|\"(?:[^\"\\]|\\.)*\")*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$")


@dataclasses.dataclass(frozen=True, slots=True)
class Histogram:
    """A cumulative histogram in Immich's unit (ms): finite upper bounds, the cumulative count at
    each bound, the total count (the +Inf bucket) and the sum."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    count: float
    sum: float

    def minus(self, older: "Histogram") -> "Histogram | None":
        """The increase since `older`; None when it is not an increase (a reset)."""
        if older.bounds != self.bounds:
            return None
        if self.count < older.count or any(a < b for a, b in zip(self.cumulative, older.cumulative)):
            return None
        return Histogram(self.bounds, tuple(a - b for a, b in zip(self.cumulative, older.cumulative)),
                         self.count - older.count, max(0.0, self.sum - older.sum))

    def plus(self, other: "Histogram") -> "Histogram":
        return Histogram(self.bounds, tuple(a + b for a, b in zip(self.cumulative, other.cumulative)),
                         self.count + other.count, self.sum + other.sum)


Key = tuple[str, str]  # ("ml", call) or ("search", "search_smart")


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    """One telemetry scrape of one server process, reduced to what latency needs."""

    histograms: Mapping[Key, Histogram]
    repo_enabled: bool  # any repository-method histogram at all: the `repo` group is on
    malformed: int = 0


def parse(text: str) -> Reading:
    """Immich's Prometheus exposition -> the latency histograms (label sets summed). Linear in the
    text; lines of other families are skipped after a prefix test."""
    parts: dict[Key, dict[str, object]] = {}
    malformed = 0
    repo = False
    for raw in text.splitlines():
        if not raw.startswith("immich_") or "_repository_" not in raw:
            continue
        line = raw.strip()
        if not repo and _ANY_REPO.match(line):
            repo = True
        m = _LINE.match(line)
        if not m:
            continue
        repo = True
        method, part = m.group("method"), m.group("part")
        if m.group("repo") == "machine_learning":
            if method not in ML_CALLS:
                continue
            key: Key = ("ml", method)
        elif method == SMART_SEARCH:
            key = ("search", method)
        else:
            continue
        v = _VALUE.match(m.group("rest"))
        try:
            value = float(v.group("value")) if v else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not 0 <= value <= MAX_VALUE:
            malformed += 1
            continue
        one = parts.setdefault(key, {"buckets": {}, "sum": 0.0, "count": 0.0})
        if part == "bucket":
            le = _LE.search((v.group("labels") if v else "") or "")
            try:
                bound = float(le.group(1)) if le else math.nan
            except ValueError:
                bound = math.nan
            buckets: dict[float, float] = one["buckets"]  # type: ignore[assignment]
            if math.isnan(bound) or (bound not in buckets and len(buckets) >= MAX_BUCKETS):
                malformed += 1
                continue
            buckets[bound] = buckets.get(bound, 0.0) + value
        else:
            one[part] = float(one[part]) + value  # type: ignore[arg-type]
    out: dict[Key, Histogram] = {}
    for key, one in parts.items():
        buckets = one["buckets"]  # type: ignore[assignment]
        finite = sorted(b for b in buckets if math.isfinite(b))
        cumulative = tuple(buckets[b] for b in finite)
        count = float(one["count"])  # type: ignore[arg-type]
        if any(a > b for a, b in zip(cumulative, cumulative[1:])) or (cumulative and cumulative[-1] > count):
            malformed += 1  # not cumulative: unusable
            continue
        out[key] = Histogram(tuple(finite), cumulative, count, float(one["sum"]))  # type: ignore[arg-type]
    return Reading(out, repo, malformed)


class LatencyAccumulator:
    """Readings of each server process over time -> cumulative histograms by (key, provider)."""

    def __init__(self) -> None:
        self._last: dict[str, dict[Key, Histogram]] = {}  # worker -> its last reading
        self._acc: dict[tuple[Key, str], Histogram] = {}
        self._provider: dict[str, str] = {}  # worker -> provider in force at its last poll
        self.repo_enabled: dict[str, bool] = {}

    def observe(self, worker: str, reading: Reading | None, provider: str | None) -> None:
        """One poll of one process; `reading` None when its telemetry could not be read. The increase
        since the process's previous poll goes to the provider in force at that previous poll (the
        start of the interval); the provider in force now gets its series at 0 at once, so that
        Prometheus' increase() sees its first calls."""
        provider = provider or ""
        if reading is None:
            self.repo_enabled.pop(worker, None)
            return
        self.repo_enabled[worker] = reading.repo_enabled
        last = self._last.get(worker)
        at_start = self._provider.get(worker, provider)
        self._last[worker] = dict(reading.histograms)
        self._provider[worker] = provider
        if last is not None:  # else: the baseline
            for key, now in reading.histograms.items():
                before = last.get(key)
                if before is None:  # appeared since: its first calls
                    delta: Histogram | None = now
                else:
                    delta = now.minus(before)
                    if delta is None and now.bounds == before.bounds:
                        delta = now  # a reset: the server restarted, all since then
                if delta is not None and (delta.count > 0 or delta.sum > 0):
                    self._add((key, at_start), delta)
        if reading.repo_enabled:
            for key in WORKER_KEYS.get(worker, ()):
                if (key, provider) not in self._acc:
                    now = reading.histograms.get(key)
                    bounds = now.bounds if now is not None else self._bounds(key)
                    self._acc[(key, provider)] = Histogram(bounds, (0.0,) * len(bounds), 0.0, 0.0)

    def _bounds(self, key: Key) -> tuple[float, ...]:
        for (k, _p), h in self._acc.items():
            if k == key:
                return h.bounds
        return IMMICH_BOUNDS

    def _add(self, at: tuple[Key, str], delta: Histogram) -> None:
        acc = self._acc.get(at)
        if acc is None or acc.bounds != delta.bounds:
            # first increase for this provider, or boundaries changed: both start over (a reset)
            for other in [k for k in self._acc if k[0] == at[0] and self._acc[k].bounds != delta.bounds]:
                del self._acc[other]
            acc = Histogram(delta.bounds, (0.0,) * len(delta.bounds), 0.0, 0.0)
        self._acc[at] = acc.plus(delta)

    # -- persistence (the state directory; sources/immich.py) ----------------------------------------
    def dump(self) -> dict:
        def h(x: Histogram) -> list:
            return [list(x.bounds), list(x.cumulative), x.count, x.sum]

        return {"last": {w: [[k[0], k[1], *h(x)] for k, x in sorted(r.items())] for w, r in sorted(self._last.items())},
                "acc": [[k[0], k[1], p, *h(x)] for (k, p), x in sorted(self._acc.items())],
                "provider": dict(self._provider)}

    def load(self, data: object) -> None:
        """Restore a dump; raises ValueError on anything that is not one (the caller sets the file aside).
        Calls made while the exporter was stopped are then counted at its first poll, under the provider
        in force at its last one."""
        if not isinstance(data, dict):
            raise ValueError("latency state: not an object")
        last, acc, provider = data.get("last"), data.get("acc"), data.get("provider")
        if not isinstance(last, dict) or not isinstance(acc, list) or not isinstance(provider, dict):
            raise ValueError("latency state: last/acc/provider of the wrong type")
        if len(acc) > MAX_STATE_SERIES or len(last) > len(WORKERS):
            raise ValueError("latency state: too many series")
        restored_last = {_worker(w): dict(_key_hist(row) for row in _rows(rows)) for w, rows in last.items()}
        restored_acc = {}
        for row in acc:
            if not isinstance(row, list) or len(row) != 7 or not isinstance(row[2], str) or len(row[2]) > 128:
                raise ValueError("latency state: a malformed series")
            key, hist = _key_hist([row[0], row[1], *row[3:]])
            restored_acc[(key, row[2])] = hist
        restored_provider = {_worker(w): p for w, p in provider.items() if isinstance(p, str) and len(p) <= 128}
        self._last, self._acc, self._provider = restored_last, restored_acc, restored_provider

    def samples(self) -> list[Sample]:
        out: list[Sample] = []
        for ((kind, name), provider), h in sorted(self._acc.items()):
            if kind == "ml":
                metric, labels = "immich_ml_call_duration_seconds", {"call": name, "provider": provider}
            else:
                metric, labels = "immich_smart_search_query_duration_seconds", {"provider": provider}
            out.extend(histogram_samples(metric, h, **labels))
        for worker, on in sorted(self.repo_enabled.items()):
            out.append(sample("immich_server_telemetry_repo_enabled", 1 if on else 0, worker=worker))
        return out

    def totals(self) -> dict[Key, tuple[float, float]]:
        """(count, sum in seconds) per key over all providers, for check and the landing page."""
        out: dict[Key, tuple[float, float]] = {}
        for (key, _p), h in self._acc.items():
            c, s = out.get(key, (0.0, 0.0))
            out[key] = (c + h.count, s + h.sum / 1000.0)
        return out


MAX_STATE_SERIES = 5 * 64  # keys x providers: the provider label is capped upstream well below this


def _worker(w: object) -> str:
    if w not in WORKERS:
        raise ValueError(f"latency state: unknown worker {str(w)[:40]!r}")
    return str(w)


def _rows(rows: object) -> list:
    if not isinstance(rows, list) or len(rows) > 8:
        raise ValueError("latency state: a reading of the wrong shape")
    return rows


def _key_hist(row: object) -> tuple[Key, Histogram]:
    if not isinstance(row, list) or len(row) != 6:
        raise ValueError("latency state: a histogram of the wrong shape")
    kind, name, bounds, cumulative, count, total = row
    if (kind, name) not in {("ml", c) for c in ML_CALLS} | {("search", SMART_SEARCH)}:
        raise ValueError(f"latency state: unknown series {str(kind)[:20]}/{str(name)[:40]}")
    if not (isinstance(bounds, list) and isinstance(cumulative, list) and len(bounds) == len(cumulative)
            and len(bounds) <= MAX_BUCKETS):
        raise ValueError("latency state: buckets of the wrong shape")
    nums = [*bounds, *cumulative, count, total]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 <= x <= MAX_VALUE
               for x in nums):
        raise ValueError("latency state: a value out of range")
    if list(bounds) != sorted(bounds) or any(a > b for a, b in zip(cumulative, cumulative[1:])) or \
            (cumulative and cumulative[-1] > count):
        raise ValueError("latency state: not a cumulative histogram")
    return (kind, name), Histogram(tuple(map(float, bounds)), tuple(map(float, cumulative)), float(count), float(total))


def histogram_samples(metric: str, h: Histogram, *, per_second: float = 1000.0, **labels: str) -> list[Sample]:
    """A cumulative histogram (bounds in Immich's ms unless `per_second` says otherwise) as the
    samples of a Prometheus histogram in seconds. Division keeps the bounds' shortest spelling
    (0.1 ms -> 0.0001)."""
    out = [sample(metric + "_bucket", c, le=go_float(b / per_second), **labels) for b, c in zip(h.bounds, h.cumulative)]
    out.append(sample(metric + "_bucket", h.count, le="+Inf", **labels))
    out.append(sample(metric + "_count", h.count, **labels))
    out.append(sample(metric + "_sum", h.sum / per_second, **labels))
    return out
