"""PID -> systemd unit / container / Immich component, and per-process facts from /proc.

The pure core: `parse_proc_cgroup()` reads the text of /proc/<pid>/cgroup (cgroup v1, v2 or
hybrid), `placement()` turns a cgroup path into a unit, a container id and a Kubernetes pod,
`locate()` picks the most telling hierarchy of a process, `component_of()` matches the
configured globs, `parse_stat()` / `parse_memlock()` read /proc/<pid>/stat and limits.

The shell: `ProcessTable` keeps what does not change for a live process (its placement, its
name, its memlock limit) keyed by (pid, start time), so a PID reused by a new process is
read afresh and a dead PID is evicted; only the PIDs asked for are read, /proc is never
scanned. Container names and identities come from `docker_api`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import os
import re
from typing import Iterable, Mapping, Sequence

log = logging.getLogger("immich_gpu_exporter.attribution")

UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".target", ".device", ".path", ".timer")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# systemd-driver container scopes: docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope,
# libpod-<id>.scope (podman); the conmon scopes of CRI-O/podman are monitors, not containers.
# Without ".scope" the same names are what CRI-O and others use under a cgroupfs-driver pod
# (/kubepods/<qos>/pod<uid>/crio-<id>).
_SCOPE = re.compile(r"^(docker|cri-containerd|crio|libpod|containerd|nerdctl)-([0-9a-f]{64})(?:\.scope)?$")
_CONMON = re.compile(r"^(crio|libpod)-conmon-[0-9a-f]{64}(?:\.scope)?$")
# podman --cgroups=split (the default of Quadlet units): the container is a child of its unit,
# /system.slice/<unit>.service/libpod-payload-<id>, so the unit stays a label too.
_PAYLOAD = re.compile(r"^libpod-payload-([0-9a-f]{64})$")
# runc's systemd-driver spelling "slice:prefix:id" taken literally as a directory name by a
# runtime on the cgroupfs driver (seen with containerd on cgroup v1 hosts).
_COLON = re.compile(r"^([^:/]+\.slice):([a-z-]+):([0-9a-f]{64})$")
# cgroupfs-driver parents whose child segment is the container id.
_CGROUPFS_PARENTS = {"docker": "docker", "libpod_parent": "libpod", "lxc.payload": "lxc"}
# kubelet's pod slice; kind and other nested kubelets prefix it ("kubelet-kubepods-...").
_POD_SLICE = re.compile(r"^(?:[a-z0-9]+-)*kubepods(?:-[a-z]+)?-pod([0-9a-f_]{36})\.slice$")
_USER_MANAGER = re.compile(r"^user@\d+\.service$")
_POD_DIR = re.compile(r"^pod([0-9a-f-]{36})$")

OTHER = "other"


# --- /proc/<pid>/cgroup ------------------------------------------------------------------------

def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Hierarchy -> path. The v2 line ("0::/path") gets the key "" ; v1 lines their controller
    list ("memory", "cpu,cpuacct", "name=systemd")."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        out[controllers] = path
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    """Where a process lives. Empty strings mean "does not apply"."""

    cgroup: str = ""  # the cgroup path that decided (relative to its hierarchy's root)
    hierarchy: str = ""  # "" for cgroup v2, else the v1 controller list
    unit: str = ""  # systemd unit (outermost non-slice unit), empty for containers
    container_id: str = ""  # full 64-hex id
    runtime: str = ""  # docker, cri-containerd, crio, libpod, kubepods, ...
    pod_uid: str = ""  # Kubernetes pod UID, dashed
    owner_cgroup: str = ""  # the cgroup of the unit or container itself (the top of its subtree)


def _segments(path: str) -> list[str]:
    # A reader in a private cgroup namespace sees "/../.." prefixes; they carry nothing. On
    # cgroup v2 the kernel appends " (deleted)" when the cgroup was removed under a process
    # (a container torn down while a worker lingers).
    path = path.removesuffix(" (deleted)")
    return [s for s in path.split("/") if s and s not in ("..", ".")]


def placement(path: str, hierarchy: str = "") -> Placement:
    """Unit / container / pod of a cgroup path (pure)."""
    segs = _segments(path)
    unit = container = runtime = pod = ""
    unit_at = container_at = -1
    keep_unit = False
    for i, seg in enumerate(segs):
        m = _POD_SLICE.match(seg)
        if m:
            pod = m.group(1).replace("_", "-")
            runtime = runtime or "kubepods"
            continue
        m = _POD_DIR.match(seg)
        if m and i > 0 and segs[0] == "kubepods":
            pod = m.group(1)
            runtime = "kubepods"
            continue
        container_at = i
        m = _SCOPE.match(seg)
        if m:
            runtime, container = m.group(1), m.group(2)
            break
        m = _COLON.match(seg)
        if m:
            slice_ = _POD_SLICE.match(m.group(1))
            if slice_:
                pod = slice_.group(1).replace("_", "-")
            runtime, container = m.group(2), m.group(3)
            break
        m = _PAYLOAD.match(seg)
        if m:
            runtime, container, keep_unit = "libpod", m.group(1), True
            break
        if _CONMON.match(seg):
            continue
        if i > 0 and segs[i - 1] in _CGROUPFS_PARENTS and (_HEX64.fullmatch(seg) or segs[i - 1] == "lxc.payload"):
            runtime, container = _CGROUPFS_PARENTS[segs[i - 1]], seg
            break
        if i > 0 and segs[i - 1] == "libpod_parent" and seg.startswith("libpod-") and _HEX64.fullmatch(seg[7:]):
            runtime, container = "libpod", seg[7:]
            break
        if pod and _HEX64.fullmatch(seg):  # cgroupfs kubelet: /kubepods/<qos>/pod<uid>/<id>
            container = seg
            break
        if not unit and seg.endswith(UNIT_SUFFIXES) and not seg.endswith(".slice"):
            # The outermost unit owns its subtree (delegated children, user managers' units).
            unit, unit_at = seg, i
    owner = -1
    if container:
        owner = container_at
        if not keep_unit or _USER_MANAGER.match(unit):
            unit = ""
    elif pod:
        unit = ""
    elif unit:
        owner = unit_at
    return Placement("/" + "/".join(segs), hierarchy, unit, container, runtime, pod,
                     "/" + "/".join(segs[: owner + 1]) if owner >= 0 else "")


# v1 hierarchies to consult when the v2 line says nothing (pure v1 hosts, Docker on cgroup v1).
_V1_ORDER = ("name=systemd", "pids", "memory", "cpu,cpuacct", "cpuacct,cpu", "cpu", "devices")


def locate(cgroup_text: str) -> Placement:
    """The most telling placement among a process's hierarchies.

    On hybrid hosts the v2 line can name the runtime's own service (a Docker container on the
    v1 cgroupfs driver shows `0::/system.slice/containerd.service`) while the v1 lines name the
    container, so a container found in any hierarchy wins; then a unit, v2 first, then
    name=systemd, then the other v1 controllers.
    """
    by_h = parse_proc_cgroup(cgroup_text)
    order = [h for h in ("",) + _V1_ORDER if h in by_h] + [h for h in by_h if h not in _V1_ORDER and h != ""]
    found = [placement(by_h[h], h) for h in order]
    for p in found:
        if p.container_id or p.pod_uid:
            return p
    for p in found:
        if p.unit:
            return p
    return found[0] if found else Placement()


# --- components --------------------------------------------------------------------------------

def component_of(patterns: Mapping[str, Sequence[str]], unit: str = "", container: str = "") -> str:
    """First component whose globs match the unit or container name; else `other`."""
    names = [n for n in (unit, container) if n]
    for component, globs in patterns.items():
        for g in globs:
            if any(fnmatch.fnmatchcase(n, g) for n in names):
                return component
    return OTHER


# --- /proc/<pid>/stat and limits -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Stat:
    comm: str
    start_ticks: int  # start time since boot, in clock ticks: identifies the process with its PID
    nice: int
    cpu_ticks: int  # utime + stime
    rss_pages: int


def parse_stat(text: str) -> Stat:
    """Parse /proc/<pid>/stat. The comm may contain spaces and parentheses: split at the last ')'."""
    lpar, rpar = text.index("("), text.rindex(")")
    f = text[rpar + 2:].split()
    # f[0] is field 3 (state): field n is f[n - 3]
    return Stat(text[lpar + 1:rpar], int(f[19]), int(f[16]), int(f[11]) + int(f[12]), int(f[21]))


def parse_memlock(limits_text: str) -> float:
    """Soft RLIMIT_MEMLOCK in bytes from /proc/<pid>/limits; +Inf for unlimited."""
    for line in limits_text.splitlines():
        if line.startswith("Max locked memory"):
            soft = line[len("Max locked memory"):].split()[0]
            return math.inf if soft == "unlimited" else float(soft)
    raise ValueError("no 'Max locked memory' line")


# --- grouping ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """What a process is, as far as labels go."""

    component: str
    unit: str
    container: str  # resolved container name, or the short id


def identity(p: Placement, patterns: Mapping[str, Sequence[str]], names: Mapping[str, str]) -> Identity:
    container = ""
    if p.container_id:
        container = names.get(p.container_id) or p.container_id[:12]
    return Identity(component_of(patterns, p.unit, container), p.unit, container)


# --- the shell: cached per-process facts ----------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(slots=True)
class ProcessInfo:
    pid: int
    start_ticks: int
    comm: str
    placement: Placement
    memlock: float | None  # None: unreadable
    # refreshed every cycle from /proc/<pid>/stat:
    nice: int = 0
    cpu_seconds: float = 0.0
    rss_bytes: int = 0


class ProcessTable:
    """Per-PID facts read from `proc_root`, cached while the process lives.

    Each `lookup()` reads /proc/<pid>/stat (one small read: it gives the start time that tells
    a reused PID apart, and the nice value, CPU time and RSS that change). The cgroup, name and
    memlock limit are read only when (pid, start time) is new. `evict_except()` forgets PIDs
    not seen in the current cycle, so no stale entry survives a dead process.
    """

    def __init__(self, proc_root: str = "/proc") -> None:
        self.proc_root = proc_root.rstrip("/") or "/"
        self._cache: dict[int, ProcessInfo] = {}
        self.reads = 0  # cache misses, for tests and the benchmark

    def _read(self, pid: int, name: str) -> str:
        with open(f"{self.proc_root}/{pid}/{name}", "rb") as f:
            return f.read().decode(errors="replace")

    def lookup(self, pid: int) -> ProcessInfo | None:
        try:
            st = parse_stat(self._read(pid, "stat"))
        except (OSError, ValueError, IndexError):
            self._cache.pop(pid, None)
            return None
        info = self._cache.get(pid)
        if info is None or info.start_ticks != st.start_ticks:
            try:
                where = locate(self._read(pid, "cgroup"))
            except OSError:
                self._cache.pop(pid, None)
                return None
            try:
                memlock: float | None = parse_memlock(self._read(pid, "limits"))
            except (OSError, ValueError):
                memlock = None
            info = ProcessInfo(pid, st.start_ticks, st.comm, where, memlock)
            self._cache[pid] = info
            self.reads += 1
        info.nice = st.nice
        info.cpu_seconds = st.cpu_ticks / CLK_TCK
        info.rss_bytes = st.rss_pages * PAGE_SIZE
        return info

    def evict_except(self, live: Iterable[int]) -> None:
        keep = set(live)
        for pid in [p for p in self._cache if p not in keep]:
            del self._cache[pid]

    def __len__(self) -> int:
        return len(self._cache)


def cgroup_mounts(mountinfo_text: str) -> dict[str, str]:
    """Hierarchy key (as in parse_proc_cgroup: "" for v2) -> mount point, from /proc/self/mountinfo."""
    out: dict[str, str] = {}
    for line in mountinfo_text.splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        if fields[3] != "/":
            continue  # a bind of a sub-tree; paths in /proc/<pid>/cgroup are relative to the root
        if rest[0] == "cgroup2":
            out.setdefault("", fields[4])
        elif rest[0] == "cgroup":
            opts = rest[2].split(",")
            ctrls = [o for o in opts if o not in ("rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec",
                                                   "clone_children", "nsdelegate", "xattr")
                     and not o.startswith("release_agent")]
            out.setdefault(",".join(ctrls), fields[4])
    return out


def cgroup_pids(mount: str, path: str, limit: int = 4096) -> list[int]:
    """PIDs in a cgroup and its descendants (a unit's subtree), at most `limit`."""
    pids: list[int] = []
    top = os.path.join(mount, path.lstrip("/"))
    for dirpath, _, files in os.walk(top):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.extend(int(x) for x in f.read().split())
        except OSError:
            continue
        if len(pids) >= limit:
            break
    return pids[:limit]
