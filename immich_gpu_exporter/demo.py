"""`immich-gpu-exporter demo`: a built-in CPU-then-CUDA scenario replayed through the real code.

Owns the scenario and the demo sources, nothing else. The scenario says what a small Immich
host does at scenario time t; the sources feed it through the same parsing, attribution and
timing code the daemon uses, so the demo exposes exactly what the daemon would on such a host:

* `journal`: real-format journal entries (Rich-wrapped Immich ML lines, ONNX Runtime's native
  warnings, gunicorn's lifecycle, the server's Nest lines) go through `mllog.Parser`/`MLState`
  (it is `JournalSource` with the journalctl follower replaced by the scenario);
* `immich`: JSON and telemetry text shaped like Immich's answers go through `immich_api`'s
  decoding and `timings.QueueTimings` (it is `ImmichSource` with HTTP replaced by the scenario);
* `processes`: the scenario's processes, as /proc and the cgroup walk would give them, go through
  `ProcessesSource.publish` (identities, tuning, CPU counters; it is `ProcessesSource` with its
  `read()` replaced by the scenario);
* `nvml`: `sources.nvml` readings (`NvmlReading`/`GpuReading`/`UtilSample`) go through
  `NvmlSource.publish`, labelled through the processes source's facts (`read()` replaced);
* `systemd`: D-Bus-shaped unit properties go through `units.unit_samples`.

The story, one loop of `PERIOD` scenario seconds: CUDA is preferred but cuDNN is missing, so ONNX
Runtime logs "Failed to create CUDAExecutionProvider" and runs on the CPU (`CPU_PHASE`, ~2 s per
smart-search job, a worker OOM-killed, no ML GPU memory); then the admin fixes it and restarts the
ML unit (`CUDA_AT`): CUDA works (~0.5 s per job, ~1.2 GB of GPU memory, 40-70 % SM), the worker
idles out. Then systemd restarts the crashed service into the broken setup again and it loops.
Videos follow the same story: in the broken phase NVENC fails and the server falls back to software
for each video; after the fix NVENC works.
Each phase gets the same upload (a batch plus a trickle of new jobs), so the runs compare.

The scenario clock is injectable (`ScenarioClock(speed)` for the daemon, `ManualClock` for tests
and docs/make_picture.py); everything in the scenario is a deterministic function of it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import textwrap
import time
from typing import Any, Callable, Iterator, Mapping

from . import attribution as attr
from .core import CollectResult
from .docker_api import ContainerInfo
from .sources.base import Source
from .sources.immich import ImmichSource, RequestFailed
from .sources.journal import JournalSource
from .sources.nvml import GpuReading, NvmlReading, NvmlSource, UtilSample
from .sources.processes import ProcessesReading, ProcessesSource
from .units import RLIM_INFINITY, UnitReading, normalize_unit_name, unit_facts, unit_samples

log = logging.getLogger("immich_gpu_exporter.demo")

PERIOD = 80.0  # scenario seconds of one CPU-then-CUDA loop
CUDA_AT = 40.0  # offset in the loop where the fixed ML unit starts
INTERVAL = 0.5  # wall seconds between collections of every demo source
MIB = 1 << 20

ML_UNIT = "immich-machine-learning.service"
SERVER_UNIT = "immich-server.service"
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
GPU_UUID = "GPU-5f1c2a7e-9d0b-4c61-8a3e-6b2d1f0c9e47"
FRIGATE_ID = "3b8e4f0d1c2a59e7b6d4f3a2c1e0d9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2"

# What the demo pretends the host is configured with (the user's flags and files do not apply).
DEMO_SETTINGS = {
    "journal_unit": (ML_UNIT,), "journal_server_unit": (SERVER_UNIT,), "journal_container_name": (),
    "journal_server_container_name": (), "component_ml": (ML_UNIT, "immich_machine_learning"),
    "component_server": (SERVER_UNIT, "immich_server"), "immich_url": "http://immich.demo:2283",
    "immich_ml_url": "http://immich.demo:3003", "immich_telemetry_url": "http://immich.demo:8082/metrics",
    "immich_api_telemetry_url": "http://immich.demo:8081/metrics",
    "immich_api_key_file": None, "journal_fallback_grace": 120.0,
    "journal_nvidia_driver_path": (),  # the demo host is imaginary: the real host's driver says nothing
    "journal_transcode_window": 2,  # two videos per phase: the verdict clears after the fix
}


# --- clocks ------------------------------------------------------------------------------------

class ScenarioClock:
    """Scenario seconds since start, `speed` times faster than the monotonic clock."""

    def __init__(self, speed: float = 1.0, monotonic: Callable[[], float] = time.monotonic,
                 start_wall: float | None = None) -> None:
        self.speed = speed
        self._mono = monotonic
        self._t0 = monotonic()
        self.start_wall = time.time() if start_wall is None else start_wall

    def now(self) -> float:
        return (self._mono() - self._t0) * self.speed

    def wall(self, t: float) -> float:
        """Unix time at which scenario time t happens (for journal and unit timestamps)."""
        return self.start_wall + t / self.speed


class ManualClock:
    """A clock the caller moves (tests, the picture generator)."""

    def __init__(self, start_wall: float = 1_785_000_000.0) -> None:
        self.t = 0.0
        self.start_wall = start_wall

    def now(self) -> float:
        return self.t

    def wall(self, t: float) -> float:
        return self.start_wall + t

    def advance(self, dt: float) -> None:
        self.t += dt


# --- the queues ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QueueSpec:
    concurrency: int
    cpu_seconds: float  # seconds per job while the ML service runs on the CPU
    cuda_seconds: float  # ... and on CUDA (the same for queues that do not use ML)
    telemetry_job: str  # snake_case JobName in Immich's telemetry


# Default concurrencies of Immich (research/immich.md 2.4); per-job times within the guide's ranges.
QUEUES: Mapping[str, QueueSpec] = {
    "smartSearch": QueueSpec(2, 2.0, 0.5, "smart_search"),
    "faceDetection": QueueSpec(2, 1.6, 0.45, "asset_detect_faces"),
    "ocr": QueueSpec(1, 2.4, 0.7, "ocr"),
    "thumbnailGeneration": QueueSpec(3, 0.4, 0.4, "asset_generate_thumbnails"),
    "metadataExtraction": QueueSpec(5, 0.15, 0.15, "asset_extract_metadata"),
    "videoConversion": QueueSpec(1, 6.0, 6.0, "asset_encode_video"),
}
IDLE_QUEUES = ("facialRecognition", "backgroundTask", "storageTemplateMigration", "migration", "search", "sidecar",
               "library", "notifications", "backupDatabase", "workflow", "integrityCheck", "editor")
PAUSED_QUEUE, PAUSED_JOBS = "duplicateDetection", 7  # paused by the admin, jobs parked in BullMQ's paused list

# One upload per phase, at these offsets from the phase start: a batch, then a trickle of new jobs.
UPLOAD = ((3.0, {"smartSearch": 24, "faceDetection": 24, "ocr": 10, "thumbnailGeneration": 30,
                 "metadataExtraction": 30, "videoConversion": 3}),
          (4.0, {"smartSearch": 1, "faceDetection": 1}), (5.0, {"smartSearch": 1, "faceDetection": 1}),
          (6.0, {"smartSearch": 1, "faceDetection": 1}), (7.0, {"smartSearch": 1, "faceDetection": 1}))


def split(t: float) -> tuple[int, float]:
    """Scenario time -> (loop number, offset in the loop)."""
    k = math.floor(t / PERIOD)
    return k, t - k * PERIOD


def on_cuda(t: float) -> bool:
    return split(t)[1] >= CUDA_AT


def arrivals() -> Iterator[tuple[float, str, int]]:
    k = 0
    while True:
        for phase in (0.0, CUDA_AT):
            for offset, batch in UPLOAD:
                for queue, n in batch.items():
                    yield k * PERIOD + phase + offset, queue, n
        k += 1


class QueueSim:
    """An event-driven simulation of Immich's queues: waiting jobs, `concurrency` busy slots each,
    a job's duration fixed by the provider in force when it starts. Deterministic."""

    def __init__(self) -> None:
        self.t = 0.0
        self.waiting = {q: 0 for q in QUEUES}
        self.running: dict[str, list[float]] = {q: [] for q in QUEUES}  # finish times
        self.done = {q: 0 for q in QUEUES}
        self._arrivals = arrivals()
        self._next = next(self._arrivals)

    def advance(self, to: float) -> None:
        while True:
            finish = min((f for fs in self.running.values() for f in fs), default=math.inf)
            at = min(finish, self._next[0])
            if at > to:
                break
            while self._next[0] <= at:
                self.waiting[self._next[1]] += self._next[2]
                self._next = next(self._arrivals)
            for q, fs in self.running.items():
                ended = [f for f in fs if f <= at]
                if ended:
                    self.done[q] += len(ended)
                    self.running[q] = [f for f in fs if f > at]
            for q, spec in QUEUES.items():
                while self.waiting[q] and len(self.running[q]) < spec.concurrency:
                    self.waiting[q] -= 1
                    self.running[q].append(at + (spec.cuda_seconds if on_cuda(at) else spec.cpu_seconds))
        self.t = max(self.t, to)

    def active(self, q: str) -> int:
        return len(self.running[q])


