"""processes source: which processes are Immich's, and what /proc says about them.

Owns the answer to "which PIDs belong to Immich" for the whole exporter:
- the Immich systemd units' PIDs from the systemd source's facts (`unit_pids`) where it runs;
- a walk of the cgroup tree for the owners whose name says Immich: units matching the
  component patterns (only when the systemd source gives no facts) and containers, whose
  component comes from the Docker/Podman API (`docker_api`: compose service, image, name
  patterns), so Immich in Docker is found with or without a GPU in use;
- the per-process facts read from /proc (`attribution.ProcessTable`: nice, memlock limit, RSS,
  CPU, start time), grouped per identity (component, unit, container) into the
  `immich_process_*` series, with the CPU time of exited processes carried forward (`CpuTotals`);
- the ML processes' CPU seconds by the execution provider in force when they were spent
  (`ProviderCpu`, the journal's `effective_provider` fact), persisted in the state directory so an
  exporter restart neither loses nor counts twice what the processes spent meanwhile.

Publishes the fact `identities` (PID -> `attribution.Identity`) with `comms` (PID -> name) and
`containers` (container id -> Identity of its processes) for the NVML source, which labels GPU
processes through them. The grouping and counting code is pure; the tree walk and the /proc reads
run on the source's own worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

from .. import attribution as attr
from ..core import CollectResult, Sample, sample
from ..docker_api import ContainerInfo, DockerClient, container_component
from .base import BlockingWorker, Source

log = logging.getLogger("immich_gpu_exporter.processes")

ML = "ml"
STATE_FILE = "processes-state.json"
STATE_VERSION = 1
PERSIST_EVERY = 10.0  # seconds between state writes while ML CPU accrues
MAX_SCAN_DIRS = 20000  # cgroup directories visited per hierarchy and cycle, at most


# --- plain data and the pure core ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class ProcView:
    """What the grouping needs of one process (from attribution.ProcessInfo)."""

    pid: int
    comm: str
    who: attr.Identity
    nice: int | None = None
    memlock: float | None = None
    rss: int | None = None
    cpu: float | None = None
    start: int | None = None  # start time in clock ticks: tells a reused PID apart


def _order(who: attr.Identity) -> tuple[str, str, str]:
    return who.component, who.unit, who.container


class CpuTotals:
    """Keeps immich_process_cpu_seconds_total a real counter.

    A plain sum over the group's live processes drops whenever one exits (the ML worker after every
    idle timeout), which Prometheus reads as a counter reset and turns into a spike. So the CPU time
    of a process that left the group is carried forward (as process-exporter does). A process that
    comes back (group membership flickered because a source missed a cycle) is taken off the
    carried amount again, so nothing is counted twice. Keys are (pid, start time).
    """

    MAX_RETIRED = 512  # per group; a process gone for longer than that many exits is forgotten

    def __init__(self) -> None:
        self._live: dict[attr.Identity, dict[tuple[int, int | None], float]] = {}
        self._retired: dict[attr.Identity, dict[tuple[int, int | None], float]] = {}
        self._carried: dict[attr.Identity, float] = {}
        self._reported: dict[attr.Identity, float] = {}

    def update(self, groups: Mapping[attr.Identity, Sequence[ProcView]]) -> dict[attr.Identity, float]:
        out: dict[attr.Identity, float] = {}
        for who in set(groups) | set(self._live):
            cur = {(m.pid, m.start): m.cpu or 0.0 for m in groups.get(who, ()) if m.nice is not None}
            retired = self._retired.setdefault(who, {})
            carried = self._carried.get(who, 0.0)
            for key, cpu in self._live.get(who, {}).items():
                if key not in cur:
                    retired[key] = cpu
                    carried += cpu
            for key in cur:
                if key in retired:
                    carried -= retired.pop(key)
            while len(retired) > self.MAX_RETIRED:
                retired.pop(next(iter(retired)))
            self._carried[who] = carried
            if cur:
                self._live[who] = cur
                # Sums in another order can come out an ulp lower, and Prometheus would read that as a reset.
                out[who] = self._reported[who] = max(carried + sum(cur.values()), self._reported.get(who, 0.0))
            else:
                self._live.pop(who, None)
        return out


def process_samples(groups: Mapping[attr.Identity, Sequence[ProcView]],
                    cpu_totals: Mapping[attr.Identity, float] | None = None) -> list[Sample]:
    """The tuning in force per component group: lowest nice and memlock, summed RSS; CPU seconds
    from `cpu_totals` (CpuTotals, monotonic) or, without it, summed over the live processes."""
    out: list[Sample] = []
    for who, members in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        live = [m for m in members if m.nice is not None]
        if not live:
            continue
        lab = {"component": who.component, "unit": who.unit, "container": who.container}
        out.append(sample("immich_process_nice", min(m.nice for m in live), **lab))  # type: ignore[type-var]
        limits = [m.memlock for m in live if m.memlock is not None]
        if limits:
            out.append(sample("immich_process_memlock_limit_bytes", min(limits), **lab))
        out.append(sample("immich_process_resident_memory_bytes", sum(m.rss or 0 for m in live), **lab))
        cpu = cpu_totals[who] if cpu_totals is not None and who in cpu_totals else sum(m.cpu or 0.0 for m in live)
        out.append(sample("immich_process_cpu_seconds_total", cpu, **lab))
    return out


def identity_of(p: attr.Placement, patterns: Mapping[str, Sequence[str]],
                containers: Mapping[str, ContainerInfo], unit: str | None = None) -> attr.Identity:
    """A process's identity from its placement (pure). `unit` is systemd's word where it gave one.
    A container is named by the engine (else its short id) and placed by `container_component`;
    a unit by the patterns."""
    unit = p.unit if unit is None else unit
    if p.container_id:
        info = containers.get(p.container_id)
        name = info.name if info is not None else p.container_id[:12]
        component = container_component(patterns, name, info)
        if component == attr.OTHER and unit:
            component = attr.component_of(patterns, unit)
        return attr.Identity(component, unit if p.unit else "", name)
    return attr.Identity(attr.component_of(patterns, unit), unit, "")


class ProviderCpu:
    """The ML processes' CPU seconds by the execution provider in force when they were spent (pure).

    Fed one observation per cycle: the live ML processes' cumulative CPU seconds keyed by (pid,
    start time), the time since boot, and the provider now in force. The CPU a process spent
    between two observations goes to the provider in force at the earlier one (the rule of the
    job-seconds counters in timings.py, so both sides of a per-job ratio are split alike).

    - The first observation ever is a baseline: nothing is counted for processes already running.
    - A process first seen later counts whole if it started after the previous observation (a new
      worker), from zero otherwise (it was there, just not known to be Immich's: a baseline).
    - `dump()`/`load()` carry the totals, the last reading and the provider across an exporter
      restart: a process still alive counts from its last reading, one started meanwhile counts
      whole. A different boot id means every process started after the last reading.
    - CPU a process spent after its last observation and before it exited is not seen (at most one
      cycle's worth); nothing is ever counted twice.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.provider = ""  # in force since the last observation
        self._last: dict[tuple[int, int], float] | None = None
        self._last_uptime = 0.0
        self.boot_id = ""

    def observe(self, uptime: float, cpu: Mapping[tuple[int, int], float], start_seconds: Callable[[int], float],
                provider: str | None) -> float:
        """Count one cycle; returns the CPU seconds added."""
        added = 0.0
        if self._last is not None:
            for key, seconds in cpu.items():
                before = self._last.get(key)
                if before is not None:
                    added += max(0.0, seconds - before)
                elif start_seconds(key[1]) > self._last_uptime:
                    added += seconds
            self.totals[self.provider] = self.totals.get(self.provider, 0.0) + added
        self._last = dict(cpu)
        self._last_uptime = uptime
        self.provider = provider or ""
        self.totals.setdefault(self.provider, 0.0)
        return added

    def samples(self) -> list[Sample]:
        return [sample("immich_ml_cpu_seconds_total", v, provider=p) for p, v in sorted(self.totals.items())]

    def dump(self) -> dict[str, Any]:
        return {"totals": self.totals, "provider": self.provider, "boot_id": self.boot_id,
                "uptime": self._last_uptime,
                "last": [[pid, start, cpu] for (pid, start), cpu in sorted((self._last or {}).items())]}

    def load(self, data: Mapping[str, Any], boot_id: str) -> None:
        totals = {str(k): float(v) for k, v in dict(data["totals"]).items()}
        last = {(int(pid), int(start)): float(cpu) for pid, start, cpu in data["last"]}
        self.totals, self.provider = totals, str(data["provider"])
        if data.get("boot_id") == boot_id and boot_id:
            self._last, self._last_uptime = last, float(data["uptime"])
        else:  # rebooted since: every process now running started after the last reading
            self._last, self._last_uptime = {}, 0.0
        self.boot_id = boot_id


# --- the cgroup tree ------------------------------------------------------------------------------

def scan_owners(mount: str, hierarchy: str, wanted_unit: Callable[[str], bool],
                limit: int = MAX_SCAN_DIRS) -> tuple[list[attr.Placement], int]:
    """Units the caller wants and every container below `mount`: their placements (owner cgroups)
    and the number of directories visited. A container's or wanted unit's subtree is not entered:
    it belongs to its owner. Everything else with subdirectories is (slices, other units: a
    Quadlet or rootless podman container lives inside a unit)."""
    found: list[attr.Placement] = []
    stack = [("", False)]  # (cgroup, inside a unit: then no unit below is an owner, the outer one is)
    visited = 0
    while stack and visited <= limit:
        rel, in_unit = stack.pop()
        under_cgroupfs_parent = rel.rsplit("/", 1)[-1] in attr.CGROUPFS_PARENTS
        try:
            it = os.scandir(mount + rel if rel else mount)
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                visited += 1
                if visited > limit:
                    break
                name = entry.name
                child = f"{rel}/{name}"
                unit_here = in_unit
                # Only a name holding a container id (64 hex digits), a cgroupfs runtime's child or an
                # outermost unit can make an owner; placement() is the cost, so it runs for those only.
                if len(name) >= 64 or under_cgroupfs_parent:
                    p = attr.placement(child, hierarchy)
                    if p.container_id:
                        if p.owner_cgroup == p.cgroup:
                            found.append(p)
                        continue
                    unit_here = in_unit or bool(p.unit)
                elif name.endswith(attr.UNIT_SUFFIXES) and not in_unit:
                    if wanted_unit(name):
                        found.append(attr.placement(child, hierarchy))
                        continue
                    unit_here = True
                # A directory's link count is 2 + its subdirectories (cgroupfs keeps it so, like most
                # filesystems; btrfs says 1): a leaf is not listed, and a cgroup lists some 15-70
                # control files, so this saves most of the walk's cost.
                try:
                    if entry.stat(follow_symlinks=False).st_nlink == 2:
                        continue
                except OSError:
                    continue
                stack.append((child, unit_here))
    return found, visited


# v1 hierarchies worth a walk: systemd's own tree (units, systemd-driver containers) where there
# is no v2 one, and one controller for cgroupfs-driver containers (/docker/<id>).
_SCAN_V1 = ("name=systemd", "pids", "memory", "cpu,cpuacct")


def scan_roots(mounts: Mapping[str, str]) -> list[tuple[str, str]]:
    """(hierarchy, mount) pairs to walk: cgroup2 (on a hybrid host systemd mirrors its tree there),
    else name=systemd; and the first v1 controller present, for cgroupfs-driver containers."""
    out = [(h, mounts[h]) for h in ("", "name=systemd") if h in mounts][:1]
    for h in _SCAN_V1[1:]:
        if h in mounts:
            out.append((h, mounts[h]))
            break
    return out


def read_uptime(proc_root: str) -> float:
    with open(f"{proc_root}/uptime") as f:
        return float(f.read().split()[0])


def read_boot_id(proc_root: str) -> str:
    try:
        with open(f"{proc_root}/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


# --- the source -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class ProcessesReading:
    """What one cycle read: the I/O half of the source (`ProcessesSource.read`), input of the
    pure half (`ProcessesSource.publish`)."""

    infos: Mapping[int, attr.ProcessInfo]  # the Immich owners' processes and systemd's unit PIDs
    unit_of: Mapping[int, str] = dataclasses.field(default_factory=dict)  # pid -> unit, systemd's word
    containers: Mapping[str, ContainerInfo] = dataclasses.field(default_factory=dict)  # every one the engine named
    uptime: float | None = None  # seconds since boot when read (None: unknown, no ML CPU counted)


class ProcessesSource(Source):
    name = "processes"
    after = ("systemd",)

    def __init__(self, config, hub):  # type: ignore[no-untyped-def]
        super().__init__(config, hub)
        from .journal import state_directory

        self.patterns = {ML: tuple(config["component.ml"]), "server": tuple(config["component.server"])}
        self.proc_root = config["proc.root"].rstrip("/") or "/"
        self._worker = BlockingWorker("processes")
        self._table = attr.ProcessTable(self.proc_root)
        self._docker = DockerClient(config["docker.socket"])
        self._cpu = CpuTotals()
        self.ml_cpu = ProviderCpu()
        self._roots: list[tuple[str, str]] | None = None
        self._state_dir = state_directory(config["state.directory"])
        self._state_path: str | None = None
        self._last_persist = 0.0
        self._dirty = False
        self.scanned_dirs = 0  # directories visited in the last walk, for the benchmark
        # Every cycle's walk meets the same unit names; fnmatch over the globs is the walk's main cost.
        self._unit_component = functools.lru_cache(maxsize=4096)(
            lambda unit: attr.component_of(self.patterns, unit))

    # -- worker-thread side -------------------------------------------------------------------------
    def _scan_roots(self) -> list[tuple[str, str]]:
        if self._roots is None:
            root = self.config["systemd.cgroup-root"]
            if root:
                self._roots = [("", root)]
            else:
                try:
                    with open("/proc/self/mountinfo") as f:
                        self._roots = scan_roots(attr.cgroup_mounts(f.read()))
                except OSError:
                    self._roots = []
        return self._roots

    def _walk(self, systemd_units: frozenset[str]) -> list[attr.Placement]:
        """Owners in the cgroup tree: every container, and the Immich units systemd did not give."""
        def wanted(unit: str) -> bool:
            return unit not in systemd_units and self._unit_component(unit) != attr.OTHER

        owners: dict[tuple[str, str], attr.Placement] = {}
        visited = 0
        for hierarchy, mount in self._scan_roots():
            found, n = scan_owners(mount, hierarchy, wanted)
            visited += n
            for p in found:  # the same owner seen in several hierarchies counts once
                owners.setdefault(("c", p.container_id) if p.container_id else ("u", p.owner_cgroup), p)
        self.scanned_dirs = visited
        return list(owners.values())

    def _members(self, unit_pids: Mapping[str, Sequence[int]], owners: Sequence[attr.Placement]) -> ProcessesReading:
        """/proc facts of the units' PIDs and of the PIDs in the given owners' subtrees."""
        mounts = dict(self._scan_roots())
        unit_of = {pid: u for u, pids in unit_pids.items() for pid in pids}
        pids = set(unit_of)
        for p in owners:
            mount = mounts.get(p.hierarchy)
            if mount:
                pids.update(attr.cgroup_pids(mount, p.owner_cgroup))
        infos = {}
        for pid in pids:
            info = self._table.lookup(pid)
            if info is not None:
                infos[pid] = info
        self._table.evict_except(infos)
        try:
            uptime: float | None = read_uptime(self.proc_root)
        except (OSError, ValueError, IndexError):
            uptime = None
        return ProcessesReading(infos, unit_of, {}, uptime)

    # -- state file ---------------------------------------------------------------------------------
    def _load_state(self, writable: bool = True) -> None:
        boot_id = read_boot_id(self.proc_root)
        self.ml_cpu.boot_id = boot_id
        path = os.path.join(self._state_dir, STATE_FILE)
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            self.ml_cpu.load(data["ml_cpu"], boot_id)
            log.info("processes: resuming the ML CPU counters from %s", path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("processes: ignoring unreadable state file %s: %s", path, e)
            self.ml_cpu = ProviderCpu()
            self.ml_cpu.boot_id = boot_id
        if not writable:
            return
        try:
            os.makedirs(self._state_dir, exist_ok=True)
            probe = os.path.join(self._state_dir, ".processes-probe")
            with open(probe, "w"):
                pass
            os.unlink(probe)
            self._state_path = path
        except OSError as e:
            log.warning("processes: state directory %s is not writable (%s); immich_ml_cpu_seconds_total "
                        "starts from zero at every restart", self._state_dir, e.strerror or e)

    def _serialise(self) -> str:
        return json.dumps({"version": STATE_VERSION, "ml_cpu": self.ml_cpu.dump(), "saved_at": time.time()},
                          separators=(",", ":"))

    async def _persist(self, force: bool = False) -> None:
        if self._state_path is None or not self._dirty:
            return
        if not force and time.monotonic() - self._last_persist < PERSIST_EVERY:
            return
        from .journal import write_atomic

        data = self._serialise()
        self._dirty = False
        self._last_persist = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(None, write_atomic, self._state_path, data)
        except OSError as e:
            self._dirty = True
            log.warning("processes: cannot write %s: %s", self._state_path, e)

    # -- event-loop side ----------------------------------------------------------------------------
    async def start(self) -> None:
        # The daemon binds a wake-up event before start(); a single pass (--once) does not, and then the
        # state is read (the counter continues) but never written (as the journal source's cursor).
        self._load_state(writable=self._wake is not None)

    def _cycle(self, unit_pids: Mapping[str, Sequence[int]]) -> tuple[list[attr.Placement], ProcessesReading | None]:
        """Walk, then read the members at once when the engine's answers about every container found
        are cached (the steady state: one trip to the worker thread per cycle). The loop is waiting
        on this call, so reading the client's cache here races with nothing."""
        owners = self._walk(frozenset(unit_pids))
        ids = [p.container_id for p in owners if p.container_id]
        if self._docker.pending(ids):
            return owners, None
        containers = self._docker.cached(ids)
        immich = [p for p in owners if identity_of(p, self.patterns, containers).component != attr.OTHER]
        return owners, self._members(unit_pids, immich)

    async def read(self, unit_pids: Mapping[str, Sequence[int]]) -> ProcessesReading:
        """The I/O of one cycle (the demo replaces it): walk the tree, ask the engine, read /proc."""
        # The walk finds every container; the Docker API says which are Immich's (cached per id
        # while the container lives); only the Immich owners' members are read.
        owners, reading = await self._worker.call(self._cycle, unit_pids)
        ids = [p.container_id for p in owners if p.container_id]
        containers = await self._docker.inspect(ids) if ids else {}
        if reading is None:
            immich = [p for p in owners if identity_of(p, self.patterns, containers).component != attr.OTHER]
            reading = await self._worker.call(self._members, unit_pids, immich)
        # Containers met only through a member's own cgroup (a Quadlet container inside its Immich unit).
        inner = {i.placement.container_id for i in reading.infos.values()} - set(containers) - {""}
        if inner:
            containers = {**containers, **await self._docker.inspect(inner)}
        self._docker.forget_except(set(ids) | inner)
        return dataclasses.replace(reading, containers=containers)

    def publish(self, reading: ProcessesReading, provider: str | None) -> CollectResult:
        """Group a reading into the series and facts, advance the counters (no I/O)."""
        groups: dict[attr.Identity, list[ProcView]] = {}
        identities: dict[int, attr.Identity] = {}
        comms: dict[int, str] = {}
        ml_cpu: dict[tuple[int, int], float] = {}
        for pid, info in sorted(reading.infos.items()):
            unit = reading.unit_of.get(pid) if not info.placement.container_id else None
            who = identity_of(info.placement, self.patterns, reading.containers, unit)
            if who.component == attr.OTHER:
                continue  # not Immich's: the reader passes Immich owners' members only, so never in practice
            identities[pid] = who
            comms[pid] = info.comm
            groups.setdefault(who, []).append(ProcView(pid, info.comm, who, info.nice, info.memlock, info.rss_bytes,
                                                       info.cpu_seconds, info.start_ticks))
            if who.component == ML:
                ml_cpu[(pid, info.start_ticks)] = info.cpu_seconds
        samples = process_samples(groups, self._cpu.update(groups))
        if reading.uptime is not None:
            self.ml_cpu.observe(reading.uptime, ml_cpu, lambda ticks: ticks / attr.CLK_TCK, provider)
            self._dirty = True
        samples += self.ml_cpu.samples()
        # Every container the engine named, Immich's or not: NVML names other GPU users by it too.
        containers = {cid: attr.Identity(container_component(self.patterns, c.name, c), "", c.name)
                      for cid, c in reading.containers.items()}
        return CollectResult(tuple(samples), {"identities": identities, "comms": comms, "containers": containers})

    async def collect(self) -> CollectResult:
        systemd = self.hub.facts("systemd")
        unit_pids = {u: tuple(p) for u, p in (systemd.get("unit_pids") or {}).items()
                     if attr.component_of(self.patterns, u) != attr.OTHER}
        reading = await self.read(unit_pids)
        result = self.publish(reading, self.hub.facts("journal").get("effective_provider"))
        await self._persist()
        return result

    async def close(self) -> None:
        self._worker.shutdown()
        await self._docker.close()
        if self._state_path is not None and self._dirty:
            from .journal import write_atomic

            try:
                write_atomic(self._state_path, self._serialise())
            except OSError as e:
                log.warning("processes: cannot write %s: %s", self._state_path, e)
