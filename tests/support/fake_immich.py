"""A scriptable fake Immich (server API, ML /ping, microservices telemetry) on loopback.

Real aiohttp servers in a background thread, so both in-process async tests and tests of the real
exporter subprocess can use it. What it answers follows Immich v3.1.0 (research/immich.md §2, §3):
the shapes of /api/server/{ping,version,features}, /api/queues and /api/jobs, the admin-only
x-api-key checks with queue.read / job.read (`all` before v1.137), the Immich error body, the
probe's POST /api/search/smart (asset.read, any user; 400 "Smart search is not enabled" while the
smartSearch feature is off; an empty library's answer after `delay`), and
telemetry counters `immich_jobs_<snake job>_<status>_total` (PascalCase-derived names from
v1.136, kebab-derived before).

Queues are driven by `QueueSim`, a deterministic schedule of jobs (FIFO, `concurrency` workers,
per-job time chosen by the provider in force when the job starts, jobs arriving while others
drain), evaluated at the fake's clock. The same simulation feeds the pure accuracy tests with a
virtual clock, so "the truth" is the schedule itself.

Every request and every response is recorded (`requests`, `responses`) with a tag saying whether
the fake meant it to follow the spec ("spec"), deliberately broke it ("fault"), or emulated
another Immich version ("older_version" / "newer_version"); the contract test validates them.
Versions before v1.113 answer /api/server-info/* instead of /api/server/* (404 there).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import heapq
import json
import pathlib
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

from aiohttp import web

from immich_gpu_exporter.immich_api import snake_case

from .immich_telemetry import TelemetrySim
from .proc import free_port

# QueueName enum of v3.1.0 and the version that added each (research/immich.md §2.4).
QUEUE_ADDED: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("backgroundTask", "faceDetection", "facialRecognition", "library", "metadataExtraction",
                     "migration", "search", "sidecar", "smartSearch", "storageTemplateMigration",
                     "thumbnailGeneration", "videoConversion"), (1, 94)),
    "notifications": (1, 104), "duplicateDetection": (1, 106), "backupDatabase": (1, 120), "ocr": (2, 2),
    "workflow": (2, 3), "editor": (2, 5), "integrityCheck": (3, 0),
}
FEATURES_V3 = ("configFile", "duplicateDetection", "email", "facialRecognition", "importFaces", "map", "oauth",
               "oauthAutoLaunch", "ocr", "passwordLogin", "realtimeTranscoding", "reverseGeocoding", "search",
               "sidecar", "smartSearch", "trash")
# The job each simulated queue runs, by naming era (JobName before / since v1.136).
JOB_NAMES = {
    "smartSearch": ("smart-search", "SmartSearch"),
    "faceDetection": ("face-detection", "AssetDetectFaces"),
    "ocr": ("ocr", "Ocr"),
    "thumbnailGeneration": ("generate-thumbnails", "AssetGenerateThumbnails"),
    "videoConversion": ("video-conversion", "AssetEncodeVideo"),
    "metadataExtraction": ("metadata-extraction", "AssetExtractMetadata"),
}
# What an API key needs per endpoint (the contract test checks this table against the spec).
AUTH = {
    "/api/server/ping": (False, False, None),
    "/api/server/version": (False, False, None),
    "/api/server/features": (False, False, None),
    "/api/queues": (True, True, "queue.read"),
    "/api/jobs": (True, True, "job.read"),
    "/api/system-config": (True, True, "systemConfig.read"),
    "/api/search/smart": (True, False, "asset.read"),
}
# Every path above answers GET, except:
METHODS = {"/api/search/smart": "POST"}
# Only the queue endpoints lacked their own permission before v1.137 (systemConfig.read is older).
ALL_BEFORE_1_137 = frozenset({"/api/queues", "/api/jobs"})
# A synthetic SystemConfigDto with planted secrets (tests/fixtures/immich/make_system_config.py).
SYSTEM_CONFIG = json.loads((pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "immich"
                            / "system-config-v3.1.0.json").read_text())


@dataclasses.dataclass(frozen=True)
class SimJob:
    arrival: float
    start: float
    end: float
    provider: str

    @property
    def seconds(self) -> float:
        return self.end - self.start


class QueueSim:
    """A BullMQ queue as a precomputed schedule; `counts(t)` is its state at time t."""

    def __init__(self, name: str, *, concurrency: int, arrivals: Iterable[float],
                 job_seconds: Mapping[str, float] | float, provider_at: Callable[[float], str] = lambda t: "",
                 failed: int = 0, pause: tuple[float, float] | None = None) -> None:
        # pause: (from, to) in which no job starts (the ML service restarting, e.g. to switch to CUDA)
        self.name = name
        self.concurrency = concurrency
        self.failed = failed
        per = job_seconds if isinstance(job_seconds, Mapping) else None
        free = [float("-inf")] * concurrency
        jobs = []
        for a in sorted(arrivals):
            start = max(a, heapq.heappop(free))
            if pause is not None and pause[0] <= start < pause[1]:
                start = pause[1]
            p = provider_at(start)
            end = start + (per[p] if per is not None else float(job_seconds))  # type: ignore[arg-type]
            heapq.heappush(free, end)
            jobs.append(SimJob(a, start, end, p))
        self.jobs = jobs
        self._arr = [j.arrival for j in jobs]
        self._start = sorted(j.start for j in jobs)
        self._end = sorted(j.end for j in jobs)

    def counts(self, t: float) -> dict[str, int]:
        arrived = bisect.bisect_right(self._arr, t)
        started = bisect.bisect_right(self._start, t)
        ended = bisect.bisect_right(self._end, t)
        return {"active": started - ended, "completed": 0, "failed": self.failed, "delayed": 0,
                "waiting": arrived - started, "paused": 0}

    def finished(self, t: float) -> int:
        return bisect.bisect_right(self._end, t)

    def truth(self, provider: str | None = None) -> float:
        """Mean seconds per job (of one provider) over the whole schedule."""
        d = [j.seconds for j in self.jobs if provider is None or j.provider == provider]
        return sum(d) / len(d)

    @property
    def last_end(self) -> float:
        return self._end[-1] if self._end else 0.0


def drain_with_arrivals(t0: float, initial: int, arrival_every: float, arrivals: int,
                        arrivals_from: float = 0.0) -> list[float]:
    """N jobs queued at t0 plus `arrivals` more, one every `arrival_every` s from t0+arrivals_from."""
    return [t0] * initial + [t0 + arrivals_from + i * arrival_every for i in range(arrivals)]


@dataclasses.dataclass
class Key:
    admin: bool = True
    permissions: frozenset[str] = frozenset({"queue.read", "job.read"})


@dataclasses.dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    server: str  # "api", "ml", "telemetry"


@dataclasses.dataclass
class Response:
    method: str
    path: str
    status: int
    body: bytes
    tag: str  # spec, fault, older_version, newer_version, error (4xx/5xx in Immich's error shape)
    server: str


class FakeImmich:
    """Use as a context manager. Attributes may be changed while it runs (guarded by `lock`)."""

    def __init__(self, version: tuple[int, int, int, int | None] = (3, 1, 0, None), *,
                 keys: Mapping[str, Key] | None = None, queues: Sequence[QueueSim] = (),
                 clock: Callable[[], float] = time.monotonic, telemetry: bool = True,
                 with_queues_endpoint: bool | None = None, latency: TelemetrySim | None = None) -> None:
        self.lock = threading.RLock()
        # repository-method duration histograms of both processes (tests/support/immich_telemetry.py);
        # None: telemetry without the repo group, as IMMICH_TELEMETRY_INCLUDE=job serves it
        self.latency = latency
        self.version = version
        self.keys = dict(keys if keys is not None else {"good-key": Key()})
        self.sims = {q.name: q for q in queues}
        self.clock = clock
        self.telemetry = telemetry
        self.with_queues_endpoint = with_queues_endpoint
        # faults: path -> value
        self.status: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.garbage: set[str] = set()
        self.huge: dict[str, int] = {}  # path -> bytes of an endless-looking JSON answer, streamed chunked
        self.extra_telemetry: list[str] = []  # lines appended to the telemetry exposition
        self.extra_queues: dict[str, dict[str, int]] = {}  # names a newer release would add
        self.broken_entries: set[str] = set()  # queue names whose entry loses a required field
        self.ml_up = True
        self.features_off: set[str] = set()  # features /api/server/features reports disabled
        self.ml_ping_json = False  # the older ML app answered the JSON string "pong"
        self.ffmpeg_accel = ("nvenc", True)  # ffmpeg.accel, ffmpeg.accelDecode of /api/system-config
        self.telemetry_offset: dict[str, int] = {}  # counters restart from 0 after a restart
        self.requests: list[Recorded] = []
        self.smart_queries: list[str] = []  # the query of every Smart Search answered 200
        self.responses: list[Response] = []
        self.ports = {"api": free_port(), "ml": free_port(), "telemetry": free_port(), "api_telemetry": free_port()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: dict[str, web.AppRunner] = {}

    # -- addresses -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def ml_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['ml']}"

    @property
    def telemetry_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['telemetry']}/metrics"

    @property
    def api_telemetry_url(self) -> str:
        """The API process's telemetry (port 8081 of a real server)."""
        return f"http://127.0.0.1:{self.ports['api_telemetry']}/metrics"

    # -- scripted behaviour ------------------------------------------------------------------------
    def _v(self, major: int, minor: int) -> bool:
        return self.version[:2] >= (major, minor)

    def has_queues_endpoint(self) -> bool:
        return self.with_queues_endpoint if self.with_queues_endpoint is not None else self._v(2, 4)

    def queue_counts(self, t: float) -> dict[str, dict[str, int]]:
        out = {}
        for name, added in QUEUE_ADDED.items():
            if self._v(*added):
                out[name] = self.sims[name].counts(t) if name in self.sims else \
                    {"active": 0, "completed": 0, "failed": 0, "delayed": 0, "waiting": 0, "paused": 0}
        out.update(self.extra_queues)
        return out

    def telemetry_text(self, t: float) -> str:
        era = 1 if self._v(1, 136) else 0
        lines = ['# HELP target_info Target metadata', '# TYPE target_info gauge',
                 f'target_info{{service_name="immich",service_version="{".".join(map(str, self.version[:3]))}"}} 1']
        for name, sim in sorted(self.sims.items()):
            n = sim.finished(t) - self.telemetry_offset.get(name, 0)
            if n <= 0 or name not in JOB_NAMES:
                continue  # OpenTelemetry creates a counter on its first increment
            metric = f"immich_jobs_{snake_case(JOB_NAMES[name][era])}"
            lines += [f"# HELP {metric}_success_total", f"# TYPE {metric}_success_total counter",
                      f'{metric}_success_total{{otel_scope_name="nestjs-otel"}} {n}']
        lines.append('immich_queues_smart_search_active{otel_scope_name="nestjs-otel"} 0')
        return "\n".join(lines) + "\n"

    def _smart_search(self, raw: bytes) -> tuple[web.Response, str]:
        """SearchService.searchSmart of v3.1.0 for a user with an empty library: the feature check
        comes after authentication, then the query check; no asset ever matches."""
        if "smartSearch" in self.features_off:
            return self._error(400, "Smart search is not enabled", "Bad Request"), "error"
        dto = json.loads(raw or b"{}")
        if not dto.get("query") and not dto.get("queryAssetId"):
            return self._error(400, "Either `query` or `queryAssetId` must be set", "Bad Request"), "error"
        self.smart_queries.append(dto.get("query", ""))
        return web.json_response({"albums": {"total": 0, "count": 0, "items": [], "facets": []},
                                  "assets": {"total": 0, "count": 0, "items": [], "facets": [], "nextPage": None}}), \
            "spec"

    # -- HTTP ------------------------------------------------------------------------------------
    def _error(self, status: int, message: str, error: str) -> web.Response:
        body = {"message": message, "error": error, "statusCode": status, "correlationId": uuid.uuid4().hex[:8]}
        return web.json_response(body, status=status)

    async def _api(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        raw = await request.read()
        with self.lock:
            self.requests.append(Recorded(request.method, path, dict(request.query), dict(request.headers),
                                          raw, "api"))
            delay = self.delay.get(path, 0.0)
        if delay:
            await asyncio.sleep(delay)
        with self.lock:
            huge = self.huge.get(path)
        if huge:
            return await self._stream_huge(request, huge)
        with self.lock:
            resp, tag = self._answer(request, path, raw)
            self.responses.append(Response(request.method, path, resp.status, resp.body or b"", tag, "api"))
        return resp

    async def _stream_huge(self, request: web.Request, size: int) -> web.StreamResponse:
        """A JSON array of `size` bytes, chunked (no Content-Length): the client cannot tell in
        advance; it must stop reading by itself."""
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b"[" + b"0," * (1 << 19)
        sent = 0
        try:
            while sent < size:
                await resp.write(chunk)
                sent += len(chunk)
                chunk = chunk[1:] if chunk[:1] == b"[" else chunk
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should
        return resp

    def _answer(self, request: web.Request, path: str, raw: bytes) -> tuple[web.Response, str]:
        resp, tag = self._answer_current(request, self._path_of_era(path), raw)
        return resp, ("older_version" if tag == "spec" and path != self._path_of_era(path) else tag)

    def _path_of_era(self, path: str) -> str:
        """Before v1.113 the /api/server/* endpoints were /api/server-info/* (same answers)."""
        if self._v(1, 113):
            return path
        if path.startswith("/api/server-info/"):
            return "/api/server/" + path[len("/api/server-info/"):]
        if path.startswith("/api/server/"):
            return "/nonexistent" + path
        return path

    def _answer_current(self, request: web.Request, path: str, raw: bytes) -> tuple[web.Response, str]:
        if path in self.status:
            st = self.status[path]
            return self._error(st, "Internal server error" if st >= 500 else "error", "Error"), "error"
        if path not in AUTH or (path == "/api/queues" and not self.has_queues_endpoint()) \
                or request.method != METHODS.get(path, "GET"):
            return self._error(404, f"Cannot {request.method} {path}", "Not Found"), "error"
        needs_auth, admin_only, perm = AUTH[path]
        if needs_auth:
            key = self.keys.get(request.headers.get("x-api-key", ""))
            if key is None:
                return self._error(401, "Invalid API key", "Unauthorized"), "error"
            if admin_only and not key.admin:
                return self._error(403, "Forbidden", "Forbidden"), "error"
            needed = "all" if not self._v(1, 137) and path in ALL_BEFORE_1_137 else perm
            if needed not in key.permissions and "all" not in key.permissions:
                return self._error(403, f"Missing required permission: {needed}", "Forbidden"), "error"
        if path in self.garbage:
            return web.Response(body=b'{"smartSearch": {"jobCounts": ', content_type="application/json"), "fault"
        if path == "/api/search/smart":
            return self._smart_search(raw)
        t = self.clock()
        tag = "spec"
        if path == "/api/server/ping":
            body: Any = {"res": "pong"}
        elif path == "/api/server/version":
            body = {"major": self.version[0], "minor": self.version[1], "patch": self.version[2]}
            if self._v(3, 0):
                body["prerelease"] = self.version[3]
            else:
                tag = "older_version"
        elif path == "/api/system-config":
            body = json.loads(json.dumps(SYSTEM_CONFIG))
            body["ffmpeg"]["accel"], body["ffmpeg"]["accelDecode"] = self.ffmpeg_accel
        elif path == "/api/server/features":
            body = {f: f not in self.features_off for f in FEATURES_V3 if (f != "ocr" or self._v(2, 2))
                    and (f != "realtimeTranscoding" or self._v(3, 0))}
            if not self._v(3, 0):
                tag = "older_version"
        else:
            counts = self.queue_counts(t)
            if path == "/api/queues":
                body = [{"name": n, "isPaused": False, "statistics": c} for n, c in counts.items()]
                for e in body:
                    if e["name"] in self.broken_entries:
                        del e["statistics"]["waiting"]
            else:
                body = {n: {"jobCounts": c, "queueStatus": {"isActive": c["active"] > 0, "isPaused": False}}
                        for n, c in counts.items()}
                for n in self.broken_entries & set(body):
                    body[n]["jobCounts"] = {"active": "lots"}
                if not self._v(3, 0):
                    tag = "older_version"
            if self.extra_queues:
                tag = "newer_version"
            if self.broken_entries:
                tag = "fault"
        return web.json_response(body), tag

    async def _ml(self, request: web.Request) -> web.StreamResponse:
        with self.lock:
            self.requests.append(Recorded(request.method, request.path, dict(request.query),
                                          dict(request.headers), b"", "ml"))
            up = self.ml_up
        if request.path == "/ping" and up:
            if self.ml_ping_json:
                return web.json_response("pong")
            return web.Response(text="pong")
        return web.Response(status=503 if not up else 404, text="unavailable")

    async def _telemetry(self, request: web.Request) -> web.StreamResponse:
        with self.lock:
            self.requests.append(Recorded(request.method, request.path, dict(request.query),
                                          dict(request.headers), b"", "telemetry"))
            if not self.telemetry or request.path != "/metrics":
                return web.Response(status=404, text="not found")
            text = self.telemetry_text(self.clock()) + "".join(line + "\n" for line in self.extra_telemetry)
            if self.latency is not None:
                text += self.latency.render("microservices", target_info=False)
        return web.Response(text=text, content_type="text/plain")

    async def _api_telemetry(self, request: web.Request) -> web.StreamResponse:
        with self.lock:
            self.requests.append(Recorded(request.method, request.path, dict(request.query),
                                          dict(request.headers), b"", "api_telemetry"))
            if not self.telemetry or request.path != "/metrics":
                return web.Response(status=404, text="not found")
            text = self.latency.render("api") if self.latency is not None else \
                self.telemetry_text(self.clock()).split("immich_", 1)[0]
        return web.Response(text=text, content_type="text/plain")

    # -- lifecycle -------------------------------------------------------------------------------
    def _app(self, handler: Callable[..., Any]) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        return app

    async def _start_servers(self, which: Iterable[str]) -> None:
        handlers = {"api": self._api, "ml": self._ml, "telemetry": self._telemetry,
                    "api_telemetry": self._api_telemetry}
        for name in which:
            runner = web.AppRunner(self._app(handlers[name]), access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.ports[name], reuse_address=True).start()
            self._runners[name] = runner

    async def _stop_servers(self, which: Iterable[str]) -> None:
        for name in list(which):
            runner = self._runners.pop(name, None)
            if runner is not None:
                await runner.cleanup()

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> "FakeImmich":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-immich", daemon=True)
        self._thread.start()
        ready.wait(5)
        self._call(self._start_servers(("api", "ml", "telemetry", "api_telemetry")))
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._stop_servers(tuple(self._runners)))
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(5)
        self._loop.close()
        self._loop = None

    def go_down(self) -> None:
        """The server process dies: API and telemetry stop listening (the ML service stays)."""
        self._call(self._stop_servers(("api", "telemetry", "api_telemetry")))

    def come_back(self) -> None:
        """The server is back: listening again, telemetry counters restarted from zero."""
        with self.lock:
            t = self.clock()
            self.telemetry_offset = {n: s.finished(t) for n, s in self.sims.items()}
            if self.latency is not None:
                for worker in ("api", "microservices"):
                    self.latency.restart(worker)
        self._call(self._start_servers(("api", "telemetry", "api_telemetry")))

    def __enter__(self) -> "FakeImmich":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection ------------------------------------------------------------------------------
    def api_requests(self, path: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.server == "api" and (path is None or r.path == path)]
