"""Immich API source: server/ML health, version, features, job queues and their timings.

A thin I/O loop. Each cycle: `GET /api/server/ping` and the ML service's `GET /ping` (no auth);
if the server answered, `/api/server/version`, `/api/server/features` (no auth; all three under
`/api/server-info` on servers before v1.113, found by a 404 on the ping), the queues
(`/api/queues`, or the deprecated `/api/jobs` on servers older than v2.4 or when the key only
has `job.read`), the configured video acceleration (`/api/system-config`, at most once a minute,
only its two ffmpeg keys kept: the answer also holds secrets) and, when configured, Immich's
telemetry, all concurrently. Decoding lives in
`immich_api`, timing in `timings`; this module only moves bytes and keeps the key secret.

What "source up" means: the exporter could ask the Immich server and got an authorised answer.
The source goes down when the server does not answer its ping (reason `unreachable`, `timeout`,
`http_5xx`...: no Immich, or Immich restarting), when the API key is refused (`unauthorized` 401,
`forbidden` 403) or cannot be read (`api_key_file`). While the server is unreachable the source
still publishes immich_server_up 0, immich_ml_up and the timing counters (they must not vanish and
come back), but no queue gauges. An unreachable ML service alone is a measurement
(immich_ml_up 0, the failed request counted in source_errors_total), not a down source.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from typing import Any

import aiohttp

from .. import immich_api as api, latency, logs, remote
from ..config import redact_url
from ..files import header_safe, loosely_readable, problem_text, read_key_file, read_small, set_aside
from .journal import state_directory, write_atomic
from ..core import CollectResult, Sample, SourceDown, sample
from ..timings import METHOD_BACKLOG, METHOD_TELEMETRY, Observation, QueueTimings
from .base import Source, provider_in_force

log = logging.getLogger("immich_gpu_exporter.immich")
ACCEL_REFRESH = 60.0  # seconds between reads of the configured acceleration (it changes rarely)
ACCEL_RETRY = 15.0  # after a failed read
ACCEL_FORBIDDEN_RETRY = 3600.0  # after a 403: the key may get the permission later


LATENCY_STATE_FILE = "latency-state.json"
LATENCY_STATE_VERSION = 1
MAX_LATENCY_STATE_BYTES = 4 << 20
PERSIST_EVERY = 10.0  # seconds between writes of the latency state while calls are counted
MAX_ANSWER_BYTES = 8 << 20  # per answer; Immich's largest (telemetry, /api/queues) are a few KiB
MAX_QUEUE_LABELS = 64  # unknown queue names kept as labels (known ones always are)
MAX_JOB_NAMES = 128  # unknown telemetry job names tracked


async def read_capped(r: aiohttp.ClientResponse) -> bytes | None:
    """The body, or None as soon as it is known to exceed MAX_ANSWER_BYTES (never buffered whole)."""
    if r.content_length is not None and r.content_length > MAX_ANSWER_BYTES:
        return None
    parts: list[bytes] = []
    size = 0
    while chunk := await r.content.read(65536):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _metrics_url(url: str | None) -> str | None:
    """A telemetry URL given as http://HOST:PORT means its /metrics."""
    if url and "/" not in url.split("://", 1)[1]:
        return url + "/metrics"
    return url


