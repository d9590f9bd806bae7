"""A real systemd for tests: PID 1 of private namespaces, with journald and a system dbus-daemon.

What this module owns: booting `/lib/systemd/systemd --system` as PID 1 of fresh pid, mount,
cgroup, uts and ipc namespaces, talking to it from the test process (D-Bus socket, journal files,
`nsenter` for systemctl/journalctl), and taking it down again without leaving anything behind.

Isolation (why each step exists; see ../shared/research/feasibility-systemd.md section 1):
* own cgroup namespace rooted at a fresh cgroup2 child `<cgroup2 mount>/pytest-systemd-<pid>-<n>`
  and a cgroup2 mount at /sys/fs/cgroup inside: without it systemd remounts the host's
  /sys/fs/cgroup tmpfs read-only (shared superblock) and moves processes between host cgroups;
* /sys and /proc/sys read-only: systemd never writes host sysctls or sysfs knobs;
* /run bound from the state dir (the D-Bus socket and the journal become host-visible files there),
  /var an overlay with its upper layer in the state dir (DynamicUser=/StateDirectory= write
  /var/lib/private, PrivateTmp= writes /var/tmp), /tmp a tmpfs (PrivateTmp= dirs die with the
  namespace; the base dir is re-exposed at its own path so unit files can reference it);
* libmount's utab goes to the state dir (otherwise `mount` creates the host's /run/mount);
* an exclusive SYSTEMD_UNIT_PATH (nothing from /etc or /lib/systemd/system starts), no generators.

Teardown: SIGKILL of the namespace's PID 1 makes the kernel kill the whole pid namespace; our
`unshare` child reaps it and exits; then the cgroup tree is removed bottom-up. `unshare` gets
PR_SET_PDEATHSIG=SIGKILL and `--kill-child`, so even a `kill -9` of pytest takes the namespace
down; only an empty cgroup dir can then remain, and the next start sweeps those whose owner died.

PIDs: the nested systemd reports PIDs of its own pid namespace (MainPID, journal _PID);
`host_pid()` translates them, and the `cgroup.procs` files under `.cgroup` hold host PIDs.

Usage (copy this file as is; the API below is kept stable):

    from tests.support.nested_systemd import nested_systemd  # noqa: F401  (registers the fixture)

    def test_x(nested_systemd):                       # function-scoped, ~0.1-0.3 s to boot
        nested_systemd.add_unit("a.service", "[Service]\\nExecStart=/bin/sleep 1000\\n")
        nested_systemd.start_unit("a.service")
        nested_systemd.unit_property("a.service", "ActiveState")   # -> "active"

The fixture also points DBUS_SYSTEM_BUS_ADDRESS of the test process at the nested bus.
Files that DynamicUser= units must read belong in the base dir (chmod 0755 by the fixture).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import time
from typing import Iterator, Sequence

import pytest

__all__ = [
    "NestedSystemd",
    "NestedSystemdUnavailable",
    "unavailable_reason",
    "root_is_mount_point",
    "cgroup2_mountpoint",
    "start_nested_systemd",
    "stop_nested_systemd",
    "sweep_stale_cgroups",
    "nested_systemd",
    "nested_systemd_module",
]

SYSTEMD = "/lib/systemd/systemd"
STOCK_UNIT_DIR = pathlib.Path("/lib/systemd/system")
# Targets that default dependencies of services point at; without them a later start fails with
# "Unit sysinit.target not found". The network/user ones let realistic units (After=network.target)
# load without edits.
STOCK_TARGETS = ("basic", "sysinit", "sockets", "timers", "paths", "slices", "local-fs", "local-fs-pre", "swap",
                 "shutdown", "multi-user", "network", "network-online", "network-pre", "nss-user-lookup",
                 "remote-fs", "time-sync")
CGROUP_PREFIX = "pytest-systemd-"
TARGET = "pytest.target"

# Trimmed copies of Debian's units: no Symlinks=/dev/log (that would land on the host's devtmpfs),
# no sandboxing that needs things the namespace lacks.
JOURNALD_SOCKET = """\
[Unit]
Description=Journal Socket
DefaultDependencies=no
Before=sockets.target

