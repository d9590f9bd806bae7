"""The systemd source against a real systemd (nested in namespaces, see tests/support/nested_systemd.py),
through the real exporter's /metrics: state changes, restarts, configured vs applied tuning, a
missing unit, no bus at all, and a bus that goes away and comes back."""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import resource
import signal
import time
from typing import Iterator, Sequence

import psutil
import pytest

from immich_gpu_exporter.sources.systemd import cgroup_pids
from tests.support.exposition import parse, value
from tests.support.nested_systemd import NestedSystemd, cgroup2_mountpoint, nested_systemd  # noqa: F401
from tests.support.proc import Exporter, wait_for

# A fake Immich ML service: a gunicorn-like arbiter with one worker child, both in the unit's cgroup.
ML_SCRIPT = """\
import os, sys, time
if os.fork() == 0:
    print("worker started", flush=True)
    while True:
        time.sleep(1)
print("Started fake immich machine learning", flush=True)
while True:
    time.sleep(1)
"""

# Generous: the change must come from a D-Bus signal (the poll interval is a minute), but a
# loaded CI machine may be slow; this is a deadline, not a speed assertion.
DEADLINE = 10.0


def ml_unit(script: pathlib.Path, extra: str = "") -> str:
    return f"""[Unit]
Description=fake immich machine learning
[Service]
ExecStart=/usr/bin/python3 -u {script}
Restart=on-failure
RestartSec=300ms
{extra}
"""


@pytest.fixture
def ml_script(nested_systemd: NestedSystemd) -> pathlib.Path:
    path = nested_systemd.base / "ml.py"
    path.write_text(ML_SCRIPT)
    return path


@contextlib.contextmanager
def exporter(ns: NestedSystemd | None, units: Sequence[str], bus_address: str | None = None,
             journal_dir: pathlib.Path | None = None, state_dir: pathlib.Path | None = None) -> Iterator[Exporter]:
    args = ["--no-collector.nvml", "--no-collector.immich", "--systemd.interval=60"]
    args += [f"--systemd.unit={u}" for u in units]
    if ns is not None:
        args.append(f"--systemd.cgroup-root={ns.cgroup}")
    if journal_dir is not None:
        args += [f"--journal.directory={journal_dir}", f"--state.directory={state_dir}"]
    else:
        args.append("--no-collector.journal")
    address = bus_address or (ns.bus_address if ns else "")
    log = (ns.base if ns else state_dir or pathlib.Path("/tmp")) / f"exporter-{time.monotonic_ns()}.log"
    e = Exporter(args, env={"DBUS_SYSTEM_BUS_ADDRESS": address}, log_path=log)
    e.start()
    try:
        yield e
    finally:
        e.stop()


def metric(e: Exporter, name: str, **labels: str) -> float | None:
    return value(e.metrics(), name, **labels)


def state_is(e: Exporter, unit: str, state: str) -> bool:
    m = parse(e.metrics())
    return value(m, "immich_unit_state", unit=unit, state=state) == 1


def test_state_changes_reach_metrics_through_signals(nested_systemd: NestedSystemd, ml_script: pathlib.Path) -> None:
    ns, unit = nested_systemd, "immich-machine-learning.service"
    ns.add_unit(unit, ml_unit(ml_script))
    with exporter(ns, [unit]) as e:
        wait_for(lambda: state_is(e, unit, "inactive"), DEADLINE, what="first collection rendered")
        m = parse(e.metrics())
        assert value(m, "immich_unit_info", unit=unit, load_state="loaded", sub_state="dead") == 1
        assert value(m, "immich_unit_processes", unit=unit) == 0

        ns.start_unit(unit)
        wait_for(lambda: state_is(e, unit, "active") and metric(e, "immich_unit_processes", unit=unit) == 2,
                 DEADLINE, what="active with arbiter and worker on /metrics")
        m = parse(e.metrics())
        assert sum(value(m, "immich_unit_state", unit=unit, state=s) for s in
                   ("active", "activating", "deactivating", "inactive", "failed", "reloading")) == 1
        assert value(m, "immich_unit_info", unit=unit, sub_state="running") == 1
        enter = value(m, "immich_unit_active_enter_timestamp_seconds", unit=unit)
        assert enter == _active_enter_seconds(ns, unit)

        ns.stop_unit(unit)
        wait_for(lambda: state_is(e, unit, "inactive") and metric(e, "immich_unit_processes", unit=unit) == 0,
                 DEADLINE, what="inactive on /metrics")

        # quiet units cause no collections of their own (no wake-up loop): with a 60 s poll
        # interval the last success stays where it is
        before = metric(e, "immich_gpu_exporter_source_last_success_timestamp_seconds", source="systemd")
        time.sleep(1.0)
        assert metric(e, "immich_gpu_exporter_source_last_success_timestamp_seconds", source="systemd") == before


def _active_enter_seconds(ns: NestedSystemd, unit: str) -> float:
    """ActiveEnterTimestamp (µs since the epoch) as busctl reads it inside the namespace."""
    path = "/org/freedesktop/systemd1/unit/" + "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}"
                                                       for c in unit)
    out = ns.run("busctl", "get-property", "org.freedesktop.systemd1", path, "org.freedesktop.systemd1.Unit",
                 "ActiveEnterTimestamp", check=True).stdout.split()
    assert out[0] == "t"
    return int(out[1]) / 1e6


