"""Table tests of the pure systemd core: properties -> samples, device access, names and paths,
cgroup root detection. Property dicts are shaped exactly as systemd 252 answers GetAll
(captured from the nested systemd, then decoded)."""

from __future__ import annotations

import math
import pathlib

import pytest

from immich_gpu_exporter.metrics import check_sample
from immich_gpu_exporter.sources.systemd import cgroup_pids, cgroup_roots_from_mountinfo
from immich_gpu_exporter.units import (
    UnitReading,
    decode,
    memlock_bytes,
    normalize_unit_name,
    nvidia_device_access,
    unit_facts,
    unit_object_path,
    unit_samples,
    unit_type_interface,
)

ML = "immich-machine-learning.service"
LOADED_UNIT = {"Id": ML, "LoadState": "loaded", "ActiveState": "active", "SubState": "running",
               "UnitFileState": "enabled", "ActiveEnterTimestamp": 1795718577920846}
LOADED_SERVICE = {"Type": "simple", "Restart": "on-failure", "NRestarts": 3, "MainPID": 21,
                  "ControlGroup": "/system.slice/immich-machine-learning.service", "Nice": 5,
                  "LimitMEMLOCK": 2**64 - 1, "LimitMEMLOCKSoft": 2**64 - 1, "DevicePolicy": "closed",
                  "DeviceAllow": [("/dev/nvidia-uvm", "rwm"), ("char-nvidia-frontend", "rw")],
                  "PrivateDevices": False}
NOT_FOUND_UNIT = {"Id": "nope.service", "LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead",
                  "UnitFileState": "", "ActiveEnterTimestamp": 0}


def by_name(samples):  # type: ignore[no-untyped-def]
    out: dict = {}
    for s in samples:
        out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def test_loaded_service_gives_every_metric_with_defined_labels() -> None:
    r = UnitReading(ML, LOADED_UNIT, LOADED_SERVICE, (101, 102))
    samples = unit_samples(r)
    for s in samples:
        check_sample(s)
    got = by_name(samples)
    assert [(lab["state"], v) for lab, v in got["immich_unit_state"]] == [
        ("active", 1), ("activating", 0), ("deactivating", 0), ("inactive", 0), ("failed", 0), ("reloading", 0)]
    assert got["immich_unit_info"] == [({"unit": ML, "load_state": "loaded", "sub_state": "running",
                                         "unit_file_state": "enabled"}, 1)]
    assert got["immich_unit_restarts_total"] == [({"unit": ML}, 3)]
    assert got["immich_unit_active_enter_timestamp_seconds"] == [({"unit": ML}, 1795718577.920846)]
    assert got["immich_unit_nice"] == [({"unit": ML}, 5)]
    assert got["immich_unit_memlock_limit_bytes"] == [({"unit": ML}, math.inf)]
    assert got["immich_unit_device_access_info"] == [
        ({"unit": ML, "device_policy": "closed", "nvidia_devices": "allowed"}, 1)]
    assert got["immich_unit_processes"] == [({"unit": ML}, 2)]


def test_soft_memlock_limit_is_reported_not_the_hard_one() -> None:
    typed = dict(LOADED_SERVICE, LimitMEMLOCK=134217728, LimitMEMLOCKSoft=67108864)
    got = by_name(unit_samples(UnitReading(ML, LOADED_UNIT, typed)))
    assert got["immich_unit_memlock_limit_bytes"] == [({"unit": ML}, 67108864)]


def test_not_found_unit_has_state_and_info_but_no_tuning() -> None:
    samples = unit_samples(UnitReading("nope.service", NOT_FOUND_UNIT, {}))
    got = by_name(samples)
    assert set(got) == {"immich_unit_state", "immich_unit_info"}
    assert dict((lab["state"], v) for lab, v in got["immich_unit_state"])["inactive"] == 1
    assert got["immich_unit_info"][0][0]["load_state"] == "not-found"
    assert unit_facts([UnitReading("nope.service", NOT_FOUND_UNIT, {})]) == {"unit_pids": {}, "control_groups": {},
                                                                         "unit_environment": {}}


