"""Video transcoding as the Immich server logs it: the acceleration attempted, each fallback step, a verdict.

Pure: log lines in, counters out; no clock, no I/O. The journal source feeds it the server unit's
(or server container's) entries; the Docker log follower calls `TranscodeState.feed_line(line, ts)`.
docs/transcode.md lists the exact lines per Immich version and defines the metrics.

What the server logs for each video (media.service.ts `handleVideoConversion`, identical text from
v1.130.3 to v3.1.0, the acceleration upper-cased: NVENC, QSV, VAAPI, RKMPP):

    Transcoding video <id> without hardware acceleration                          (accel disabled)
    Transcoding video <id> with NVENC-accelerated encoding and decoding           (accelDecode on)
    Transcoding video <id> with NVENC-accelerated encoding and software decoding  (accelDecode off)
    Retrying with NVENC-accelerated encoding and software decoding                (1st retry, only if accelDecode)
    Retrying with NVENC acceleration disabled                                     (software retry)
    Successfully encoded <id>

The retry lines carry no asset id, and several videos may transcode at once in one process. So the
fallback counters and the verdict are defined without tying a retry to a video: a retry line is a
step, counted where it appears. Only the per-video seconds need a video: a retry moves the oldest
open transcode of that process still at the matching step (exact at Immich's default
videoConversion concurrency of 1; with more, the split of seconds between accelerations may be
off, their totals are not).

Both of Immich's log formats: the console format
`[Nest] <pid>  - <date, time>     LOG [Microservices:MediaService] <message>` (ANSI colours unless
NO_COLOR) and `IMMICH_LOG_FORMAT=json` (v2.5.0+): `{"level":"log","pid":..,"timestamp":..,"message":..,
"context":"MediaService"}`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping, NamedTuple

from .core import Sample, sample

ACCELS = ("nvenc", "qsv", "vaapi", "rkmpp")  # Immich's TranscodeHardwareAcceleration, less "disabled"
DISABLED = "disabled"  # Immich's own name for software transcoding (ffmpeg.accel = "disabled")
OTHER = "other"  # an acceleration a newer Immich may add: counted, but under a bounded label
HARDWARE = "hardware"
SOFTWARE = "software"
DEFAULT_WINDOW = 10
MAX_OPEN = 256  # open transcodes remembered (a job that fails at its last step never logs an end)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# padStart(7) level; the date is the process locale's, so anything up to the level word
_CONSOLE = re.compile(r"\[Nest\] (?P<pid>\d+)\s+- .*? (?P<lvl>LOG|WARN|ERROR|DEBUG|VERBOSE|FATAL) "
                      r"(?:\[(?P<ctx>[^\]]*)\] )?(?P<msg>.*)$")
_START_SW = re.compile(r"Transcoding video (?P<id>\S+) without hardware acceleration$")
_START_HW = re.compile(r"Transcoding video (?P<id>\S+) with (?P<accel>\w+)-accelerated encoding and"
                       r"(?P<sw> software)? decoding$")
_RETRY_DECODE = re.compile(r"Retrying with (?P<accel>\w+)-accelerated encoding and software decoding$")
_RETRY_SOFTWARE = re.compile(r"Retrying with (?P<accel>\w+) acceleration disabled$")
_DONE = re.compile(r"Successfully encoded (?P<id>\S+)$")
_NEEDLES = ("Transcoding video ", "Retrying with ", "Successfully encoded ")


class Envelope(NamedTuple):
    pid: str  # "" when the line has no envelope
    level: str  # log, warn, error, ...; "" when unknown
    context: str
    message: str


class Event(NamedTuple):
    kind: str  # start, retry_decode, retry_software, done
    pid: str
    asset: str = ""
    accel: str = ""
    decode: str = ""


def strip_ansi(s: str) -> str:
    return _ANSI.sub("", s) if "\x1b" in s else s


def envelope(line: str) -> Envelope:
    """One physical log line of the server -> its pid, level, context and message.

    A line in neither format is returned whole as the message, so a pipeline that already
    stripped Nest's prefix (or another log driver's) still works."""
    line = strip_ansi(line).rstrip("\r\n")
    s = line.lstrip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("message"), str):
            pid = obj.get("pid")
            return Envelope("" if pid is None else str(pid), str(obj.get("level") or ""),
                            str(obj.get("context") or ""), obj["message"])
    m = _CONSOLE.search(line)
    if m:
        return Envelope(m.group("pid"), m.group("lvl").lower(), m.group("ctx") or "", m.group("msg"))
    return Envelope("", "", "", line)


def accel_label(upper: str) -> str:
    a = upper.lower()
    return a if a in ACCELS else OTHER


def classify(line: str) -> Event | None:
    """A server log line -> the transcoding event it reports, or None."""
    if not any(n in line for n in _NEEDLES):  # the cheap test first: most server lines are not ours
        return None
    env = envelope(line)
    msg = env.message.rstrip()
    m = _START_HW.search(msg)
    if m:
        return Event("start", env.pid, m.group("id"), accel_label(m.group("accel")),
                     SOFTWARE if m.group("sw") else HARDWARE)
    m = _START_SW.search(msg)
    if m:
        return Event("start", env.pid, m.group("id"), DISABLED, SOFTWARE)
    m = _RETRY_DECODE.search(msg)
    if m:
        return Event("retry_decode", env.pid, accel=accel_label(m.group("accel")))
    m = _RETRY_SOFTWARE.search(msg)
    if m:
        return Event("retry_software", env.pid, accel=accel_label(m.group("accel")))
    m = _DONE.search(msg)
    if m:
        return Event("done", env.pid, m.group("id"))
    return None


def stage(accel: str, decode: str) -> str:
    """Label value of a fallback step's ends: nvenc_hw_decode, nvenc_sw_decode, software."""
    if accel == DISABLED:
        return SOFTWARE
    return f"{accel}_{'hw' if decode == HARDWARE else 'sw'}_decode"