# --- latency: the server's repository durations (docs/latency.md) ------------------------------

# Each finished ML job made one call to the ML service; its duration (ms) by provider. The rest of a
# job's seconds is the server's own work (reading the image, writing results).
ML_CALLS = {"smartSearch": ("encode_image", 1400.0, 160.0), "faceDetection": ("detect_faces", 1100.0, 140.0),
            "ocr": ("ocr", 1900.0, 320.0)}
SEARCH_EVERY = 6.0  # scenario seconds between two users' Smart Searches
SEARCH_CACHED = 3  # every 3rd search repeats an earlier query: its embedding is cached, no ML call
ENCODE_TEXT_MS = (95.0, 14.0)  # CPU, CUDA
QUERY_MS = 18.0  # the vector search in PostgreSQL, the same on both
LATENCY_BOUNDS = (0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0,
                  1000.0, 2500.0, 5000.0, 7500.0, 10000.0)  # Immich's aggregationBoundaries (ms)


def _jitter(i: int) -> float:
    """A deterministic spread of +-30 % around a call's typical duration."""
    return 1.0 + 0.3 * math.sin(i * 2.399963)


class LatencyHistograms:
    """Cumulative histograms of (repository, method) as a server process would have recorded them."""

    def __init__(self) -> None:
        self.h: dict[tuple[str, str], list[float]] = {}  # -> [count per bound..., count, sum]

    def record(self, repo: str, method: str, ms: float) -> None:
        h = self.h.setdefault((repo, method), [0.0] * (len(LATENCY_BOUNDS) + 2))
        for i, b in enumerate(LATENCY_BOUNDS):
            if ms <= b:
                h[i] += 1
        h[-2] += 1
        h[-1] += ms

    def lines(self) -> list[str]:
        out = []
        for (repo, method), h in sorted(self.h.items()):
            name = f"immich_{repo}_repository_{method}_duration"
            out += [f"# HELP {name} The elapsed time in ms for the {repo.replace('_', ' ').title()} Repository to "
                    f"{method.replace('_', ' ')}", f"# TYPE {name} histogram",
                    f"{name}_count {h[-2]:g}", f"{name}_sum {h[-1]!r}"]
            out += [f'{name}_bucket{{le="{b:g}"}} {h[i]:g}' for i, b in enumerate(LATENCY_BOUNDS)]
            out.append(f'{name}_bucket{{le="+Inf"}} {h[-2]:g}')
        return out


