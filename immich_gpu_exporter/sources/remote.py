"""Remote ML source: the provider in force, read from the exporter on the ML host.

On the server host of a two-host installation (role `server`), this source asks the exporter on
each ML host (`--remote-ml.exporter-url`, paired by position with Immich's ML URLs
`--immich.ml-url` + `--immich.ml-failover-url`) for its verdict every cycle, and publishes the
verdict of the host that serves the work as facts (`effective_provider`, `preferred_provider`), the
same facts the journal source publishes on one host. The Immich source labels seconds per job with
it (see `provider_in_force`), so the numbers are the same as on one host, at the resolution of one
cycle. Which host serves comes from the Immich source's per-URL health (fact `ml_url_health`).

Series: `immich_remote_ml_exporter_up{exporter}` per configured exporter. The verdict series stay
with the ML host's exporter (exported twice they would double every alert).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .. import remote
from ..core import CollectResult, Sample, SourceDown, sample
from .base import Source

log = logging.getLogger("immich_gpu_exporter.remote")
MAX_BODY = 8 << 20  # bytes of one /metrics answer; a real exporter's is ~100 KiB


class RemoteSource(Source):
    name = "remote"

    def __init__(self, config, hub) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, hub)
        self.exporters = remote.unique(config["remote-ml.exporter-url"])
        self.ml_urls = [config["immich.ml-url"], *config["immich.ml-failover-url"]]
        self._session: Any = None
        self._logged: set[str] = set()

    @property
    def interval(self) -> float:
        return float(self.config["immich.interval"])

    @property
    def timeout(self) -> float:
        return float(self.config["immich.timeout"]) + 1.0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=float(self.config["immich.timeout"])),
                headers={"User-Agent": "immich-gpu-exporter", "Accept": "text/plain"})
        return self._session

    async def _fetch(self, url: str) -> remote.Verdict:
        async with self._http().get(url, allow_redirects=False) as r:
            if r.status != 200:
                raise ConnectionError(f"HTTP {r.status}")
            body = await r.content.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise ConnectionError(f"answer larger than {MAX_BODY} bytes")
        return remote.parse_verdict(body.decode("utf-8", "replace"))

    async def collect(self) -> CollectResult:
        if not self.exporters:
            raise SourceDown("not_configured", "no --remote-ml.exporter-url: this host's journal gives the provider")
        results = await asyncio.gather(*(self._fetch(u) for u in self.exporters), return_exceptions=True)
        verdicts: dict[str, remote.Verdict] = {}
        samples: list[Sample] = []
        errors: list[str] = []
        for url, res in zip(self.exporters, results):
            label = remote.host_label(url)
            if isinstance(res, remote.Verdict):
                verdicts[url] = res
                samples.append(sample("immich_remote_ml_exporter_up", 1, exporter=label))
                self._logged.discard(url)
            else:
                if isinstance(res, BaseException) and not isinstance(res, (OSError, asyncio.TimeoutError,
                                                                              ConnectionError)):
                    import aiohttp
                    if not isinstance(res, aiohttp.ClientError):
                        raise res
                samples.append(sample("immich_remote_ml_exporter_up", 0, exporter=label))
                errors.append("exporter_unreachable")
                if url not in self._logged:
                    self._logged.add(url)
                    log.warning("remote ML exporter %s does not answer: %s", label,
                                type(res).__name__ if not str(res) else f"{type(res).__name__}: {res}")
        health = self.hub.facts("immich").get("ml_url_health")
        pairs = remote.pair(self.ml_urls, self.exporters)
        idx = remote.serving_index(list(health)) if isinstance(health, (list, tuple)) and health else 0
        facts: dict[str, Any] = {}
        if idx is not None and idx < len(pairs):
            ml_url, exp = pairs[idx]
            v = verdicts.get(exp) if exp else None
            facts["serving_ml_url"] = ml_url
            if v is not None and v.journal_up is not False:
                facts["effective_provider"] = v.effective
                facts["preferred_provider"] = v.preferred
                facts["cpu_fallback"] = v.cpu_fallback
        return CollectResult(tuple(samples), facts, tuple(errors))
