"""units.py against unit property values as systemd 252-256 answers them through pystemd.

pystemd hands back `GetAll` with bytes for every string (keys included), `a(ss)` as a list of
tuples of bytes, `t` limits as Python ints (2**64-1 for infinity) and `b` as bool; the inputs
below are written that way and go through `decode()` like the source does.
"""

from __future__ import annotations

import math

import pytest

from immich_gpu_exporter.metrics import check_sample
from immich_gpu_exporter.units import UnitReading, decode, unit_facts, unit_samples

ML = "immich-machine-learning.service"
INF = 2**64 - 1


def unit(**over):  # type: ignore[no-untyped-def]
    base = {b"Id": ML.encode(), b"LoadState": b"loaded", b"ActiveState": b"active", b"SubState": b"running",
            b"UnitFileState": b"enabled", b"ActiveEnterTimestamp": 1718000000123456, b"FreezerState": b"running"}
    base.update({k.encode(): v.encode() if isinstance(v, str) else v for k, v in over.items()})
    return decode(base)


def service(**over):  # type: ignore[no-untyped-def]
    base = {b"Type": b"notify", b"Restart": b"on-failure", b"NRestarts": 0, b"MainPID": 4242,
            b"ControlGroup": f"/system.slice/system-immich.slice/{ML}".encode(), b"Nice": 0,
            b"LimitMEMLOCK": 8388608, b"LimitMEMLOCKSoft": 8388608, b"DevicePolicy": b"auto",
            b"DeviceAllow": [], b"PrivateDevices": False}
    for k, v in over.items():
        if isinstance(v, str):
            v = v.encode()
        elif isinstance(v, list):
            v = [(a.encode(), b.encode()) for a, b in v]
        base[k.encode()] = v
    return decode(base)


def got(reading: UnitReading) -> dict[str, list[tuple[dict, float]]]:
    out: dict = {}
    for s in unit_samples(reading):
        check_sample(s)
        out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def one(samples: dict, name: str) -> float:
    (_, v), = samples[name]
    return v


@pytest.mark.parametrize("limit,expected", [(INF, math.inf), (8388608, 8388608.0), (65536, 65536.0), (0, 0.0)])
def test_memlock_values_of_real_systemd(limit, expected):
    g = got(UnitReading(ML, unit(), service(LimitMEMLOCK=limit, LimitMEMLOCKSoft=limit)))
    assert one(g, "immich_unit_memlock_limit_bytes") == expected


def test_soft_memlock_is_what_counts_when_hard_is_infinity():
    g = got(UnitReading(ML, unit(), service(LimitMEMLOCK=INF, LimitMEMLOCKSoft=8388608)))
    assert one(g, "immich_unit_memlock_limit_bytes") == 8388608


@pytest.mark.parametrize("nice", [0, -10, 19, -20])
def test_nice_values(nice):
    assert one(got(UnitReading(ML, unit(), service(Nice=nice))), "immich_unit_nice") == nice


NV = [("/dev/nvidiactl", "rw"), ("/dev/nvidia0", "rw"), ("/dev/nvidia-uvm", "rw")]


@pytest.mark.parametrize("policy,allow,private,expected", [
    ("auto", [], False, "allowed"),  # no filter at all
    ("closed", NV, False, "allowed"),
    ("strict", NV + [("/dev/nvidia-uvm-tools", "rw"), ("/dev/nvidia-caps/nvidia-cap1", "r"),
                     ("/dev/nvidia-caps/nvidia-cap2", "r")], False, "allowed"),  # MIG capability nodes
    ("closed", [("char-nvidia-frontend", "rw"), ("char-nvidia-uvm", "rw")], False, "allowed"),
    ("closed", [("char-nvidia-frontend", "rwm"), ("char-nvidia-uvm", "rwm")], False, "allowed"),
    ("strict", [("char-nvidia", "rw"), ("char-nvidia-uvm", "rw")], False, "allowed"),  # older /proc/devices name
    ("closed", [("/dev/nvidia0", "rw"), ("/dev/nvidiactl", "rw")], False, "denied"),  # no uvm: CUDA init fails
    ("closed", [("/dev/nvidiactl", "r"), ("/dev/nvidia0", "r"), ("/dev/nvidia-uvm", "r")], False, "denied"),
    ("auto", [("/dev/dri/renderD128", "rw")], False, "denied"),  # NixOS accelerationDevices for VAAPI only
    ("closed", [("/dev/nvidia-caps/nvidia-cap1", "r")], False, "denied"),
    ("closed", NV, True, "private_devices"),
    ("auto", [], True, "private_devices"),  # services.immich default: PrivateDevices=yes
])
def test_device_access_from_real_device_allow_lists(policy, allow, private, expected):
    g = got(UnitReading(ML, unit(), service(DevicePolicy=policy, DeviceAllow=allow, PrivateDevices=private)))
    (labels, v), = g["immich_unit_device_access_info"]
    assert (labels["device_policy"], labels["nvidia_devices"], v) == (policy, expected, 1)


