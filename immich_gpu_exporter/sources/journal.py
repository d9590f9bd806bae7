"""Journal source: follows the ML (and server) units' journal and turns it into `immich_ml_*` metrics.

Owns the I/O around `mllog`: one `journalctl -o json --follow` child process, the journal cursor and
its persistence. Why journalctl and not a native reader (systemd-python, cysystemd): journalctl always
matches the host's journal file format (a bundled libsystemd may be older than the files it reads),
needs no extra dependency, and runs in its own process, so the exporter parses while journalctl
decodes. It is also the measured bottleneck, not us (BENCHMARKS.md).

Persistence (no loss, no double counting): the cursor of the last entry applied, the parser's
half-joined records and the whole `MLState` (counters included) are written together, atomically, to
`<state dir>/journal-state.json` at most every PERSIST_EVERY seconds and at shutdown. A restart loads
them and resumes with `--after-cursor`: entries up to the cursor are never read again, entries after
it are applied exactly once to the restored counters, so counters continue where the persisted
state left them (no reset). journalctl's own --cursor-file is not used: a killed --follow journalctl
does not write it. Entries deleted (rotated and vacuumed) before they were read are the one loss: each
gap and the entries in it are counted, and saved with the cursor (`resume_args`).

First start without a state file: a bounded backfill (`journal.backfill-entries`, from the ML unit's
last `Starting gunicorn` / `Initializing Immich ML`) so the current provider is known at once.

Run once (`--once`, no wake-up bound): collect() reads the window synchronously (after the persisted
cursor, else the backfill) and never writes the state file, so it can run beside a daemon.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from ..core import CollectResult, SourceDown, sample
from ..files import problem_text, read_small, set_aside
from ..mllog import MLState, Parser, event_time, field_text, message_text, strip_ansi
from ..transcode import TranscodeState
from .base import Source

log = logging.getLogger("immich_gpu_exporter.journal")

STATE_FILE = "journal-state.json"
STATE_VERSION = 1
PERSIST_EVERY = 2.0  # seconds between state writes while entries arrive
FLUSH_AFTER = 0.15  # seconds of quiet after which a pending Rich record is complete
BACKOFF_MAX = 30.0
OUTPUT_FIELDS = "MESSAGE,_SYSTEMD_UNIT,CONTAINER_NAME,_PID,PRIORITY,SYSLOG_IDENTIFIER,_UID,_COMM,_TRANSPORT"
START_MARKERS = ("Starting gunicorn", "Initializing Immich ML")
DEFAULT_STATE_DIR = "/var/lib/immich-gpu-exporter"

# Bounds (bytes). journald's own LineMax for a service's stdout is 48K, so real ML lines fit with room;
# anything bigger was written to be big.
MAX_MESSAGE_CHARS = 8192  # per line: the parser sees at most this much of one MESSAGE
MAX_ENTRY_BYTES = 1 << 20  # per entry as journalctl prints it (JSON); a longer one is skipped, counted
MAX_BACKFILL_BYTES = 32 << 20  # per backfill window; the oldest entries beyond it are left out
MAX_STATE_BYTES = 32 << 20  # the state file (a few KiB normally)
SLICE_ENTRIES = 2000  # entries parsed between two returns to the event loop during a backfill

# The container runtimes' own processes. Their entries come through the native journal protocol
# from root; journald sets the `_`-prefixed fields itself, so no client can forge them. Any local
# user can write an entry with CONTAINER_NAME=immich_machine_learning (logger --journald), but only
# with its own _UID.
CONTAINER_RUNTIME_COMMS = frozenset({"dockerd", "conmon", "podman", "containerd", "crio"})


def state_directory(configured: str | None, environ: Any = os.environ) -> str:
    if configured:
        return configured
    sd = environ.get("STATE_DIRECTORY")  # systemd StateDirectory=; may list several, colon-separated
    if sd:
        return sd.split(":")[0]
    return DEFAULT_STATE_DIR


def write_atomic(path: str, data: str) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".journal-state.", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def stderr_down(text: str) -> SourceDown | None:
    """journalctl's complaints that mean "there is nothing to read", as a bounded reason."""
    if "No journal files were opened due to insufficient permissions" in text or "ermission denied" in text:
        return SourceDown("permission_denied", _first_line(text))
    if "No journal files were found" in text or "Failed to open" in text or "No such file or directory" in text:
        return SourceDown("no_journal", _first_line(text))
    return None


SYSTEM_JOURNAL_DIRS = ("/var/log/journal", "/run/log/journal")