# --- the ML service: workers and their journal -------------------------------------------------

STOP_BEFORE = 0.5  # scenario seconds between the old gunicorn's last line and the new one's first
RICH_WIDTH = 80 - 29  # Rich wraps at 80 columns; the message column starts at 29


@dataclasses.dataclass(frozen=True)
class Worker:
    arbiter: int  # gunicorn master PID
    pid: int  # worker PID
    booted: float  # scenario time


def ml_worker(t: float) -> Worker:
    k, o = split(t)
    base = 4000 + 100 * k
    if o < 14.0:
        return Worker(base, base + 1, k * PERIOD)
    if o < CUDA_AT:
        return Worker(base, base + 2, k * PERIOD + 14.0)
    if o < 70.0:
        return Worker(base + 50, base + 51, k * PERIOD + CUDA_AT)
    return Worker(base + 50, base + 52, k * PERIOD + 70.0)


def ml_activating(t: float) -> bool:
    o = split(t)[1]
    return o < 1.0 or CUDA_AT <= o < CUDA_AT + 1.0


def ml_models_on_gpu(t: float) -> bool:
    o = split(t)[1]
    return CUDA_AT + 1.0 <= o < 70.0


def _rich(when: datetime.datetime, level: str, msg: str) -> list[str]:
    lines = textwrap.wrap(msg, RICH_WIDTH, break_long_words=False, break_on_hyphens=False) or [""]
    return [f"[{when:%x %X}] {level:<8} {lines[0]}"] + [" " * 29 + x for x in lines[1:]]


def _ort(when: datetime.datetime, sev: str, where: str, msg: str) -> str:
    return f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond:06d}123 [{sev}:onnxruntime:Default, {where}] {msg}"


def _nest(when: datetime.datetime, pid: int, level: str, ctx: str, msg: str) -> str:
    return f"[Nest] {pid}  - {when:%m/%d/%Y, %I:%M:%S %p} {level:>7} [{ctx}] {msg}"


MODELS = (("visual", "ViT-B-32__openai"), ("detection", "buffalo_l"), ("recognition", "buffalo_l"),
          ("detection", "PP-OCRv5_mobile"), ("recognition", "PP-OCRv5_mobile"))
NO_CUDNN = ("/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1695 onnxruntime::Provider& "
            "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
            "libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open shared object file: "
            "No such file or directory")
CREATE_FAILED = ("Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*. Please install all "
                 "dependencies as mentioned in the GPU requirements page (https://onnxruntime.ai/docs/"
                 "execution-providers/CUDA-ExecutionProvider.html#requirements), make sure they're in the PATH, "
                 "and that your GPU is supported.")
SERVER_PIDS = (1500, 1510, 1520)  # immich (main), immich-api, immich-microservices


