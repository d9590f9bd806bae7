"""A real dockerd for the tests: Debian's docker.io, private to the test run, without network.

`Dockerd.start()` runs `dockerd` with its own --data-root, --exec-root, pid file and socket
under a fresh temporary directory, `--storage-driver=vfs` (no overlay mounts to leak),
`--bridge=none --iptables=false --ip-masq=false` (no network is created or touched) and its own
containerd namespace, so it cannot meet another dockerd on the machine. `stop()` removes every
container, ends dockerd with SIGTERM (SIGKILL after a grace), unmounts whatever is still
mounted under the directory and removes it.

Images are built locally `FROM scratch` from host files (`scratch_image()`): busybox-static and
small static programs compiled here with gcc. Nothing is pulled from a registry; containers run
with `--network none`.

`unavailable()` gives the one-line reason when this machine cannot run it (not root, no dockerd,
no cgroup mount, dockerd exits at start); the fixture skips with it only outside CI.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Iterable, Mapping

# The Debian package's CLI (API 1.41). A newer static CLI in /usr/local/bin would negotiate too,
# but the tests name the one that ships with the daemon they start.
DOCKER_CLI = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else (shutil.which("docker") or "docker")
BUSYBOX = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None)


def unavailable() -> str | None:
    """Why a private dockerd cannot run here, or None."""
    if os.geteuid() != 0:
        return "dockerd needs root"
    if shutil.which("dockerd") is None:
        return "dockerd not installed (Debian package docker.io)"
    if not os.path.exists(DOCKER_CLI):
        return "docker CLI not installed (Debian package docker.io)"
    if BUSYBOX is None:
        return "busybox not installed (Debian package busybox-static)"
    if not os.path.isdir("/sys/fs/cgroup") or not os.listdir("/sys/fs/cgroup"):
        return "no cgroup filesystem at /sys/fs/cgroup"
    return None


class DockerdFailed(RuntimeError):
    pass


class Dockerd:
    def __init__(self, base: str | None = None) -> None:
        # unix socket paths must stay short (108 bytes): containerd's socket lives in exec-root
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="igx-d-", dir=base or "/tmp"))
        self.socket = str(self.dir / "docker.sock")
        self.data_root = self.dir / "root"
        self.exec_root = self.dir / "x"
        self.log_path = self.dir / "dockerd.log"
        self.namespace = f"igx{os.getpid()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = f"unix://{self.socket}"

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "Dockerd":
        args = ["dockerd", f"--data-root={self.data_root}", f"--exec-root={self.exec_root}",
                f"--pidfile={self.dir / 'dockerd.pid'}", f"--host={self.host}", "--storage-driver=vfs",
                "--bridge=none", "--iptables=false", "--ip-masq=false", "--ipv6=false",
                f"--containerd-namespace={self.namespace}", f"--containerd-plugins-namespace={self.namespace}p",
                "--log-level=warn", "--userland-proxy=false"]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DockerdFailed(f"dockerd exited with {self.proc.returncode}: {self.log_tail()}")
            if os.path.exists(self.socket):
                r = self.cli("version", "--format", "{{.Server.Version}}", check=False)
                if r.returncode == 0:
                    return self
            time.sleep(0.2)
        raise DockerdFailed(f"dockerd did not answer within {timeout:g}s: {self.log_tail()}")

    def stop_daemon(self, timeout: float = 30.0) -> None:
        """dockerd stops (SIGTERM: its containers stop too, it removes its socket); its data stays, so
        `start()` brings the same daemon back on the same socket."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)

    def log_tail(self, n: int = 5) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            ids = self.cli("ps", "-aq", check=False).stdout.split()
            if ids:
                self.cli("rm", "-f", "-v", *ids, check=False, timeout=120)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # dockerd's managed containerd and shims run in dockerd's session; anything left is ours
        try:
            os.killpg(self.proc.pid, signal.SIGKILL) if self.proc is not None else None
        except ProcessLookupError:
            pass
        self._unmount_below()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _unmount_below(self) -> None:
        prefix = str(self.dir) + "/"
        try:
            with open("/proc/self/mountinfo") as f:
                points = [ln.split()[4] for ln in f]
        except OSError:
            return
        for p in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", p], capture_output=True)

    # -- the CLI -------------------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True, timeout: float = 120, input: bytes | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        e = dict(os.environ, DOCKER_HOST=self.host, DOCKER_BUILDKIT="0", DOCKER_CLI_HINTS="false")
        e.pop("DOCKER_CONTEXT", None)
        e.update(env or {})
        r = subprocess.run([DOCKER_CLI, *args], capture_output=True, timeout=timeout, env=e,
                           input=input.decode() if input is not None else None, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def inspect(self, name: str) -> dict:
        return json.loads(self.cli("inspect", name).stdout)[0]

    def scratch_image(self, tag: str, files: Mapping[str, str], dockerfile_tail: Iterable[str] = (),
                      busybox: bool = True) -> str:
        """Build `tag` FROM scratch: `files` maps a path in the image to a host file (static
        programs); busybox-static is installed as /bin/sh and its applets."""
        ctx = pathlib.Path(tempfile.mkdtemp(prefix="ctx-", dir=self.dir))
        lines = ["FROM scratch"]
        for i, (dest, src) in enumerate(sorted(files.items())):
            name = f"f{i}"
            shutil.copy2(src, ctx / name)
            lines.append(f"COPY {name} {dest}")
        if busybox:
            assert BUSYBOX is not None
            shutil.copy2(BUSYBOX, ctx / "busybox")
            lines.append("COPY busybox /bin/busybox")
            lines.append('RUN ["/bin/busybox", "--install", "-s", "/bin"]')
        lines.extend(dockerfile_tail)
        (ctx / "Dockerfile").write_text("\n".join(lines) + "\n")
        self.cli("build", "-q", "-t", tag, str(ctx), timeout=300)
        shutil.rmtree(ctx, ignore_errors=True)
        return tag


def compile_static(source: str, out: str) -> str:
    """Compile a C program statically (glibc's libc.a from libc6-dev), for FROM scratch images."""
    subprocess.run(["gcc", "-O2", "-static", "-o", out, source], check=True, capture_output=True)
    return out
