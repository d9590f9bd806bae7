"""Containers that replay a captured ML service log: real timing, real streams, real processes.

A capture is either a journal (journalctl -o json lines, or journal export format) of the ML unit,
or `docker.jsonl` ({"stream", "time", "log"} per line, as Docker's json-file driver stores them).
`replay_lines()` turns it into (offset µs, process, fd, text) tuples for the static C program
tests/support/replay_ml.c, which a FROM scratch image runs as its entrypoint.

Which stream a journal line goes to (journald merges both into one unit stream, so the capture
does not say it): Immich's Rich handler prints through a `rich.console.Console()`, whose default
file is stdout, and gunicorn's, uvicorn's and Immich's own loggers all go through it
(machine-learning/immich_ml/log_conf.json, config.py `CustomRichHandler`); ORT's `EP Error` block
is a Python print(), also stdout; ONNX Runtime's native logger writes to stderr (its default sink),
and so does the `\\x1b[m` entry that follows a native line ending in a newline. So: native ORT
lines and that reset entry -> stderr, everything else -> stdout.

Which process writes a line: the capture's _PID; the first PID is gunicorn's master, the others
are workers in order of appearance (the C program forks them like gunicorn boots them).
"""

from __future__ import annotations

import json
import re
import pathlib
import struct
import tempfile
from typing import Any, Iterable

from immich_gpu_exporter.docker_api import parse_time
from immich_gpu_exporter.mllog import message_text, strip_ansi
from tests.support import dockerd as dsupport

HERE = pathlib.Path(__file__).resolve().parent
REAL_ML = HERE.parent / "fixtures" / "real-ml"
ML_IMAGE = "ghcr.io/immich-app/immich-machine-learning"
SERVER_IMAGE = "ghcr.io/immich-app/immich-server"


def parse_export(data: bytes) -> list[dict[str, Any]]:
    """Journal export format -> entries (field -> str)."""
    entries: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i) if b"\n" in data[i:] else len(data)
        line = data[i:nl]
        if not line:
            if cur:
                entries.append(cur)
            cur = {}
            i = nl + 1
            continue
        if b"=" in line:
            k, _, v = line.partition(b"=")
            cur[k.decode()] = v.decode("utf-8", "replace")
            i = nl + 1
        else:  # binary field: name \n le64 size, data \n
            size = struct.unpack_from("<Q", data, nl + 1)[0]
            start = nl + 9
            cur[line.decode()] = data[start:start + size].decode("utf-8", "replace")
            i = start + size + 1
    if cur:
        entries.append(cur)
    return entries