def test_newer_active_state_gets_its_own_series_and_the_six_stay_zero() -> None:
    got = by_name(unit_samples(UnitReading(ML, dict(LOADED_UNIT, ActiveState="maintenance"), LOADED_SERVICE)))
    assert [v for _, v in got["immich_unit_state"]] == [0] * 6 + [1]
    assert got["immich_unit_state"][-1][0]["state"] == "maintenance"


def test_unit_without_type_properties_gets_no_service_metrics() -> None:
    unit = dict(LOADED_UNIT, Id="nvidia.target")
    got = by_name(unit_samples(UnitReading("nvidia.target", unit, {})))
    assert set(got) == {"immich_unit_state", "immich_unit_info", "immich_unit_active_enter_timestamp_seconds"}


def test_facts_hold_pids_control_groups_and_environment_settings() -> None:
    r = UnitReading(ML, LOADED_UNIT, dict(LOADED_SERVICE, Environment=["PYTHONUNBUFFERED=1", "COLUMNS=250"],
                                          EnvironmentFiles=[("/etc/immich/ml.env", True)]), (101, 102))
    stopped = UnitReading("immich-server.service", dict(LOADED_UNIT, ActiveState="inactive"),
                          dict(LOADED_SERVICE, ControlGroup=""), ())
    facts = unit_facts([r, stopped])
    assert facts["unit_pids"] == {ML: (101, 102), "immich-server.service": ()}
    assert facts["control_groups"] == {ML: "/system.slice/immich-machine-learning.service"}
    # for `check`'s environment advice only (never exported: units keep database passwords there)
    assert facts["unit_environment"][ML] == {"Environment": ("PYTHONUNBUFFERED=1", "COLUMNS=250"),
                                             "EnvironmentFiles": (("/etc/immich/ml.env", True),)}


@pytest.mark.parametrize("policy,allow,private,expected", [
    # services.immich default: accelerationDevices = [] -> PrivateDevices=yes
    ("closed", [], True, "private_devices"),
    ("auto", [("/dev/nvidia0", "rw"), ("/dev/nvidiactl", "rw"), ("/dev/nvidia-uvm", "rw")], True, "private_devices"),
    # accelerationDevices = null: no device filter at all
    ("auto", [], False, "allowed"),
    # the CUDA trio listed explicitly (accelerationDevices = [ ... ])
    ("auto", [("/dev/nvidia0", "rw"), ("/dev/nvidiactl", "rw"), ("/dev/nvidia-uvm", "rw")], False, "allowed"),
    ("closed", [("/dev/nvidia1", "rwm"), ("/dev/nvidiactl", "rwm"), ("/dev/nvidia-uvm", "rwm")], False, "allowed"),
    ("strict", [("char-nvidia-frontend", "rw"), ("char-nvidia-uvm", "rw")], False, "allowed"),
    ("closed", [("char-nvidia*", "rw")], False, "allowed"),  # the group glob covers frontend and uvm
    ("closed", [("char-nvidia", "rw"), ("char-nvidia-uvm", "rw")], False, "allowed"),  # older drivers' group name
    ("closed", [("/dev/char/195:0", "rw"), ("/dev/char/195:255", "rw"), ("/dev/nvidia-uvm", "rw")], False,
     "allowed"),
    # partial lists: CUDA cannot initialise
    ("closed", [("/dev/nvidia0", "rw")], False, "denied"),
    ("closed", [("/dev/nvidia0", "rw"), ("/dev/nvidiactl", "rw")], False, "denied"),
    ("auto", [("/dev/dri/renderD128", "rw")], False, "denied"),  # a transcoding-only list
    ("closed", [("/dev/nvidia0", "r"), ("/dev/nvidiactl", "r"), ("/dev/nvidia-uvm", "r")], False, "denied"),
    ("closed", [("char-nvidia-caps", "rw"), ("/dev/nvidia-uvm", "rw")], False, "denied"),
    ("closed", [], False, "denied"),
    ("strict", [], False, "denied"),
])
def test_nvidia_device_access(policy, allow, private, expected) -> None:  # type: ignore[no-untyped-def]
    assert nvidia_device_access(policy, allow, private) == expected


