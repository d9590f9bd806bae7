"""Run the real exporter as a subprocess, as an operator would."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Callable, Mapping, Sequence, TypeVar

ROOT = pathlib.Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling, report the last one
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def terminate(proc: "subprocess.Popen | None", timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after `timeout`; reaps the process."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def exporter_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a child exporter: this checkout first on sys.path, no stray config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMMICH_GPU_EXPORTER_")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "immich_gpu_exporter", *args], capture_output=True, text=True,
                          env=exporter_env(env), timeout=timeout, cwd=ROOT, **kw)


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 5) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Exporter:
    """The daemon on an ephemeral loopback port. Use as a context manager."""

    def __init__(self, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 python: str | None = None, log_path: pathlib.Path | None = None, command: str | None = None) -> None:
        self.port = free_port()
        # command: a subcommand such as "demo"; it must come before the flags
        self.args = [*([command] if command else []), f"--web.listen-address=127.0.0.1:{self.port}", *args]
        self.env = exporter_env(env)
        # The daemon keeps state (journal cursor, ML CPU counters); unless the test chose a place, it goes
        # to a private directory, never to this machine's /var/lib/immich-gpu-exporter.
        self._state: str | None = None
        if not any(a.startswith("--state.directory") for a in args) and \
                not {"IMMICH_GPU_EXPORTER_STATE_DIRECTORY", "STATE_DIRECTORY"} & set(self.env):
            self._state = tempfile.mkdtemp(prefix="igx-state-")
            self.env["IMMICH_GPU_EXPORTER_STATE_DIRECTORY"] = self._state
        self.python = python or sys.executable
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 20) -> "Exporter":
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._log = out if self.log_path else None
        self.proc = subprocess.Popen([self.python, "-m", "immich_gpu_exporter", *self.args], env=self.env,
                                     cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if self.log_path else subprocess.PIPE)
        if wait_ready:
            try:
                wait_for(self._ready, timeout, what=f"exporter ready on {self.url}")
            except BaseException:
                self.stop(signal.SIGKILL)  # a `with` block never entered would leave it running
                raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else self.logs()
            raise RuntimeError(f"exporter exited with {self.proc.returncode}: {err}")
        try:
            return http_get(self.url + "/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def metrics(self, headers: Mapping[str, str] | None = None) -> str:
        status, _, body = http_get(self.url + "/metrics", headers)
        assert status == 200, status
        return body.decode()

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
        if self._state is not None:
            shutil.rmtree(self._state, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> "Exporter":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
