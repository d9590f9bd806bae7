"""What a source is, and the dedicated worker thread for blocking libraries.

A source is a thin I/O loop around pure functions. The daemon calls `collect()` every
`interval` seconds (or sooner when the source calls `self.wake()` because something changed,
e.g. a journal entry or a D-Bus signal arrived), bounds it by `timeout`, and publishes the
returned `CollectResult`. `start()` may launch background tasks (followers, subscriptions);
`close()` stops them. A source never touches the snapshot or the HTTP layer directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar, Mapping, TypeVar

from ..core import EMPTY, CollectResult, SourceDown

if TYPE_CHECKING:
    from ..config import Config
    from ..core import Snapshot

T = TypeVar("T")


class Hub:
    """Read-only view of the latest snapshot for sources that use another source's facts."""

    def __init__(self, get_snapshot: Callable[[], "Snapshot | None"]) -> None:
        self._get = get_snapshot

    def facts(self, source: str) -> Mapping[str, Any]:
        snap = self._get()
        return snap.facts(source) if snap is not None else EMPTY


def provider_in_force(hub: Hub) -> str | None:
    """The ML execution provider in force now: this host's journal verdict, else the verdict of the
    remote ML host that serves the work (docs/remote-ml.md). Everything labelled "by provider"
    (seconds per job, ML CPU seconds, ML call latency) takes it from here."""
    for source in ("journal", "remote"):
        p = hub.facts(source).get("effective_provider")
        if isinstance(p, str) and p:
            return p
    return None


class Source:
    name: ClassVar[str] = ""

    def __init__(self, config: "Config", hub: Hub) -> None:
        self.config = config
        self.hub = hub
        self._wake: asyncio.Event | None = None

    # -- scheduling knobs; subclasses override from their own config keys -------------------
    @property
    def interval(self) -> float:
        return float(self.config["collection.interval"])

    @property
    def timeout(self) -> float:
        return float(self.config["collection.timeout"])

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start background work (followers, subscriptions). Must not block or raise."""

    async def collect(self) -> CollectResult:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop background work and release resources; called once at shutdown."""

    # -- change notification -----------------------------------------------------------------
    def bind_wake(self, event: asyncio.Event) -> None:
        self._wake = event

    def wake(self) -> None:
        """Ask the daemon for an early collect() because new data arrived."""
        if self._wake is not None:
            self._wake.set()


class BusyWorker(SourceDown):
    def __init__(self, what: str) -> None:
        super().__init__("timeout", f"{what}: a previous call is still running (hung library call?)")


class BlockingWorker:
    """One dedicated thread for a blocking, non-thread-safe library (NVML, sd-bus).

    Calls run strictly one at a time on the same OS thread. If a call hangs, later calls are
    refused immediately with SourceDown('timeout') instead of queueing behind it, so a hung
    driver never piles up work or blocks the event loop.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._ex = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._busy = threading.Lock()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._busy.acquire(blocking=False):
            raise BusyWorker(self.name)

        def run() -> T:
            try:
                return fn(*args)
            finally:
                self._busy.release()

        try:
            fut = self._ex.submit(run)
        except RuntimeError:  # executor shut down
            self._busy.release()
            raise SourceDown("shutdown", f"{self.name} worker is shut down") from None
        return await asyncio.wrap_future(fut)

    def submit_nowait(self, fn: Callable[..., Any], *args: Any) -> "concurrent.futures.Future[Any]":
        """Queue a call without waiting (used at shutdown for cleanup)."""
        return self._ex.submit(fn, *args)

    def shutdown(self) -> None:
        self._ex.shutdown(wait=False, cancel_futures=True)


async def bounded(aw: Awaitable[T], timeout: float) -> T:
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        raise SourceDown("timeout", f"no answer within {timeout:g}s") from None
