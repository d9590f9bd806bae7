"""The opt-in Smart Search probe (docs/probe.md): for servers without telemetry, the exporter itself
runs a Smart Search through the API every `--probe.interval` seconds and measures the round trip.

Off by default. It needs its own key (`--probe.key-file`, asset.read only), never the admin key. Each
query is the configured phrase plus a random word, so Immich's text-embedding cache (keyed by model,
query and language) never answers it and every probe makes the server call the ML service: what a
user typing a new search waits for. The cost is real: every probe keeps the textual model loaded (it
is not unloaded after MACHINE_LEARNING_MODEL_TTL while probes come more often) and holds its GPU
memory.

Exposes `immich_smart_search_probe_duration_seconds{provider}` (a histogram, by the ONNX provider in
force, like the other latency metrics) and `immich_smart_search_probes_total{result}`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import aiohttp

from .. import logs
from ..config import redact_url
from ..core import CollectResult, Sample, SourceDown, sample
from ..files import header_safe, loosely_readable, problem_text, read_key_file
from ..latency import Histogram, histogram_samples
from .base import Source, provider_in_force
from .immich import read_capped

log = logging.getLogger("immich_gpu_exporter.probe")

# seconds; a Smart Search is tens of milliseconds on a GPU, up to seconds on a busy CPU
BOUNDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
RESULTS = ("ok", "disabled", "unauthorized", "error", "timeout")
PATH = "/api/search/smart"


def classify(status: int, body: bytes) -> str:
    if status == 200:
        return "ok"
    if status in (401, 403):
        return "unauthorized"
    if status == 400 and b"not enabled" in body:
        return "disabled"  # "Smart search is not enabled"
    return "error"


# what the log and the source's down detail say, by result (error and timeout carry their own)
EXPLAIN = {"disabled": "Smart Search is not enabled on the server",
           "unauthorized": "the probe key was refused; it needs asset.read"}


class ProbeSource(Source):
    name = "probe"
    after = ("journal", "docker", "remote")

    def __init__(self, config, hub) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, hub)
        self._url = config["immich.url"].rstrip("/") + PATH
        self._session: aiohttp.ClientSession | None = None
        self._hist: dict[str, Histogram] = {}
        self._results = dict.fromkeys(RESULTS, 0)
        self._last_result = ""
        self._mode_warned = False

    @property
    def interval(self) -> float:
        return float(self.config["probe.interval"])

    @property
    def timeout(self) -> float:
        # the request's own timeout fires first and counts as result="timeout"
        return float(self.config["probe.timeout"]) + 2.0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _key(self) -> str:
        """Read at every probe, like the admin key: a rotated key file needs no restart."""
        path = self.config["probe.key-file"]
        try:
            key, mode = read_key_file(path)
        except OSError as e:
            raise SourceDown("probe_key_file", f"cannot read the probe key file {path}: {problem_text(e)}") from None
        logs.add_secret(key)
        if not key or not header_safe(key):
            raise SourceDown("probe_key_file", f"the probe key file {path} holds no usable key")
        if loosely_readable(mode) and not self._mode_warned:
            self._mode_warned = True
            log.warning("the probe key file %s is readable by group or others (mode %o); chmod 600 it "
                        "or use systemd LoadCredential=", path, mode)
        return key

    def query(self) -> str:
        """The phrase and a random word: never in the server's embedding cache."""
        return f"{self.config['probe.query']} {secrets.token_hex(4)}"

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=float(self.config["probe.timeout"])),
                headers={"User-Agent": "immich-gpu-exporter", "Accept": "application/json"})
        return self._session

    async def _search(self, key: str) -> tuple[str, float, str]:
        """(result, seconds, detail) of one Smart Search; seconds is the whole round trip."""
        body = {"query": self.query(), "size": 1}
        t0 = time.perf_counter()
        try:
            async with self._http().post(self._url, json=body, headers={"x-api-key": key},
                                         allow_redirects=False) as r:
                raw = await read_capped(r)
                seconds = time.perf_counter() - t0
                result = classify(r.status, raw or b"")
                detail = f"HTTP {r.status}" + (f": {EXPLAIN[result]}" if result in EXPLAIN else "")
                return result, seconds, detail
        except asyncio.TimeoutError:
            return "timeout", time.perf_counter() - t0, f"no answer within {self.config['probe.timeout']:g}s"
        except aiohttp.ClientError as e:
            # names host and port only; the key travels in a header
            return "error", time.perf_counter() - t0, f"{type(e).__name__}: {e}"

    def _observe(self, result: str, seconds: float, provider: str) -> None:
        self._results[result] += 1
        if result == "ok":
            one = Histogram(BOUNDS, tuple(1.0 if seconds <= b else 0.0 for b in BOUNDS), 1.0, seconds)
            old = self._hist.get(provider)
            self._hist[provider] = one if old is None else old.plus(one)

    def _samples(self) -> list[Sample]:
        out = [sample("immich_smart_search_probes_total", n, result=r) for r, n in self._results.items()]
        for p, h in sorted(self._hist.items()):
            out.extend(histogram_samples("immich_smart_search_probe_duration_seconds", h, per_second=1.0,
                                         provider=p))
        return out

    async def collect(self) -> CollectResult:
        key = self._key()
        provider = provider_in_force(self.hub) or ""
        result, seconds, detail = await self._search(key)
        self._observe(result, seconds, provider)
        if result != self._last_result:
            self._last_result = result
            if result in ("error", "timeout"):  # the down cases are logged by the daemon, once
                log.warning("Smart Search probe of %s: %s (%s)", redact_url(self._url), result, detail)
        samples = tuple(self._samples())
        if result in ("unauthorized", "disabled"):
            # the probe cannot measure anything until the admin acts: the source says so
            raise SourceDown(result, f"{redact_url(self._url)}: {detail}", samples)
        return CollectResult(samples, errors=(result,) if result != "ok" else ())