class JournalScript:
    """The journal entries of the ML and server units at scenario times, as journalctl -o json
    prints them (one entry per line Rich or gunicorn wrote)."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._seq = 0

    def _when(self, t: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.wall(t))

    def _entry(self, t: float, unit: str, pid: int, line: str, priority: int = 6) -> dict[str, Any]:
        self._seq += 1
        return {"__CURSOR": f"s=demo;i={self._seq:x}", "__REALTIME_TIMESTAMP": str(int(self.clock.wall(t) * 1e6)),
                "_SYSTEMD_UNIT": unit, "_PID": str(pid), "PRIORITY": str(priority),
                "SYSLOG_IDENTIFIER": unit.split(".")[0], "MESSAGE": line}

    # -- building blocks -----------------------------------------------------------------------
    def _boot(self, t: float, w: Worker) -> list[tuple[int, list[str]]]:
        d = self._when(t)
        return [(w.pid, _rich(d, "INFO", f"Booting worker with pid: {w.pid}")),
                (w.pid, _rich(d, "INFO", f"Started server process [{w.pid}]")),
                (w.pid, _rich(d, "INFO", "Waiting for application startup.")),
                (w.pid, _rich(d, "INFO", "Created in-memory cache with unloading after 300s of inactivity.")),
                (w.pid, _rich(d, "INFO", "Initialized request thread pool with 16 threads.")),
                (w.pid, _rich(d, "INFO", "Application startup complete."))]

    def _stop(self, t: float, w: Worker) -> list[tuple[int, list[str]]]:
        d = self._when(t)
        return [(w.arbiter, _rich(d, "INFO", "Handling signal: term")),
                (w.pid, _rich(d, "INFO", f"Worker exiting (pid: {w.pid})")),
                (w.arbiter, _rich(d, "INFO", "Shutting down: Master"))]

    def _start(self, t: float, w: Worker) -> list[tuple[int, list[str]]]:
        d = self._when(t)
        out = [(w.arbiter, _rich(d, "INFO", "Starting gunicorn 23.0.0")),
                (w.arbiter, _rich(d, "INFO", f"Listening at: http://[::]:3003 ({w.arbiter})")),
                (w.arbiter, _rich(d, "INFO", "Using worker: immich_ml.config.CustomUvicornWorker"))]
        return out + self._boot(t, w)

    def _load(self, t: float, w: Worker, cuda_ok: bool) -> list[tuple[int, list[str]]]:
        d = self._when(t)
        out: list[tuple[int, list[str]]] = []
        for i, (mtype, name) in enumerate(MODELS):
            out.append((w.pid, _rich(d, "INFO", f"Loading {mtype} model '{name}' to memory")))
            out.append((w.pid, _rich(d, "INFO", f"Setting execution providers to ['{CUDA}', '{CPU}'], in "
                                              "descending order of preference")))
            if not cuda_ok:
                if i == 0:
                    out.append((w.pid, [_ort(d, "E", "provider_bridge_ort.cc:2022 TryGetProviderInfo_CUDA", NO_CUDNN)]))
                out.append((w.pid, [_ort(d, "W", "onnxruntime_pybind_state.cc:1094 "
                                         "CreateExecutionProviderFactoryInstance", CREATE_FAILED)]))
            elif i == 0:
                out.append((w.pid, [_ort(d, "W", "session_state.cc:1166 VerifyEachNodeIsAssignedToAnEp",
                                         "Some nodes were not assigned to the preferred execution providers which "
                                         "may or may not have an negative impact on performance. e.g. ORT "
                                         "explicitly assigns shape related ops to CPU to improve perf.")]))
        return out

    def _ml_health(self, t: float, healthy: bool) -> tuple[str, int, str]:
        d = self._when(t)
        word = "healthy" if healthy else "unhealthy"
        return (SERVER_UNIT, SERVER_PIDS[2], _nest(d, SERVER_PIDS[2], "LOG" if healthy else "WARN",
                                                   "Microservices:MachineLearningRepository",
                                                   f"Machine learning server became {word} (http://localhost:3003)."))

    def _videos(self, t0: float, nvenc_ok: bool) -> list[tuple[float, str, int, list[str]]]:
        """Two videos of one phase, as media.service.ts logs them (docs/transcode.md): NVENC works,
        or it fails and each video is retried with software decoding, then in software (6 s)."""
        out = []
        ctx = "Microservices:MediaService"
        for n, s in enumerate((t0 + 3.0, t0 + 10.0)):
            vid = f"0e0c{int(t0) % 10000:04d}-0000-4000-8000-{n:012d}"
            pid = SERVER_PIDS[2]
            log_ = [(s, "LOG", f"Transcoding video {vid} with NVENC-accelerated encoding and decoding")]
            if nvenc_ok:
                log_.append((s + 2.0, "LOG", f"Successfully encoded {vid}"))
            else:
                err = "Error occurred during transcoding: ffmpeg exited with code 234: Conversion failed!"
                log_ += [(s + 0.5, "ERROR", err),
                         (s + 0.5, "ERROR", "Retrying with NVENC-accelerated encoding and software decoding"),
                         (s + 1.0, "ERROR", err), (s + 1.0, "ERROR", "Retrying with NVENC acceleration disabled"),
                         (s + 7.0, "LOG", f"Successfully encoded {vid}")]
            out += [(t, SERVER_UNIT, pid, [_nest(self._when(t), pid, lvl, ctx, msg)]) for t, lvl, msg in log_]
        return out

    def _loop(self, k: int) -> list[tuple[float, str, int, list[str]]]:
        """(scenario time, unit, _PID, lines) of loop k, in order."""
        t0 = k * PERIOD
        ml: list[tuple[float, list[tuple[int, list[str]]]]] = []
        prev = ml_worker(t0 - 1.0) if k > 0 else None
        w1, w2, w3, w4 = (ml_worker(t0 + o) for o in (0.0, 14.0, CUDA_AT, 70.0))
        if prev is not None:
            ml.append((t0 - STOP_BEFORE, self._stop(t0 - STOP_BEFORE, prev)))
        ml.append((t0, self._start(t0, w1)))
        ml.append((t0 + 1.0, self._load(t0 + 1.0, w1, False)))
        ml.append((t0 + 14.0, [(w1.arbiter, _rich(self._when(t0 + 14.0), "ERROR",
                                                  f"Worker (pid:{w1.pid}) was sent SIGKILL! Perhaps out of memory?"))]
                   + self._boot(t0 + 14.0, w2)))
        ml.append((t0 + 15.0, self._load(t0 + 15.0, w2, False)))
        ml.append((t0 + CUDA_AT - STOP_BEFORE, self._stop(t0 + CUDA_AT - STOP_BEFORE, w2)))
        ml.append((t0 + CUDA_AT, self._start(t0 + CUDA_AT, w3)))
        ml.append((t0 + CUDA_AT + 1.0, self._load(t0 + CUDA_AT + 1.0, w3, True)))
        d = self._when(t0 + 70.0)
        ml.append((t0 + 70.0, [(w3.pid, _rich(d, "INFO", m)) for m in (
            "Shutting down due to inactivity.", "Shutting down", "Waiting for application shutdown.",
            "Application shutdown complete.", f"Finished server process [{w3.pid}]", f"Worker exiting (pid: {w3.pid})")]
                   + self._boot(t0 + 70.0, w4)))
        out = [(t, ML_UNIT, pid, lines) for t, recs in ml for pid, lines in recs]
        for t, healthy in ((t0, False), (t0 + 1.5, True), (t0 + CUDA_AT, False), (t0 + CUDA_AT + 1.5, True)):
            if t > 0 or healthy:
                unit, pid, line = self._ml_health(t, healthy)
                out.append((t, unit, pid, [line]))
        out += self._videos(t0, False) + self._videos(t0 + CUDA_AT, True)
        out.sort(key=lambda r: r[0])  # stable: same-time records keep their order
        return out

    def entries(self, after: float, upto: float) -> list[dict[str, Any]]:
        """Entries logged at scenario times in (after, upto]."""
        out: list[dict[str, Any]] = []
        for k in range(max(0, split(max(after, 0.0))[0]), split(upto)[0] + 2):  # +1: the next loop's stop lines
            for t, unit, pid, lines in self._loop(k):
                if after < t <= upto:
                    out.extend(self._entry(t, unit, pid, line) for line in lines)
        return out


# --- processes, GPU and units -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DemoProcess:
    pid: int
    comm: str
    cgroup: str  # the text of /proc/<pid>/cgroup
    nice: int
    memlock: float
    rss: int
    cpu: float
    start: float = -3600.0  # scenario seconds


BOOT = 86400.0  # the demo host booted this many seconds before scenario time 0


def _wave(t: float, lo: float, hi: float, f: float = 1.3) -> float:
    return lo + (hi - lo) * (0.5 + 0.5 * math.sin(t * f))


class Scenario:
    """Everything the host does, as a function of the injected clock's scenario time."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.queues = QueueSim()
        self.journal = JournalScript(clock)
        self.container_names = {FRIGATE_ID: "frigate"}
        self.api_latency, self.jobs_latency = LatencyHistograms(), LatencyHistograms()
        self._calls = {q: 0 for q in ML_CALLS}  # ML calls recorded per queue
        self._searches = 0
        self._latency_t = 0.0

    def now(self) -> float:
        t = self.clock.now()
        self.queues.advance(t)
        self._advance_latency(t)
        return t

    def _advance_latency(self, t: float) -> None:
        """Record the calls made up to t: one per finished ML job, and the users' Smart Searches (none
        while the ML service is restarting)."""
        cuda = on_cuda(t)
        for q, (method, cpu_ms, cuda_ms) in ML_CALLS.items():
            while self._calls[q] < self.queues.done.get(q, 0):
                self._calls[q] += 1
                self.jobs_latency.record("machine_learning", method, (cuda_ms if cuda else cpu_ms) * _jitter(self._calls[q]))
        while (self._searches + 1) * SEARCH_EVERY <= t:
            self._searches += 1
            at = self._searches * SEARCH_EVERY
            if ml_activating(at):
                continue
            if self._searches % SEARCH_CACHED:
                ms = ENCODE_TEXT_MS[1 if on_cuda(at) else 0] * _jitter(self._searches)
                self.api_latency.record("machine_learning", "encode_text", ms)
            self.api_latency.record("search", "search_smart", QUERY_MS * _jitter(7 * self._searches))
        self._latency_t = t

    # -- Immich API answers (bytes as the server would send them) ----------------------------------
    def queues_json(self) -> bytes:
        body = []
        for name in sorted((*QUEUES, *IDLE_QUEUES, PAUSED_QUEUE)):
            stats = {"active": 0, "completed": 0, "failed": 0, "delayed": 0, "waiting": 0, "paused": 0}
            if name in QUEUES:
                stats.update(active=self.queues.active(name), waiting=self.queues.waiting[name])
            elif name == PAUSED_QUEUE:
                stats.update(paused=PAUSED_JOBS)
            body.append({"name": name, "isPaused": name == PAUSED_QUEUE, "statistics": stats})
        return json.dumps(body).encode()

    def telemetry_text(self) -> bytes:
        lines = ['# HELP target_info Target metadata', '# TYPE target_info gauge',
                 'target_info{service_name="immich",service_version="3.1.0"} 1']
        for q, spec in QUEUES.items():
            for status, n in (("success", self.queues.done[q]), ("failed", 0)):
                m = f"immich_jobs_{spec.telemetry_job}_{status}_total"
                lines += [f"# HELP {m} Job {status}", f"# TYPE {m} counter",
                          f'{m}{{otel_scope_name="nestjs-otel"}} {n}']
        lines += self.jobs_latency.lines()
        return ("\n".join(lines) + "\n").encode()

    def api_telemetry_text(self) -> bytes:
        lines = ['# HELP target_info Target metadata', '# TYPE target_info gauge',
                 'target_info{service_name="immich",service_version="3.1.0"} 1']
        # the API process's repository durations exist from its first requests (system metadata, ...)
        lines += ["# HELP immich_system_metadata_repository_get_duration The elapsed time in ms for the System "
                  "Metadata Repository to get", "# TYPE immich_system_metadata_repository_get_duration histogram",
                  "immich_system_metadata_repository_get_duration_count 1",
                  "immich_system_metadata_repository_get_duration_sum 0.4"]
        lines += self.api_latency.lines()
        return ("\n".join(lines) + "\n").encode()

    @staticmethod
    def version_json() -> bytes:
        return b'{"major":3,"minor":1,"patch":0,"prerelease":null}'

    @staticmethod
    def system_config_json() -> bytes:
        # only the keys the exporter reads; the real answer is a whole SystemConfigDto (with secrets)
        return b'{"ffmpeg": {"accel": "nvenc", "accelDecode": true}}'

    @staticmethod
    def features_json() -> bytes:
        on = ("duplicateDetection", "facialRecognition", "map", "ocr", "passwordLogin", "reverseGeocoding", "search",
              "sidecar", "smartSearch", "trash")
        off = ("configFile", "email", "importFaces", "oauth", "oauthAutoLaunch", "realtimeTranscoding")
        return json.dumps({**{k: True for k in on}, **{k: False for k in off}}, sort_keys=True).encode()

    @staticmethod
    def ml_outage(after: float, upto: float) -> bool:
        """Whether the ML service stopped answering at some time in (after, upto]: it restarts at the
        start of each phase and its worker is killed at offset 14."""
        if ml_activating(upto):
            return True
        k0 = split(max(after, 0.0))[0]
        for k in range(k0, split(upto)[0] + 1):
            for o in (0.0, 14.0, CUDA_AT):
                if after < k * PERIOD + o <= upto:
                    return True
        return False

    # -- processes and the GPU ---------------------------------------------------------------------
    def processes(self, t: float) -> dict[int, DemoProcess]:
        """Processes of the Immich units plus every GPU user, with their /proc facts."""
        w = ml_worker(t)
        k, o = split(t)
        cuda = on_cuda(t)
        # The unit file was edited (Nice=-10, LimitMEMLOCK=infinity) but only the restart into the
        # CUDA phase applies it: configured vs applied differ during the CPU phase.
        nice, memlock = (-10, math.inf) if cuda else (0, 8.0 * MIB)
        arbiter_start = k * PERIOD + (CUDA_AT if cuda else 0.0)
        ml_cg = f"0::/system.slice/{ML_UNIT}\n"
        srv_cg = f"0::/system.slice/{SERVER_UNIT}\n"
        procs = [
            DemoProcess(w.arbiter, "gunicorn", ml_cg, nice, memlock, 58 * MIB, 0.02 * (t - arbiter_start),
                        arbiter_start),
            DemoProcess(w.pid, "gunicorn", ml_cg, nice, memlock, (2300 if cuda else 1900) * MIB,
                        (t - w.booted) * (0.6 if cuda else 3.1), w.booted),
            DemoProcess(SERVER_PIDS[0], "immich", srv_cg, 0, 8.0 * MIB, 210 * MIB, 0.05 * t + 40.0),
            DemoProcess(SERVER_PIDS[1], "immich-api", srv_cg, 0, 8.0 * MIB, 380 * MIB, 0.1 * t + 120.0),
            DemoProcess(SERVER_PIDS[2], "immich-microser", srv_cg, 0, 8.0 * MIB, 520 * MIB, 0.4 * t + 300.0),
            DemoProcess(1200, "Xorg", "0::/user.slice/user-1000.slice/session-2.scope\n", 0, 8.0 * MIB, 90 * MIB,
                        0.01 * t + 50.0),
            DemoProcess(3100, "ffmpeg", f"0::/system.slice/docker-{FRIGATE_ID}.scope\n", 0, 8.0 * MIB, 150 * MIB,
                        0.2 * t + 800.0),
        ]
        if self.queues.active("videoConversion"):
            procs.append(DemoProcess(7000 + self.queues.done["videoConversion"] % 1000, "ffmpeg", srv_cg, 0, 8.0 * MIB,
                                     240 * MIB, 1.5, t - 1.5))
        return {p.pid: p for p in procs}

    def gpu(self, t: float) -> NvmlReading:
        ts = int(self.clock.wall(t) * 1e6)
        w = ml_worker(t)
        used: dict[int, int | None] = {1200: 44 * MIB, 3100: 304 * MIB}
        util = [UtilSample(1200, ts, 1, 1, 0, 0), UtilSample(3100, ts, 3, 2, 0, int(_wave(t, 12, 20, 0.7)))]
        if ml_models_on_gpu(t):
            used[w.pid] = int(1180 * MIB + _wave(t, 0, 40 * MIB, 0.4))
            busy = any(self.queues.active(q) for q in ("smartSearch", "faceDetection", "ocr"))
            sm = int(_wave(t, 40, 70)) if busy else 0
            util.append(UtilSample(w.pid, ts, sm, int(sm * 0.45), 0, 0))
        if self.queues.active("videoConversion"):
            ff = 7000 + self.queues.done["videoConversion"] % 1000
            used[ff] = 262 * MIB
            util.append(UtilSample(ff, ts, 6, 4, int(_wave(t, 40, 60, 0.9)), int(_wave(t, 15, 25, 0.9))))
        total = 12288 * MIB
        gpu = GpuReading(0, GPU_UUID, "NVIDIA GeForce RTX 3060", min(1.0, sum(s.sm for s in util) / 100),
                         sum(v or 0 for v in used.values()) + 310 * MIB, total, used, tuple(util), True)
        return NvmlReading("550.144.03", (gpu,), ())

    # -- systemd units -------------------------------------------------------------------------------
    def units(self, t: float, names: tuple[str, ...]) -> list[UnitReading]:
        k, o = split(t)
        procs = self.processes(t)
        nvidia = [("/dev/nvidiactl", "rw"), ("/dev/nvidia0", "rw"), ("/dev/nvidia-uvm", "rw"),
                  ("/dev/nvidia-uvm-tools", "rw")]
        ml_start = k * PERIOD + (CUDA_AT if on_cuda(t) else 0.0)

        def unit(active: str, sub: str, entered: float | None) -> dict[str, Any]:
            return {"LoadState": "loaded", "ActiveState": active, "SubState": sub, "UnitFileState": "enabled",
                    "ActiveEnterTimestamp": int(self.clock.wall(entered) * 1e6) if entered is not None else 0}

        def typed(restarts: int, main: int, nice: int, memlock: int, policy: str, allow: list, cg: str) -> dict[str, Any]:
            return {"NRestarts": restarts, "MainPID": main, "ControlGroup": cg, "Nice": nice, "LimitMEMLOCK": memlock,
                    "LimitMEMLOCKSoft": memlock, "DevicePolicy": policy, "DeviceAllow": allow, "PrivateDevices": False}

        cg = {u: f"/system.slice/{u}" for u in (ML_UNIT, SERVER_UNIT, "postgresql.service", "redis-immich.service")}
        activating = ml_activating(t)
        # While (re)starting, the timestamp still names the previous start; before the first one it is 0.
        ml_entered = ml_start + 1.0 if not activating else (ml_start - CUDA_AT + 1.0 if ml_start > 0 else None)
        known = {
            SERVER_UNIT: (unit("active", "running", -3600.0),
                          typed(0, SERVER_PIDS[0], 0, 8 * MIB, "closed", nvidia + [("/dev/dri/renderD128", "rw")],
                                cg[SERVER_UNIT]),
                          tuple(p for p, v in procs.items() if SERVER_UNIT in v.cgroup)),
            # systemd restarts the crashed service at every loop boundary (Restart=on-failure): NRestarts = k;
            # the restart into the CUDA phase is the admin's, which systemd does not count.
            ML_UNIT: (unit("activating" if activating else "active", "start" if activating else "running",
                           ml_entered),
                      typed(k, ml_worker(t).arbiter, -10, RLIM_INFINITY, "closed", nvidia, cg[ML_UNIT]),
                      tuple(p for p, v in procs.items() if ML_UNIT in v.cgroup)),
            "nvidia-container-toolkit-cdi-generator.service": (
                unit("active", "exited", -3700.0), typed(0, 0, 0, 8 * MIB, "auto", [], ""), ()),
            "postgresql.service": (unit("active", "running", -3700.0),
                                   typed(0, 900, 0, 8 * MIB, "auto", [], cg["postgresql.service"]), (900, 905, 906, 907)),
            "redis-immich.service": (unit("active", "running", -3700.0),
                                     typed(0, 950, 0, 8 * MIB, "closed", [], cg["redis-immich.service"]), (950,)),
        }
        out = []
        for name in names:
            if name in known:
                u, ty, pids = known[name]
                out.append(UnitReading(name, u, ty, pids))
            else:
                out.append(UnitReading(name, {"LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead",
                                              "UnitFileState": ""}))
        return out