class TranscodeState:
    """Counters, the open transcodes and the verdict; `dump()`/`load()` persist all of it.

    Verdict (`immich_transcode_fallback`): 1 iff a "Retrying with <ACCEL> acceleration disabled"
    line was logged after the `window`-th most recent "Transcoding video" line, and the most
    recent "Transcoding video" line asked for hardware acceleration. Both are facts about the
    order of lines in one log, so no attribution of retries to videos is needed and concurrent
    jobs cannot make it wrong. Starts are numbered 1, 2, ...; a software fallback logged when S
    starts had been seen is "within the window" while S >= starts - window + 1.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, max_open: int = MAX_OPEN) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self.max_open = max_open
        self.jobs: dict[tuple[str, str], float] = {}  # (accel, decode) attempted -> starts
        self.fallbacks: dict[tuple[str, str], float] = {}  # (from stage, to stage) -> steps
        self.seconds: dict[tuple[str, str], float] = {}  # (accel, decode) that produced the file
        self.completed: dict[tuple[str, str], float] = {}
        self.starts = 0
        self.last_software_fallback: int | None = None  # value of `starts` when it was logged
        self.last_start: tuple[str, str] | None = None
        self.last_completed: tuple[str, str] | None = None
        # asset id -> [pid, accel, decode, start time, start number]; insertion order = start order
        self.open: dict[str, list[Any]] = {}

    # -- persistence ---------------------------------------------------------------------------
    _KEYED = ("jobs", "fallbacks", "seconds", "completed")

    def dump(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: [[a, b, v] for (a, b), v in getattr(self, k).items()] for k in self._KEYED}
        d.update(starts=self.starts, last_software_fallback=self.last_software_fallback,
                 last_start=self.last_start, last_completed=self.last_completed,
                 open=[[k] + v for k, v in self.open.items()])
        return d

    def load(self, d: Mapping[str, Any]) -> None:
        for k in self._KEYED:
            setattr(self, k, {(str(a), str(b)): float(v) for a, b, v in d.get(k) or ()})
        self.starts = int(d.get("starts") or 0)
        lsf = d.get("last_software_fallback")
        self.last_software_fallback = None if lsf is None else int(lsf)
        self.last_start = tuple(d["last_start"]) if d.get("last_start") else None  # type: ignore[assignment]
        done = d.get("last_completed")
        self.last_completed = tuple(done) if done else None  # type: ignore[assignment]
        self.open = {str(row[0]): list(row[1:]) for row in d.get("open") or ()}

    # -- feeding -------------------------------------------------------------------------------
    def feed_line(self, line: str, ts: float) -> bool:
        """One server log line (either format, ANSI or not) seen at unix time `ts`; True if it counted.

        The entry point for any log transport: the journal source and the Docker log follower."""
        ev = classify(line)
        if ev is None:
            return False
        self.apply(ev, ts)
        return True

    def feed_lines(self, lines: Iterable[tuple[str, float]]) -> int:
        return sum(self.feed_line(line, ts) for line, ts in lines)

    def apply(self, ev: Event, ts: float) -> None:
        if ev.kind == "start":
            key = (ev.accel, ev.decode)
            self.jobs[key] = self.jobs.get(key, 0.0) + 1
            self.starts += 1
            self.last_start = key
            self.open.pop(ev.asset, None)  # a re-run of the same video starts over
            self.open[ev.asset] = [ev.pid, ev.accel, ev.decode, ts, self.starts]
            # Series this video may increment are born at 0 now, so that increase() sees its first
            # fallback and first completion (a counter born at 1 hides that increment).
            self._zero(key)
            if ev.accel != DISABLED:
                if ev.decode == HARDWARE:
                    self.fallbacks.setdefault((stage(ev.accel, HARDWARE), stage(ev.accel, SOFTWARE)), 0.0)
                self.fallbacks.setdefault((stage(ev.accel, SOFTWARE), SOFTWARE), 0.0)
            while len(self.open) > self.max_open:
                del self.open[next(iter(self.open))]
        elif ev.kind == "retry_decode":
            self._step(stage(ev.accel, HARDWARE), stage(ev.accel, SOFTWARE))
            job = self._oldest(ev, (HARDWARE,))
            if job is not None:
                job[2] = SOFTWARE
                self._zero((job[1], SOFTWARE))
        elif ev.kind == "retry_software":
            # Immich sets accelDecode=false before this retry in every path, so the step always
            # leaves "<accel> encoding, software decoding"
            self._step(stage(ev.accel, SOFTWARE), SOFTWARE)
            self.last_software_fallback = self.starts
            job = self._oldest(ev, (SOFTWARE, HARDWARE))  # HARDWARE: the decode retry line was missed
            if job is not None:
                job[1], job[2] = DISABLED, SOFTWARE
                self._zero((DISABLED, SOFTWARE))
        elif ev.kind == "done":
            job = self.open.pop(ev.asset, None)
            if job is None:
                return  # started before the log we read: its seconds are unknown
            key = (job[1], job[2])
            self.seconds[key] = self.seconds.get(key, 0.0) + max(0.0, ts - float(job[3]))
            self.completed[key] = self.completed.get(key, 0.0) + 1
            self.last_completed = key

    def _zero(self, key: tuple[str, str]) -> None:
        self.seconds.setdefault(key, 0.0)
        self.completed.setdefault(key, 0.0)

    def _step(self, frm: str, to: str) -> None:
        self.fallbacks[(frm, to)] = self.fallbacks.get((frm, to), 0.0) + 1

    def _oldest(self, ev: Event, decodes: tuple[str, ...]) -> list[Any] | None:
        for decode in decodes:
            for job in self.open.values():
                if job[1] == ev.accel and job[2] == decode and (not ev.pid or not job[0] or job[0] == ev.pid):
                    return job
        return None

    # -- read-out ------------------------------------------------------------------------------
    @property
    def fallback(self) -> bool:
        lsf = self.last_software_fallback
        return (lsf is not None and lsf >= self.starts - self.window + 1
                and self.last_start is not None and self.last_start[0] != DISABLED)

    def facts(self) -> dict[str, Any]:
        return {"transcode": {"last_start": self.last_start, "last_completed": self.last_completed,
                              "fallback": self.fallback, "starts": self.starts}}

    def samples(self) -> list[Sample]:
        out = [sample("immich_transcode_fallback", 1 if self.fallback else 0)]
        for (accel, decode), v in sorted(self.jobs.items()):
            out.append(sample("immich_transcode_jobs_total", v, accel=accel, decode=decode))
        for (frm, to), v in sorted(self.fallbacks.items()):
            out.append(sample("immich_transcode_fallbacks_total", v, **{"from": frm, "to": to}))
        for (accel, decode), v in sorted(self.completed.items()):
            out.append(sample("immich_transcode_completed_total", v, accel=accel, decode=decode))
            out.append(sample("immich_transcode_seconds_total", self.seconds.get((accel, decode), 0.0),
                              accel=accel, decode=decode))
        return out


def check_report(configured: Mapping[str, Any] | None, observed: Mapping[str, Any] | None) -> tuple[bool, list[str]]:
    """For `check`: configured acceleration (API) vs observed (log). (ok, lines for a human).

    `configured`: {"accel": "nvenc", "decode": "hardware"} from /api/system-config, or None when the
    key may not read it. `observed`: the journal's `transcode` fact, or None without one."""
    lines: list[str] = []
    ok = True
    if configured:
        c = (str(configured.get("accel")), str(configured.get("decode")))
        lines.append("configured acceleration: " + _describe(c))
    else:
        c = None
        lines.append("configured acceleration: unknown (the API key lacks systemConfig.read, or no key)")
    last = observed.get("last_start") if observed else None
    if not last:
        lines.append("observed acceleration: no transcode in the server log yet")
        return ok, lines
    lines.append("observed acceleration (last transcode started): " + _describe(tuple(last)))
    done = observed.get("last_completed") if observed else None
    if done:
        lines.append("last transcode finished with: " + _describe(tuple(done)))
    if observed and observed.get("fallback"):
        ok = False
        lines.append("FALLBACK: a transcode fell back to software within the last transcodes")
    if c is not None and c[0] != str(last[0]):
        ok = False
        lines.append(f"MISMATCH: configured {c[0]} but the server last transcoded with {last[0]} "
                     "(configuration changed since, or the log is old)")
    return ok, lines


def _describe(key: tuple[Any, ...]) -> str:
    accel, decode = str(key[0]), str(key[1])
    if accel == DISABLED:
        return "software (no hardware acceleration)"
    return f"{accel.upper()} encoding, {decode} decoding"
