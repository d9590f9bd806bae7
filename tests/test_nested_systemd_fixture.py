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
