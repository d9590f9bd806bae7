"""Immich API source (minimal: pings the server)."""

from __future__ import annotations

import aiohttp

from ..core import CollectResult, SourceDown, sample
from .base import Source


class ImmichSource(Source):
    name = "immich"

    @property
    def interval(self) -> float:
        return float(self.config["immich.interval"])

    async def collect(self) -> CollectResult:
        timeout = aiohttp.ClientTimeout(total=self.config["immich.timeout"])
        try:
            async with aiohttp.ClientSession(timeout=timeout) as s:
                async with s.get(self.config["immich.url"] + "/api/server/ping") as r:
                    if r.status != 200:
                        raise SourceDown(f"http_{r.status // 100}xx", f"ping answered HTTP {r.status}")
        except aiohttp.ClientError as e:
            raise SourceDown("unreachable", f"{self.config['immich.url']}: {e}") from None
        return CollectResult((sample("immich_server_up", 1),))