# --- the sources ------------------------------------------------------------------------------------

def _process_info(p: DemoProcess) -> attr.ProcessInfo:
    """A scenario process as the /proc reader would have read it."""
    return attr.ProcessInfo(p.pid, int((p.start + BOOT) * attr.CLK_TCK), p.comm, attr.locate(p.cgroup), p.memlock,
                            p.nice, p.cpu, p.rss)


class DemoProcesses(ProcessesSource):
    """The processes source with the scenario in place of the cgroup walk, /proc and Docker; no
    state file."""

    def __init__(self, config: Any, hub: Any, scenario: Scenario) -> None:
        super().__init__(config, hub)
        self.scenario = scenario

    @property
    def interval(self) -> float:
        return INTERVAL

    async def start(self) -> None:
        pass  # no state file: every demo starts from zero

    async def read(self, unit_pids: Mapping[str, Any]) -> ProcessesReading:
        t = self.scenario.now()
        procs = self.scenario.processes(t)
        unit_of = {pid: u for u, pids in unit_pids.items() for pid in pids}
        # What the walk would find: the units' members (systemd's facts, else the cgroups' names).
        members = {pid: _process_info(p) for pid, p in procs.items()
                   if pid in unit_of or attr.component_of(self.patterns, attr.locate(p.cgroup).unit) != attr.OTHER}
        containers = {cid: ContainerInfo(cid, name, "ghcr.io/blakeblackshear/frigate:stable")
                      for cid, name in self.scenario.container_names.items()}
        return ProcessesReading(members, unit_of, containers, t + BOOT)


