"""The nested-systemd fixture itself: units start, their output reaches the host through the
journal files, hardened DynamicUser= units run, PIDs translate, and teardown leaves nothing."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

from tests.support.nested_systemd import (  # noqa: F401  (nested_systemd registers the fixture)
    NestedSystemd,
    cgroup2_mountpoint,
    nested_systemd,
    start_nested_systemd,
    stop_nested_systemd,
    unavailable_reason,
)
from tests.support.proc import wait_for

HELLO = """[Unit]
Description=fixture hello
[Service]
ExecStart=/bin/sh -c 'echo "hello from $$"; exec sleep 1000'
"""

HARDENED = """[Unit]
Description=fixture hardened
[Service]
ExecStart=/bin/sh -c 'id -u > $STATE_DIRECTORY/uid; echo tmp > /tmp/x; echo hardened-up; exec sleep 1000'
DynamicUser=yes
StateDirectory=fixture-hardened
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=no
DevicePolicy=closed
DeviceAllow=/dev/null rw
DeviceAllow=char-nvidia-frontend rw
NoNewPrivileges=yes
CapabilityBoundingSet=
MemoryDenyWriteExecute=yes
SystemCallFilter=@system-service
SystemCallArchitectures=native
RestrictNamespaces=yes
LockPersonality=yes
"""


def journal(ns: NestedSystemd, unit: str) -> list[dict]:
    r = subprocess.run(["journalctl", "-D", str(ns.journal_dir), "-u", unit, "-o", "json", "--no-pager"],
                       capture_output=True, text=True, timeout=10)
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_unit_output_reaches_the_host_journal_reader(nested_systemd: NestedSystemd) -> None:
    nested_systemd.add_unit("hello.service", HELLO)
    nested_systemd.start_unit("hello.service")
    assert nested_systemd.unit_property("hello.service", "ActiveState") == "active"
    entries = wait_for(lambda: [e for e in journal(nested_systemd, "hello.service")
                                if e.get("MESSAGE", "").startswith("hello from")], what="hello in the journal")
    assert entries[0]["_SYSTEMD_UNIT"] == "hello.service"
    # the journal's _PID is a PID of the nested namespace; it maps to a host process of the unit
    host = nested_systemd.host_pid(int(entries[0]["_PID"]))
    assert host is not None and host in nested_systemd.unit_host_pids("hello.service")
    assert pathlib.Path(f"/proc/{host}/cmdline").read_bytes().startswith(b"sleep\0")


def test_bus_address_is_exported_to_the_test_process(nested_systemd: NestedSystemd) -> None:
    from pystemd.systemd1 import Unit

    assert os.environ["DBUS_SYSTEM_BUS_ADDRESS"] == nested_systemd.bus_address
    nested_systemd.add_unit("hello.service", HELLO)
    nested_systemd.start_unit("hello.service")
    u = Unit(b"hello.service", _autoload=True)
    assert u.Unit.ActiveState == b"active"
    assert nested_systemd.host_pid(u.Service.MainPID) in nested_systemd.unit_host_pids("hello.service")
    missing = Unit(b"no-such.service", _autoload=True)
    assert missing.Unit.LoadState == b"not-found"


def test_hardened_dynamic_user_unit_runs(nested_systemd: NestedSystemd) -> None:
    nested_systemd.add_unit("hardened.service", HARDENED)
    nested_systemd.start_unit("hardened.service")
    wait_for(lambda: any(e.get("MESSAGE") == "hardened-up" for e in journal(nested_systemd, "hardened.service")),
             what="hardened unit output\n" + nested_systemd.status("hardened.service"))
    pid = nested_systemd.unit_host_pids("hardened.service")[0]
    uid = os.stat(f"/proc/{pid}").st_uid
    assert uid >= 61184, "DynamicUser= should allocate a uid from the dynamic range"
    # StateDirectory= of a dynamic user lands in the namespace's /var overlay, not on the host
    upper = nested_systemd.state / "var-upper/lib/private/fixture-hardened/uid"
    assert upper.read_text().strip() == str(uid)
    assert not pathlib.Path("/var/lib/private/fixture-hardened").exists()
    assert nested_systemd.unit_property("hardened.service", "DevicePolicy") == "closed"


def _host_fingerprint(base: pathlib.Path) -> dict:
    mounts = pathlib.Path("/proc/mounts").read_text()
    return {
        "mounts_mentioning_base": [m for m in mounts.splitlines() if str(base) in m],
        "host_cgroupfs_rw": next(m.split()[3] for m in mounts.splitlines() if m.split()[1] == "/sys/fs/cgroup"
                                 ).startswith("rw"),
        "run_mount": pathlib.Path("/run/mount").exists(),
        "units_load": pathlib.Path("/run/systemd/systemd-units-load").exists(),
        "private_tmp": sorted(p.name for p in [*pathlib.Path("/tmp").glob("systemd-private-*"),
                                              *pathlib.Path("/var/tmp").glob("systemd-private-*")]),
        "var_lib_private": sorted(os.listdir("/var/lib/private")) if os.path.isdir("/var/lib/private") else None,
    }


def test_teardown_leaves_no_process_mount_or_cgroup(tmp_path_factory: pytest.TempPathFactory) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("nsd")
    before = _host_fingerprint(base)
    assert before["host_cgroupfs_rw"]
    ns = start_nested_systemd(base, {"hello.service": HELLO, "hardened.service": HARDENED},
                              target_wants=["hello.service", "hardened.service"])
    try:
        pids = wait_for(lambda: len(ns.unit_host_pids("hello.service") + ns.unit_host_pids("hardened.service")) == 2
                        and [*ns.unit_host_pids("hello.service"), *ns.unit_host_pids("hardened.service"),
                             ns.pid1, ns.proc.pid], what="both units running")
        cgroup, supervisor = ns.cgroup, ns.supervisor_cgroup
        assert cgroup.parent == cgroup2_mountpoint()
        assert (supervisor / "cgroup.procs").read_text().split() == [str(ns.proc.pid)]
    finally:
        stop_nested_systemd(ns)
    assert ns.proc.returncode is not None
    assert not [p for p in pids if pathlib.Path(f"/proc/{p}").exists()], "processes survived teardown"
    assert not cgroup.exists() and not supervisor.exists()
    assert _host_fingerprint(base) == before
    stop_nested_systemd(ns)  # idempotent


# --- inside a build chroot --------------------------------------------------------------------------
# A chroot assembled from bind mounts of this host (usr, etc, var, dev, sys, the Python and the
# checkout), in a private mount namespace so nothing reaches the host's mount table. Its root is a
# plain directory on a tmpfs unless SELF_BIND=1 bind-mounts it onto itself (what the one-line
# reason tells the user to do); /chroot-marker exists only in the chroot.
CHROOT = r"""
set -eu
T=$1 SELF_BIND=$2 CODE=$3; shift 3
mount -t tmpfs tmpfs "$T"
R=$T/root
mkdir "$R"
[ "$SELF_BIND" = 1 ] && mount --bind "$R" "$R"
for top in bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$top" ]; then ln -s "$(readlink "/$top")" "$R/$top"; elif [ -d "/$top" ]; then mkdir "$R/$top"; mount --rbind "/$top" "$R/$top"; fi
done
for d in /usr /etc /var /dev /sys "$@"; do mkdir -p "$R$d"; mount --rbind "$d" "$R$d"; done
mkdir -p "$R/proc" "$R/run" "$R/tmp"
chmod 1777 "$R/tmp"
mount -t proc proc "$R/proc"
echo chroot > "$R/chroot-marker"
exec chroot "$R" /bin/sh -c 'cd "$0" && exec "$1" -c "$2"' "$PWD" "$PYTHON" "$CODE"
"""


def _in_chroot(tmp_path: pathlib.Path, self_bind: bool, code: str, *binds: pathlib.Path) -> dict:
    import sys

    from tests.support.proc import ROOT

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    prefix = pathlib.Path(sys.base_prefix).resolve()
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", CHROOT, "chroot",
                        str(mnt), "1" if self_bind else "0", code, str(ROOT), str(prefix), *map(str, binds)],
                       cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_in_a_chroot_whose_root_is_not_a_mount_point_the_reason_says_so(tmp_path: pathlib.Path) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    code = ("import json; from tests.support.nested_systemd import unavailable_reason as u; "
            "print(json.dumps({'reason': u()}))")
    reason = _in_chroot(tmp_path, False, code)["reason"]
    assert reason.startswith("/ is not a mount point") and "\n" not in reason


def test_in_a_chroot_with_a_mounted_root_the_fixture_runs_commands_inside_the_chroot(
        tmp_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """nsenter -r -w: without them a command entered into the namespace runs at the mount
    namespace's root, outside the chroot, and would not see /chroot-marker."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("nsd")
    code = f"""
import json, pathlib
from tests.support.nested_systemd import start_nested_systemd, stop_nested_systemd, unavailable_reason
out = {{"reason": unavailable_reason()}}
ns = start_nested_systemd(pathlib.Path({str(base)!r}), {{"hello.service": {HELLO!r}}}, target_wants=["hello.service"])
try:
    out["marker"] = ns.run("cat", "/chroot-marker").stdout.strip()
    out["hello"] = ns.unit_property("hello.service", "ActiveState")
finally:
    stop_nested_systemd(ns)
print(json.dumps(out))
"""
    out = _in_chroot(tmp_path, True, code, base)
    assert out == {"reason": None, "marker": "chroot", "hello": "active"}