[Socket]
ListenDatagram=/run/systemd/journal/socket
ListenStream=/run/systemd/journal/stdout
PassCredentials=yes
PassSecurity=yes
ReceiveBuffer=8M
Service=systemd-journald.service
SocketMode=0666
Timestamping=us
"""
JOURNALD_SERVICE = """\
[Unit]
Description=Journal Service
DefaultDependencies=no
Requires=systemd-journald.socket
After=systemd-journald.socket

[Service]
ExecStart=/lib/systemd/systemd-journald
Restart=always
RestartSec=0
RuntimeDirectory=systemd/journal
RuntimeDirectoryPreserve=yes
Sockets=systemd-journald.socket
StandardOutput=null
Type=notify
"""

# PID 1 of the new namespaces until it execs systemd. Arguments: STATE UNITS TARGET BASE.
INNER = r"""
set -eu
S=$1 U=$2 TARGET=$3 BASE=$4
export LIBMOUNT_UTAB="$S/utab"
mount --rbind /sys /sys
mount -o remount,bind,ro /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount -t overlay overlay -o "lowerdir=/var,upperdir=$S/var-upper,workdir=$S/var-work" /var
mkdir -p /var/log/journal
mount --bind "$S/varlog-journal" /var/log/journal
mount --bind "$S/run" /run
mkdir -p /run/.pytest-base
mount --bind "$BASE" /run/.pytest-base
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p "$BASE"
mount --bind /run/.pytest-base "$BASE"
umount /run/.pytest-base
rmdir /run/.pytest-base
# wait until the host has moved `unshare` out of our cgroup: then the namespace's cgroup root
# holds no process but systemd's, and systemd can enable controllers below it (cgroup v2's
# no-internal-processes rule would refuse that on hosts that delegate controllers here)
while [ ! -e "$S/go" ]; do sleep 0.005; done
exec env -i container=pytest PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 SYSTEMD_UNIT_PATH="$U" \
     SYSTEMD_GENERATOR_PATH=/nonexistent SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/nonexistent \
     /lib/systemd/systemd --system --unit="$TARGET" --log-target=journal-or-kmsg --show-status=no
"""


class NestedSystemdUnavailable(RuntimeError):
    """This machine cannot run the fixture (not root, no cgroup2 mount, no unshare, ...)."""


def cgroup2_mountpoint() -> pathlib.Path | None:
    """The host's cgroup2 mount: /sys/fs/cgroup on pure v2, /sys/fs/cgroup/unified on hybrid hosts."""
    try:
        lines = pathlib.Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            return pathlib.Path(fields[4])
    return None


def root_is_mount_point() -> bool | None:
    """Whether / is a mount point of this process's view (None: /proc is not mounted).

    Not so in a chroot into a plain directory: mountinfo then lists no mount at "/", and
    `unshare --mount` fails with "cannot change root filesystem propagation" (the kernel refuses
    MS_PRIVATE on a path that is not a mount point)."""
    try:
        lines = pathlib.Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    return any(line.split()[4] == "/" for line in lines)