@pytest.mark.parametrize("active,sub", [("refreshing", "running"), ("maintenance", "dead")])
def test_newer_active_states_are_visible(active, sub):
    g = got(UnitReading(ML, unit(ActiveState=active, SubState=sub), service()))
    states = {lab["state"]: v for lab, v in g["immich_unit_state"]}
    assert states[active] == 1
    assert sum(states.values()) == 1 and len(states) == 7


@pytest.mark.parametrize("file_state", ["enabled", "linked", "generated", "transient", "static", "enabled-runtime",
                                        "alias", "indirect", ""])
def test_unit_file_states_pass_through(file_state):
    (labels, _), = got(UnitReading(ML, unit(UnitFileState=file_state), service()))["immich_unit_info"]
    assert labels["unit_file_state"] == file_state


def test_masked_running_unit_keeps_runtime_series_but_no_configured_tuning():
    """`systemctl mask` without --now: still running, but systemd answers the tuning with defaults."""
    r = UnitReading(ML, unit(LoadState="masked", UnitFileState="masked"),
                    service(Nice=0, LimitMEMLOCK=8388608, LimitMEMLOCKSoft=8388608, NRestarts=2), (4242, 4243))
    g = got(r)
    assert {lab["state"]: v for lab, v in g["immich_unit_state"]}["active"] == 1
    assert one(g, "immich_unit_restarts_total") == 2
    assert one(g, "immich_unit_processes") == 2
    for name in ("immich_unit_nice", "immich_unit_memlock_limit_bytes", "immich_unit_device_access_info"):
        assert name not in g
    assert unit_facts([r])["unit_pids"] == {ML: (4242, 4243)}


def test_masked_stopped_unit():
    g = got(UnitReading(ML, unit(LoadState="masked", ActiveState="inactive", SubState="dead", UnitFileState="masked",
                                 ActiveEnterTimestamp=0), service(MainPID=0)))
    assert {lab["state"]: v for lab, v in g["immich_unit_state"]}["inactive"] == 1
    assert g["immich_unit_info"][0][0]["load_state"] == "masked"
    assert "immich_unit_nice" not in g


def test_bad_setting_unit_keeps_the_tuning_that_was_read():
    g = got(UnitReading(ML, unit(LoadState="bad-setting", ActiveState="inactive", SubState="dead"),
                        service(Nice=-10, LimitMEMLOCKSoft=INF)))
    assert one(g, "immich_unit_nice") == -10 and one(g, "immich_unit_memlock_limit_bytes") == math.inf


def test_error_load_state_has_no_tuning():
    g = got(UnitReading(ML, unit(LoadState="error", ActiveState="inactive", SubState="dead", UnitFileState=""),
                        service()))
    assert g["immich_unit_info"][0][0]["load_state"] == "error"
    assert "immich_unit_nice" not in g and "immich_unit_memlock_limit_bytes" not in g


def test_not_found_unit_as_pystemd_returns_it():
    r = UnitReading("redis-immich.service", unit(Id="redis-immich.service", LoadState="not-found",
                                                 ActiveState="inactive", SubState="dead", UnitFileState="",
                                                 ActiveEnterTimestamp=0), {})
    g = got(r)
    assert set(g) == {"immich_unit_state", "immich_unit_info"}
    assert unit_facts([r]) == {"unit_pids": {}, "control_groups": {}, "unit_environment": {}}


def test_template_instance_with_escaped_name():
    name = "immich-ml@gpu\\x2d0.service"
    r = UnitReading(name, unit(Id=name), service(ControlGroup=f"/system.slice/system-immich\\x2dml.slice/{name}"),
                    (7,))
    g = got(r)
    assert g["immich_unit_info"][0][0]["unit"] == name
    assert unit_facts([r])["control_groups"] == {name: f"/system.slice/system-immich\\x2dml.slice/{name}"}