def test_killed_main_process_is_counted_as_restart(nested_systemd: NestedSystemd, ml_script: pathlib.Path) -> None:
    ns, unit = nested_systemd, "immich-machine-learning.service"
    ns.add_unit(unit, ml_unit(ml_script))
    ns.start_unit(unit)
    with exporter(ns, [unit]) as e:
        wait_for(lambda: metric(e, "immich_unit_processes", unit=unit) == 2, DEADLINE, what="two processes")
        assert metric(e, "immich_unit_restarts_total", unit=unit) == 0
        entered = metric(e, "immich_unit_active_enter_timestamp_seconds", unit=unit)
        main = ns.host_pid(int(ns.unit_property(unit, "MainPID")))
        assert main is not None

        os.kill(main, signal.SIGKILL)
        wait_for(lambda: metric(e, "immich_unit_restarts_total", unit=unit) == 1 and state_is(e, unit, "active")
                 and metric(e, "immich_unit_processes", unit=unit) == 2, DEADLINE, what="restart counted")
        assert metric(e, "immich_unit_active_enter_timestamp_seconds", unit=unit) > entered
        assert ns.host_pid(int(ns.unit_property(unit, "MainPID"))) != main
        assert ns.unit_property(unit, "NRestarts") == "1"


def _cap_sys_resource(pid: int) -> bool:
    eff = next(line.split()[1] for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("CapEff:"))
    return bool(int(eff, 16) >> 24 & 1)  # CAP_SYS_RESOURCE = 24


def _applied_memlock(configured: float, pid1: int) -> float:
    """What the kernel lets systemd apply: without CAP_SYS_RESOURCE it cannot raise the hard
    limit it inherited, and systemd then sets the closest value it may (setrlimit_closest())."""
    if _cap_sys_resource(pid1):
        return configured
    hard = psutil.Process(pid1).rlimit(psutil.RLIMIT_MEMLOCK)[1]
    hard_f = math.inf if hard == resource.RLIM_INFINITY else float(hard)
    return min(configured, hard_f)


def _soft_memlock(pid: int) -> float:
    soft = psutil.Process(pid).rlimit(psutil.RLIMIT_MEMLOCK)[0]
    return math.inf if soft == resource.RLIM_INFINITY else float(soft)


def test_configured_tuning_and_what_the_processes_really_got(nested_systemd: NestedSystemd,
                                                              ml_script: pathlib.Path) -> None:
    ns = nested_systemd
    ml, server, redis = "immich-machine-learning.service", "immich-server.service", "redis-immich.service"
    ns.add_unit(ml, ml_unit(ml_script, "Nice=7\nLimitMEMLOCK=infinity\nDevicePolicy=closed\n"
                                       "DeviceAllow=/dev/nvidiactl rw\nDeviceAllow=/dev/nvidia0 rw\n"
                                       "DeviceAllow=/dev/nvidia-uvm rw\n"), reload=False)
    ns.add_unit(server, ml_unit(ml_script, "Nice=-3\nLimitMEMLOCK=4M\nPrivateDevices=yes\n"), reload=False)
    ns.add_unit(redis, ml_unit(ml_script, "DevicePolicy=closed\nDeviceAllow=/dev/nvidia0 rw\n"))
    for u in (ml, server, redis):
        ns.start_unit(u)
    with exporter(ns, [ml, server, redis]) as e:
        wait_for(lambda: all(metric(e, "immich_unit_processes", unit=u) == 2 for u in (ml, server, redis)),
                 DEADLINE, what="all three units running")
        m = parse(e.metrics())
        # configured tuning, as systemd reports it
        assert value(m, "immich_unit_nice", unit=ml) == 7
        assert value(m, "immich_unit_nice", unit=server) == -3
        assert value(m, "immich_unit_memlock_limit_bytes", unit=ml) == math.inf
        assert value(m, "immich_unit_memlock_limit_bytes", unit=server) == 4 * 2**20
        assert value(m, "immich_unit_device_access_info", unit=ml, device_policy="closed",
                     nvidia_devices="allowed") == 1
        assert value(m, "immich_unit_device_access_info", unit=server, device_policy="closed",
                     nvidia_devices="private_devices") == 1
        assert value(m, "immich_unit_device_access_info", unit=redis, device_policy="closed",
                     nvidia_devices="denied") == 1

        # applied tuning, as the kernel reports it for every process of the unit
        for unit, nice, memlock in ((ml, 7, math.inf), (server, -3, 4 * 2**20)):
            pids = cgroup_pids([str(ns.cgroup)], ns.unit_property(unit, "ControlGroup"))
            assert len(pids) == 2
            for pid in pids:
                assert psutil.Process(pid).nice() == nice
                assert _soft_memlock(pid) == _applied_memlock(memlock, ns.pid1)
        # On hosts where root lacks CAP_SYS_RESOURCE (this project's test machines) the unit
        # says infinity while its processes keep the inherited limit: the mismatch is visible.
        ml_pid = cgroup_pids([str(ns.cgroup)], ns.unit_property(ml, "ControlGroup"))[0]
        if not _cap_sys_resource(ns.pid1):
            assert _soft_memlock(ml_pid) < value(m, "immich_unit_memlock_limit_bytes", unit=ml)