def find_journal_files(directory: str | None) -> SourceDown | None:
    """None if there is a readable journal file where journalctl will look, else why not.

    journalctl itself is silent about an empty journal once matches are given, so look first."""
    roots = (directory,) if directory else SYSTEM_JOURNAL_DIRS
    found = readable = system_found = system_readable = 0
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath.count(os.sep) - root.count(os.sep) >= 2:
                dirnames[:] = []
            if dirpath != root and "." in os.path.basename(dirpath):
                dirnames[:] = []
                continue  # <machine-id>.<namespace>: journalctl reads it only with --namespace (or -D)
            for fn in filenames:
                if fn.endswith((".journal", ".journal~")):
                    ok = os.access(os.path.join(dirpath, fn), os.R_OK)
                    found += 1
                    readable += ok
                    if fn.startswith("system"):
                        system_found += 1
                        system_readable += ok
    if not found:
        where = directory or " or ".join(SYSTEM_JOURNAL_DIRS)
        return SourceDown("no_journal", f"no journal files in {where}")
    if not readable or (not directory and system_found and not system_readable):
        # Without the systemd-journal group an unprivileged (or DynamicUser) exporter may still read
        # its own user-<uid>.journal; journalctl then follows that silently and never sees the ML unit.
        return SourceDown("permission_denied", "the system journal is not readable (add the systemd-journal group)")
    return None


def nvidia_driver_loaded(paths: tuple[str, ...]) -> bool | None:
    """Whether the NVIDIA kernel driver is loaded on this host, from host facts that do not depend on the
    exporter's own device access (/proc/driver/nvidia/version, /sys/module/nvidia exist whenever the
    module is loaded, even where a sandbox hides /dev/nvidia*). None: the check is off (no paths)."""
    if not paths:
        return None
    return any(os.path.exists(p) for p in paths)


def cursor_seqnum(cursor: Any) -> tuple[str, int] | None:
    """(seqnum_id, seqnum) of a journal cursor, or None. A cursor reads `s=<seqnum_id>;i=<seqnum, hex>;
    b=<boot id>;m=...;t=...;x=...` on every systemd version (`__SEQNUM` in JSON needs systemd 254). journald
    numbers every entry it writes, of every unit and every journal file, from one counter; a new counter
    (new seqnum_id) starts only when the journal is begun afresh."""
    if not isinstance(cursor, str):
        return None
    fields = dict(p.split("=", 1) for p in cursor.split(";") if "=" in p)
    try:
        seqnum = int(fields["i"], 16)
    except (KeyError, ValueError):
        return None
    return (fields["s"], seqnum) if fields.get("s") else None


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), text.strip())


def ml_start_index(entries: list[dict[str, Any]], ml_groups: Callable[[dict[str, Any]], bool]) -> int:
    """Index of the ML unit's last start in a backfill window (0 if it is not in the window)."""
    for i in range(len(entries) - 1, -1, -1):
        e = entries[i]
        if not ml_groups(e):
            continue
        # Immich's Rich handler writes ANSI codes even off a terminal, and journalctl prints such a
        # MESSAGE as an array of bytes: decode before looking for the start line
        msg = strip_ansi(message_text(e.get("MESSAGE")))
        if any(m in msg for m in START_MARKERS):
            return i
    return 0


def trusted(entry: dict[str, Any], units: frozenset[str]) -> bool:
    """Whether an entry really comes from a watched unit or a container runtime (see above).

    A unit is matched by _SYSTEMD_UNIT (journald derives it from the sender's cgroup). A container
    name counts only when the entry was written by a container runtime running as root."""
    unit = entry.get("_SYSTEMD_UNIT")
    if unit is not None and (unit if type(unit) is str else field_text(unit)) in units:
        return True
    if not entry.get("CONTAINER_NAME"):
        return False
    return (field_text(entry.get("_UID")) == "0" and field_text(entry.get("_TRANSPORT")) == "journal"
            and field_text(entry.get("_COMM")) in CONTAINER_RUNTIME_COMMS)


def bound_message(entry: dict[str, Any]) -> None:
    """Cut a huge MESSAGE (str, or a byte array for non-UTF-8 text) to MAX_MESSAGE_CHARS, in place."""
    m = entry.get("MESSAGE")
    if m is not None and len(m) > MAX_MESSAGE_CHARS and isinstance(m, (str, list)):
        entry["MESSAGE"] = m[:MAX_MESSAGE_CHARS]