def unavailable_reason() -> str | None:
    """Why the fixture cannot run here, in one line, or None if it can."""
    if os.geteuid() != 0:
        return "nested systemd needs root"
    root_mounted = root_is_mount_point()
    if root_mounted is None:
        return "nested systemd needs /proc mounted (/proc/self/mountinfo is unreadable)"
    if not root_mounted:
        return ("/ is not a mount point (a chroot into a plain directory?): unshare cannot make its mounts "
                "private; bind-mount the chroot directory onto itself before entering it")
    if cgroup2_mountpoint() is None:
        return "nested systemd needs a cgroup2 mount"
    for tool in ("unshare", "nsenter", "busctl", "dbus-daemon", "bash"):
        if shutil.which(tool) is None:
            return f"nested systemd needs {tool}"
    if not os.access(SYSTEMD, os.X_OK) or not (STOCK_UNIT_DIR / "dbus.service").exists():
        return "nested systemd needs systemd and dbus installed"
    if "overlay" not in pathlib.Path("/proc/filesystems").read_text():
        return "nested systemd needs overlayfs"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:  # kernel without CONFIG_PROC_CHILDREN: scan the parent PIDs
        out = []
        for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                pass
        return sorted(out)
    except OSError:
        return []


def _cgroup_pids(root: pathlib.Path) -> list[int]:
    pids: list[int] = []
    for procs in [root / "cgroup.procs", *root.rglob("*/cgroup.procs")]:
        try:
            pids.extend(int(p) for p in procs.read_text().split())
        except OSError:
            pass
    return pids


def _rmdir_tree(root: pathlib.Path) -> None:
    dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for d in [*dirs, root]:
        try:
            d.rmdir()
        except OSError:
            pass


