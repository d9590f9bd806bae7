"""systemd unit properties -> samples: the pure core of the systemd source.

Input is what `org.freedesktop.DBus.Properties.GetAll` returns for a unit's
`org.freedesktop.systemd1.Unit` interface and for its type interface (`...Service` for a
.service), with bytes already decoded to str, plus the host PIDs found in its control group.
Nothing here does I/O; `sources/systemd.py` is the loop around it.

Property names and D-Bus types, as read from systemd 252 (see docs/systemd.md):
  Unit:    LoadState s, ActiveState s, SubState s, UnitFileState s, ActiveEnterTimestamp t (usec)
  Service: NRestarts u, MainPID u, ControlGroup s, Nice i, LimitMEMLOCK t (hard),
           LimitMEMLOCKSoft t (soft), DevicePolicy s, DeviceAllow a(ss), PrivateDevices b
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from typing import Any, Iterable, Mapping, Sequence

from .core import Sample, sample

UNIT_STATES = ("active", "activating", "deactivating", "inactive", "failed", "reloading")
# Newer ActiveState values (maintenance: systemd 247, `systemctl clean`; refreshing: 249+, a unit
# re-applying its mount images). They get their own series only while current, so the six
# above keep node_exporter's shape and the current state is never invisible.
_STATE_NAME = re.compile(r"[a-z][a-z-]{0,31}")
# Load states whose unit properties are configuration. For masked, not-found or error systemd
# answers with its defaults (a running masked unit keeps its processes, not its unit file).
CONFIGURED_LOAD_STATES = ("loaded", "bad-setting")
RLIM_INFINITY = 2**64 - 1  # how systemd spells "infinity" in LimitXXX= properties (uint64 -1)
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit"

# Unit type suffix -> the D-Bus interface carrying that type's properties.
TYPE_INTERFACES = {
    "service": "Service", "socket": "Socket", "mount": "Mount", "swap": "Swap", "timer": "Timer",
    "target": "Target", "path": "Path", "slice": "Slice", "scope": "Scope", "device": "Device",
    "automount": "Automount",
}

# Device nodes CUDA opens: the control node, one GPU node, the unified-memory node. Their
# /proc/devices groups ("char-<group>" in DeviceAllow=) are "nvidia-frontend" (called "nvidia" by
# older drivers) for nvidiactl and nvidiaN, and "nvidia-uvm" for nvidia-uvm.
_NVIDIA_FRONTEND_GROUPS = ("nvidia-frontend", "nvidia")
_NVIDIA_FRONTEND_MAJOR = 195


def normalize_unit_name(name: str) -> str:
    """`immich-server` -> `immich-server.service`, as systemctl does; names with a type stay."""
    name = name.strip()
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    return name if suffix in TYPE_INTERFACES else name + ".service"


def unit_type_interface(name: str) -> str | None:
    """The D-Bus interface of the unit's type (`a.service` -> org.freedesktop.systemd1.Service)."""
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    iface = TYPE_INTERFACES.get(suffix)
    return f"org.freedesktop.systemd1.{iface}" if iface else None


def unit_object_path(name: str) -> str:
    """The unit's object path, escaped like sd_bus_path_encode(): bytes outside [A-Za-z0-9] -> _xx."""
    if not name:
        return UNIT_PATH_PREFIX + "/_"
    return UNIT_PATH_PREFIX + "/" + "".join(
        chr(b) if chr(b).isascii() and chr(b).isalnum() else f"_{b:02x}" for b in name.encode())


def decode(value: Any) -> Any:
    """pystemd answers with bytes for strings (keys too); turn them into str, recursively."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {decode(k): decode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(decode(v) for v in value)
    return value


def memlock_bytes(limit: int) -> float:
    """A LimitMEMLOCK value in bytes; systemd's infinity (2**64-1) becomes +Inf."""
    return math.inf if limit >= RLIM_INFINITY else float(limit)


def _in_group(entry: str, groups: Sequence[str]) -> bool:
    """`char-<glob>` names /proc/devices groups; systemd matches the glob against them."""
    return entry.startswith("char-") and any(fnmatch.fnmatchcase(g, entry[len("char-"):]) for g in groups)


def _char_node(entry: str) -> tuple[int, int] | None:
    """`/dev/char/MAJOR:MINOR` -> (major, minor)."""
    m = re.fullmatch(r"/dev/char/(\d+):(\d+)", entry)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _covers_ctl(entry: str) -> bool:
    return entry == "/dev/nvidiactl" or _in_group(entry, _NVIDIA_FRONTEND_GROUPS) \
        or _char_node(entry) == (_NVIDIA_FRONTEND_MAJOR, 255)


def _covers_gpu(entry: str) -> bool:
    node = _char_node(entry)
    return bool(re.fullmatch(r"/dev/nvidia\d+", entry)) or _in_group(entry, _NVIDIA_FRONTEND_GROUPS) \
        or (node is not None and node[0] == _NVIDIA_FRONTEND_MAJOR and node[1] < 255)


