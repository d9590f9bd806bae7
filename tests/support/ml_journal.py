"""ML service journals for provider switches in end-to-end tests: the real v3.1.0 CPU fallback
capture, and a SYNTHETIC healthy CUDA start (no healthy CUDA capture can be made without a GPU; its
lines follow the real captures' layout) appended on the same boot."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import time
from typing import TYPE_CHECKING

from tests.support import journal as jr

if TYPE_CHECKING:
    from tests.support.nvml import Scenario

ROOT = pathlib.Path(__file__).resolve().parents[2]


def fallback_export() -> bytes:
    """The real Immich v3.1.0 ML service with CUDA libraries but no driver (nixpkgs launch): CUDA
    failure 35 at every session, the EP Error block late, CPU (tests/fixtures/real-ml/README.md)."""
    return (ROOT / "tests/fixtures/real-ml/v3.1.0-gpu-nodriver-nixpkgs/unit.export").read_bytes()


def rich(msg: str) -> list[str]:
    """Rich's layout off a terminal (80 columns; continuation lines indented by 29 spaces)."""
    import textwrap

    prefix = time.strftime("[%x %X] ") + "INFO     "
    lines = textwrap.wrap(msg, 80 - len(prefix), break_long_words=False, break_on_hyphens=False)
    return [prefix + lines[0]] + [" " * len(prefix) + rest for rest in lines[1:]]


def healthy_cuda_start(arbiter: int, worker: int) -> bytes:
    """SYNTHETIC: a new start of the ML unit whose worker loads a model on CUDA without any error."""
    clock = jr.Clock(time.time_ns() // 1000)
    out = b""
    for pid, msg in [(arbiter, "Starting gunicorn 25.3.0"), (arbiter, "Listening at: http://127.0.0.1:3003 (%d)" % arbiter),
                     (arbiter, "Using worker: immich_ml.config.CustomUvicornWorker"),
                     (worker, "Booting worker with pid: %d" % worker), (worker, "Started server process [%d]" % worker),
                     (worker, "Waiting for application startup."),
                     (worker, "Created in-memory cache with unloading after 300s of inactivity."),
                     (worker, "Application startup complete."),
                     (worker, "Loading visual model 'ViT-B-32__openai' to memory"),
                     (worker, "Setting execution providers to ['CUDAExecutionProvider', 'CPUExecutionProvider'], in "
                              "descending order of preference")]:
        out += jr.entries(rich(msg), pid=pid, clock=clock)
    return out


def on_the_same_boot(segment: bytes, journal_dir: pathlib.Path) -> bytes:
    """Entries made by `jr.entries` moved onto the boot of the journal's last entry, their monotonic
    clock continuing it: a restart of the unit, not a reboot. (journalctl 252's --follow after a cursor
    does not show entries of another boot appended to the file it follows; on a real host a reboot
    restarts the exporter and its journalctl, so only a test can meet that.)"""
    last = json.loads(subprocess.run(["journalctl", f"--directory={journal_dir}", "-n1", "-o", "json"],
                                     capture_output=True, text=True, check=True).stdout)
    mono = int(last["__MONOTONIC_TIMESTAMP"])
    step = iter(range(1, 1 << 30))
    segment = segment.replace(jr.BOOT_ID.encode(), last["_BOOT_ID"].encode())
    return re.sub(rb"__MONOTONIC_TIMESTAMP=\d+", lambda m: b"__MONOTONIC_TIMESTAMP=%d" % (mono + 1000 * next(step)),
                  segment)


def fallback_gpu_host(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path, "Scenario"]:
    """A GPU host whose ML journal holds the real v3.1.0 CPU fallback: the gcc-built fake NVML, the
    journal directory and file, and an NVML scenario of one GPU without Immich's memory yet.
    Returns (library, journal directory, journal file, scenario)."""
    from tests.support.nvml import Gpu, Scenario, build_fake_nvml

    lib = build_fake_nvml(tmp_path / "fakenvml")
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    jfile = journal_dir / "system.journal"
    jr.write_journal(jfile, fallback_export())
    scen = Scenario(tmp_path / "nvml.txt", gpus=[Gpu(used=300 * 2**20, util=0)])
    scen.write()
    return lib, journal_dir, jfile, scen