def _remove_cgroup(cgroup: pathlib.Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while cgroup.exists():
        _rmdir_tree(cgroup)
        if not cgroup.exists() or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if cgroup.exists():
        raise RuntimeError(f"could not remove cgroup {cgroup}; processes left: {_cgroup_pids(cgroup)}")


def sweep_stale_cgroups(cg2: pathlib.Path) -> None:
    """Remove pytest-systemd-* cgroups whose creating process is gone (a crashed or killed run).

    Cgroups of live test processes (other test runs on the same host) are left alone.
    """
    for stale in cg2.glob(CGROUP_PREFIX + "*"):
        try:
            owner = int(stale.name[len(CGROUP_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if _pid_alive(owner):
            continue
        if _cgroup_pids(stale):
            try:
                (stale / "cgroup.kill").write_text("1")
            except OSError:
                pass
        try:
            _remove_cgroup(stale, timeout=2.0)
        except RuntimeError:
            pass


@dataclasses.dataclass
class NestedSystemd:
    """A running nested systemd. Paths are host paths."""

    base: pathlib.Path
    state: pathlib.Path
    units_dir: pathlib.Path
    cgroup: pathlib.Path  # host path of the namespace's cgroup root (ControlGroup paths are relative to it)
    proc: subprocess.Popen
    _pid1: int | None = None

    @property
    def bus_address(self) -> str:
        """D-Bus address of the namespace's system bus (dbus-daemon inside), usable from the host."""
        return f"unix:path={self.state}/run/dbus/system_bus_socket"

    @property
    def journal_dir(self) -> pathlib.Path:
        """Host path of the namespace's /run/log/journal: `journalctl -D <this>` reads unit output."""
        return self.state / "run/log/journal"

    @property
    def supervisor_cgroup(self) -> pathlib.Path:
        """Sibling cgroup that holds only `unshare` (outside the namespace's cgroup root)."""
        return self.cgroup.with_name(self.cgroup.name + "-supervisor")

    @property
    def pid1(self) -> int:
        """Host PID of the nested systemd (the child `unshare` forked)."""
        if self._pid1 is None:
            children = _children(self.proc.pid)
            if not children:
                raise RuntimeError("nested systemd has no PID 1 (unshare has no child)")
            self._pid1 = children[0]
        return self._pid1

    def host_pid(self, ns_pid: int) -> int | None:
        """Translate a PID of the nested pid namespace (MainPID, journal _PID) into a host PID."""
        for pid in _cgroup_pids(self.cgroup):
            try:
                status = pathlib.Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:"):
                    nspid = line.split()[1:]
                    if len(nspid) > 1 and int(nspid[-1]) == ns_pid:
                        return int(nspid[0])
        return None

    def run(self, *cmd: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespaces (systemctl, journalctl, busctl, ...)."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LANG": "C.UTF-8"}
        # -r -w: the root and working directory of the nested PID 1, not those of the mount namespace's
        # root: inside a chroot, entering the mount namespace alone lands outside the chroot.
        return subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "-p", "-u", "-i", "-C", "-r", "-w", "--",
                               *cmd],
                              capture_output=True, text=True, timeout=timeout, env=env, check=check)

    def add_unit(self, name: str, text: str, reload: bool = True) -> pathlib.Path:
        """Write (or replace) a unit file in the exclusive unit path and daemon-reload."""
        path = self.units_dir / name
        path.write_text(text)
        if reload:
            self.daemon_reload()
        return path

    def daemon_reload(self) -> None:
        r = self.run("systemctl", "daemon-reload")
        if r.returncode != 0:
            raise RuntimeError(f"daemon-reload failed: {r.stderr.strip()}")

    def start_unit(self, name: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`systemctl start` (waits for the start job); raises if it fails and check is true."""
        r = self.run("systemctl", "start", name)
        if check and r.returncode != 0:
            raise RuntimeError(f"start {name} failed: {r.stderr.strip()}\n{self.status(name)}")
        return r

    def stop_unit(self, name: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = self.run("systemctl", "stop", name)
        if check and r.returncode != 0:
            raise RuntimeError(f"stop {name} failed: {r.stderr.strip()}")
        return r

    def unit_property(self, name: str, prop: str) -> str:
        """One property as `systemctl show -P` prints it (e.g. ActiveState -> "active")."""
        return self.run("systemctl", "show", "-P", prop, name, check=True).stdout.rstrip("\n")

    def status(self, name: str) -> str:
        """`systemctl status` text plus the unit's last journal lines, for assertion messages."""
        return self.run("systemctl", "status", "--no-pager", "-n", "20", name).stdout

    def unit_host_pids(self, name: str) -> list[int]:
        """Host PIDs in the unit's control group (recursively)."""
        cg = self.unit_property(name, "ControlGroup")
        return _cgroup_pids(self.cgroup / cg.lstrip("/")) if cg else []


def start_nested_systemd(base: pathlib.Path, units: dict[str, str], target_wants: Sequence[str] = (),
                         timeout: float = 20.0) -> NestedSystemd:
    """Boot a nested systemd with `units` in its unit path; `target_wants` are started at boot.

    Returns once org.freedesktop.systemd1 answers on the namespace's system bus.
    Raises NestedSystemdUnavailable where the machine cannot run it.
    """
    reason = unavailable_reason()
    if reason:
        raise NestedSystemdUnavailable(reason)
    cg2 = cgroup2_mountpoint()
    assert cg2 is not None
    base = pathlib.Path(base).resolve()
    if pathlib.Path("/var") in base.parents:
        raise ValueError(f"base {base} must not lie under /var (it is overlaid inside the namespace)")
    state, udir = base / "state", base / "units"
    sock = f"{state}/run/dbus/system_bus_socket"
    if len(sock.encode()) > 107:  # sun_path limit: clients (busctl, sd-bus) could never connect
        raise ValueError(f"base {base} is too long for a unix socket path below it ({len(sock)} > 107 bytes)")
    for d in (state / "run", state / "varlog-journal", state / "var-upper", state / "var-work", udir):
        d.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)  # DynamicUser= units may need to read scripts placed here
    for t in STOCK_TARGETS:
        src = STOCK_UNIT_DIR / f"{t}.target"
        if src.exists():
            shutil.copy(src, udir)
    for f in ("dbus.socket", "dbus.service"):
        shutil.copy(STOCK_UNIT_DIR / f, udir)
    (udir / "systemd-journald.socket").write_text(JOURNALD_SOCKET)
    (udir / "systemd-journald.service").write_text(JOURNALD_SERVICE)
    for name, text in units.items():
        (udir / name).write_text(text)
    wants = " ".join(["systemd-journald.socket", "systemd-journald.service", "dbus.socket", "dbus.service",
                      *target_wants])
    (udir / TARGET).write_text(f"[Unit]\nDescription=pytest nested systemd\nWants={wants}\n")

    sweep_stale_cgroups(cg2)
    cgroup = cg2 / f"{CGROUP_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
    cgroup.mkdir()

    def enter_cgroup() -> None:  # in the child before exec: the whole namespace lives below `cgroup`
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: pytest dies -> unshare dies -> systemd dies

    log = open(base / "boot.log", "wb")
    try:
        proc = subprocess.Popen(
            ["unshare", "--cgroup", "--pid", "--fork", "--mount", "--mount-proc", "--uts", "--ipc", "--kill-child",
             "bash", "-c", INNER, "inner", str(state), str(udir), TARGET, str(base)],
            preexec_fn=enter_cgroup, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except BaseException:
        _remove_cgroup(cgroup)
        raise
    finally:
        log.close()
    ns = NestedSystemd(base, state, udir, cgroup, proc)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=ns.bus_address)
    deadline = time.monotonic() + timeout
    try:
        while not _children(proc.pid):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("unshare did not start: " + (base / "boot.log").read_text())
            time.sleep(0.002)
        ns.supervisor_cgroup.mkdir()
        (ns.supervisor_cgroup / "cgroup.procs").write_text(str(proc.pid))
        (state / "go").touch()
        while True:
            if proc.poll() is not None:
                raise RuntimeError("nested systemd died: " + (base / "boot.log").read_text())
            if (state / "run/dbus/system_bus_socket").exists() and subprocess.run(
                    ["busctl", "--system", "status", "org.freedesktop.systemd1"], env=env,
                    capture_output=True, timeout=5).returncode == 0:
                return ns
            if time.monotonic() > deadline:
                raise TimeoutError("nested systemd not ready: " + (base / "boot.log").read_text())
            time.sleep(0.03)
    except BaseException:
        stop_nested_systemd(ns)
        raise


def stop_nested_systemd(ns: NestedSystemd) -> None:
    """Kill the namespace (all its processes) and remove its cgroup tree. Idempotent."""
    # SIGKILL of PID 1 kills the whole pid namespace; unshare (our child) reaps it and exits.
    # cgroup.kill alone would also kill unshare and leave systemd's zombie to the host's init.
    if ns.proc.poll() is None:
        try:
            os.kill(ns.pid1, signal.SIGKILL)
        except (OSError, RuntimeError, ValueError):
            pass
        try:
            ns.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            (ns.cgroup / "cgroup.kill").write_text("1")
            ns.proc.wait(timeout=10)
    for cg in (ns.cgroup, ns.supervisor_cgroup):
        if cg.exists():
            _remove_cgroup(cg)


def _skip_or_start(factory: pytest.TempPathFactory) -> NestedSystemd:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    # a short base (not tmp_path, which embeds the test name): the bus socket path must fit sun_path
    return start_nested_systemd(factory.mktemp("nsd"), {})


@pytest.fixture
def nested_systemd(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[NestedSystemd]:
    """A fresh nested systemd per test (no units beyond journald and dbus; use add_unit/start_unit).

    DBUS_SYSTEM_BUS_ADDRESS points at its bus for the duration of the test.
    """
    ns = _skip_or_start(tmp_path_factory)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", ns.bus_address)
    try:
        yield ns
    finally:
        stop_nested_systemd(ns)


@pytest.fixture(scope="module")
def nested_systemd_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NestedSystemd]:
    """One nested systemd shared by a module's tests (give each test its own unit names).

    Does not touch the environment; pass `ns.bus_address` explicitly.
    """
    ns = _skip_or_start(tmp_path_factory)
    try:
        yield ns
    finally:
        stop_nested_systemd(ns)