class RequestFailed(Exception):
    """One request failed; `reason` is a bounded label, `status` the HTTP status if any."""

    def __init__(self, reason: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status


class ImmichSource(Source):
    name = "immich"
    after = ("journal",)

    def __init__(self, config, hub, clock=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, hub)
        import time

        self._clock = clock or time.monotonic
        self._session: aiohttp.ClientSession | None = None
        self._url = config["immich.url"]
        self._ml_url = config["immich.ml-url"]
        # Immich's machineLearning.urls, in its order: it sends work to the first healthy one
        self._ml_urls = [self._ml_url, *[u for u in config["immich.ml-failover-url"] if u != self._ml_url]]
        tele = _metrics_url(config["immich.telemetry-url"])
        self._telemetry_url = tele
        self._api_telemetry_url = _metrics_url(config["immich.api-telemetry-url"])
        self.latency = latency.LatencyAccumulator()
        self._latency_path: str | None = None
        self._latency_dirty = False
        self._latency_saved = 0.0
        # worker -> {"status": not_configured | unreachable | no_repo | ok, ...}, for check and the page
        self.latency_status: dict[str, dict[str, Any]] = {}
        method = METHOD_TELEMETRY if tele else METHOD_BACKLOG
        interval = float(config["immich.interval"])
        self.timings = QueueTimings(method, max_gap=max(6 * interval, 30.0), eta_window=300.0)
        self._version: api.Version | None = None
        self._queue_path: str | None = None  # which queue endpoint works on this server
        self._server_base = api.SERVER_BASE  # /api/server-info on servers before v1.113
        self._logged: set[str] = set()
        self._queue_cap = api.LabelCap(api.KNOWN_QUEUES, MAX_QUEUE_LABELS)
        self._job_cap = api.LabelCap(frozenset(api.JOB_QUEUES), MAX_JOB_NAMES)
        self._unmapped_logged: set[str] = set()
        self._key_mode_warned = False
        # configured video acceleration: the last decoded value and when to ask again
        self._accel: api.ConfiguredAcceleration | None = None
        self._accel_due = 0.0

    # -- knobs -----------------------------------------------------------------------------------
    @property
    def interval(self) -> float:
        return float(self.config["immich.interval"])

    @property
    def timeout(self) -> float:
        # Two rounds of requests, plus the fallbacks to /api/server-info and /api/jobs, each bounded.
        return 4 * float(self.config["immich.timeout"]) + 1.0

    async def start(self) -> None:
        # The daemon binds a wake-up event before start(); a single pass (--once, check) does not, and then
        # the latency state is read but never written (as the journal's cursor).
        self._load_latency(writable=self._wake is not None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._latency_path is not None and self._latency_dirty:
            try:
                write_atomic(self._latency_path, self._latency_json())
            except OSError as e:
                log.warning("immich: cannot write %s: %s", self._latency_path, e)

    # -- latency state (docs/latency.md: nothing lost across a restart) ----------------------------
    def _load_latency(self, writable: bool) -> None:
        path = os.path.join(state_directory(self.config["state.directory"]), LATENCY_STATE_FILE)
        try:
            data = json.loads(read_small(path, MAX_LATENCY_STATE_BYTES))
            if not isinstance(data, dict) or data.get("version") != LATENCY_STATE_VERSION:
                raise ValueError("unknown version")
            self.latency.load(data.get("latency"))
            log.info("immich: resuming the latency histograms from %s", path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, RecursionError) as e:
            why = problem_text(e) if isinstance(e, OSError) else str(e)
            log.warning("immich: unusable latency state %s (%s); %s; the histograms start afresh", path, why,
                        set_aside(path))
            self.latency = latency.LatencyAccumulator()
        if not writable:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._latency_path = path
        except OSError as e:
            log.warning("immich: state directory not writable (%s); the latency histograms start afresh at every "
                        "restart", e.strerror or e)

    def _latency_json(self) -> str:
        return json.dumps({"version": LATENCY_STATE_VERSION, "latency": self.latency.dump(), "saved_at": time.time()},
                          separators=(",", ":"))

    async def _persist_latency(self) -> None:
        if self._latency_path is None or not self._latency_dirty:
            return
        if time.monotonic() - self._latency_saved < PERSIST_EVERY:
            return
        data = self._latency_json()
        self._latency_dirty, self._latency_saved = False, time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(None, write_atomic, self._latency_path, data)
        except OSError as e:
            self._latency_dirty = True
            log.warning("immich: cannot write %s: %s", self._latency_path, e)

    def _once(self, key: str, level: int, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, msg, *args)

    # -- the API key -----------------------------------------------------------------------------
    def api_key(self) -> str | None:
        path = self.config["immich.api-key-file"]
        if path:
            try:
                # a FIFO or /dev/zero named here must not hang or fill the daemon: non-blocking, capped
                key, mode = read_key_file(path)
            except OSError as e:
                raise SourceDown("api_key_file", f"cannot read the API key file {path}: {problem_text(e)}") from None
            if loosely_readable(mode) and not self._key_mode_warned:
                self._key_mode_warned = True
                log.warning("the API key file %s is readable by group or others (mode %o); chmod 600 it "
                            "or use systemd LoadCredential=", path, mode)
            logs.add_secret(key)
            if not key:
                raise SourceDown("api_key_file", f"the API key file {path} is empty")
        else:
            key = self.config["immich.api-key"] or None
            if key is None:
                return None
        if not header_safe(key):
            # Never echo it: a key with spaces or control characters cannot go into a header.
            raise SourceDown("api_key", "the API key contains characters not allowed in an HTTP header")
        return key

    # -- HTTP ------------------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=float(self.config["immich.timeout"])),
                headers={"User-Agent": "immich-gpu-exporter", "Accept": "application/json"},
                # A restarted server leaves dead keep-alive connections; reuse them only briefly.
                connector=aiohttp.TCPConnector(limit=8, keepalive_timeout=5, force_close=False),
            )
        return self._session

    async def fetch(self, url: str, key: str | None = None, *, prefix: str = "", want_json: bool = True) -> Any:
        headers = {"x-api-key": key} if key else None
        what = redact_url(url).split("://", 1)[-1]
        try:
            async with self._http().get(url, headers=headers, allow_redirects=False) as r:
                if r.status != 200:
                    kind = "http_5xx" if r.status >= 500 else "http_4xx"
                    raise RequestFailed(prefix + kind, f"{what} answered HTTP {r.status}", r.status)
                raw = await read_capped(r)
                if raw is None:
                    raise RequestFailed(prefix + "too_large", f"{what}: answer larger than {MAX_ANSWER_BYTES} bytes")
        except asyncio.TimeoutError:
            raise RequestFailed(prefix + "timeout", f"{what}: no answer within {self.config['immich.timeout']:g}s") from None
        except aiohttp.ClientError as e:
            # The message names host and port only; the key travels in a header, never in the URL.
            raise RequestFailed(prefix + "unreachable", f"{what}: {type(e).__name__}: {e}") from None
        if not want_json:
            return raw.decode("utf-8", "replace")
        try:
            return json.loads(raw)
        except ValueError:
            raise RequestFailed(prefix + "bad_json", f"{what}: the answer is not JSON") from None

    # -- one cycle -------------------------------------------------------------------------------
    async def collect(self) -> CollectResult:
        key = self.api_key()
        if key is None:
            self._once("no_key", logging.INFO, "no Immich API key configured: queue metrics are off "
                       "(set --immich.api-key-file; %s)", api.needed_permission(api.QUEUES_PATH, self._version))
        errors: list[str] = []
        samples: list[Sample] = []

        ping, version, *mls = await asyncio.gather(
            self.fetch(self._url + self._server_base + "/ping"),
            # The version decides which queue endpoint to ask and what a refused key needs.
            self.fetch(self._url + self._server_base + "/version"),
            *(self.fetch(u + "/ping", prefix="ml_", want_json=False) for u in self._ml_urls),
            return_exceptions=True,
        )
        for r in (ping, version, *mls):
            if isinstance(r, BaseException) and not isinstance(r, RequestFailed):
                raise r
        if isinstance(ping, RequestFailed) and ping.status == 404:
            ping, version = await self._other_server_base(ping, version)
        server_up = not isinstance(ping, BaseException) and api.decode_ping(ping)
        health = [not isinstance(ml, BaseException) and api.decode_ml_ping(ml) for ml in mls]
        ml_up = any(health)
        for r in (ping, *mls):
            if isinstance(r, RequestFailed):
                errors.append(r.reason)
        if not isinstance(ping, BaseException) and not server_up:
            errors.append("bad_json")
        samples.append(sample("immich_server_up", 1 if server_up else 0))
        samples.append(sample("immich_ml_up", 1 if ml_up else 0))
        # Immich's log does not say which URL served a request: inferred as Immich picks, the first
        # healthy URL of its list (docs/remote-ml.md)
        serving = remote.serving_index(health)
        for i, (u, ok) in enumerate(zip(self._ml_urls, health)):
            samples.append(sample("immich_ml_url_up", 1 if ok else 0, url=remote.host_label(u)))
            samples.append(sample("immich_ml_serving", 1 if i == serving else 0, url=remote.host_label(u)))
        facts: dict[str, Any] = {"ml_url_health": tuple(health)}

        observation: Observation | None = None
        if server_up:
            self._server_version(version, samples, errors)
            observation = await self._collect_server(key, samples, errors)
        if observation is not None:
            self.timings.observe(observation)
        if key is not None:
            samples.extend(self._timing_samples(fresh=observation is not None))
        samples.extend(self.latency.samples())
        samples.append(sample("immich_gpu_exporter_immich_labels_dropped_total", self._queue_cap.dropped, label="queue"))
        samples.append(sample("immich_gpu_exporter_immich_labels_dropped_total", self._job_cap.dropped, label="job"))
        if isinstance(ping, RequestFailed):
            raise SourceDown(ping.reason, str(ping), tuple(samples))
        if server_up:
            facts["latency"] = self.latency_status
        await self._persist_latency()
        if self._accel is not None:
            facts["transcode_configured"] = {"accel": self._accel.accel, "decode": self._accel.decode}
        return CollectResult(tuple(samples), facts, errors=tuple(errors))

    async def _other_server_base(self, ping: RequestFailed, version: Any) -> tuple[Any, Any]:
        """The ping is 404: a server before v1.113 (/api/server-info), or one upgraded past it."""
        other = api.LEGACY_SERVER_BASE if self._server_base == api.SERVER_BASE else api.SERVER_BASE
        ping2, version2 = await asyncio.gather(self.fetch(self._url + other + "/ping"),
                                               self.fetch(self._url + other + "/version"), return_exceptions=True)
        for r in (ping2, version2):
            if isinstance(r, BaseException) and not isinstance(r, RequestFailed):
                raise r
        if isinstance(ping2, BaseException) or not api.decode_ping(ping2):
            return ping, version
        self._server_base = other
        self._once("server_base:" + other, logging.INFO, "Immich answers on %s/* (%s)", other,
                   "a server older than v1.113" if other == api.LEGACY_SERVER_BASE else "upgraded past v1.113")
        return ping2, version2

    def _server_version(self, version: Any, samples: list[Sample], errors: list[str]) -> None:
        if isinstance(version, RequestFailed):
            errors.append(version.reason)
            return
        try:
            v = api.decode_version(version)
        except api.BadAnswer:
            errors.append("bad_json")
            return
        if self._version is not None and v != self._version:
            self._queue_path = None  # upgraded or downgraded: find the endpoint again
        self._version = v
        samples.append(sample("immich_server_info", 1, version=str(v)))

    async def _collect_server(self, key: str | None, samples: list[Sample], errors: list[str]) -> Observation | None:
        jobs: dict[str, Any] = {"features": self.fetch(self._url + self._server_base + "/features")}
        ask_config = key is not None and self._clock() >= self._accel_due
        if key is not None:
            jobs["queues"] = self._queues(key)
            if ask_config:
                jobs["config"] = self._configured_acceleration(key)
        # telemetry needs no key: latency is read with or without one
        if self._telemetry_url:
            jobs["telemetry"] = self.fetch(self._telemetry_url, prefix="telemetry_", want_json=False)
        if self._api_telemetry_url:
            jobs["api_telemetry"] = self.fetch(self._api_telemetry_url, prefix="api_telemetry_", want_json=False)
        results = dict(zip(jobs, await asyncio.gather(*jobs.values(), return_exceptions=True)))
        for r in results.values():
            if isinstance(r, SourceDown):
                raise r
            if isinstance(r, BaseException) and not isinstance(r, (RequestFailed, api.BadAnswer)):
                raise r
        if ask_config:
            self._accel_result(results["config"], errors)
        if self._accel is not None:
            samples.append(sample("immich_transcode_configured_info", 1, accel=self._accel.accel,
                                  decode=self._accel.decode))
        self._observe_latency(results, errors)
        features = results["features"]
        if isinstance(features, RequestFailed):
            errors.append(features.reason)
        else:
            try:
                for name, on in api.decode_features(features).items():
                    samples.append(sample("immich_server_feature_enabled", 1 if on else 0, feature=name))
            except api.BadAnswer:
                errors.append("bad_json")
        if key is None:
            return None

        queues = results["queues"]
        at = self._clock()
        if isinstance(queues, (RequestFailed, api.BadAnswer)):
            errors.append(queues.reason if isinstance(queues, RequestFailed) else "bad_json")
            return None
        decoded: api.Decoded = queues
        errors.extend(["malformed_entry"] * decoded.malformed)
        kept = tuple(q for q in decoded.queues if self._queue_cap.admit(q.name))
        for q in kept:
            for state in api.EXPOSED_STATES:
                samples.append(sample("immich_queue_jobs", q.count(state), queue=q.name, state=state))
            samples.append(sample("immich_queue_paused", 1 if q.is_paused else 0, queue=q.name))

        telemetry = None
        if self._telemetry_url:
            tele = results["telemetry"]
            if not isinstance(tele, RequestFailed):
                parsed = api.parse_telemetry(tele)
                errors.extend(["telemetry_malformed"] * parsed.malformed)
                jobs = {j for j, _ in parsed.counters}
                allowed = {j for j in sorted(jobs) if self._job_cap.admit(j)}
                if allowed != jobs:
                    parsed = dataclasses.replace(parsed, counters={k: v for k, v in parsed.counters.items()
                                                                   if k[0] in allowed},
                                                 unmapped=parsed.unmapped & allowed)
                new = parsed.unmapped - self._unmapped_logged
                if new:  # bounded: only admitted names get here
                    self._unmapped_logged |= new
                    log.debug("telemetry job names without a known queue (ignored): %s", ", ".join(sorted(new)))
                telemetry = parsed.by_queue()
        return Observation(at, {q.name: q for q in kept}, telemetry, provider_in_force(self.hub))

    def _observe_latency(self, results: dict[str, Any], errors: list[str]) -> None:
        """Both processes' telemetry -> the latency histograms (docs/latency.md)."""
        provider = provider_in_force(self.hub)
        status: dict[str, dict[str, Any]] = {}
        for worker, job in (("microservices", "telemetry"), ("api", "api_telemetry")):
            if job not in results:
                status[worker] = {"status": "not_configured"}
                continue
            text = results[job]
            reading = None
            if isinstance(text, RequestFailed):
                status[worker] = {"status": "unreachable", "detail": str(text)}
                errors.append(text.reason)
                self._once(f"{job}_failed", logging.WARNING, "Immich %s telemetry not readable: %s "
                           "(latency needs IMMICH_TELEMETRY_INCLUDE=all or one that has repo; docs/latency.md)",
                           worker, text)
            else:
                reading = latency.parse(text)
                errors.extend([f"{job}_histogram_malformed"] * reading.malformed)
                status[worker] = {"status": "ok" if reading.repo_enabled else "no_repo",
                                  "calls": {f"{k[1]}": h.count for k, h in sorted(reading.histograms.items())}}
                if not reading.repo_enabled:
                    self._once(f"{job}_no_repo", logging.INFO,
                               "Immich %s telemetry has no repository durations: add repo to the server's "
                               "IMMICH_TELEMETRY_INCLUDE (or set it to all) for ML call and Smart Search latency",
                               worker)
            self.latency.observe(worker, reading, provider)
            self._latency_dirty = self._latency_dirty or reading is not None
        self.latency_status = status

    async def _configured_acceleration(self, key: str) -> api.ConfiguredAcceleration | None:
        """ffmpeg.accel/accelDecode from /api/system-config; None if the key may not read it.

        The answer holds secrets (OAuth client secret, SMTP password): it is decoded at once, only
        the two ffmpeg keys are kept, and neither it nor its size is logged."""
        try:
            body = await self.fetch(self._url + api.SYSTEM_CONFIG_PATH, key, prefix="system_config_")
        except RequestFailed as e:
            if e.status == 403:
                return None
            raise
        try:
            return api.decode_ffmpeg_acceleration(body)
        finally:
            del body

    def _accel_result(self, r: Any, errors: list[str]) -> None:
        now = self._clock()
        if isinstance(r, RequestFailed):
            errors.append(r.reason)
            self._accel_due = now + ACCEL_RETRY
        elif isinstance(r, api.BadAnswer):
            errors.append("system_config_bad_json")
            self._accel_due = now + ACCEL_RETRY
        elif r is None:
            self._accel = None
            self._accel_due = now + ACCEL_FORBIDDEN_RETRY
            self._once("system_config_403", logging.INFO,
                       "the API key lacks %s: the configured video acceleration is unknown, the transcoding "
                       "metrics come from the server log alone (docs/transcode.md)", api.SYSTEM_CONFIG_PERMISSION)
        else:
            self._accel = r
            self._accel_due = now + ACCEL_REFRESH

    @property
    def configured_acceleration(self) -> api.ConfiguredAcceleration | None:
        return self._accel

    async def _queues(self, key: str) -> api.Decoded:
        path = self._queue_path or api.preferred_queue_path(self._version)
        try:
            body = await self.fetch(self._url + path, key)
        except RequestFailed as e:
            if path == api.QUEUES_PATH and e.status in (404, 403):
                # 404: a server older than v2.4. 403: a key made for /api/jobs (job.read only).
                try:
                    body = await self.fetch(self._url + api.LEGACY_PATH, key)
                except RequestFailed as e2:
                    self._auth_failure(e2, api.LEGACY_PATH if e.status == 404 else path)
                    raise
                if e.status == 403:
                    self._once("legacy_403", logging.INFO, "the API key lacks queue.read; using the deprecated "
                               "%s with job.read (add queue.read to the key)", api.LEGACY_PATH)
                path = api.LEGACY_PATH
            else:
                self._auth_failure(e, path)
                raise
        self._queue_path = path
        self._logged.discard("unauthorized")
        self._logged.discard("forbidden")
        decode = api.decode_queues if path == api.QUEUES_PATH else api.decode_jobs_legacy
        return decode(body)

    def _auth_failure(self, e: RequestFailed, path: str) -> None:
        if e.status == 401:
            need = api.needed_permission(path, self._version)
            self._once("unauthorized", logging.ERROR,
                       "Immich refused the API key (HTTP 401: unknown or revoked key); it must be %s", need)
            raise SourceDown("unauthorized", f"{path}: HTTP 401, the API key is not valid; needs {need}")
        if e.status == 403:
            need = api.needed_permission(path, self._version)
            self._once("forbidden", logging.ERROR,
                       "Immich denied the queue statistics (HTTP 403): the key must be %s", need)
            raise SourceDown("forbidden", f"{path}: HTTP 403; needs {need}")

    # -- timings -> samples ----------------------------------------------------------------------
    def _timing_samples(self, fresh: bool) -> list[Sample]:
        # Counters and last-run gauges stay while the server is away (they are still true); the
        # drain ETA is a statement about now and goes with the queue gauges.
        out = [sample("immich_queue_processed_method_info", 1, method=self.timings.method)]
        for queue, rep in self.timings.report().items():
            for provider, v in sorted(rep.active_seconds.items()):
                out.append(sample("immich_queue_active_job_seconds_total", v, queue=queue, provider=provider))
            for provider, v in sorted(rep.processed.items()):
                out.append(sample("immich_queue_jobs_processed_total", v, queue=queue, provider=provider))
            if rep.last_run is not None:
                out.append(sample("immich_queue_last_run_duration_seconds", rep.last_run[0], queue=queue))
                out.append(sample("immich_queue_last_run_jobs", rep.last_run[1], queue=queue))
            if fresh and rep.drain_eta is not None:
                out.append(sample("immich_queue_drain_eta_seconds", rep.drain_eta, queue=queue))
        return out
