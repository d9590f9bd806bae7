"""Runs every enabled source as its own asyncio task and owns the snapshot.

Each source loop: collect() bounded by the source's timeout, publish a new immutable
`SourceState`, wait for the interval or an early wake-up. Publishing swaps in a new
`Snapshot` and wakes the renderer, which renders the exposition once per change; /metrics
only ever reads the cached `Rendered` bytes. A hung or failing source is marked down and
never blocks the scrape or another source.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from types import MappingProxyType
from typing import Callable, Iterable

from . import __version__, logs
from .core import CollectResult, Snapshot, SourceDown, SourceState
from .metrics import Rendered, check_sample, render
from .sources.base import Hub, Source

log = logging.getLogger("immich_gpu_exporter")

MIN_WAKE_GAP = 0.05  # seconds: coalesce bursts of wake-ups (a burst of journal lines)


MODES = ("live", "demo")  # demo: the values are `immich-gpu-exporter demo`'s invented replay


def build_labels(mode: str = "live", role: str = "all") -> dict[str, str]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    return {"version": __version__, "python_version": platform.python_version(), "mode": mode, "role": role}


class Daemon:
    def __init__(self, sources: Iterable[Source] | None = None, clock: Callable[[], float] = time.time,
                 strict_samples: bool = False, mode: str = "live", role: str = "all") -> None:
        self.sources: list[Source] = []
        self.hub = Hub(lambda: self._snapshot)
        self._clock = clock
        self._strict = strict_samples
        self._snapshot = Snapshot(0, MappingProxyType({}), MappingProxyType(build_labels(mode, role)))
        self._rendered: Rendered | None = None
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._first_cycle: set[str] = set()
        self.openmetrics_wanted = False  # set by the HTTP layer once a client asked for OpenMetrics
        self._down_logged: dict[str, str] = {}
        for s in sources or ():
            self.add(s)

    def add(self, source: Source) -> None:
        self.sources.append(source)
        self._set_state(SourceState(source.name))

    # -- snapshot ------------------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def rendered(self) -> Rendered:
        r = self._rendered
        if r is None or r.version != self._snapshot.version and not self._tasks:
            # No renderer task (tests, --once): render synchronously.
            r = self._rendered = render(self._snapshot, self.openmetrics_wanted)
        return r

    @property
    def ready(self) -> bool:
        return all(s.name in self._first_cycle for s in self.sources)

    def _set_state(self, state: SourceState) -> None:
        old = self._snapshot
        sources = dict(old.sources)
        sources[state.name] = state
        self._snapshot = Snapshot(old.version + 1, MappingProxyType(sources), old.build)
        self._changed.set()

    # -- one cycle of one source ---------------------------------------------------------------
    async def collect_source(self, source: Source) -> SourceState:
        prev = self._snapshot.sources.get(source.name) or SourceState(source.name)
        t0 = time.monotonic()
        errors = dict(prev.errors)
        try:
            result = await asyncio.wait_for(source.collect(), source.timeout)
            if not isinstance(result, CollectResult):
                raise TypeError(f"{source.name}.collect() returned {type(result).__name__}")
            if self._strict:
                for s in result.samples:
                    check_sample(s)
        except asyncio.TimeoutError:
            reason, detail, kept = "timeout", f"collection took longer than {source.timeout:g}s", ()
        except SourceDown as e:
            reason, detail, kept = e.reason, e.detail, e.samples
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in a source must not take the daemon down
            log.debug("source %s crashed", source.name, exc_info=True)
            reason, detail, kept = "error", f"{type(e).__name__}: {e}", ()
        else:
            for r in result.errors:
                errors[r] = errors.get(r, 0) + 1
            if source.name in self._down_logged:
                log.info("source %s is up again", source.name)
                del self._down_logged[source.name]
            state = SourceState(
                source.name, True, self._clock(), time.monotonic() - t0, "", "",
                MappingProxyType(errors), tuple(result.samples), MappingProxyType(dict(result.facts)),
                prev.cycles + 1,
            )
            self._first_cycle.add(source.name)
            self._set_state(state)
            return state
        detail = logs.redact(detail)  # shown on the landing page and logged
        errors[reason] = errors.get(reason, 0) + 1
        if self._down_logged.get(source.name) != reason:
            log.warning("source %s is down (%s): %s", source.name, reason, detail)
            self._down_logged[source.name] = reason
        state = SourceState(
            source.name, False, prev.last_success, time.monotonic() - t0, detail, reason,
            MappingProxyType(errors), tuple(kept), MappingProxyType({}), prev.cycles + 1,
        )
        self._first_cycle.add(source.name)
        self._set_state(state)
        return state

    # -- modes -----------------------------------------------------------------------------------
    async def run_once(self, sequential: bool = False) -> Snapshot:
        """Start, collect every source once, close. For --once, `check` and tests.

        Concurrently, except that a source whose facts another reads (`Source.after`) is collected
        before it; `sequential` collects one by one in the order the sources were added, so a
        source sees the facts of all those before it in this same cycle (`check` relies on it)."""
        await asyncio.gather(*(self._safe_start(s) for s in self.sources))
        try:
            if sequential:
                for s in self.sources:
                    await self.collect_source(s)
            else:
                present = {s.name for s in self.sources}
                pending, done = list(self.sources), set()
                while pending:
                    ready = [s for s in pending if all(d in done or d not in present for d in s.after)] or pending
                    await asyncio.gather(*(self.collect_source(s) for s in ready))
                    done.update(s.name for s in ready)
                    pending = [s for s in pending if s not in ready]
        finally:
            await self.close_sources()
        return self._snapshot

    async def start(self) -> None:
        for s in self.sources:
            wake = asyncio.Event()
            s.bind_wake(wake)
            await self._safe_start(s)
            self._tasks.append(asyncio.create_task(self._loop(s, wake), name=f"source-{s.name}"))
        self._tasks.append(asyncio.create_task(self._renderer(), name="renderer"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.close_sources()

    async def close_sources(self) -> None:
        async def close(s: Source) -> None:
            try:
                await asyncio.wait_for(s.close(), 1.5)
            except Exception:
                log.debug("closing %s failed", s.name, exc_info=True)
        await asyncio.gather(*(close(s) for s in self.sources))

    async def _safe_start(self, s: Source) -> None:
        try:
            await asyncio.wait_for(s.start(), s.timeout)
        except Exception as e:
            log.warning("source %s failed to start: %s", s.name, e)

    async def _loop(self, source: Source, wake: asyncio.Event) -> None:
        while True:
            wake.clear()
            await self.collect_source(source)
            try:
                await asyncio.wait_for(wake.wait(), source.interval)
                await asyncio.sleep(MIN_WAKE_GAP)
            except asyncio.TimeoutError:
                pass

    async def _renderer(self) -> None:
        while True:
            await self._changed.wait()
            await asyncio.sleep(0.01)  # coalesce several sources publishing at once
            self._changed.clear()
            try:
                self._rendered = render(self._snapshot, self.openmetrics_wanted)
            except Exception:
                log.exception("rendering the exposition failed")