def load_journal(path: pathlib.Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    if path.suffix in (".json", ".jsonl") or data[:1] == b"{":
        return [json.loads(x) for x in data.splitlines() if x.strip()]
    return parse_export(data)


def is_native_ort(text: str) -> bool:
    plain = strip_ansi(text)
    return "onnxruntime:" in plain[:64]


_RICH_CONTINUATION = re.compile(r" {20,}\S")
_MASTER_LINES = ("Starting gunicorn", "Listening at", "Using worker", "Handling signal", "was sent SIG",
                 "Shutting down: Master", "Control socket", "Worker exiting", "Initializing Immich ML")


def replay_lines(entries: Iterable[dict[str, Any]]) -> list[tuple[int, int, int, str]]:
    entries = list(entries)
    out: list[tuple[int, int, int, str]] = []
    pids: dict[str, int] = {}
    # A capture whose entries all carry one _PID (the typed fixtures; Docker's journald driver,
    # whose _PID is dockerd's) does not tell master from worker: then a worker starts at each
    # `Booting worker with pid` (gunicorn logs it from the worker) and gunicorn's own lines stay
    # with the master.
    one_pid = len({str(e.get("_PID") or "0") for e in entries}) == 1
    worker = 0
    t0: int | None = None
    previous_native = False
    for e in entries:
        text = message_text(e.get("MESSAGE"))
        ts = int(e.get("__REALTIME_TIMESTAMP") or 0)
        t0 = ts if t0 is None else t0
        if one_pid:
            plain = strip_ansi(text)
            if "Booting worker with pid" in plain:
                worker += 1
            who = 0 if worker == 0 or any(m in plain for m in _MASTER_LINES) else worker
        else:
            who = pids.setdefault(str(e.get("_PID") or "0"), len(pids))
        native = is_native_ort(text)
        fd = 2 if native or (previous_native and strip_ansi(text).strip() == "") else 1
        previous_native = native
        for physical in text.split("\n"):
            if out and _RICH_CONTINUATION.match(strip_ansi(physical)) and out[-1][1:3] == (who, fd):
                # Rich writes a wrapped record in one write(): its continuation lines go out together
                # with the head (journald kept them as entries microseconds apart)
                at, w, f, head = out[-1]
                out[-1] = (at, w, f, head + "\n" + physical)
            else:
                out.append((ts - t0, who, fd, physical))
    return out


def replay_lines_docker(path: pathlib.Path) -> list[tuple[int, int, int, str]]:
    """docker.jsonl: the streams are known; one process (the capture does not name PIDs)."""
    out: list[tuple[int, int, int, str]] = []
    t0: float | None = None
    for raw in path.read_text().splitlines():
        if not raw.strip():
            continue
        d = json.loads(raw)
        t = parse_time(d["time"]) or 0.0
        t0 = t if t0 is None else t0
        out.append((int(round((t - t0) * 1e6)), 0, 2 if d["stream"] == "stderr" else 1, d["log"].rstrip("\n")))
    return out


def write_replay(lines: Iterable[tuple[int, int, int, str]], path: pathlib.Path) -> pathlib.Path:
    with open(path, "w") as f:
        for at, who, fd, text in lines:
            esc = text.replace("\\", "\\\\").replace("\x1b", "\\e").replace("\t", "    ").replace("\n", "\\n")
            f.write(f"{at}\t{who}\t{fd}\t{esc}\n")
    return path


def build_replay_image(d: "dsupport.Dockerd", tag: str = f"{ML_IMAGE}:v3.1.0-cuda") -> str:
    """The replay image, FROM scratch: busybox and the static replayer. Tagged like Immich's image
    so discovery by image and the flavour are exercised too."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="replay-", dir=d.dir))
    exe = dsupport.compile_static(str(HERE / "replay_ml.c"), str(work / "replay_ml"))
    d.scratch_image(tag, {"/usr/bin/replay_ml": exe}, ['ENTRYPOINT ["/usr/bin/replay_ml", "/replay/log.txt"]'])
    return tag


def run_replay(d: "dsupport.Dockerd", image: str, name: str, lines: list[tuple[int, int, int, str]],
               speed: float = 1.0, service: str = "immich-machine-learning", extra: Iterable[str] = ()) -> str:
    """Start a replay container like compose would name and label it; returns its id."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="replay-", dir=d.dir))
    write_replay(lines, folder / "log.txt")
    r = d.cli("run", "-d", "--name", name, "--network", "none",
              "--label", f"com.docker.compose.service={service}", "--label", "com.docker.compose.project=immich",
              "-v", f"{folder}:/replay:ro", *extra, image, f"{speed:g}")
    return r.stdout.strip()


def real_captures() -> list[pathlib.Path]:
    """Variant folders of real captures (tests/fixtures/real-ml/<variant>/), when they are present."""
    if not REAL_ML.is_dir():
        return []
    return sorted(p for p in REAL_ML.iterdir() if (p / "manifest.json").exists())


def wait_replayed(d: "dsupport.Dockerd", name: str, count: int, timeout: float = 120.0) -> None:
    """Until the container's log holds `count` lines (the replay is over)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = d.cli("logs", name)
        if len(r.stdout.splitlines()) + len(r.stderr.splitlines()) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} logged fewer than {count} lines in {timeout:g}s")
        time.sleep(0.2)


def live_worker(master: int) -> int:
    """The replay's current worker: the master's one remaining child once the replay is over
    (earlier workers exited when gunicorn "replaced" them)."""
    import time

    deadline = time.monotonic() + 10  # a replaced worker burns its 0.3 s of CPU before it exits
    while True:
        kids = [int(x) for t in pathlib.Path(f"/proc/{master}/task").iterdir()
                for x in (t / "children").read_text().split()]
        if len(kids) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(kids) == 1, f"expected one live worker under {master}, found {kids}"
    return kids[0]


def physical(lines: list[tuple[int, int, int, str]]) -> int:
    """How many log lines Docker will store for these writes."""
    return sum(text.count("\n") + 1 for _, _, _, text in lines)


def spaced(lines: list[tuple[int, int, int, str]], step_us: int) -> list[tuple[int, int, int, str]]:
    """The typed fixtures' 1 ms clock re-timed to `step_us` per write (their timing is synthetic
    anyway): Docker reads stdout and stderr through two pipes, and writes 1 ms apart on different
    pipes may be stored out of order, which real ML output, milliseconds to seconds apart, is not."""
    return [(i * step_us, who, fd, text) for i, (_, who, fd, text) in enumerate(lines)]
