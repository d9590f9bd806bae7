"""What the Immich server says, decoded: queue statistics, version, features, telemetry counters.

Pure functions over parsed JSON / exposition text; no I/O. Everything here is tolerant in the
way an exporter must be against a server it does not control:

- the set of queue names is open (new releases add queues: ocr in v2.2, workflow v2.3,
  editor v2.5, integrityCheck v3.0), so unknown names are kept, never rejected;
- one malformed queue entry is skipped and counted (`Decoded.malformed`), the rest is used;
- an answer whose top level has the wrong shape raises `BadAnswer` (one line, no payload).

Two queue endpoints carry the same numbers (research/immich.md §2.2, §2.3):
`GET /api/queues` (v2.4+, a list of `{name, isPaused, statistics}`) and the deprecated
`GET /api/jobs` (every version, an object keyed by queue name of `{jobCounts, queueStatus}`).
Both decode to `QueueStats`.

Telemetry (`IMMICH_TELEMETRY_INCLUDE=job`, microservices worker :8082) exposes one counter per
job name and status, `immich_jobs_<job>_<status>_total`, where `<job>` is lodash `snakeCase` of
the `JobName` value. The values changed in v1.136 from kebab (`face-detection`) to PascalCase
(`AssetDetectFaces`), so both spellings are mapped to their queue in `JOB_QUEUES` (job_queues.py,
generated from Immich's source for every release from v1.113 on).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

# Queues whose jobs call the ML service (and therefore run on the ONNX execution provider).
ML_QUEUES = frozenset({"smartSearch", "faceDetection", "ocr"})

# The states exposed as immich_queue_jobs{state}. `completed` is deliberately absent: BullMQ runs
# with removeOnComplete, so finished jobs are deleted and the count is ~always 0.
EXPOSED_STATES = ("waiting", "active", "delayed", "failed", "paused")
_COUNT_FIELDS = ("active", "completed", "failed", "delayed", "waiting", "paused")


class BadAnswer(ValueError):
    """The whole answer is unusable (not JSON, or the wrong top-level shape)."""


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue's counts at one moment (BullMQ getJobCounts + isPaused)."""

    name: str
    waiting: int = 0
    active: int = 0
    delayed: int = 0
    failed: int = 0
    paused: int = 0  # jobs in BullMQ's paused list, not the queue's paused flag
    completed: int = 0
    is_paused: bool = False

    @property
    def backlog(self) -> int:
        """Jobs not finished yet: waiting + active + delayed (+ BullMQ's paused list, normally 0,
        so that pausing a queue is not mistaken for jobs finishing)."""
        return self.waiting + self.active + self.delayed + self.paused

    def count(self, state: str) -> int:
        return int(getattr(self, state))


@dataclasses.dataclass(frozen=True, slots=True)
class Decoded:
    queues: tuple[QueueStats, ...]
    malformed: int = 0  # entries skipped because their shape was wrong


_QUEUE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
# A count above this is a broken or hostile answer, not a queue: 1e308 jobs would turn every
# counter derived from it into +Inf for good. A trillion is far beyond any real library.
MAX_COUNT = 10**12
MAX_TELEMETRY_VALUE = 1e15

# Immich's QueueName values up to v3.1 (research/immich.md §2.4). Known names always get their own
# label; unknown ones (a newer release) are kept too, up to LabelCap's limit.
KNOWN_QUEUES = frozenset({
    "backgroundTask", "faceDetection", "facialRecognition", "library", "metadataExtraction", "migration",
    "search", "sidecar", "smartSearch", "storageTemplateMigration", "thumbnailGeneration", "videoConversion",
    "notifications", "duplicateDetection", "backupDatabase", "ocr", "workflow", "editor", "integrityCheck",
})


class LabelCap:
    """Bounded label values from outside: known values always pass; unknown ones pass until `limit`
    distinct ones were admitted (first come, kept for the process's life); the rest are refused and
    counted in `dropped`."""

    def __init__(self, known: frozenset[str], limit: int) -> None:
        self.known = known
        self.limit = limit
        self.admitted: set[str] = set()
        self.dropped = 0

    def admit(self, value: str) -> bool:
        if value in self.known or value in self.admitted:
            return True
        if len(self.admitted) < self.limit:
            self.admitted.add(value)
            return True
        self.dropped += 1
        return False


def _count(v: Any) -> int | None:
    # JSON numbers may come as floats (2.0); bools are ints in Python but not counts.
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and (not math.isfinite(v) or v != int(v)):
        return None
    if not 0 <= v <= MAX_COUNT:
        return None
    return int(v)


def _stats(name: Any, counts: Any, is_paused: Any) -> QueueStats | None:
    if not isinstance(name, str) or not _QUEUE_NAME.match(name) or not isinstance(counts, Mapping):
        return None
    values: dict[str, int] = {}
    for field in _COUNT_FIELDS:
        if field not in counts:
            # `completed`/`paused` are harmless to miss; the backlog fields are not.
            if field in ("completed", "paused"):
                values[field] = 0
                continue
            return None
        c = _count(counts[field])
        if c is None:
            return None
        values[field] = c
    if not isinstance(is_paused, bool):
        is_paused = False
    return QueueStats(name, values["waiting"], values["active"], values["delayed"], values["failed"],
                      values["paused"], values["completed"], is_paused)