STATE_SHAPE: dict[str, Any] = {
    # key -> accepted types; the state file is rejected (and set aside) when a known key has another
    "cursor": (str, type(None)),
    "gaps": int,
    "entries_lost": int,
    "gap_at": (list, type(None)),
    "parser": dict,
    "ml": dict,
    "transcode": dict,
}
ML_SHAPE: dict[str, Any] = {
    "boots": int, "providers_seen": list, "units_seen": list, "preferred": (str, type(None)),
    "log_effective": (str, type(None)), "workers": dict, "current": dict, "server_healthy": (bool, type(None)),
    "last_change": (int, float, type(None)), "last_provider_time": (int, float, type(None)), "errors": list,
    "model_loads": list, "models_seen": list, "exits": dict, "entries": list, "unrecognized": dict,
}


def state_problem(data: Any) -> str | None:
    """Why a decoded state file cannot be used, or None. Checks every known key's type."""
    if not isinstance(data, dict):
        return f"expected an object, got {type(data).__name__}"
    if data.get("version") != STATE_VERSION:
        return f"unknown version {str(data.get('version'))[:40]!r}"
    for shape, where in ((STATE_SHAPE, data), (ML_SHAPE, data.get("ml") or {})):
        for k, types in shape.items():
            if k in where and not isinstance(where[k], types) or (types is int and isinstance(where.get(k), bool)):
                return f"{k} has the wrong type ({type(where[k]).__name__})"
    for k in ("gaps", "entries_lost"):
        if not 0 <= data.get(k, 0) <= 1 << 53:
            return f"{k} is out of range"
    gap_at = data.get("gap_at")  # [vanished cursor, seqnum of the oldest entry left after it, or null]
    if gap_at is not None and not (len(gap_at) == 2 and isinstance(gap_at[0], str) and (
            gap_at[1] is None or isinstance(gap_at[1], int) and not isinstance(gap_at[1], bool))):
        return "gap_at is malformed"
    ml = data.get("ml") or {}
    for k in ("providers_seen", "units_seen"):
        if not all(isinstance(x, str) for x in ml.get(k, ())):
            return f"{k} holds a non-string"
    for k in ("errors", "model_loads", "entries"):
        for row in ml.get(k, ()):
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[2], int) and not isinstance(row[2], bool)
                    and all(isinstance(x, str) for x in row[:2])):
                return f"{k} holds a malformed row"
    for k in ("exits", "unrecognized"):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ml.get(k, {}).values()):
            return f"{k} holds a non-integer"
    if not all(isinstance(w, dict) for w in ml.get("workers", {}).values()):
        return "workers holds a non-object"
    parser = data.get("parser") or {}
    for k in ("pending", "ep_block"):
        if not isinstance(parser.get(k, {}), dict) or not all(isinstance(v, list) for v in parser.get(k, {}).values()):
            return f"parser.{k} has the wrong shape"
    return None


