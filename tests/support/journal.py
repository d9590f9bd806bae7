"""Real journal files for tests: journal export format -> systemd-journal-remote -> DIR/*.journal.

Fixtures live in tests/fixtures/journal/*.export (journal export format; multi-line messages use the
binary field form). `write_journal()` turns export bytes into a journal file; appending to the same
output file appends entries (that is how follow-mode tests add lines while the exporter runs).
"""

from __future__ import annotations

import pathlib
import struct
import subprocess
from typing import Iterable, Mapping

JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "journal"
ML_UNIT = "immich-machine-learning.service"
SERVER_UNIT = "immich-server.service"
BOOT_ID = "0123456789abcdef0123456789abcdef"


def export_entry(fields: Mapping[str, str | bytes]) -> bytes:
    """One entry in export format; values with a newline or non-UTF-8 bytes use the binary form."""
    out = bytearray()
    for k, v in fields.items():
        b = v.encode() if isinstance(v, str) else v
        if b"\n" in b:
            out += k.encode() + b"\n" + struct.pack("<Q", len(b)) + b + b"\n"
        else:
            out += k.encode() + b"=" + b + b"\n"
    return bytes(out) + b"\n"


class Clock:
    """Monotonically increasing realtime/monotonic timestamps for generated entries."""

    def __init__(self, start_us: int = 1_785_000_000_000_000) -> None:
        self.t = start_us

    def tick(self) -> tuple[str, str]:
        self.t += 1000
        return str(self.t), str(self.t - 1_785_000_000_000_000 + 1_000_000)


def entries(lines: Iterable[str], unit: str = ML_UNIT, pid: int = 4242, clock: Clock | None = None,
            container: str | None = None, priority: int = 6) -> bytes:
    clock = clock or Clock()
    out = bytearray()
    for line in lines:
        rt, mono = clock.tick()
        f: dict[str, str | bytes] = {"__REALTIME_TIMESTAMP": rt, "__MONOTONIC_TIMESTAMP": mono, "_BOOT_ID": BOOT_ID,
                                     "PRIORITY": str(priority)}
        if container:
            # what journald records for Docker's journald log driver: dockerd (root) sends each line
            # over the native protocol; the `_` fields are journald's own, not the sender's
            f.update({"_SYSTEMD_UNIT": "docker.service", "_PID": "900", "_UID": "0", "_GID": "0",
                      "_COMM": "dockerd", "_EXE": "/usr/bin/dockerd", "_TRANSPORT": "journal",
                      "CONTAINER_NAME": container, "SYSLOG_IDENTIFIER": container})
        else:
            f.update({"_SYSTEMD_UNIT": unit, "_PID": str(pid), "SYSLOG_IDENTIFIER": unit.split(".")[0]})
        f["MESSAGE"] = line
        out += export_entry(f)
    return bytes(out)


def write_journal(path: pathlib.Path, export: bytes) -> int:
    """Append export-format entries to the journal file `path` (created if missing)."""
    assert path.name.endswith(".journal"), path
    r = subprocess.run([JOURNAL_REMOTE, f"--output={path}", "--split-mode=none", "-"], input=export,
                       capture_output=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"systemd-journal-remote failed: {r.stderr.decode(errors='replace')}")
    return export.count(b"\n\n")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()
