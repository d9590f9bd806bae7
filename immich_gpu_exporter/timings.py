"""Queue samples -> job-seconds, jobs processed, backlog runs and drain ETA, by ML provider.

A deterministic state machine over timestamped observations; it never reads a clock and does no
I/O, so tests drive it with a virtual clock. `ImmichSource` feeds it one `Observation` per poll.

Semantics (docs/immich.md explains them for users):

- **Start from zero.** The first observation of a queue is a baseline: nothing is counted for it,
  so a restart of the exporter never makes a counter jump.
- **Job-seconds.** `active` is integrated over time with the trapezoid rule between two polls:
  (active_before + active_after) / 2 x dt. With `c` workers busy for the whole interval this is
  exact; at the edges of a run it errs by at most half a poll interval of one worker.
- **Jobs processed**, by `method`:
  - `telemetry`: deltas of Immich's cumulative `immich_jobs_<job>_{success,failed,skipped}_total`
    per queue (exact). A counter that goes down means Immich restarted: the new value is the
    delta. Counting (job-seconds too) starts with the first telemetry reading, so both sides of
    the ratio cover the same time. If a reading is missed, the next delta covers the gap, split
    over providers in proportion to the job-seconds accrued since the last reading.
  - `backlog`: `max(0, backlog_before - backlog_after)` per poll, backlog = waiting + active +
    delayed (+ BullMQ's paused list). It **undercounts** whenever jobs arrive in the same poll
    interval in which others finish: with C completions and A arrivals it counts max(0, C - A)
    instead of C. It overcounts when jobs leave without running (a queue emptied by an admin).
- **Provider.** The interval between two polls is attributed to the provider in force at the
  start of the interval (the earlier poll). A new (queue, provider) series is created at 0 the
  moment the provider is first seen, so Prometheus' increase() sees it from zero. Only ML queues
  carry a provider; the others use "".
- **Gaps.** Two polls further apart than `max_gap` (server down, exporter stalled) are not
  integrated: every queue and the telemetry baseline start over, without a jump.
- **Runs.** A run starts at the first poll that sees a non-empty backlog after an empty one and
  ends at the first poll that sees it empty again (so durations are poll-granular). Runs already
  under way at the baseline, or broken by a gap, are not reported as "last run".
- **Drain ETA.** While busy: backlog / rate, the rate being jobs processed per second over the
  last `eta_window` seconds of the current run; unknown (None) until a job was processed; 0 idle.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping

from .immich_api import ML_QUEUES, QueueStats

METHOD_TELEMETRY = "telemetry"
METHOD_BACKLOG = "backlog"


@dataclasses.dataclass(frozen=True, slots=True)
class Observation:
    """One poll. `queues`/`telemetry` are None when they could not be read this time.

    `telemetry` maps (queue, job) -> cumulative finished jobs (success + failed + skipped)."""

    time: float
    queues: Mapping[str, QueueStats] | None
    telemetry: Mapping[tuple[str, str], float] | None = None
    provider: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class QueueReport:
    active_seconds: Mapping[str, float]  # provider -> job-seconds
    processed: Mapping[str, float]  # provider -> jobs
    last_run: tuple[float, float] | None  # (duration seconds, jobs) of the last complete run
    drain_eta: float | None  # seconds; 0 when idle; None when unknown or not observed now
    present: bool  # in the latest observation


@dataclasses.dataclass
class _Run:
    start: float
    jobs: float
    partial: bool
    window: collections.deque  # (time, cumulative processed of the queue)


@dataclasses.dataclass
class _Queue:
    last: QueueStats | None = None
    last_time: float = 0.0
    provider: str = ""  # label in force since the last poll
    active_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    processed: dict[str, float] = dataclasses.field(default_factory=dict)
    unread_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # since last telemetry
    cumulative: float = 0.0
    run: _Run | None = None
    last_run: tuple[float, float] | None = None
    eta: float | None = None
    present: bool = False

    def ensure(self, provider: str) -> None:
        self.active_seconds.setdefault(provider, 0.0)
        self.processed.setdefault(provider, 0.0)


def provider_label(queue: str, provider: str | None) -> str:
    return (provider or "") if queue in ML_QUEUES else ""


class QueueTimings:
    def __init__(self, method: str = METHOD_BACKLOG, max_gap: float = 30.0, eta_window: float = 300.0) -> None:
        if method not in (METHOD_TELEMETRY, METHOD_BACKLOG):
            raise ValueError(f"unknown method {method!r}")
        self.method = method
        self.max_gap = max_gap
        self.eta_window = eta_window
        self._queues: dict[str, _Queue] = {}
        self._last_time: float | None = None
        self._telemetry: dict[tuple[str, str], float] | None = None  # last reading (baseline)
        self.rebaselines = 0  # gaps that restarted counting (for tests and logs)

    # -- the state machine -------------------------------------------------------------------
    def observe(self, obs: Observation) -> None:
        if obs.queues is None:
            return  # nothing to pair with; the gap check happens at the next real sample
        t = obs.time
        if self._last_time is not None and not 0 < t - self._last_time <= self.max_gap:
            self._restart_counting()
        self._last_time = t
        counting = self.method == METHOD_BACKLOG or self._telemetry is not None
        delta: dict[str, float] = {}

        for name, q in self._queues.items():
            if name not in obs.queues:
                q.present, q.last, q.run, q.eta = False, None, None, None
        for name, now in obs.queues.items():
            q = self._queues.setdefault(name, _Queue())
            q.present = True
            if q.last is None:
                continue
            dt = t - q.last_time
            job_seconds = (q.last.active + now.active) / 2.0 * dt
            if counting:
                q.active_seconds[q.provider] += job_seconds
                q.unread_seconds[q.provider] = q.unread_seconds.get(q.provider, 0.0) + job_seconds
                if self.method == METHOD_BACKLOG:
                    done = float(max(0, q.last.backlog - now.backlog))
                    if done:
                        q.processed[q.provider] += done
                        delta[name] = done

        if self.method == METHOD_TELEMETRY and obs.telemetry is not None:
            delta = self._telemetry_delta(obs.telemetry, obs.queues)

        for name, now in obs.queues.items():
            q = self._queues[name]
            baseline = q.last is None
            self._advance_run(q, now, t, delta.get(name, 0.0), baseline)
            q.last, q.last_time = now, t
            q.provider = provider_label(name, obs.provider)
            q.ensure(q.provider)

    def _restart_counting(self) -> None:
        self.rebaselines += 1
        self._telemetry = None
        for q in self._queues.values():
            q.last = None
            q.unread_seconds.clear()
            if q.run is not None:
                q.run.partial = True

    def _telemetry_delta(self, reading: Mapping[tuple[str, str], float],
                         queues: Mapping[str, QueueStats]) -> dict[str, float]:
        previous, self._telemetry = self._telemetry, dict(reading)
        if previous is None:  # baseline: counting starts now
            for q in self._queues.values():
                q.unread_seconds.clear()
            return {}
        per_queue: dict[str, float] = {}
        for key, value in reading.items():
            before = previous.get(key, 0.0)  # absent before: created by its first increment
            d = value - before if value >= before else value  # went down: Immich restarted
            if d > 0:
                per_queue[key[0]] = per_queue.get(key[0], 0.0) + d
        applied: dict[str, float] = {}
        for name, d in per_queue.items():
            q = self._queues.get(name)
            if q is None or name not in queues or q.last is None:
                continue  # a queue not being observed: nothing to attribute it to
            total = sum(q.unread_seconds.values())
            if total > 0:
                for provider, secs in q.unread_seconds.items():
                    q.processed[provider] = q.processed.get(provider, 0.0) + d * secs / total
            else:
                q.processed[q.provider] += d
            applied[name] = d
        for q in self._queues.values():
            q.unread_seconds.clear()
        return applied

    def _advance_run(self, q: _Queue, now: QueueStats, t: float, done: float, baseline: bool) -> None:
        q.cumulative += done
        busy = now.backlog > 0
        if q.run is None:
            if busy:
                q.run = _Run(t, done, baseline, collections.deque([(t, q.cumulative)]))
        else:
            q.run.jobs += done
            q.run.window.append((t, q.cumulative))
            while len(q.run.window) > 2 and q.run.window[1][0] <= t - self.eta_window:
                q.run.window.popleft()
            if not busy:
                if not q.run.partial:
                    q.last_run = (t - q.run.start, q.run.jobs)
                q.run = None
        if not busy:
            q.eta = 0.0
            return
        assert q.run is not None
        t0, c0 = q.run.window[0]
        rate = (q.cumulative - c0) / (t - t0) if t > t0 else 0.0
        q.eta = now.backlog / rate if rate > 0 else None

    # -- read-out ------------------------------------------------------------------------------
    @property
    def counting(self) -> bool:
        return self.method == METHOD_BACKLOG or self._telemetry is not None

    def report(self) -> dict[str, QueueReport]:
        return {
            name: QueueReport(dict(q.active_seconds), dict(q.processed), q.last_run,
                              q.eta if q.present else None, q.present)
            for name, q in sorted(self._queues.items())
        }