def _covers_uvm(entry: str) -> bool:
    return entry == "/dev/nvidia-uvm" or _in_group(entry, ("nvidia-uvm",))


def nvidia_device_access(device_policy: str, device_allow: Iterable[tuple[str, str]],
                         private_devices: bool) -> str:
    """Whether a unit's processes can open the NVIDIA device nodes CUDA needs.

    Returns `private_devices` (PrivateDevices=yes: the unit's /dev has no nvidia nodes at all,
    whatever DeviceAllow= says), `allowed` (the unit may read and write /dev/nvidiactl, a GPU
    node /dev/nvidiaN and /dev/nvidia-uvm), or `denied` (anything less: a partial list still
    breaks CUDA's initialisation).
    DevicePolicy=auto without DeviceAllow= entries applies no device filter at all; auto with
    entries, closed and strict allow only the listed devices (closed adds /dev/null & co., never
    nvidia nodes).
    """
    if private_devices:
        return "private_devices"
    allow = list(device_allow)
    if device_policy == "auto" and not allow:
        return "allowed"
    rw = [path for path, mode in allow if "r" in mode and "w" in mode]
    ok = any(map(_covers_ctl, rw)) and any(map(_covers_gpu, rw)) and any(map(_covers_uvm, rw))
    return "allowed" if ok else "denied"


@dataclasses.dataclass(frozen=True)
class UnitReading:
    """One unit as read from systemd in one cycle (decoded properties) plus its host PIDs."""

    name: str
    unit: Mapping[str, Any]  # org.freedesktop.systemd1.Unit properties
    typed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the type interface's properties
    pids: tuple[int, ...] = ()

    @property
    def found(self) -> bool:
        return self.unit.get("LoadState", "not-found") not in ("not-found", "")

    @property
    def control_group(self) -> str:
        return str(self.typed.get("ControlGroup") or self.unit.get("ControlGroup") or "")


def unit_samples(r: UnitReading) -> list[Sample]:
    """The samples of one watched unit.

    A unit that does not exist (LoadState not-found) still gets its state and info series
    (inactive, load_state="not-found"), so dashboards show it as missing rather than as a gap;
    its tuning and counters are omitted because systemd answers them with defaults, not
    configuration.
    """
    u, t, name = r.unit, r.typed, r.name
    active = str(u.get("ActiveState", ""))
    out = [sample("immich_unit_state", 1 if active == s else 0, unit=name, state=s) for s in UNIT_STATES]
    if active not in UNIT_STATES and _STATE_NAME.fullmatch(active):
        out.append(sample("immich_unit_state", 1, unit=name, state=active))
    out.append(sample("immich_unit_info", 1, unit=name, load_state=u.get("LoadState", ""),
                      sub_state=u.get("SubState", ""), unit_file_state=u.get("UnitFileState", "")))
    if not r.found:
        return out
    out.append(sample("immich_unit_active_enter_timestamp_seconds",
                      int(u.get("ActiveEnterTimestamp", 0)) / 1e6, unit=name))
    if "NRestarts" in t:
        out.append(sample("immich_unit_restarts_total", int(t["NRestarts"]), unit=name))
    if r.control_group or "ControlGroup" in t:
        out.append(sample("immich_unit_processes", len(r.pids), unit=name))
    if u.get("LoadState") not in CONFIGURED_LOAD_STATES:
        return out  # tuning: systemd's defaults, not configuration
    if "Nice" in t:
        out.append(sample("immich_unit_nice", int(t["Nice"]), unit=name))
    soft = t.get("LimitMEMLOCKSoft", t.get("LimitMEMLOCK"))  # the soft limit is what mlock() is checked against
    if soft is not None:
        out.append(sample("immich_unit_memlock_limit_bytes", memlock_bytes(int(soft)), unit=name))
    if "DevicePolicy" in t:
        policy = str(t["DevicePolicy"])
        access = nvidia_device_access(policy, [tuple(e) for e in t.get("DeviceAllow", ())],
                                      bool(t.get("PrivateDevices", False)))
        out.append(sample("immich_unit_device_access_info", 1, unit=name, device_policy=policy,
                          nvidia_devices=access))
    return out


def unit_facts(readings: Iterable[UnitReading]) -> dict[str, Any]:
    """Facts for other sources and `check`: host PIDs, control group and environment settings of
    each unit that exists. The environment is a fact only (for `check`'s environment advice); it is
    never exported, because units keep database passwords there."""
    readings = [r for r in readings if r.found]
    return {
        "unit_pids": {r.name: tuple(r.pids) for r in readings},
        "control_groups": {r.name: r.control_group for r in readings if r.control_group},
        "unit_environment": {r.name: {"Environment": tuple(str(e) for e in r.typed.get("Environment", ())),
                                      "EnvironmentFiles": tuple((str(p), bool(o)) for p, o in
                                                                r.typed.get("EnvironmentFiles", ()))}
                             for r in readings if "Environment" in r.typed or "EnvironmentFiles" in r.typed},
    }
