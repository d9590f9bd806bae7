"""Run as ExecStart= of a copy of the shipped unit: reports, as one JSON line on stdout (the
journal), what the process may and may not do under the unit's hardening. The test reads it
back with journalctl and asserts on each field."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import subprocess
import sys


def attempt(fn) -> str:
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    except Exception as e:  # noqa: BLE001 - the probe reports, the test judges
        return type(e).__name__


def status_field(name: str) -> str:
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def open_dev(path: str) -> None:
    os.close(os.open(path, os.O_RDONLY))


def write_file(path: str) -> None:
    with open(path, "w") as f:
        f.write("x")


def journal_marker(marker_unit: str) -> str:
    r = subprocess.run(["journalctl", "--no-pager", "-q", "-o", "cat", "-u", marker_unit],
                       capture_output=True, text=True, timeout=20)
    return r.stdout.strip()


def bus_state() -> str:
    from pystemd.systemd1 import Unit

    u = Unit(b"dbus.service")
    u.load()
    return u.Unit.ActiveState.decode()


def nvml() -> str:
    import pynvml

    try:
        pynvml.nvmlInit()
        return "initialised"
    except pynvml.NVMLError_LibraryNotFound:
        return "library_not_found"


def main() -> None:
    marker_unit, fake_dev = sys.argv[1], sys.argv[2]
    state = os.environ.get("STATE_DIRECTORY", "")
    report = {
        "uid": os.getuid(),
        "groups": sorted(os.getgroups()),
        "no_new_privs": status_field("NoNewPrivs"),
        "cap_eff": status_field("CapEff"),
        "seccomp": status_field("Seccomp"),
        "state_directory": state,
        "write_state": attempt(lambda: write_file(os.path.join(state, "probe"))),
        "write_usr": attempt(lambda: write_file("/usr/igx-probe")),
        "read_pid1_cgroup": attempt(lambda: open("/proc/1/cgroup").read()),
        "read_pid1_limits": attempt(lambda: open("/proc/1/limits").read()),
        "open_dev_null": attempt(lambda: open_dev("/dev/null")),
        "open_fake_device": attempt(lambda: open_dev(fake_dev)),
        "mmap_write_exec": attempt(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)),
        "ctypes_call": attempt(lambda: ctypes.CDLL("libc.so.6").getpid()),
        "import_aiohttp": attempt(lambda: __import__("aiohttp.web")),
        "nvml": nvml(),
        "journal": journal_marker(marker_unit),
        "bus": bus_state(),
        "credentials_directory": os.environ.get("CREDENTIALS_DIRECTORY", ""),
    }
    print("PROBE " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