def decode_queues(body: Any) -> Decoded:
    """`GET /api/queues` (v2.4+): `[{"name", "isPaused", "statistics": {...}}, ...]`."""
    if not isinstance(body, list):
        raise BadAnswer(f"/api/queues: expected a JSON array, got {type(body).__name__}")
    out: dict[str, QueueStats] = {}
    bad = 0
    for entry in body:
        q = _stats(entry.get("name"), entry.get("statistics"), entry.get("isPaused")) \
            if isinstance(entry, Mapping) else None
        if q is None or q.name in out:
            bad += 1
            continue
        out[q.name] = q
    return Decoded(tuple(out[k] for k in sorted(out)), bad)


def decode_jobs_legacy(body: Any) -> Decoded:
    """`GET /api/jobs` (all versions, deprecated since v2.4): `{queue: {jobCounts, queueStatus}}`."""
    if not isinstance(body, Mapping):
        raise BadAnswer(f"/api/jobs: expected a JSON object, got {type(body).__name__}")
    out: list[QueueStats] = []
    bad = 0
    for name, entry in body.items():
        q = None
        if isinstance(entry, Mapping):
            status = entry.get("queueStatus")
            q = _stats(name, entry.get("jobCounts"), status.get("isPaused") if isinstance(status, Mapping) else None)
        if q is None:
            bad += 1
            continue
        out.append(q)
    return Decoded(tuple(sorted(out, key=lambda q: q.name)), bad)


# --- version and features ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Version:
    major: int
    minor: int
    patch: int
    prerelease: int | None = None

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        # The API gives the prerelease as a bare number (v3.0+); shown as such.
        return base if self.prerelease is None else f"{base}-{self.prerelease}"

    def at_least(self, major: int, minor: int, patch: int = 0) -> bool:
        return (self.major, self.minor, self.patch) >= (major, minor, patch)


def decode_version(body: Any) -> Version:
    """`GET /api/server/version`: `{"major", "minor", "patch", "prerelease"?}`."""
    if not isinstance(body, Mapping):
        raise BadAnswer(f"/api/server/version: expected a JSON object, got {type(body).__name__}")
    parts = [_count(body.get(k)) for k in ("major", "minor", "patch")]
    if any(p is None for p in parts):
        raise BadAnswer("/api/server/version: major/minor/patch missing or not non-negative integers")
    pre = body.get("prerelease")
    return Version(parts[0], parts[1], parts[2], _count(pre) if pre is not None else None)  # type: ignore[arg-type]


_FEATURE = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}$")


def decode_features(body: Any) -> dict[str, bool]:
    """`GET /api/server/features`: booleans by feature; non-boolean or odd keys are dropped."""
    if not isinstance(body, Mapping):
        raise BadAnswer(f"/api/server/features: expected a JSON object, got {type(body).__name__}")
    return {k: v for k, v in sorted(body.items()) if isinstance(v, bool) and isinstance(k, str) and _FEATURE.match(k)}


def decode_ping(body: Any) -> bool:
    """`GET /api/server/ping`: `{"res": "pong"}`."""
    return isinstance(body, Mapping) and body.get("res") == "pong"


def decode_ml_ping(text: str) -> bool:
    """The ML service's `GET /ping`: `pong` as text/plain (immich_ml), or the JSON string
    `"pong"` of the older `app.main` (a FastAPI route with a pydantic root model)."""
    text = text.strip()
    return text == "pong" or text == '"pong"'


# --- endpoint choice and permissions ----------------------------------------------------------

# Unauthenticated server endpoints (ping, version, features) live under /api/server since v1.113;
# before, the same endpoints with the same answers were under /api/server-info.
SERVER_BASE = "/api/server"
LEGACY_SERVER_BASE = "/api/server-info"


QUEUES_PATH = "/api/queues"
LEGACY_PATH = "/api/jobs"


def preferred_queue_path(version: Version | None) -> str:
    """`/api/queues` exists since v2.4.0; older servers only have `/api/jobs`."""
    if version is not None and not version.at_least(2, 4):
        return LEGACY_PATH
    return QUEUES_PATH


def needed_permission(path: str, version: Version | None) -> str:
    """One line naming what the API key needs for `path` on this server version."""
    if version is not None and not version.at_least(1, 137):
        return ("an API key of an admin user with the 'all' permission (before Immich v1.137 the queue "
                "endpoint has no finer permission)")
    perm = "queue.read" if path == QUEUES_PATH else "job.read"
    return f"an API key of an admin user with the '{perm}' permission (for {path})"


# --- configured video acceleration (GET /api/system-config) -----------------------------------