class JournalSource(Source):
    name = "journal"
    after = ("nvml",)

    def __init__(self, config: Any, hub: Any) -> None:
        super().__init__(config, hub)
        self.units = tuple(config["journal.unit"])
        self.server_units = tuple(config["journal.server-unit"])
        self.containers = tuple(config["journal.container-name"])
        self.server_containers: tuple[str, ...] = tuple(config["journal.server-container-name"])
        self.directory = config["journal.directory"]
        self.driver_paths = tuple(config["journal.nvidia-driver-path"])
        self._read_at: tuple[float, float] | None = None  # (journal time, monotonic) of the last entry read
        self.parser = Parser(self.server_units, self.server_containers)
        self.ml = MLState(float(config["journal.fallback-grace"]))
        self.transcode = TranscodeState(int(config["journal.transcode-window"]))
        self.cursor: str | None = None
        self.entries_read = 0
        self.gaps = 0  # times the saved cursor's entry had been vacuumed before the entries after it were read
        self.entries_lost = 0  # journal entries deleted between the cursor and the oldest one left (seqnums)
        # the vanished cursor whose gap is counted, and the seqnum of the oldest entry left after it then
        # (None: unknown): a journalctl restarted (or an exporter restarted) before the cursor moved on
        # must not count the same gap twice
        self.gap_at: tuple[str, int | None] | None = None
        self._state_dir = state_directory(config["state.directory"])
        self._state_path: str | None = None
        self._loaded = False
        self._dirty = False
        self._last_persist = 0.0
        self._persisting = False
        self._down: SourceDown | None = None
        self._task: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._follow_mode = False
        self._trusted_units = frozenset(self.units + self.server_units)
        self.dropped: dict[str, int] = {}  # reason -> entries read but not used
        self._failure_logged = False

    # -- journalctl command lines -------------------------------------------------------------------
    def _exe(self) -> str:
        exe = shutil.which(self.config["journal.journalctl"])
        if exe is None:
            raise SourceDown("no_journalctl", f"{self.config['journal.journalctl']} not found")
        return exe

    def matches(self) -> list[str]:
        groups = [[f"_SYSTEMD_UNIT={u}" for u in self.units + self.server_units],
                  [f"CONTAINER_NAME={c}" for c in self.containers + self.server_containers]]
        out: list[str] = []
        for g in (g for g in groups if g):
            if out:
                out.append("+")
            out.extend(g)
        return out

    def base_args(self) -> list[str]:
        args = [self._exe(), "-o", "json", "--all", "--no-pager", "--quiet", f"--output-fields={OUTPUT_FIELDS}"]
        if self.directory:
            args.append(f"--directory={self.directory}")
        return args

    # -- state file ----------------------------------------------------------------------------------
    def _load_state(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = os.path.join(self._state_dir, STATE_FILE)
        try:
            # non-blocking and capped: a FIFO or /dev/zero put there must not hang or fill the daemon
            data = json.loads(read_small(path, MAX_STATE_BYTES))
            problem = state_problem(data)
            if problem is not None:
                raise ValueError(problem)
            self.parser.load(data.get("parser") or {})
            self.ml.load(data.get("ml") or {})
            self.transcode.load(data.get("transcode") or {})
            self.cursor = data.get("cursor") or None
            self.gaps, self.entries_lost = int(data.get("gaps", 0)), int(data.get("entries_lost", 0))
            gap_at = data.get("gap_at")
            self.gap_at = (gap_at[0], gap_at[1]) if gap_at else None
            if self.cursor is not None:  # a state saved before any entry was read has none to resume after
                log.info("journal: resuming after the persisted cursor (%s)", path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            self._set_aside(path, problem_text(e) if isinstance(e, OSError) else str(e) or type(e).__name__)

    def _set_aside(self, path: str, why: str) -> None:
        """One warning; the bad state file is renamed (kept for a post-mortem) and we start afresh."""
        log.warning("journal: unusable state file %s (%s); %s; starting afresh with a backfill", path, why,
                    set_aside(path))
        self._reset()

    def _reset(self) -> None:
        self.parser, self.ml = Parser(self.server_units, self.server_containers), MLState(self.ml.grace)
        self.transcode = TranscodeState(self.transcode.window)
        self.cursor = None
        self.gap_at = None

    def _open_state_dir(self) -> None:
        try:
            os.makedirs(self._state_dir, exist_ok=True)
            probe = os.path.join(self._state_dir, ".journal-probe")
            with open(probe, "w"):
                pass
            os.unlink(probe)
            self._state_path = os.path.join(self._state_dir, STATE_FILE)
        except OSError as e:
            log.warning("journal: state directory %s is not writable (%s); running without a persisted "
                        "cursor: a restart will backfill instead of resuming", self._state_dir, e.strerror or e)
            self._state_path = None

    def _serialise(self) -> str:
        return json.dumps({"version": STATE_VERSION, "cursor": self.cursor, "gaps": self.gaps,
                           "entries_lost": self.entries_lost, "gap_at": list(self.gap_at) if self.gap_at else None,
                           "parser": self.parser.dump(),
                           "ml": self.ml.dump(), "transcode": self.transcode.dump(), "saved_at": time.time()},
                          separators=(",", ":"))

    async def _persist(self, force: bool = False) -> None:
        if self._state_path is None or not self._dirty or self._persisting:
            return
        if not force and time.monotonic() - self._last_persist < PERSIST_EVERY:
            return
        data = self._serialise()  # on the loop: cursor and state are consistent at this instant
        self._dirty = False
        self._persisting = True
        self._last_persist = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(None, write_atomic, self._state_path, data)
        except OSError as e:
            self._dirty = True
            log.warning("journal: cannot write %s: %s", self._state_path, e)
        finally:
            self._persisting = False

    # -- applying entries ----------------------------------------------------------------------------
    def apply_line(self, line: bytes | str) -> None:
        try:
            entry = json.loads(line)
        except ValueError:
            return
        self.apply_entry(entry)

    def apply_lines(self, lines: list[str]) -> None:
        """A chunk of JSON lines; decoded in one json.loads call (measurably faster than per line)."""
        try:
            batch = json.loads("[" + ",".join(lines) + "]")
        except ValueError:  # a malformed line: fall back to one at a time, skipping the bad one
            for line in lines:
                self.apply_line(line)
            return
        feed, apply, server, units = self.parser.feed, self.ml.apply, self._server_line, self._trusted_units
        for entry in batch:
            if not trusted(entry, units):
                self.dropped["untrusted"] = self.dropped.get("untrusted", 0) + 1
                continue
            bound_message(entry)
            for ev in feed(entry):
                apply(ev)
            server(entry)
        if batch:
            self._mark_read(batch[-1])
            c = batch[-1].get("__CURSOR")
            if c:
                self.cursor = c
            else:
                for entry in reversed(batch):
                    if entry.get("__CURSOR"):
                        self.cursor = entry["__CURSOR"]
                        break
        self.entries_read += len(batch)

    def apply_entry(self, entry: dict[str, Any]) -> None:
        apply = self.ml.apply
        if trusted(entry, self._trusted_units):
            bound_message(entry)
            for ev in self.parser.feed(entry):
                apply(ev)
            self._server_line(entry)
        else:
            self.dropped["untrusted"] = self.dropped.get("untrusted", 0) + 1
        self._mark_read(entry)
        c = entry.get("__CURSOR")
        if c:
            self.cursor = c
        self.entries_read += 1

    def _mark_read(self, entry: dict[str, Any]) -> None:
        try:
            self._read_at = (int(entry.get("__REALTIME_TIMESTAMP")) / 1e6, time.monotonic())
        except (TypeError, ValueError):
            pass

    def journal_now(self, now: float) -> float:
        """The journal's clock: the time of the last entry read, plus the time since it was read (never
        ahead of `now`). Pending sessions settle by it, so reading a backlog (or entries written long
        ago) does not settle a session whose crash or fallback is in the next chunk."""
        if self._read_at is None:
            return now
        t, mono = self._read_at
        return min(now, t + (time.monotonic() - mono))
    def _server_line(self, entry: dict[str, Any]) -> None:
        """The server's video transcoding lines (transcode.py); the ML parser ignores them."""
        if not self._is_ml(entry):
            ts = event_time(entry.get("__REALTIME_TIMESTAMP")) or 0.0
            self.transcode.feed_line(message_text(entry.get("MESSAGE")), ts)

    def flush(self) -> bool:
        self._flush_handle = None
        events = self.parser.flush()
        for ev in events:
            self.ml.apply(ev)
        return bool(events)

    def _flush_and_wake(self) -> None:
        if self.flush():
            self._dirty = True
            self.wake()

    async def pump(self, args: list[str], on_chunk: Callable[[], None] | None = None) -> tuple[int, str]:
        """Run one journalctl, apply every JSON line it prints; return (exit code, stderr)."""
        proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    limit=1 << 20)
        self._proc = proc
        _grow_pipe(proc)
        err_parts: list[bytes] = []

        async def read_err() -> None:
            assert proc.stderr is not None
            while True:
                chunk = await proc.stderr.read(4096)
                if not chunk:
                    return
                if sum(map(len, err_parts)) < 16384:
                    err_parts.append(chunk)
                down = stderr_down(chunk.decode(errors="replace"))
                if down is not None and self._follow_mode:
                    self._down = down

        err_task = asyncio.create_task(read_err())
        assert proc.stdout is not None
        rest = b""
        skipping = False  # inside an entry over MAX_ENTRY_BYTES: drop bytes until its newline
        try:
            while True:
                chunk = await proc.stdout.read(1 << 18)
                if not chunk:
                    break
                if skipping:
                    nl = chunk.find(b"\n")
                    if nl < 0:
                        continue
                    chunk, skipping = chunk[nl + 1:], False
                buf = rest + chunk
                cut = buf.rfind(b"\n") + 1
                rest = buf[cut:]
                if len(rest) > MAX_ENTRY_BYTES:
                    self.dropped["oversized"] = self.dropped.get("oversized", 0) + 1
                    rest, skipping = b"", True
                if cut:
                    # journalctl's JSON is ASCII/UTF-8 (non-UTF-8 fields come as byte arrays)
                    lines = [x for x in buf[:cut].decode("utf-8", "replace").split("\n") if x]
                    if any(len(x) > MAX_ENTRY_BYTES for x in lines):
                        n = len(lines)
                        lines = [x for x in lines if len(x) <= MAX_ENTRY_BYTES]
                        self.dropped["oversized"] = self.dropped.get("oversized", 0) + n - len(lines)
                    self.apply_lines(lines)
                if on_chunk is not None:
                    on_chunk()
                await asyncio.sleep(0)  # one chunk (256 KiB) parsed: let the scrape and other sources run
            if rest.strip() and not skipping:
                self.apply_line(rest)
            rc = await proc.wait()
            await err_task
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            err_task.cancel()
            self._proc = None
        return rc, b"".join(err_parts).decode(errors="replace")

    async def cursor_vacuumed(self) -> tuple[bool, int | None]:
        """Whether the saved cursor's entry is gone from the journal, and if so how many journal entries
        were deleted after it (None: cannot be told). The first entry of the whole journal (no matches) at
        the cursor's position is the cursor's own entry while it exists; once the journal was rotated and
        vacuumed it is the oldest entry left after it, and the seqnums between the two are the entries
        deleted unread. journald numbers the entries of all units together, so that count is the ML
        units' loss at most (entries of other units deleted in the same range are in it too); which of the
        deleted entries were the units' cannot be known once they are gone."""
        args = [self._exe(), "-o", "json", "--no-pager", "--quiet", "--output-fields=_BOOT_ID",
                f"--cursor={self.cursor}"]
        if self.directory:
            args.append(f"--directory={self.directory}")
        # no --all: fields over 4 KiB print as null, so a line is small whatever a client logged
        proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                                                    limit=1 << 16)
        rc: int | None = None
        try:
            assert proc.stdout is not None
            first = await asyncio.wait_for(proc.stdout.readline(), 10.0)
            if not first.strip():
                rc = await asyncio.wait_for(proc.wait(), 10.0)
        except (asyncio.TimeoutError, ValueError):  # no answer, or a line over the bound: cannot tell
            return False, None
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        if not first.strip():
            # nothing at or after it, and journalctl content: the entry is gone, and so is everything
            # after it (the journal was begun afresh); a failing journalctl tells nothing
            return rc == 0, None
        try:
            there = json.loads(first).get("__CURSOR")
        except (ValueError, AttributeError):
            return False, None
        if there == self.cursor:
            return False, None
        saved, oldest = cursor_seqnum(self.cursor), cursor_seqnum(there)
        if saved is None or oldest is None or saved[0] != oldest[0] or oldest[1] <= saved[1]:
            return True, None  # another seqnum_id: the journal was begun afresh; the loss has no number
        return True, oldest[1] - saved[1] - 1

    async def resume_args(self) -> list[str]:
        """How journalctl resumes from the saved cursor: `--after-cursor` while its entry exists; `--cursor`
        (its position) when it was vacuumed, for journalctl 252's --after-cursor skips one entry after
        seeking, found or not, so it would skip the oldest entry still there. A vanished cursor's gap is
        counted once (immich_gpu_exporter_journal_gaps_total, and the deleted entries when their number is
        known in immich_gpu_exporter_journal_entries_lost_total)."""
        assert self.cursor is not None
        vanished, lost = await self.cursor_vacuumed()
        if not vanished:
            return [f"--after-cursor={self.cursor}"]
        oldest = None if lost is None else (cursor_seqnum(self.cursor) or ("", 0))[1] + lost + 1
        if self.gap_at is None or self.gap_at[0] != self.cursor:
            self.gaps += 1
            self.entries_lost += lost or 0
            self.gap_at = (self.cursor, oldest)
            self._dirty = True
            log.warning("journal: the entry of the saved cursor is gone (the journal was rotated and vacuumed "
                        "while it was not read): %s; resuming at the oldest entry still there",
                        f"{lost} journal entries (of all units) were deleted unread" if lost is not None
                        else "entries logged in between are lost, how many cannot be told")
        elif oldest is not None and self.gap_at[1] is not None and oldest > self.gap_at[1]:
            # the same vanished cursor, vacuumed further before the reader got past it (no entry of the
            # units came since): the entries deleted this time are a new gap
            more = oldest - self.gap_at[1]
            self.gaps += 1
            self.entries_lost += more
            self.gap_at = (self.cursor, oldest)
            self._dirty = True
            log.warning("journal: %d more journal entries after the vanished cursor were deleted unread", more)
        return [f"--cursor={self.cursor}"]

    def _is_ml(self, e: dict[str, Any]) -> bool:
        # same attribution as mllog.Parser.feed: a server unit wins over a (podman quadlet) container name
        if field_text(e.get("_SYSTEMD_UNIT")) in self.server_units:
            return False
        c = e.get("CONTAINER_NAME")
        if c:
            return field_text(c) not in self.server_containers
        return True

    async def backfill(self) -> tuple[int, str]:
        """Read the last `journal.backfill-entries` entries, apply those since the ML unit's last start."""
        args = self.base_args() + [f"--lines={int(self.config['journal.backfill-entries'])}"] + self.matches()
        proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    limit=1 << 20)
        self._proc = proc
        lines: collections.deque[bytes] = collections.deque()
        held = 0
        err_parts: list[bytes] = []

        async def read_err() -> None:
            assert proc.stderr is not None
            while chunk := await proc.stderr.read(4096):
                if sum(map(len, err_parts)) < 16384:
                    err_parts.append(chunk)

        err_task = asyncio.create_task(read_err())
        try:
            # Streamed, not communicate(): the window is held in at most MAX_BACKFILL_BYTES (the
            # newest entries win), and an entry over MAX_ENTRY_BYTES is skipped.
            assert proc.stdout is not None
            rest, skipping = b"", False
            while chunk := await proc.stdout.read(1 << 18):
                if skipping:
                    nl = chunk.find(b"\n")
                    if nl < 0:
                        continue
                    chunk, skipping = chunk[nl + 1:], False
                buf = rest + chunk
                parts = buf.split(b"\n")
                rest = parts.pop()
                if len(rest) > MAX_ENTRY_BYTES:
                    self.dropped["oversized"] = self.dropped.get("oversized", 0) + 1
                    rest, skipping = b"", True
                for line in parts:
                    if not line.strip():
                        continue
                    if len(line) > MAX_ENTRY_BYTES:
                        self.dropped["oversized"] = self.dropped.get("oversized", 0) + 1
                        continue
                    lines.append(line)
                    held += len(line)
                    while held > MAX_BACKFILL_BYTES:
                        held -= len(lines.popleft())
            if rest.strip() and not skipping:
                lines.append(rest)
            await proc.wait()
            await err_task
        finally:
            err_task.cancel()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            self._proc = None
        entries = []
        while lines:
            try:
                e = json.loads(lines.popleft())
            except ValueError:
                continue
            if isinstance(e, dict):
                bound_message(e)
                entries.append(e)
            if len(entries) % SLICE_ENTRIES == 0:
                await asyncio.sleep(0)
        units = self._trusted_units  # a forged start line must not hide the real ones before it
        start = ml_start_index(entries, lambda e: self._is_ml(e) and trusted(e, units))
        for i, e in enumerate(entries):
            if i >= start or not self._is_ml(e):
                self.apply_entry(e)
            elif e.get("__CURSOR"):
                self.cursor = e["__CURSOR"]
            if i % SLICE_ENTRIES == SLICE_ENTRIES - 1:
                await asyncio.sleep(0)
        return proc.returncode or 0, b"".join(err_parts).decode(errors="replace")

    # -- daemon mode -----------------------------------------------------------------------------------
    async def start(self) -> None:
        # The daemon binds a wake-up event before start(); --once does not, and then collect() reads
        # a bounded window itself instead of a follower running in the background.
        self._follow_mode = self._wake is not None
        self._load_state()
        if not self._follow_mode:
            return
        self._open_state_dir()
        self._task = asyncio.create_task(self._follow(), name="journal-follow")

    def _on_chunk(self) -> None:
        self._dirty = True
        self._down = None
        loop = asyncio.get_running_loop()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_handle = loop.call_later(FLUSH_AFTER, self._flush_and_wake)
        self.wake()

    async def _follow(self) -> None:
        backoff = 1.0
        while True:
            before = self.entries_read
            try:
                self._exe()  # no journalctl is the cause to report, also where there are no journal files
                missing = find_journal_files(self.directory)
                if missing is not None:
                    raise missing
                if self.cursor is None:
                    rc, err = await self.backfill()
                    if self.entries_read > before:
                        self._on_chunk()
                    if rc != 0 or stderr_down(err):
                        raise _Failed(rc, err)
                # --lines=all always: --follow alone implies --lines=10, and journalctl applies that
                # after --after-cursor too, so a resume with more than ten new entries lost the rest
                args = self.base_args() + ["--follow", "--lines=all"]
                if self.cursor:
                    args += await self.resume_args()
                rc, err = await self.pump(args + self.matches(), self._on_chunk)
                raise _Failed(rc, err)
            except asyncio.CancelledError:
                raise
            except SourceDown as e:
                if self._down is None or self._down.reason != e.reason:
                    log.debug("journal: %s", e.detail)
                self._down = e
            except _Failed as f:
                down = stderr_down(f.err)
                if down is not None:
                    self._down = down
                elif f.rc != 0 and "cursor" in f.err.lower():
                    log.warning("journal: journalctl rejected the cursor (%s); backfilling instead",
                                _first_line(f.err))
                    self.cursor = None
                else:
                    log.info("journal: journalctl exited (rc=%s%s); restarting from the cursor", f.rc,
                             f": {_first_line(f.err)}" if f.err.strip() else "")
            except OSError as e:
                self._down = SourceDown("no_journalctl", f"cannot run journalctl: {e}")
            except Exception as e:  # noqa: BLE001 - a bug or a poisoned state must not end the follower
                if not self._failure_logged:
                    log.warning("journal: reading failed (%s: %s); starting afresh with a backfill",
                                type(e).__name__, e)
                    self._failure_logged = True
                self._down = SourceDown("error", f"{type(e).__name__}: {e}")
                self._reset()
            if self.entries_read > before:
                backoff = 1.0
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    # -- collect -------------------------------------------------------------------------------------
    async def collect(self) -> CollectResult:
        if not self._follow_mode:
            await self._read_window()
        elif self._down is not None:
            raise self._down
        result = self.observe(time.time())
        if self._follow_mode:
            await self._persist()
        return result

    def observe(self, now: float) -> CollectResult:
        """What the source reports at `now` from the entries applied so far: pending sessions settle by
        time, the host's NVIDIA driver and NVML's view of the ML processes are checked (docs/journal.md,
        "Evidence")."""
        self.ml.settle(self.journal_now(now))
        self.ml.observe_host(now, nvidia_driver_loaded(self.driver_paths))
        nvml = self.hub.facts("nvml")
        if nvml:
            mem = (nvml.get("component_gpu_memory") or {}).get("ml") or 0
            self.ml.observe_gpu(now, float(mem))
        else:
            self.ml.observe_gpu(now, None)
        dropped = [sample("immich_gpu_exporter_journal_entries_dropped_total", self.dropped.get(r, 0), reason=r)
                   for r in ("untrusted", "oversized")]
        dropped.append(sample("immich_gpu_exporter_journal_gaps_total", self.gaps))
        dropped.append(sample("immich_gpu_exporter_journal_entries_lost_total", self.entries_lost))
        dropped += [sample("immich_gpu_exporter_journal_labels_dropped_total", n, label=label)
                    for label, n in sorted(getattr(self.ml, "labels_dropped", {}).items())]
        if not self.ml.entries and self.hub.facts("docker").get("ml_logs"):
            # The ML service is a container logging to a file that the docker source reads: this
            # journal has nothing of it, and its empty verdict must not stand beside that one.
            return CollectResult(tuple(dropped) + tuple(self.transcode.samples()), dict(self.transcode.facts()))
        return CollectResult(tuple(self.ml.samples()) + tuple(dropped) + tuple(self.transcode.samples()),
                             {**self.ml.facts(), **self.transcode.facts()})

    async def _read_window(self) -> None:
        self._load_state()
        self._exe()
        missing = find_journal_files(self.directory)
        if missing is not None:
            raise missing
        if self.cursor is None:
            rc, err = await self.backfill()
        else:
            rc, err = await self.pump(self.base_args() + await self.resume_args() + self.matches())
        down = stderr_down(err)
        if down is not None:
            raise down
        if rc != 0:
            raise SourceDown("journalctl_failed", _first_line(err) or f"journalctl exited with {rc}")
        self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._follow_mode and self._state_path is not None:
            # Pending records stay pending (they are part of the state): their continuation lines
            # may still arrive after the restart.
            self._dirty = True
            try:
                write_atomic(self._state_path, self._serialise())
            except OSError as e:
                log.warning("journal: cannot write %s: %s", self._state_path, e)


def _grow_pipe(proc: asyncio.subprocess.Process) -> None:
    """A 1 MiB pipe instead of 64 KiB: fewer wake-ups and context switches during a backlog."""
    try:
        import fcntl

        transport = proc._transport  # type: ignore[attr-defined]
        pipe = transport.get_pipe_transport(1).get_extra_info("pipe")
        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (AttributeError, OSError, ImportError, ValueError):
        # ValueError: the pipe is closed already (a journalctl that exited at once); pump() then reads
        # the end of its output as usual
        pass


class _Failed(Exception):
    def __init__(self, rc: int, err: str) -> None:
        super().__init__(rc, err)
        self.rc = rc
        self.err = err