class DemoNvml(NvmlSource):
    """The NVML source with the scenario's GPU in place of the driver."""

    def __init__(self, config: Any, hub: Any, scenario: Scenario) -> None:
        super().__init__(config, hub)
        self.scenario = scenario

    @property
    def interval(self) -> float:
        return INTERVAL

    async def read(self, known: frozenset[int]) -> tuple[NvmlReading, Mapping[int, attr.ProcessInfo | None]]:
        t = self.scenario.now()
        reading = self.scenario.gpu(t)
        procs = self.scenario.processes(t)
        unknown = {pid for g in reading.gpus for pid in g.processes if pid not in known}
        return reading, {pid: _process_info(procs[pid]) if pid in procs else None for pid in unknown}


class DemoSystemd(Source):
    name = "systemd"

    def __init__(self, config: Any, hub: Any, scenario: Scenario) -> None:
        super().__init__(config, hub)
        self.scenario = scenario
        self.units = tuple(dict.fromkeys(normalize_unit_name(u) for u in config["systemd.unit"]))

    @property
    def interval(self) -> float:
        return INTERVAL

    async def collect(self) -> CollectResult:
        readings = self.scenario.units(self.scenario.now(), self.units)
        return CollectResult(tuple(s for r in readings for s in unit_samples(r)), unit_facts(readings))


