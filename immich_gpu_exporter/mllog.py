"""The ML service's journal, as pure data: journal entries -> events -> metrics state.

Owns three things, none of which does I/O:

* `Parser`: journal entries (dicts as `journalctl -o json` prints them) -> `Event`s. It strips ANSI
  codes, parses Rich's `[%x %X] LEVEL    message` prefix, joins Rich's 80-column continuation lines
  (one journal entry each) per stream, and classifies each logical record with the table `RULES`.
* `MLState`: `Event`s (plus NVML observations) -> the values behind every `immich_ml_*` metric.
  The provider rules are written down once, in docs/journal.md ("Provider rules").
* Both serialise to plain JSON (`dump()`/`load()`), so the journal source can persist them together
  with the journal cursor: after a restart nothing is re-counted and nothing is lost.

Log texts follow ../shared/research/immich.md sections 1.2-1.4 (Immich v1.94 .. v3.1, gunicorn,
uvicorn, ONNX Runtime native and Python output).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from .core import Sample, sample

CPU = "CPUExecutionProvider"
# Providers whose memory NVML can see; only these take part in the GPU-memory cross-check.
NVIDIA_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider"})
ERROR_KINDS = ("create_failed", "library_load", "cuda_failure", "ep_fallback", "not_available", "no_gpu_memory",
               "no_driver", "run_failed")
# Kinds that ORT logs only while it creates an execution provider, so they are evidence of a fallback of
# the session being created wherever they appear (docs/journal.md, "Evidence", E2-E4).
BREAKING_KINDS = frozenset({"create_failed", "library_load", "ep_fallback", "not_available"})
EXIT_REASONS = ("inactivity", "timeout", "oom_kill", "signal", "error")
# Signals that mean the worker crashed (gunicorn: "was sent SIGSEGV!"; gunicorn < 20: "was sent code 139!").
CRASH_SIGNALS = frozenset({"SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE", "code 139", "code 134", "code 135",
                           "code 132", "code 136"})
NO_SESSION = "none"  # immich_ml_workers{provider} of a live worker without a session (or one still being judged)
LEVELS = ("debug", "info", "warning", "error", "critical")

# Cardinality caps: beyond them a new value is exposed as "other".
MAX_PROVIDERS = 16
MAX_UNKNOWN_PROVIDERS = MAX_PROVIDERS - 1  # names outside KNOWN_PROVIDERS; known ones never count against it
# ONNX Runtime's execution providers (onnxruntime/core/providers, as of 1.20) and the CPU one.
KNOWN_PROVIDERS = frozenset({
    "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider",
    "OpenVINOExecutionProvider", "MIGraphXExecutionProvider", "ROCMExecutionProvider", "CoreMLExecutionProvider",
    "DmlExecutionProvider", "DnnlExecutionProvider", "QNNExecutionProvider", "VitisAIExecutionProvider",
    "WebGpuExecutionProvider", "XnnpackExecutionProvider", "AzureExecutionProvider", "ACLExecutionProvider",
    "ArmNNExecutionProvider", "CANNExecutionProvider", "NnapiExecutionProvider", "RknpuExecutionProvider",
    "SNPEExecutionProvider", "JsExecutionProvider", "WebNNExecutionProvider", "TvmExecutionProvider",
})
MAX_MODELS = 32
MAX_UNITS = 16
MAX_WORKERS = 64  # worker records kept (live ones plus recently exited, for exit de-duplication)
MAX_RECORD_LINES = 200  # a longer Rich record (a huge traceback) is cut; the rest is still "continuation"
MAX_EP_BLOCK_LINES = 60
STALE_RECORD_US = 150_000  # journal time after which another stream's entry completes a pending record
OTHER = "other"


class Event(NamedTuple):
    kind: str  # see MLState.apply
    group: str  # unit or container the entry came from
    pid: str  # the entry's _PID for systemd units, "" for containers (see MLState._worker)
    ts: Any  # the entry's __REALTIME_TIMESTAMP as journalctl gives it (microseconds); see event_time()
    a: Any = None
    b: Any = None


# --------------------------------------------------------------------------------------------------
# physical lines
# --------------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_RICH = re.compile(r"\[(?P<ts>[^\]\[]{4,40})\] (?P<lvl>DEBUG|INFO|WARNING|ERROR|CRITICAL) +(?P<msg>.*)")
_RICH_NO_TIME = re.compile(r"(?P<pad> {8,40})(?P<lvl>DEBUG|INFO|WARNING|ERROR|CRITICAL) +(?P<msg>\S.*)")
_GUNICORN_PLAIN = re.compile(r"\[[^\]]{8,40}\] \[\d+\] \[(?P<lvl>DEBUG|INFO|WARNING|ERROR|CRITICAL)\] (?P<msg>.*)")
_PY_PLAIN = re.compile(r"(?P<lvl>DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL):\s+(?P<msg>.*)")
# Linear time: `id` stops at the first comma and `loc` starts only after it, so no two groups can
# take the same characters (the former `[^,\]]*),? *[^\]]*` backtracked quadratically on a long line
# without a closing bracket: 11 s for 48 KB).
_ORT = re.compile(r"(?:\d{4}-\d\d-\d\d[ T][\d:.]{1,40} )?\[(?P<sev>[VIWEF]):onnxruntime:(?P<id>[^,\]]*)"
                  r"(?:, *(?P<loc>[^\]]*))?\] ?(?P<msg>.*)")
_NEST = re.compile(r"\[Nest\] \d+\s+-\s.*?\s(?P<lvl>LOG|WARN|ERROR|DEBUG|VERBOSE|FATAL)\s")
_ORT_SEV = {"V": "debug", "I": "info", "W": "warning", "E": "error", "F": "critical"}
_NEST_LVL = {"LOG": "info", "WARN": "warning", "ERROR": "error", "DEBUG": "debug", "VERBOSE": "debug",
             "FATAL": "critical"}
_PRIORITY = {"0": "critical", "1": "critical", "2": "critical", "3": "error", "4": "warning", "5": "info",
             "6": "info", "7": "debug"}


def message_text(value: Any) -> str:
    """MESSAGE as journalctl -o json gives it: a string, a list of byte values (binary or non-UTF-8
    field, e.g. any line with an ANSI escape), null (field too large without --all), or a list of
    such values when the entry has the field more than once (joined by newlines)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if value and not isinstance(value[0], int):
            return "\n".join(message_text(v) for v in value)
        try:
            return bytes(value).decode("utf-8", "replace")
        except (TypeError, ValueError):
            return ""
    return str(value)