@pytest.mark.parametrize("raw,expected", [
    (2**64 - 1, math.inf), (8388608, 8388608.0), (0, 0.0), (65536, 65536.0),
])
def test_memlock_bytes(raw: int, expected: float) -> None:
    assert memlock_bytes(raw) == expected


@pytest.mark.parametrize("name,expected", [
    ("immich-server", "immich-server.service"),
    ("immich-server.service", "immich-server.service"),
    (" postgresql ", "postgresql.service"),
    ("nvidia.target", "nvidia.target"),
    ("system-immich.slice", "system-immich.slice"),
    ("redis-immich.socket", "redis-immich.socket"),
    ("foo.bar", "foo.bar.service"),
])
def test_normalize_unit_name(name: str, expected: str) -> None:
    assert normalize_unit_name(name) == expected


@pytest.mark.parametrize("name", [
    "immich-machine-learning.service", "nvidia-container-toolkit-cdi-generator.service", "redis-immich.service",
    "postgresql@15-main.service", "a.service", "x_y.service", "dev-nvidia0.device", "ünïcode.service", "",
])
def test_unit_object_path_matches_sd_bus_path_encode(name: str) -> None:
    from pystemd.dbuslib import path_encode  # the real sd_bus_path_encode(), through pystemd

    assert unit_object_path(name) == path_encode(b"/org/freedesktop/systemd1/unit", name.encode()).decode()


def test_unit_type_interface() -> None:
    assert unit_type_interface(ML) == "org.freedesktop.systemd1.Service"
    assert unit_type_interface("x.socket") == "org.freedesktop.systemd1.Socket"
    assert unit_type_interface("x") is None


def test_decode_turns_pystemd_bytes_into_str() -> None:
    assert decode({b"DeviceAllow": [(b"/dev/nvidia0", b"rw")], b"Nice": 5, b"PrivateDevices": False}) == \
        {"DeviceAllow": [("/dev/nvidia0", "rw")], "Nice": 5, "PrivateDevices": False}


HYBRID = """\
24 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 24 0:26 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
"""
UNIFIED = """\
24 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""
LEGACY = """\
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,release_agent=/lib/systemd/systemd-cgroups-agent,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
"""
ESCAPED = "31 30 0:27 / /mnt/my\\040cgroup rw,relatime - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize("text,expected", [
    (HYBRID, ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"]),
    (UNIFIED, ["/sys/fs/cgroup"]),
    (LEGACY, ["/sys/fs/cgroup/systemd"]),
    (ESCAPED, ["/mnt/my cgroup"]),
    ("", []),
])
def test_cgroup_roots_from_mountinfo(text: str, expected: list[str]) -> None:
    assert cgroup_roots_from_mountinfo(text) == expected


def test_cgroup_pids_walks_the_group_and_its_children(tmp_path: pathlib.Path) -> None:
    # a delegated sub-tree as systemd lays it out (Delegate=yes: the service manages children)
    unit = tmp_path / "v2/system.slice/immich-machine-learning.service"
    (unit / "worker").mkdir(parents=True)
    (unit / "cgroup.procs").write_text("12\n10\n")
    (unit / "worker/cgroup.procs").write_text("11\n12\n")
    (tmp_path / "v1").mkdir()
    cg = "/system.slice/immich-machine-learning.service"
    assert cgroup_pids([str(tmp_path / "v1"), str(tmp_path / "v2")], cg) == (10, 11, 12)
    assert cgroup_pids([str(tmp_path / "v2")], "") == ()
    assert cgroup_pids([str(tmp_path / "v1")], cg) == ()