class DemoJournal(JournalSource):
    """The journal source with the scenario in place of journalctl; no state file."""

    def __init__(self, config: Any, hub: Any, scenario: Scenario) -> None:
        super().__init__(config, hub)
        self.scenario = scenario
        self._read_upto = -1.0

    @property
    def interval(self) -> float:
        return INTERVAL

    async def start(self) -> None:
        self._follow_mode = True  # entries come from the scenario; never run journalctl

    async def collect(self) -> CollectResult:
        t = self.scenario.now()
        logged_at = None
        for entry in self.scenario.journal.entries(self._read_upto, t):
            if entry["__REALTIME_TIMESTAMP"] != logged_at:
                # What the real source does after FLUSH_AFTER of quiet: the scenario's moments are
                # further apart than that, and each logs whole records.
                self.flush()
                logged_at = entry["__REALTIME_TIMESTAMP"]
            self.apply_entry(entry)
        self._read_upto = t
        self.flush()
        return await super().collect()


class DemoImmich(ImmichSource):
    """The Immich source with the scenario answering in place of the server."""

    def __init__(self, config: Any, hub: Any, scenario: Scenario) -> None:
        super().__init__(config, hub, clock=scenario.now)
        self.scenario = scenario
        self._pinged = -math.inf

    async def start(self) -> None:
        """No state file: the demo host is imaginary, nothing of it is kept or resumed."""

    @property
    def interval(self) -> float:
        return INTERVAL

    def api_key(self) -> str | None:
        return "demo"

    async def fetch(self, url: str, key: str | None = None, *, prefix: str = "", want_json: bool = True) -> Any:
        path = "/" + url.split("://", 1)[-1].split("/", 1)[-1]
        s = self.scenario
        if url.startswith(self.config["immich.ml-url"]):
            t = s.now()
            down, self._pinged = s.ml_outage(self._pinged, t), t
            if down:
                raise RequestFailed(prefix + "unreachable",
                                    "immich.demo:3003/ping: ClientConnectorError: the ML service is restarting")
            raw = b"pong"
        elif url == self.config["immich.api-telemetry-url"]:
            raw = s.api_telemetry_text()
        else:
            raw = {"/api/server/ping": b'{"res":"pong"}', "/api/server/version": s.version_json(),
                   "/api/server/features": s.features_json(), "/api/queues": s.queues_json(),
                   "/metrics": s.telemetry_text(), "/api/system-config": s.system_config_json()}[path]
        if not want_json:
            return raw.decode("utf-8", "replace")
        return json.loads(raw)