def field_text(value: Any) -> str:
    """An identifier field (_SYSTEMD_UNIT, CONTAINER_NAME, _PID): repeated ones count by their first value."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        value = value[0]
    return value if type(value) is str else message_text(value)


def strip_ansi(s: str) -> str:
    return _ANSI.sub("", s) if "\x1b" in s else s


def _squash(s: str) -> str:
    """Whitespace never matters inside a provider list or a quoted model name, but Rich's wrapping
    may put a line break (and our join a space) into them."""
    return "".join(s.split())


def _quoted(s: str) -> list[str]:
    return re.findall(r"['\"]([^'\"]+)['\"]", _squash(s))


_VALID_NAME = re.compile(r"[A-Za-z0-9_.:+@-]{1,80}")
_LIBRARY_PROVIDER = {
    "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider", "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider", "vitisai": "VitisAIExecutionProvider", "qnn": "QNNExecutionProvider",
    "coreml": "CoreMLExecutionProvider", "nv_tensorrt_rtx": "NvTensorRTRTXExecutionProvider",
}


def _library_provider(short: str) -> str:
    short = short.lower()
    return _LIBRARY_PROVIDER.get(short, f"{short.upper()}ExecutionProvider")


# --------------------------------------------------------------------------------------------------
# message rules: the table. Each rule: a cheap literal needle, a regex searched in the logical
# message, and a handler returning (kind, a, b) or None (= recognised, no event). First match wins;
# specific rules come before the generic "search anywhere" ones so one failure is counted once.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    needles: tuple[str, ...]  # cheap pre-filter: the regex runs only if one of them is in the message
    regex: re.Pattern[str]
    handler: Callable[[re.Match[str]], Any]


def _r(name: str, needle: str | tuple[str, ...], pattern: str,
       handler: Callable[[re.Match[str]], Any] = lambda m: None) -> Rule:
    return Rule(name, (needle,) if isinstance(needle, str) else needle, re.compile(pattern), handler)


def _providers(m: re.Match[str]) -> Any:
    names = [p for p in _quoted(m.group("list")) if _VALID_NAME.fullmatch(p)]
    return ("providers", tuple(names), None) if names else None


def _model(m: re.Match[str]) -> Any:
    mtype = "_".join(m.group("type").split()).replace("-", "_").lower()
    name = _squash(m.group("name"))
    return ("model_load", mtype[:40] or "unknown", name if _VALID_NAME.fullmatch(name) else OTHER)


def _exit(reason: str) -> Callable[[re.Match[str]], Any]:
    return lambda m: ("worker_exit", m.group("pid"), reason)


def _sent(m: re.Match[str]) -> Any:
    sig = m.group("sig")
    if sig == "SIGKILL" or sig == "code 9":
        return ("worker_exit", m.group("pid"), "oom_kill")
    # "crash" is counted as reason "signal"; MLState also needs to know it was not a requested stop
    return ("worker_exit", m.group("pid"), "crash" if sig in CRASH_SIGNALS else "signal")


def _error(kind: str, provider: str | None = None) -> Callable[[re.Match[str]], Any]:
    def h(m: re.Match[str]) -> Any:
        p = provider
        if p is None:
            gd = m.groupdict()
            if gd.get("provider"):
                p = gd["provider"]
            elif gd.get("lib"):
                p = _library_provider(gd["lib"])
        return ("provider_error", p, kind)
    return h


RULES: tuple[Rule, ...] = (
    # --- execution providers (Immich sessions/ort.py); v1.107+ and the v1.94-v1.106 form ---------
    _r("providers", "execution providers to", r"^Setting (?:'[^']*' )?execution providers to (?P<list>\[.*?\])", _providers),
    _r("openvino_cpu", "OpenVINO: No GPU found", r"OpenVINO: No GPU found",
       lambda m: ("provider_error", "OpenVINOExecutionProvider", "not_available")),
    # --- models ----------------------------------------------------------------------------
    _r("model_load", "model", r"^(?:Loading|Attempt #\d+ to load) (?P<type>[\w -]+?) model '(?P<name>[^']+)'", _model),
    _r("idle_shutdown", "Shutting down due to inactivity", r"^Shutting down due to inactivity", lambda m: ("idle_shutdown", None, None)),
    # --- gunicorn arbiter / worker lifecycle --------------------------------------------------
    _r("boot", "Booting worker", r"Booting worker with pid: (?P<pid>\d+)", lambda m: ("worker_boot", m.group("pid"), None)),
    _r("timeout", "WORKER TIMEOUT", r"WORKER TIMEOUT \(pid: ?(?P<pid>\d+)\)", _exit("timeout")),
    _r("sent", "was sent", r"Worker \(pid: ?(?P<pid>\d+)\) was sent (?P<sig>SIG[A-Z0-9]+|code \d+)", _sent),
    _r("exit_code", "exited with code", r"Worker \(pid: ?(?P<pid>\d+)\) exited with code (?P<code>-?\d+)", _exit("error")),
    _r("worker_exiting", "Worker exiting", r"Worker exiting \(pid: ?(?P<pid>\d+)\)", lambda m: ("worker_gone", m.group("pid"), None)),
    _r("arbiter_start", "Starting gunicorn", r"^Starting gunicorn", lambda m: ("arbiter_start", None, None)),
    _r("immich_init", "Initializing Immich ML", r"^Initializing Immich ML", lambda m: ("arbiter_start", None, None)),
    _r("arbiter_stop", "Shutting down: Master", r"^Shutting down: Master", lambda m: ("arbiter_stop", None, None)),
    # --- ONNX Runtime failures (native logger, Python warnings, exception texts) --------------
    _r("create_failed", "Failed to create", r"Failed to create (?P<provider>\w+ExecutionProvider)", _error("create_failed")),
    _r("library_load", "Failed to load library", r"Failed to load library (?:\S*/)?libonnxruntime_providers_(?P<lib>\w+?)\.(?:so|dll|dylib)",
       _error("library_load")),
    _r("not_available", "is not in available provider names",
       r"Specified provider '(?P<provider>\w+)' is not in available provider names", _error("not_available")),
    # device enumeration failing (no driver, a driver too old, no device visible): ORT enumerates devices
    # only while it creates the CUDA provider, so inside a session's creation this is fallback evidence
    _r("device_unavailable", "cudaGetDeviceCount", r"\bCUDA failure -?\d+\b[^\n]*?expr=cudaGetDeviceCount\b",
       lambda m: ("device_error", "CUDAExecutionProvider", "cuda_failure")),
    _r("cuda_failure", "failure", r"\b(?:CUDA|CU(?:DNN|BLAS|FFT|RAND|SPARSE|SOLVER)\w*|NCCL) failure -?\d+", _error("cuda_failure", "CUDAExecutionProvider")),
    _r("cuda_error", ("CUDA error", "cudaError"), r"\bCUDA error\b|\bcudaError\w+", _error("cuda_failure", "CUDAExecutionProvider")),
    _r("hip_failure", ("failure", "hipError"), r"\b(?:HIP|MIOPEN|ROCBLAS|HIPBLAS|MIGRAPHX) failure -?\d+|\bhipError\w+", _error("cuda_failure")),
    # a session that is already running failed one request (counted, never a fallback: docs/journal.md)
    _r("run_failed", "Non-zero status code", r"Non-zero status code returned while running", _error("run_failed")),
    # --- server (immich-server) --------------------------------------------------------------
    _r("server_health", "Machine learning server became", r"Machine learning server became (?P<h>healthy|unhealthy)",
       lambda m: ("server_health", m.group("h") == "healthy", None)),
)

# Recognised lines that carry no event (so they are not counted as unrecognised).
BENIGN_PATTERNS: tuple[str, ...] = (
    r"^Created in-memory cache", r"^Initialized request thread pool", r"^Preloading models", r"^Downloading ",
    r"^Available ORT providers", r"^Setting execution provider options", r"^Setting (?:execution_mode|inter_op_num_threads|intra_op_num_threads|model format)",
    r"^Could not load ANN", r"^(?:Loading|Loaded|Unloaded) ANN model", r"^(?:Loading|Loaded) RKNN model",
    r"^Device is not supported for RKNN", r"^Could not read ", r"^RKNN is not available", r"is available, but model",
    r"^Failed to load .* model '", r"^Cleared cache directory", r"^Invalid request format", r"^Language '",
    r"^OpenVINO: Using GPU device", r"^Exception in ASGI application", r"^Listening at: ", r"^Using worker: ",
    r"^Handling signal: ", r"^Reason: ", r"^Worker failed to boot", r"^App failed to load", r"^Started server process",
    r"^Waiting for application (?:startup|shutdown)", r"^Application (?:startup|shutdown) complete", r"^Shutting down$",
    r"^Finished server process", r"^Control socket", r"^\d+\.\d+\.\d+\.\d+:\d+ - \"", r"^\[?[\w:.]*+\]?:?\d* - \"",  # *+: possessive, else quadratic on a long run of digits
    r"^Traceback \(most recent call last\)", r"^File \"", r"^\s", r"^[╭╰│]", r"^\w+(?:\.\w+)*(?:Error|Exception|Fail|Warning): ",
    r"^warnings\.warn", r"^\S+\.py:\d+: \w*Warning: ", r"^\[OpenVINO-EP\]", r"^MIGraphX", r"^The above exception", r"^During handling of the above",
    r"^\[Nest\] ", r"^$",
)
_BENIGN = re.compile("|".join(f"(?:{p})" for p in BENIGN_PATTERNS))  # one search instead of ~45


def classify(msg: str) -> tuple[bool, Any]:
    """One logical message -> (recognised, (kind, a, b) or None)."""
    for rule in RULES:
        for needle in rule.needles:
            if needle in msg:
                break
        else:
            continue
        m = rule.regex.search(msg)
        if m is not None:
            return True, rule.handler(m)
    return _BENIGN.search(msg) is not None, None


# --------------------------------------------------------------------------------------------------
# Parser: entries -> events, with per-stream continuation joining and EP-Error block tracking
# --------------------------------------------------------------------------------------------------

_EP_BANNER = re.compile(r"^\*{5,} ?EP Error ?\*{5,}$")
_EP_END = re.compile(r"^\*{20,}$")
_EP_ERROR = re.compile(r"^EP Error:? ")
_EP_USING = re.compile(r"(?:when )?using (?P<list>\[[^\]]*\])\s*$")
_EP_FALLBACK = re.compile(r"^Falling back to (?P<list>\[[^\]]*\]) and retrying")


class Parser:
    """Turns journal entries into `Event`s.

    A *stream* is (unit or container, _PID): Rich's continuation lines are joined only within their
    stream. A Rich record stays pending until the next non-continuation line of its stream or
    `flush()` (called by the source when the journal has been quiet for a moment).
    """

    def __init__(self, server_units: Iterable[str] = (), server_containers: Iterable[str] = ()) -> None:
        self.server_units = frozenset(server_units)
        self.server_containers = frozenset(server_containers)
        # stream key -> [level, msg_col, [lines], entry_count, group, pid, ts]
        self.pending: dict[str, list[Any]] = {}
        # stream key -> [failing provider or None, lines seen] while inside an EP Error block
        self.ep_block: dict[str, list[Any]] = {}

    # -- persistence ---------------------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        return {"pending": self.pending, "ep_block": self.ep_block}

    def load(self, data: Mapping[str, Any]) -> None:
        self.pending = {k: list(v) for k, v in dict(data.get("pending") or {}).items()}
        self.ep_block = {k: list(v) for k, v in dict(data.get("ep_block") or {}).items()}

    # -- feeding -------------------------------------------------------------------------------
    def feed(self, entry: Mapping[str, Any]) -> list[Event]:
        out: list[Event] = []
        container = entry.get("CONTAINER_NAME")
        unit = entry.get("_SYSTEMD_UNIT")
        if unit is not None and type(unit) is not str:
            unit = field_text(unit)
        if unit in self.server_units:
            # podman under quadlet adds CONTAINER_NAME ("systemd-<unit>") to the unit's own entries
            group, pid, server = unit, "", True
        elif container:
            group, pid = container if type(container) is str else field_text(container), ""
            server = group in self.server_containers
        else:
            group = unit or entry.get("SYSLOG_IDENTIFIER") or "unknown"
            if type(group) is not str:
                group = field_text(group)
            pid = entry.get("_PID") or ""
            if type(pid) is not str:
                pid = field_text(pid) if isinstance(pid, list) else str(pid)
            server = group in self.server_units
        ts = entry.get("__REALTIME_TIMESTAMP") or 0  # microseconds; converted only where used (event_time)
        if self.pending:
            self._close_stale(ts, out)
        text = entry.get("MESSAGE")
        if type(text) is not str:
            text = message_text(text)
        if "\x1b" in text:
            text = strip_ansi(text)
        if server:
            out.append(Event("log", group, pid, ts, self._server_level(text, entry), 1))
            if "Machine learning server became" in text:
                ok, ev = classify(text)
                if ev is not None:
                    out.append(Event(ev[0], group, pid, ts, ev[1], ev[2]))
            return out
        key = f"{group}\x00{pid}"
        level = None
        lines = text.split("\n") if "\n" in text else (text,)
        if len(lines) > 1 and not lines[0].startswith("[") and "onnxruntime:" not in lines[0][:64] \
                and not lines[0].startswith(" "):
            # a multi-line entry that is not Rich output (a traceback sent in one piece): one record
            self._record(group, pid, ts, " ".join(x.strip() for x in lines if x.strip()), 1, out)
            lines = ()
        for line in lines:
            if line.endswith("\r"):
                line = line[:-1]
            lv = self._line(key, group, pid, ts, line, entry, out)
            if level is None:
                level = lv
        # count the entry once, with the level of its first line
        out.insert(0, Event("log", group, pid, ts, level or _PRIORITY.get(str(entry.get("PRIORITY")), "info"), 1))
        return out

    def _close_stale(self, ts: Any, out: list[Event]) -> None:
        """Close other streams' records that are older than STALE_RECORD_US in journal time. Rich writes a
        record's lines in one write(), so its continuations carry (almost) its first line's time; a record
        whose process died after writing it (a worker crashing in ORT right after its provider line) gets
        no next line, and reading a backlog has no quiet moment to complete it, so without this its events
        would come after those of later lines (the master's "was sent SIGSEGV!")."""
        try:
            now = int(ts)
        except (TypeError, ValueError):
            return
        for key, rec in list(self.pending.items()):
            try:
                if now - int(rec[6]) > STALE_RECORD_US:
                    self._close(key, out)
            except (TypeError, ValueError):
                continue

    def flush(self) -> list[Event]:
        out: list[Event] = []
        for key in list(self.pending):
            self._close(key, out)
        return out

    # -- internals -----------------------------------------------------------------------------
    @staticmethod
    def _server_level(text: str, entry: Mapping[str, Any]) -> str:
        m = _NEST.match(text)
        if m:
            return _NEST_LVL[m.group("lvl")]
        return _PRIORITY.get(str(entry.get("PRIORITY")), "info")

    def _line(self, key: str, group: str, pid: str, ts: Any, line: str, entry: Mapping[str, Any],
              out: list[Event]) -> str | None:
        """One physical line; returns its level (None: take it from PRIORITY)."""
        first = line[:1]
        if first == "[":
            m = _RICH.match(line)
            if m is not None:
                self._close(key, out)
                self.pending[key] = [m.group("lvl").lower(), m.start("msg"), [m.group("msg").rstrip()], 1, group,
                                     pid, ts]
                return m.group("lvl").lower()
            m = _GUNICORN_PLAIN.match(line)
            if m is not None:
                self._record(group, pid, ts, m.group("msg"), 1, out)
                return m.group("lvl").lower()
        elif first == " " or first == "\t":
            rec = self.pending.get(key)
            stripped = line.strip()
            if rec is not None and (line[: rec[1]].strip() == "" or not stripped):
                if len(rec[2]) < MAX_RECORD_LINES:
                    rec[2].append(stripped)
                rec[3] += 1
                return rec[0]
            m = _RICH_NO_TIME.match(line)
            if m is not None and (rec is None or len(m.group("pad")) < rec[1]):
                # Rich left the time column blank (same time as the previous record)
                self._close(key, out)
                self.pending[key] = [m.group("lvl").lower(), m.start("msg"), [m.group("msg").rstrip()], 1,
                                     group, pid, ts]
                return m.group("lvl").lower()
            if rec is None and len(line) - len(line.lstrip(" ")) >= 20:
                # a continuation whose record we never saw (read window began mid-record): recognised
                return None
        # Any other line ends the stream's pending Rich record: Rich writes a record in one write(),
        # which journald stores as consecutive entries, so nothing of the same process comes between.
        if key in self.pending:
            self._close(key, out)
        if "onnxruntime:" in line[:64]:
            m = _ORT.match(line)
            if m is not None:
                self._record(group, pid, ts, m.group("msg"), 1, out, native=m.group("loc") or "")
                return _ORT_SEV[m.group("sev")]
        # ORT's Python fallback prints (stdout, no prefix)
        blk = self.ep_block.get(key)
        if blk is not None or "EP Error" in line or line.startswith("Falling back to"):
            if self._ep(key, group, pid, ts, line, out):
                return "error"
        m = _PY_PLAIN.match(line)
        if m is not None:
            self._record(group, pid, ts, m.group("msg"), 1, out)
            return {"warn": "warning"}.get(m.group("lvl").lower(), m.group("lvl").lower())
        self._record(group, pid, ts, line.strip(), 1, out, indented=first == " " or first == "\t")
        return None

    def _ep(self, key: str, group: str, pid: str, ts: Any, line: str, out: list[Event]) -> bool:
        s = line.strip()
        blk = self.ep_block.get(key)
        if _EP_BANNER.match(s):
            self.ep_block[key] = [None, 0]
            return True
        m = _EP_FALLBACK.match(s)
        if m is not None:
            failing = blk[0] if blk is not None and blk[0] else None
            out.append(Event("fallback", group, pid, ts, failing, tuple(_quoted(m.group("list")))))
            if blk is not None:
                blk[0] = "done"
            return True
        if blk is not None and blk[0] == "done":
            del self.ep_block[key]
            return bool(_EP_END.match(s))
        if _EP_ERROR.match(s) or (blk is not None and blk[0] is None):
            if blk is None:
                blk = self.ep_block[key] = [None, 0]
            m = _EP_USING.search(_squash_tail(s))
            if m is not None:
                names = _quoted(m.group("list"))
                blk[0] = names[0] if names else ""
            blk[1] += 1
            if blk[1] > MAX_EP_BLOCK_LINES:
                del self.ep_block[key]
            return True
        if blk is not None:
            if _EP_END.match(s):
                del self.ep_block[key]
            else:
                blk[1] += 1
                if blk[1] > MAX_EP_BLOCK_LINES:
                    del self.ep_block[key]
            return True
        return False

    def _close(self, key: str, out: list[Event]) -> None:
        rec = self.pending.pop(key, None)
        if rec is not None:
            self._record(rec[4], rec[5], rec[6], " ".join(x for x in rec[2] if x), rec[3], out)

    @staticmethod
    def _record(group: str, pid: str, ts: Any, msg: str, entries: int, out: list[Event],
                native: str | None = None, indented: bool = False) -> None:
        ok, ev = classify(msg)
        ok = ok or indented  # traceback frames and code lines of plain (non-Rich) stderr output
        if native is not None and ev is None and not ok:
            ok = True  # any ONNX Runtime native line is a known format, even if not an EP failure
            if "TryGetProviderInfo_" in native and "Failed" in msg:
                prov = native.split("TryGetProviderInfo_", 1)[1].split()[0]
                ev = ("provider_error", _library_provider(prov), "library_load")
        if ev is not None:
            out.append(Event(ev[0], group, pid, ts, ev[1], ev[2]))
        elif not ok:
            out.append(Event("unrecognized", group, pid, ts, entries, None))


def _squash_tail(s: str) -> str:
    # the provider list at the end of "EP Error ... when using [...]" may be wrapped by nothing but
    # its own ", " separators; normalise them so the list regex sees one token
    i = s.rfind("[")
    return s if i < 0 else s[:i] + _squash(s[i:])


# --------------------------------------------------------------------------------------------------
# MLState: events -> metric values
# --------------------------------------------------------------------------------------------------

def event_time(ts: Any) -> float | None:
    """Unix seconds of an event's __REALTIME_TIMESTAMP (None if absent or malformed)."""
    try:
        v = int(ts) / 1e6
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def _is_gpu(provider: str | None) -> bool:
    return bool(provider) and provider != CPU and provider != OTHER


SETTLE_S = 30.0  # see MLState.settle
MAX_SESSIONS = 16  # sessions kept per worker (a model reload replaces that model's sessions)
UNJUDGED = ""  # MLState.verdict after a worker crashed creating its session: no provider at all


class MLState:
    """The ML service as the journal (and NVML and the host) describe it.

    Implements the rules written down once, in docs/journal.md ("Provider rules" and "Evidence"; the
    names in comments below refer to them). In short: every `Setting execution providers` line opens an
    ONNX Runtime *session* of its worker, pending until evidence judges it (fell back, crashed) or the
    worker moves on (ok). A worker's provider is what its sessions really use; the unit's verdict
    (`verdict`) follows the live workers and keeps its last value while they have no judged session.
    """

    def __init__(self, grace: float = 120.0) -> None:
        self.grace = grace
        self.errors: dict[tuple[str, str], int] = {}
        self.model_loads: dict[tuple[str, str], int] = {}
        self.exits: dict[str, int] = {}
        self.boots = 0
        self.session_crashes = 0
        self.entries: dict[tuple[str, str], int] = {}
        self.unrecognized: dict[str, int] = {}
        self.providers_seen: list[str] = []
        self.models_seen: list[tuple[str, str]] = []
        self.units_seen: list[str] = []
        self.preferred: str | None = None
        # the unit's effective provider as the log shows it: None before any session, UNJUDGED after a
        # crash while creating a session (no provider), else a provider name
        self.verdict: str | None = None
        # worker key "group\0pid" -> {"sessions": [{"p": [...], "st": pending|ok|fell_back|crashed,
        #   "to": provider after a fallback, "conf": EP Error block seen, "m": [type, name] or None,
        #   "t": unix time}], "models": [[type, name], ...], "exited": bool, "since": unix time, "model": [...]}
        self.workers: dict[str, dict[str, Any]] = {}
        self.current: dict[str, str] = {}  # group -> pid of the worker that booted last (containers)
        self.server_healthy: bool | None = None
        self.last_change: float | None = None
        self.no_gpu_since: float | None = None
        self.nvml_fallback = False
        self.host_driver: bool | None = None  # NVIDIA kernel driver on this host (None: not checked)
        self.last_evidence: str | None = None  # what the latest fallback evidence was, for `check`
        self.labels_dropped: dict[str, int] = {}  # label -> values mapped to "other" (not persisted)

    # -- persistence ---------------------------------------------------------------------------
    _PERSIST = ("boots", "session_crashes", "providers_seen", "units_seen", "preferred", "verdict", "workers",
                "current", "server_healthy", "last_change", "last_evidence")

    def dump(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self._PERSIST}
        d["errors"] = [[p, k, n] for (p, k), n in self.errors.items()]
        d["model_loads"] = [[t, m, n] for (t, m), n in self.model_loads.items()]
        d["models_seen"] = [list(x) for x in self.models_seen]
        d["exits"] = self.exits
        d["entries"] = [[u, lv, n] for (u, lv), n in self.entries.items()]
        d["unrecognized"] = self.unrecognized
        return d

    def load(self, d: Mapping[str, Any]) -> None:
        for k in self._PERSIST:
            if k in d:
                setattr(self, k, d[k])
        if "verdict" not in d and d.get("log_effective"):  # a state file written before sessions existed
            self.verdict = d["log_effective"]
        for w in self.workers.values():
            w.setdefault("sessions", [])
        self.errors = {(p, k): int(n) for p, k, n in d.get("errors", ())}
        self.model_loads = {(t, m): int(n) for t, m, n in d.get("model_loads", ())}
        self.models_seen = [(t, m) for t, m in d.get("models_seen", ())]
        self.exits = {str(k): int(v) for k, v in dict(d.get("exits") or {}).items()}
        self.entries = {(u, lv): int(n) for u, lv, n in d.get("entries", ())}
        self.unrecognized = {str(k): int(v) for k, v in dict(d.get("unrecognized") or {}).items()}

    # -- bounded label values ------------------------------------------------------------------
    def _provider(self, p: str) -> str:
        if p in self.providers_seen:
            return p
        # A known provider always gets its own label: unknown names logged first (or restored from a
        # state file) must never turn a real CUDAExecutionProvider into "other", which is no GPU.
        if p in KNOWN_PROVIDERS or sum(x not in KNOWN_PROVIDERS for x in self.providers_seen) < MAX_UNKNOWN_PROVIDERS:
            self.providers_seen.append(p)
            return p
        self.labels_dropped["provider"] = self.labels_dropped.get("provider", 0) + 1
        return OTHER

    def _model(self, key: tuple[str, str]) -> tuple[str, str]:
        if key in self.models_seen:
            return key
        if len(self.models_seen) < MAX_MODELS:
            self.models_seen.append(key)
            return key
        return (OTHER, OTHER)

    def _unit(self, u: str) -> str:
        if u in self.units_seen:
            return u
        if len(self.units_seen) < MAX_UNITS:
            self.units_seen.append(u)
            return u
        return OTHER

    # -- workers -------------------------------------------------------------------------------
    def _worker(self, ev: Event, pid: str | None = None, create: bool = True) -> dict[str, Any] | None:
        if pid is None:
            pid = self.current.get(ev.group, ev.pid) if ev.group in self.current else ev.pid
        key = f"{ev.group}\x00{pid}"
        w = self.workers.get(key)
        if w is None and create:
            if len(self.workers) >= MAX_WORKERS:
                # drop exited workers first, then the oldest
                victim = next((k for k, v in self.workers.items() if v["exited"]), next(iter(self.workers)))
                del self.workers[victim]
            w = self.workers[key] = {"sessions": [], "models": [], "exited": False, "since": event_time(ev.ts),
                                     "model": None}
        return w

    @staticmethod
    def _settle(w: dict[str, Any]) -> None:
        """The worker moved on (its next model load, its next session, its idle shutdown): every session
        still pending was created without evidence against it. Rule "ok"."""
        for s in w["sessions"]:
            if s["st"] == "pending":
                s["st"] = "ok"

    @staticmethod
    def _standing(w: dict[str, Any]) -> tuple[str, str] | None:
        """(state, provider) of one worker: fell_back beats ok beats pending; None without a session."""
        best: tuple[str, str] | None = None
        for s in w["sessions"]:
            st = s["st"]
            if st == "fell_back":
                return ("fell_back", s["to"] or CPU)
            if st == "ok" and (best is None or best[0] == "pending"):
                best = ("ok", s["p"][0])
            elif st == "pending" and best is None:
                best = ("pending", s["p"][0])
        return best

    def _judge(self, ts: Any, crashed: bool = False, late: dict[str, Any] | None = None) -> None:
        """The unit's verdict from its live workers (rule "unit"). Pending sessions decide only before
        any verdict exists, so a fresh worker never flips a standing verdict (reboots, idle cycles, a
        crash loop); a crash while creating a session leaves no provider; `late`: an exited worker whose
        session was judged after it exited (its late EP Error block) speaks when no live worker does."""
        fell: list[str] = []
        ok: list[str] = []
        pending: list[str] = []
        for w in self.workers.values():
            if w["exited"]:
                continue
            st = self._standing(w)
            if st is not None:
                (fell if st[0] == "fell_back" else ok if st[0] == "ok" else pending).append(st[1])
        if fell:
            new = CPU if CPU in fell else fell[-1]
        elif ok:
            new = ok[-1]
        elif crashed:
            new = UNJUDGED
        elif late is not None and (st := self._standing(late)) is not None and st[0] == "fell_back":
            new = st[1]
        elif pending and self.verdict is None:
            new = pending[-1]
        else:
            new = self.verdict
        if new != self.verdict:
            self.verdict = new
            self.last_change = event_time(ts) or self.last_change

    def _evidence(self, w: dict[str, Any], prov: str, ts: Any, block: bool = False,
                  fallback_to: tuple[str, ...] = (), note: tuple[str, Event] | None = None) -> None:
        """Evidence that one session of `w` does not run on `prov`: the oldest pending session (ORT's
        native lines come while the session is created), or for an EP Error block the worker's latest
        session (the block is printed before anything else the worker writes to stdout). A session that
        is already judged is not judged again (a late block confirms it, nothing counts twice)."""
        sessions = w["sessions"]
        s = sessions[-1] if block and sessions else next((x for x in sessions if x["st"] == "pending"), None)
        if s is None and sessions and sessions[-1]["st"] == "ok":
            s = sessions[-1]  # settled by a concurrent request's lines before its own evidence arrived
        if s is None:
            # the read window began after the session's provider line: the failing provider was requested
            rest = [p for p in fallback_to if p != prov] or [CPU]
            s = {"p": [prov] + rest, "st": "pending", "to": None, "conf": False, "m": w.get("model"),
                 "t": event_time(ts)}
            sessions.append(s)
            if self.preferred is None:
                self.preferred = prov
        if s["st"] == "fell_back":
            s["conf"] = s["conf"] or block
            return
        if s["st"] == "crashed":
            return
        s["st"] = "fell_back"
        s["conf"] = block
        if note is not None:  # the evidence that judged this session (a late block only confirms it)
            self._note_evidence(prov, *note)
        s["to"] = next((self._provider(p) for p in (fallback_to or s["p"]) if p != prov), CPU)

    def _note_evidence(self, prov: str, kind: str, ev: Event) -> None:
        t = event_time(ev.ts)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t is not None else "?"
        who = f" of {ev.group}" + (f" (pid {ev.pid})" if ev.pid else "")
        self.last_evidence = f"{kind} of {prov}{who} at {when}"

    def _open_session(self, w: dict[str, Any], providers: list[str], ts: Any) -> None:
        self._settle(w)
        model = w.get("model")
        sessions = w["sessions"]
        # no evidence can fail a CPU-only (or unknown-first) list: it is what it says
        st = "pending" if _is_gpu(providers[0]) else "ok"
        sessions.append({"p": providers, "st": st, "to": None, "conf": False, "m": model, "t": event_time(ts)})
        if len(sessions) > MAX_SESSIONS:
            del sessions[0]

    # -- events --------------------------------------------------------------------------------
    def apply(self, ev: Event) -> None:
        k = ev.kind
        if k == "log":
            key = (self._unit(ev.group), ev.a if ev.a in LEVELS else "info")
            self.entries[key] = self.entries.get(key, 0) + ev.b
        elif k == "unrecognized":
            u = self._unit(ev.group)
            self.unrecognized[u] = self.unrecognized.get(u, 0) + ev.a
        elif k == "providers":  # rule "session"
            w = self._worker(ev)
            providers = [self._provider(p) for p in ev.a]
            self._open_session(w, providers, ev.ts)
            self.preferred = providers[0]
            self._judge(ev.ts)
        elif k == "provider_error":  # evidence E2, E3 (and counted-only kinds)
            w = self._worker(ev)
            sessions = w["sessions"]
            prov = ev.a or (sessions[-1]["p"][0] if sessions else self.preferred) or "unknown"
            prov = self._provider(prov)
            self.errors[(prov, ev.b)] = self.errors.get((prov, ev.b), 0) + 1
            if ev.b in BREAKING_KINDS and prov != CPU:
                self._evidence(w, prov, ev.ts, note=(ev.b, ev))
                self._judge(ev.ts, late=w if w["exited"] else None)
        elif k == "device_error":  # evidence E1: only inside a session's creation
            w = self._worker(ev)
            prov = self._provider(ev.a)
            self.errors[(prov, ev.b)] = self.errors.get((prov, ev.b), 0) + 1
            sessions = w["sessions"]
            creating = any(s["st"] == "pending" and s["p"][0] in NVIDIA_PROVIDERS for s in sessions)
            if creating or not sessions:
                self._evidence(w, prov, ev.ts, note=(ev.b, ev))
                self._judge(ev.ts, late=w if w["exited"] else None)
        elif k == "fallback":  # evidence E4 (EP Error block)
            w = self._worker(ev)
            if not w["sessions"] and ev.group in self.current:
                # Docker/podman: _PID names no worker and the block came after the worker that printed
                # it was replaced; a fresh worker cannot own it (its own provider line would come first)
                w = self._last_worker_with_sessions(ev.group) or w
            sessions = w["sessions"]
            prov = ev.a or (sessions[-1]["p"][0] if sessions else self.preferred) or "unknown"
            prov = self._provider(prov)
            self.errors[(prov, "ep_fallback")] = self.errors.get((prov, "ep_fallback"), 0) + 1
            if prov != CPU:
                self._evidence(w, prov, ev.ts, block=True, fallback_to=tuple(ev.b or ()), note=("ep_fallback", ev))
                self._judge(ev.ts, late=w if w["exited"] else None)
        elif k == "model_load":
            key = self._model((ev.a, ev.b))
            self.model_loads[key] = self.model_loads.get(key, 0) + 1
            w = self._worker(ev)
            self._settle(w)
            # a reload replaces that model's sessions (the cache dropped the old ones)
            w["sessions"] = [s for s in w["sessions"] if s.get("m") != list(key)]
            w["model"] = list(key)
            if list(key) not in w["models"]:
                w["models"].append(list(key))
            self._judge(ev.ts)
        elif k == "idle_shutdown":
            w = self._worker(ev)
            self._settle(w)
            self._judge(ev.ts)  # its sessions count once more before it leaves the live workers
            self._exit(w, "inactivity")
        elif k == "worker_boot":
            self.boots += 1
            if ev.pid != ev.a or ev.group in self.current:
                # rule 1: the _PID does not name the worker (container; systemd < 244 gives every line of
                # the unit the main PID): later lines belong to the worker that booted last
                self.current[ev.group] = ev.a
            self.workers.pop(f"{ev.group}\x00{ev.a}", None)
            self._worker(ev, pid=ev.a)
        elif k == "worker_exit":
            w = self._worker(ev, pid=self._pid_for(ev), create=True)
            crashed = False
            if ev.b == "crash" and not w["exited"]:
                for s in w["sessions"]:
                    if s["st"] == "pending":  # rule "crash": it ran on no provider
                        s["st"] = "crashed"
                        crashed = True
                if crashed:
                    self.session_crashes += 1
            elif ev.b == "signal" and not w["exited"]:
                # a requested stop (SIGTERM, SIGINT, SIGQUIT): ORT had finished creating its sessions, and
                # the worker's stdout (an EP Error block) was flushed before it exited
                self._settle(w)
                self._judge(ev.ts)
            self._exit(w, "signal" if ev.b == "crash" else ev.b)
            self._judge(ev.ts, crashed=crashed)
        elif k == "worker_gone":
            w = self._worker(ev, pid=self._pid_for(ev), create=False)
            if w is not None:
                w["models"] = []
                w["exited"] = True
                self._judge(ev.ts)
        elif k in ("arbiter_start", "arbiter_stop"):
            # Only workers that existed before the arbiter line: an old master's "Shutting down:
            # Master" can be completed (and applied) after the new master's worker booted, when both
            # arrive in one read (backfill, catching up after a restart).
            prefix, t = ev.group + "\x00", event_time(ev.ts)
            for key, w in self.workers.items():
                since = w.get("since")
                if key.startswith(prefix) and not (t is not None and since is not None and since > t):
                    w["models"] = []
                    w["exited"] = True
            self._judge(ev.ts)
        elif k == "server_health":
            self.server_healthy = bool(ev.a)

    def _last_worker_with_sessions(self, group: str) -> dict[str, Any] | None:
        prefix = group + "\x00"
        found = None
        for key, w in self.workers.items():  # insertion order: the last match booted last
            if key.startswith(prefix) and w["exited"] and w["sessions"]:
                found = w
        return found

    def _pid_for(self, ev: Event) -> str:
        # gunicorn names the worker; on systemd hosts that is also its _PID, in a container its
        # in-container pid, which is what "Booting worker with pid: N" recorded there
        return str(ev.a)

    def _exit(self, w: dict[str, Any], reason: str) -> None:
        # one exit per worker: WORKER TIMEOUT is followed by "exited with code 1" or "was sent
        # SIGKILL", an inactivity shutdown by "Worker exiting"; the first line names the reason
        if not w["exited"]:
            self.exits[reason] = self.exits.get(reason, 0) + 1
        w["exited"] = True
        w["models"] = []

    # -- time, NVML and host ---------------------------------------------------------------------
    def settle(self, now: float) -> None:
        """A session pending for SETTLE_S without evidence was created (rule "ok"): ORT's creation
        errors and a crash come within a second or two of the provider line."""
        changed = False
        for w in self.workers.values():
            if w["exited"]:
                continue
            for s in w["sessions"]:
                if s["st"] == "pending" and s.get("t") is not None and now - s["t"] >= SETTLE_S:
                    s["st"] = "ok"
                    changed = True
        if changed:
            self._judge(int(now * 1e6))

    def _settle_by_gpu(self, now: float) -> None:
        """The ML processes hold GPU memory and no live worker is already judged on an NVIDIA provider:
        that memory is a pending session's, so those sessions were created on the GPU (rule "ok"). An
        EP Error block arriving later still judges its session (evidence beats this)."""
        live = [w for w in self.workers.values() if not w["exited"]]
        if any(s["st"] == "ok" and s["p"][0] in NVIDIA_PROVIDERS for w in live for s in w["sessions"]):
            return
        changed = False
        for w in live:
            for s in w["sessions"]:
                if s["st"] == "pending" and s["p"][0] in NVIDIA_PROVIDERS:
                    s["st"] = "ok"
                    changed = True
        if changed:
            self._judge(int(now * 1e6))

    def loaded_models(self) -> set[tuple[str, str]]:
        out: set[tuple[str, str]] = set()
        for w in self.workers.values():
            if not w["exited"]:
                out.update((t, m) for t, m in w["models"])
        return out

    def observe_host(self, now: float, nvidia_driver: bool | None) -> None:  # evidence H1
        """nvidia_driver: whether this host has the NVIDIA kernel driver loaded (None: not checked)."""
        before = self.effective
        self.host_driver = nvidia_driver
        after = self.effective
        if after != before:
            self.last_change = now
            if after == CPU and nvidia_driver is False and self.preferred:
                key = (self._provider(self.preferred), "no_driver")
                self.errors[key] = self.errors.get(key, 0) + 1

    def observe_gpu(self, now: float, ml_gpu_bytes: float | None) -> None:  # evidence H2
        """ml_gpu_bytes: the ML component's GPU memory from NVML, None while NVML is not up."""
        if ml_gpu_bytes:
            self._settle_by_gpu(now)
        armed = (ml_gpu_bytes is not None and ml_gpu_bytes <= 0 and self.preferred in NVIDIA_PROVIDERS
                 and self.verdict == self.preferred and bool(self.loaded_models()))
        if not armed:
            self.no_gpu_since = None
            if self.nvml_fallback:
                self.nvml_fallback = False
                self.last_change = now
            return
        if self.no_gpu_since is None:
            self.no_gpu_since = now
        elif not self.nvml_fallback and now - self.no_gpu_since >= self.grace:
            self.nvml_fallback = True
            key = (self._provider(self.preferred), "no_gpu_memory")  # type: ignore[arg-type]
            self.errors[key] = self.errors.get(key, 0) + 1
            self.last_change = now

    # -- outputs -------------------------------------------------------------------------------
    @property
    def effective(self) -> str | None:
        v = self.verdict or None
        if v in NVIDIA_PROVIDERS and (self.nvml_fallback or self.host_driver is False):
            return CPU
        return v

    @property
    def cpu_fallback(self) -> bool:
        return _is_gpu(self.preferred) and self.effective == CPU

    def worker_providers(self) -> dict[str, int]:
        """Live workers by the provider their sessions really use (NO_SESSION: none yet, or one that is
        still being created while the unit stands on another verdict)."""
        out: dict[str, int] = {}
        for w in self.workers.values():
            if w["exited"]:
                continue
            st = self._standing(w)
            if st is None or (st[0] == "pending" and self.verdict not in (None, st[1])):
                p = NO_SESSION
            elif st[1] in NVIDIA_PROVIDERS and self.host_driver is False:
                p = CPU
            else:
                p = st[1]
            out[p] = out.get(p, 0) + 1
        return out

    def facts(self) -> dict[str, Any]:
        return {"effective_provider": self.effective, "preferred_provider": self.preferred,
                "models_loaded": len(self.loaded_models()), "evidence": self.last_evidence}

    def samples(self) -> list[Sample]:
        out: list[Sample] = []
        eff, pref = self.effective, self.preferred
        seen = list(self.providers_seen)
        if eff is not None and eff not in seen:
            seen.append(eff)
        if eff is not None or self.verdict == UNJUDGED:
            # after a crash while creating a session every provider is 0: it ran on none
            out.extend(sample("immich_ml_execution_provider", p == eff, provider=p) for p in seen)
        if pref is not None:
            out.extend(sample("immich_ml_preferred_execution_provider", p == pref, provider=p) for p in seen)
        out.append(sample("immich_ml_cpu_fallback", self.cpu_fallback))
        if self.workers or self.boots:
            live = self.worker_providers()
            labels = seen + [NO_SESSION] + [p for p in live if p not in seen and p != NO_SESSION]
            out.extend(sample("immich_ml_workers", live.get(p, 0), provider=p) for p in labels)
        # Counters exist at 0 before their first event, so that increase() sees that event too
        # (an alert on the first OOM kill or the first provider failure after a restart).
        error_providers = {p for p, _ in self.errors} | ({pref} if _is_gpu(pref) else set())
        out.extend(sample("immich_ml_provider_errors_total", self.errors.get((p, k), 0), provider=p, kind=k)
                   for p in sorted(error_providers) for k in ERROR_KINDS)
        loaded = self.loaded_models()
        for key in self.models_seen + [k for k in self.model_loads if k not in self.models_seen]:
            out.append(sample("immich_ml_model_loads_total", self.model_loads.get(key, 0), model_type=key[0],
                              model_name=key[1]))
            out.append(sample("immich_ml_model_loaded", key in loaded, model_type=key[0], model_name=key[1]))
        out.extend(sample("immich_ml_worker_exits_total", self.exits.get(r, 0), reason=r) for r in EXIT_REASONS)
        out.append(sample("immich_ml_worker_boots_total", self.boots))
        out.append(sample("immich_ml_session_crashes_total", self.session_crashes))
        if self.server_healthy is not None:
            out.append(sample("immich_ml_server_healthy", self.server_healthy))
        out.extend(sample("immich_ml_log_entries_total", n, unit=u, level=lv)
                   for (u, lv), n in sorted(self.entries.items()))
        out.extend(sample("immich_gpu_exporter_journal_unrecognized_total", n, unit=u)
                   for u, n in sorted(self.unrecognized.items()))
        if self.last_change is not None:
            out.append(sample("immich_ml_last_provider_change_timestamp_seconds", self.last_change))
        return out
