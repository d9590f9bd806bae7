"""systemd source (minimal: reports whether the system bus is reachable)."""

from __future__ import annotations

from ..core import CollectResult, SourceDown
from .base import BlockingWorker, Source


class SystemdSource(Source):
    name = "systemd"

    def __init__(self, config, hub):  # type: ignore[no-untyped-def]
        super().__init__(config, hub)
        self._worker = BlockingWorker("systemd")

    @property
    def interval(self) -> float:
        return float(self.config["systemd.interval"])

    def _open(self) -> None:
        try:
            from pystemd.dbuslib import DBus
        except ImportError:
            raise SourceDown("no_pystemd", "pystemd is not installed") from None
        try:
            bus = DBus()
            bus.open()
        except Exception as e:
            raise SourceDown("no_bus", f"cannot open the system bus: {e}") from None

    async def collect(self) -> CollectResult:
        await self._worker.call(self._open)
        return CollectResult()

    async def close(self) -> None:
        self._worker.shutdown()