# --- wiring -------------------------------------------------------------------------------------------

# In the order their facts flow (systemd -> processes -> nvml -> journal -> immich).
DEMO_SOURCES = {"systemd": DemoSystemd, "processes": DemoProcesses, "nvml": DemoNvml, "journal": DemoJournal,
                "immich": DemoImmich}


def demo_config(cfg: Any) -> Any:
    return cfg.replace(**DEMO_SETTINGS)


def build_daemon(cfg: Any, clock: Any, strict_samples: bool = False) -> Any:
    """A normal Daemon running the demo sources (those whose collector is enabled)."""
    from .daemon import Daemon

    cfg = demo_config(cfg)
    scenario = Scenario(clock)
    daemon = Daemon(strict_samples=strict_samples, mode="demo")  # labelled: never mistaken for a real host
    for name, cls in DEMO_SOURCES.items():
        if cfg[f"collector.{name}"]:
            daemon.add(cls(cfg, daemon.hub, scenario))
    return daemon


def demo_daemon(cfg: Any) -> Any:
    """The daemon `immich-gpu-exporter demo` serves (the CLI serves it like the real one)."""
    speed = float(cfg["demo.speed"])
    log.info("demo: replaying a CPU-then-CUDA Immich host, one loop every %gs (speed %g); nothing is read from "
             "this machine", PERIOD / speed, speed)
    return build_daemon(cfg, ScenarioClock(speed))