SYSTEM_CONFIG_PATH = "/api/system-config"
SYSTEM_CONFIG_PERMISSION = "systemConfig.read"  # and an admin user's key; the same from v1.130 to v3.1
# TranscodeHardwareAcceleration (v3.1.0; TranscodeHWAccel before, same values)
ACCELERATIONS = ("nvenc", "qsv", "vaapi", "rkmpp", "disabled")


@dataclasses.dataclass(frozen=True, slots=True)
class ConfiguredAcceleration:
    accel: str  # one of ACCELERATIONS, or "other"
    decode: str  # "hardware" if ffmpeg.accelDecode else "software"


def decode_ffmpeg_acceleration(body: Any) -> ConfiguredAcceleration:
    """`ffmpeg.accel` and `ffmpeg.accelDecode` of a SystemConfigDto, and nothing else.

    The same answer carries the OAuth client secret, the SMTP password and other secrets: this is
    the one place the answer is read, and only these two keys leave it. Errors never quote it."""
    ffmpeg = body.get("ffmpeg") if isinstance(body, dict) else None
    if not isinstance(ffmpeg, dict):
        raise BadAnswer("the system config has no ffmpeg object")
    accel, decode = ffmpeg.get("accel"), ffmpeg.get("accelDecode")
    if not isinstance(accel, str) or not isinstance(decode, bool):
        raise BadAnswer("ffmpeg.accel / ffmpeg.accelDecode missing or of the wrong type")
    return ConfiguredAcceleration(accel if accel in ACCELERATIONS else "other", "hardware" if decode else "software")


# --- telemetry --------------------------------------------------------------------------------

JOB_STATUSES = ("success", "failed", "skipped")

# snake_case(JobName) -> queue for every job of every release from v1.113 to v3.1.0 (kebab names before
# v1.136, PascalCase after), derived from Immich's source by scripts/derive_job_queues.py.
from .job_queues import JOB_QUEUES  # noqa: E402  (generated; a test keeps it in sync with the fixtures)


def job_queue(job: str) -> str | None:
    """Queue of a snake_case job name from a telemetry metric, or None if unknown (a job of a release
    newer than the table; `library_*` jobs of a newer release are still the library queue's)."""
    q = JOB_QUEUES.get(job)
    if q is None and job.startswith("library_"):
        q = "library"
    return q


# A job counter's sample line. Other `immich_jobs_*` families exist (a job-duration histogram,
# `immich_jobs_duration_{bucket,sum,count}{job_name=...}`, in newer servers): they do not match
# and are ignored, not counted as malformed. `_total` is optional: exporters that follow the
# older Prometheus conventions leave it off.
_TELEMETRY_NAME = re.compile(r"^immich_jobs_(?P<job>[a-z0-9_]+?)_(?P<status>success|failed|skipped)(?:_total)?(?=[{\s])")
_TELEMETRY_REST = re.compile(r"^(?:\{(?P<labels>(?:[^\"}]|\"(?:[^\"\\]|\\.)*\")*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$")


@dataclasses.dataclass(frozen=True, slots=True)
class Telemetry:
    """Job counters from one telemetry scrape.

    `counters`: (job, status) -> value, summed over label sets (`otel_scope_name`, ...).
    `unmapped`: job names whose queue is unknown (ignored for processed counts).
    `malformed`: `immich_jobs_*` lines that did not parse.
    """

    counters: Mapping[tuple[str, str], float]
    unmapped: frozenset[str] = frozenset()
    malformed: int = 0
    series: int = 0  # lines of any metric, to tell "empty" from "no job metrics yet"

    def by_queue(self) -> dict[tuple[str, str], float]:
        """(queue, job) -> finished jobs (success + failed + skipped) for mapped jobs."""
        out: dict[tuple[str, str], float] = {}
        for (job, _status), v in self.counters.items():
            q = job_queue(job)
            if q is not None:
                out[(q, job)] = out.get((q, job), 0.0) + v
        return out


def parse_telemetry(text: str) -> Telemetry:
    """Immich's Prometheus exposition (OpenTelemetry exporter) -> job counters."""
    counters: dict[tuple[str, str], float] = {}
    unmapped: set[str] = set()
    bad = 0
    series = 0
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        series += 1
        name = _TELEMETRY_NAME.match(line)
        if not name:
            continue
        m = _TELEMETRY_REST.match(line[name.end():])
        if not m:
            bad += 1
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            bad += 1
            continue
        if not math.isfinite(value) or not 0 <= value <= MAX_TELEMETRY_VALUE:
            bad += 1
            continue
        key = (name.group("job"), name.group("status"))
        counters[key] = counters.get(key, 0.0) + value
        if job_queue(key[0]) is None:
            unmapped.add(key[0])
    return Telemetry(counters, frozenset(unmapped), bad, series)


def snake_case(name: str) -> str:
    """lodash-style snakeCase of a JobName value (`AssetDetectFaces`, `face-detection`), as Immich's
    telemetry uses it in metric names."""
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z]|\d|\b|_|-)|[A-Z]?[a-z]+|[A-Z]+|\d+", name)
    return "_".join(w.lower() for w in words)