def test_missing_unit_is_reported_not_found(nested_systemd: NestedSystemd, ml_script: pathlib.Path) -> None:
    ns, unit = nested_systemd, "immich-machine-learning.service"
    ns.add_unit(unit, ml_unit(ml_script))
    ns.start_unit(unit)
    with exporter(ns, [unit, "postgresql"]) as e:  # no suffix: .service is implied, as with systemctl
        # /-/ready means "collected once"; the render of that cycle may lag a few ms behind
        wait_for(lambda: state_is(e, unit, "active"), DEADLINE, what="first collection rendered")
        m = parse(e.metrics())
        assert value(m, "immich_gpu_exporter_source_up", source="systemd") == 1
        assert value(m, "immich_unit_info", unit="postgresql.service", load_state="not-found") == 1
        assert value(m, "immich_unit_state", unit="postgresql.service", state="inactive") == 1
        assert value(m, "immich_unit_restarts_total", unit="postgresql.service") is None
        assert value(m, "immich_unit_state", unit=unit, state="active") == 1
        assert value(m, "immich_gpu_exporter_source_errors_total", source="systemd") is None


def test_no_bus_marks_only_systemd_down(nested_systemd: NestedSystemd, tmp_path: pathlib.Path) -> None:
    # the nested systemd is here only for a real journal, so that another source has something to read
    ns = nested_systemd
    with exporter(None, ["immich-machine-learning.service"], bus_address=f"unix:path={tmp_path}/no-such-socket",
                  journal_dir=ns.journal_dir, state_dir=tmp_path) as e:
        wait_for(lambda: value(e.metrics(), "immich_gpu_exporter_source_errors_total", source="systemd",
                               reason="no_bus") and value(e.metrics(), "immich_gpu_exporter_source_up",
                                                          source="journal") == 1,
                 DEADLINE, what="no_bus counted, journal up")
        m = parse(e.metrics())
        assert value(m, "immich_gpu_exporter_source_up", source="systemd") == 0
        assert not [k for k in m if k[0].startswith("immich_unit_")]
        assert "source systemd is down (no_bus)" in e.logs()


def test_bus_lost_and_recovered_without_restart(nested_systemd: NestedSystemd, ml_script: pathlib.Path,
                                                tmp_path: pathlib.Path) -> None:
    ns, unit = nested_systemd, "immich-machine-learning.service"
    ns.add_unit(unit, ml_unit(ml_script))
    ns.start_unit(unit)
    with exporter(ns, [unit], journal_dir=ns.journal_dir, state_dir=tmp_path) as e:
        wait_for(lambda: state_is(e, unit, "active"), DEADLINE, what="active")
        pid = e.proc.pid

        ns.run("systemctl", "stop", "dbus.socket", "dbus.service", check=True)
        wait_for(lambda: metric(e, "immich_gpu_exporter_source_up", source="systemd") == 0, DEADLINE,
                 what="systemd source down")
        m = parse(e.metrics())
        assert value(m, "immich_gpu_exporter_source_errors_total", source="systemd", reason="no_bus") >= 1
        assert value(m, "immich_gpu_exporter_source_up", source="journal") == 1

        ns.run("systemctl", "start", "dbus.socket", "dbus.service", check=True)
        wait_for(lambda: metric(e, "immich_gpu_exporter_source_up", source="systemd") == 1
                 and state_is(e, unit, "active"), DEADLINE, what="systemd source back")

        # and the new connection is subscribed again: a change still arrives without polling
        ns.stop_unit(unit)
        wait_for(lambda: state_is(e, unit, "inactive"), DEADLINE, what="stop seen after reconnect")
        assert e.proc.pid == pid and e.proc.poll() is None
        assert "connected to the system bus again" in e.logs()


def test_unit_pids_come_from_the_host_cgroup_tree(nested_systemd: NestedSystemd, ml_script: pathlib.Path) -> None:
    ns, unit = nested_systemd, "immich-machine-learning.service"
    ns.add_unit(unit, ml_unit(ml_script))
    ns.start_unit(unit)
    wait_for(lambda: len(ns.unit_host_pids(unit)) == 2, DEADLINE, what="two processes")
    cg = ns.unit_property(unit, "ControlGroup")
    mount = cgroup2_mountpoint()
    assert mount is not None
    # the same group reached through a root that lacks it first (name=systemd-like miss), then the right one
    pids = cgroup_pids([str(ns.base / "no-such-root"), str(ns.cgroup)], cg)
    assert pids == tuple(sorted(ns.unit_host_pids(unit)))
    main = ns.host_pid(int(ns.unit_property(unit, "MainPID")))
    assert main in pids
    assert all(b"ml.py" in pathlib.Path(f"/proc/{p}/cmdline").read_bytes() for p in pids)
