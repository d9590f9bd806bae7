"""NVML source: GPU use per Immich process, attributed to its systemd unit or container.

Layers, from the driver up:
- `NvmlReader` (runs only on the source's dedicated `BlockingWorker` thread): all calls into
  nvidia-ml-py, with NVML's quirks handled once: the two-call size protocol, `usedGpuMemory`
  N/A, the 535-era process struct, the per-device utilisation cursor and the fallback from
  `nvmlDeviceGetProcessUtilization` to `nvmlDeviceGetProcessesUtilizationInfo`. It returns
  plain `GpuReading`s.
- `UtilTracker` (pure state): per-process utilisation with "no new samples" held for a bounded
  time, forgotten as soon as the process leaves the GPU.
- `gpu_samples()` / `process_samples()` (pure): readings + attribution -> `Sample`s.
- `NvmlSource`: the loop. Init once; re-init with backoff after GpuIsLost, Uninitialized,
  DriverNotLoaded or LibRmVersionMismatch; a missing library is retried every
  `nvml.retry-interval`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import re
import time
from typing import Any, Iterable, Mapping, Sequence

from .. import attribution as attr
from ..docker_api import DockerClient
from ..core import CollectResult, Sample, SourceDown, sample
from .base import BlockingWorker, Source

log = logging.getLogger("immich_gpu_exporter.nvml")

# NVML errors after which the library handle is unusable until nvmlShutdown + nvmlInit.
REINIT_ERRORS = ("NVMLError_GpuIsLost", "NVMLError_Uninitialized", "NVMLError_DriverNotLoaded",
                 "NVMLError_LibRmVersionMismatch")
_UNSUPPORTED = ("NVMLError_NotSupported", "NVMLError_FunctionNotFound")
NA_ULL = 2**64 - 1
SUCCESS, INSUFFICIENT_SIZE = 0, 7


def error_reason(e: BaseException) -> str:
    """NVMLError_GpuIsLost -> gpu_is_lost (a bounded label value)."""
    name = type(e).__name__.removeprefix("NVMLError_")
    if name == "NVMLError":
        return "nvml_error"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# --- plain data ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class UtilSample:
    pid: int
    timestamp: int  # microseconds, CPU epoch
    sm: int  # percent
    memory: int
    encoder: int
    decoder: int


@dataclasses.dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    utilization: float | None  # ratio
    memory_used: int | None
    memory_total: int | None
    processes: Mapping[int, int | None]  # pid -> used bytes (None: N/A)
    samples: tuple[UtilSample, ...]
    util_supported: bool


@dataclasses.dataclass(frozen=True, slots=True)
class NvmlReading:
    driver_version: str
    gpus: tuple[GpuReading, ...]
    errors: tuple[str, ...]


def merge_processes(*lists: Iterable[tuple[int, int | None]]) -> dict[int, int | None]:
    """Compute + graphics lists -> pid -> bytes. A PID in both lists holds one allocation
    (NVML reports the process's total in each), so take the larger known value, not the sum."""
    out: dict[int, int | None] = {}
    for lst in lists:
        for pid, mem in lst:
            if mem is not None and mem >= NA_ULL:
                mem = None
            old = out.get(pid)
            out[pid] = mem if old is None else (old if mem is None else max(old, mem))
    return out


# --- the 535-era process struct -------------------------------------------------------------------

class _ProcessInfo(ctypes.Structure):  # v2/v3 layout, 24 bytes
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


class _ProcessInfo535(ctypes.Structure):  # layout of the _v3 calls in 535-era drivers, 32 bytes
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint),
                ("usedGpuCcProtectedMemory", ctypes.c_ulonglong)]


def is_535_layout(lib: Any) -> bool:
    """535-era drivers briefly widened the _v3 process struct (usedGpuCcProtectedMemory) and
    reverted it when nvmlDeviceGetRunningProcessDetailList arrived; they are recognisable by
    exporting nvmlDeviceGetConfComputeMemSizeInfo without that function."""
    return hasattr(lib, "nvmlDeviceGetConfComputeMemSizeInfo") and not hasattr(
        lib, "nvmlDeviceGetRunningProcessDetailList")


# --- the reader (worker thread only) ----------------------------------------------------------------

class NvmlReader:
    def __init__(self, window_s: float) -> None:
        import pynvml

        self.nv = pynvml
        self.window_us = int(max(window_s, 1.0) * 1e6)
        self.driver_version = ""
        self.legacy_535 = False
        self._cursors: dict[str, int] = {}
        self._util_call: dict[str, str] = {}  # uuid -> "v1" | "v2" | "none"
        self._proc_symbols: tuple[str, type] | None = None

    def init(self) -> None:
        nv = self.nv
        nv.nvmlInit()
        self.legacy_535 = is_535_layout(nv.nvmlLib)
        self._proc_symbols = ("_v3", _ProcessInfo535 if self.legacy_535 else _ProcessInfo)
        self._cursors.clear()
        self._util_call.clear()
        try:
            self.driver_version = nv.nvmlSystemGetDriverVersion()
        except nv.NVMLError:
            self.driver_version = ""
        if self.legacy_535:
            log.info("NVML: driver %s uses the 535-era process struct; reading it with the 32-byte layout",
                     self.driver_version)

    def shutdown(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception:  # the handle is already broken; nothing else to release
            pass

    def _processes(self, handle: Any, kind: str) -> list[tuple[int, int | None]]:
        nv = self.nv
        assert self._proc_symbols is not None
        suffix, struct = self._proc_symbols
        try:
            fn = nv._nvmlGetFunctionPointer(f"nvmlDeviceGet{kind}RunningProcesses{suffix}")
        except nv.NVMLError_FunctionNotFound:
            if suffix == "_v2":
                raise
            self._proc_symbols = ("_v2", _ProcessInfo)  # pre-R510 drivers
            return self._processes(handle, kind)
        count = ctypes.c_uint(0)
        ret = fn(handle, ctypes.byref(count), None)
        for _ in range(4):  # processes may start between the two calls
            if ret == SUCCESS and count.value == 0:
                return []
            if ret != INSUFFICIENT_SIZE:
                raise nv.NVMLError(ret)
            n = count.value * 2 + 5
            arr = (struct * n)()
            count.value = n
            ret = fn(handle, ctypes.byref(count), arr)
            if ret == SUCCESS:
                return [(arr[i].pid, arr[i].usedGpuMemory) for i in range(count.value)]
        raise nv.NVMLError(ret)

    def _samples(self, handle: Any, uuid: str, now_us: int) -> tuple[list[UtilSample], bool]:
        nv = self.nv
        cursor = self._cursors.get(uuid)
        if cursor is None or cursor > now_us + 1_000_000:  # first call, or the clock went back
            cursor = now_us - self.window_us
        call = self._util_call.get(uuid, "v1")
        out: list[UtilSample] = []
        while call != "none":
            try:
                if call == "v1":
                    raw = nv.nvmlDeviceGetProcessUtilization(handle, cursor)
                    out = [UtilSample(s.pid, s.timeStamp, s.smUtil, s.memUtil, s.encUtil, s.decUtil) for s in raw]
                else:
                    raw = nv.nvmlDeviceGetProcessesUtilizationInfo(handle, cursor)
                    out = [UtilSample(s.pid, s.timeStamp, s.smUtil, s.memUtil, s.encUtil, s.decUtil) for s in raw]
                break
            except (nv.NVMLError_NotFound, nv.NVMLError_InsufficientSize):
                # NotFound: nothing newer than the cursor. InsufficientSize on pynvml's second
                # call: a process started between its size query and the read. Both mean "no
                # new samples this cycle"; the held values stay.
                break
            except (nv.NVMLError_NotSupported, nv.NVMLError_FunctionNotFound, AttributeError):
                call = "v2" if call == "v1" else "none"
                self._util_call[uuid] = call
        if out:
            cursor = max(cursor, max(s.timestamp for s in out))
        self._cursors[uuid] = cursor
        return out, call != "none"

    def read(self, now_us: int) -> NvmlReading:
        """One pass over every GPU. Re-init errors propagate; others are recorded per call."""
        nv = self.nv
        errors: list[str] = []

        def soft(fn: Any, *args: Any) -> Any:
            try:
                return fn(*args)
            except nv.NVMLError as e:
                if type(e).__name__ in REINIT_ERRORS:
                    raise
                if type(e).__name__ not in _UNSUPPORTED:
                    errors.append(error_reason(e))
                return None

        gpus = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            uuid = soft(nv.nvmlDeviceGetUUID, h) or f"index-{i}"
            name = soft(nv.nvmlDeviceGetName, h) or ""
            util = soft(nv.nvmlDeviceGetUtilizationRates, h)
            mem = soft(nv.nvmlDeviceGetMemoryInfo, h)
            compute = soft(self._processes, h, "Compute") or []
            graphics = soft(self._processes, h, "Graphics") or []
            procs = merge_processes(compute, graphics)
            try:
                samples, supported = self._samples(h, uuid, now_us)
            except nv.NVMLError as e:
                if type(e).__name__ in REINIT_ERRORS:
                    raise
                errors.append(error_reason(e))
                samples, supported = [], False
            gpus.append(GpuReading(
                i, uuid, name, util.gpu / 100 if util is not None else None,
                mem.used if mem is not None else None, mem.total if mem is not None else None,
                procs, tuple(samples), supported))
        return NvmlReading(self.driver_version, tuple(gpus), tuple(errors))


# --- utilisation state (pure) ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Util:
    sm: float
    memory: float
    encoder: float
    decoder: float


ZERO = Util(0.0, 0.0, 0.0, 0.0)


class UtilTracker:
    """Latest utilisation per (GPU, PID), held for `hold` seconds when no new sample comes.

    NVML returns only samples newer than the cursor, and NotFound when there are none; a process
    that is on the GPU but shows no sample for longer than `hold` is reported idle (0).
    Processes that left the GPU are forgotten at once, so a reused PID starts from nothing.
    """

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self._last: dict[tuple[str, int], tuple[Util, float]] = {}

    def update(self, uuid: str, samples: Iterable[UtilSample], live_pids: Iterable[int], now: float) -> dict[int, Util]:
        live = set(live_pids)
        for s in sorted(samples, key=lambda s: s.timestamp):  # the newest sample of a PID wins
            # Drivers have been seen returning percentages far above 100 for stale or zombie
            # entries (nvtop #110); such a sample is garbage, not a reading.
            if s.pid in live and all(0 <= v <= 100 for v in (s.sm, s.memory, s.encoder, s.decoder)):
                self._last[(uuid, s.pid)] = (Util(s.sm / 100, s.memory / 100, s.encoder / 100, s.decoder / 100), now)
        out: dict[int, Util] = {}
        for pid in live:
            got = self._last.get((uuid, pid))
            out[pid] = got[0] if got is not None and now - got[1] <= self.hold else ZERO
        return out

    def forget_except(self, live: Iterable[tuple[str, int]]) -> None:
        keep = set(live)
        for k in [k for k in self._last if k not in keep]:
            del self._last[k]


# --- samples (pure) ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class ProcView:
    """What the sample builders need of one process (from attribution.ProcessInfo)."""

    pid: int
    comm: str
    who: attr.Identity
    nice: int | None = None
    memlock: float | None = None
    rss: int | None = None
    cpu: float | None = None
    start: int | None = None  # start time in clock ticks: tells a reused PID apart


def gpu_samples(reading: NvmlReading, utils: Mapping[str, Mapping[int, Util]], procs: Mapping[int, ProcView],
                pid_labels: bool) -> list[Sample]:
    out: list[Sample] = []
    for g in reading.gpus:
        gl = {"gpu": str(g.index), "uuid": g.uuid}
        # core.sample() takes the metric name as `name`, so this label goes in by hand.
        info = dict(gl, name=g.name, driver_version=reading.driver_version)
        out.append(Sample("immich_gpu_info", tuple(sorted(info.items())), 1.0))
        if g.utilization is not None:
            out.append(sample("immich_gpu_utilization_ratio", g.utilization, **gl))
        if g.memory_used is not None:
            out.append(sample("immich_gpu_memory_used_bytes", g.memory_used, **gl))
        if g.memory_total is not None:
            out.append(sample("immich_gpu_memory_total_bytes", g.memory_total, **gl))
        groups: dict[attr.Identity, list[int]] = {}
        for pid in g.processes:
            groups.setdefault(procs[pid].who, []).append(pid)
        util = utils.get(g.uuid, {})
        for who, pids in sorted(groups.items(), key=lambda kv: (kv[0].component, kv[0].unit, kv[0].container)):
            lab = dict(gl, component=who.component, unit=who.unit, container=who.container)
            out.append(sample("immich_gpu_processes", len(pids), **lab))
            known = [g.processes[p] for p in pids if g.processes[p] is not None]
            if known:  # all N/A (MIG, WDDM): no series rather than a false 0
                out.append(sample("immich_gpu_process_memory_used_bytes", sum(known), **lab))  # type: ignore[arg-type]
            if g.util_supported:
                us = [util.get(p, ZERO) for p in pids]
                out.append(sample("immich_gpu_process_sm_utilization_ratio", sum(u.sm for u in us), **lab))
                out.append(sample("immich_gpu_process_memory_utilization_ratio", sum(u.memory for u in us), **lab))
                out.append(sample("immich_gpu_process_encoder_utilization_ratio", sum(u.encoder for u in us), **lab))
                out.append(sample("immich_gpu_process_decoder_utilization_ratio", sum(u.decoder for u in us), **lab))
            if pid_labels:
                for p in sorted(pids):
                    pl = dict(lab, pid=str(p), comm=procs[p].comm)
                    if g.processes[p] is not None:
                        out.append(sample("immich_gpu_pid_memory_used_bytes", g.processes[p], **pl))  # type: ignore[arg-type]
                    if g.util_supported:
                        out.append(sample("immich_gpu_pid_sm_utilization_ratio", util.get(p, ZERO).sm, **pl))
    return out


class CpuTotals:
    """Keeps immich_process_cpu_seconds_total a real counter.

    A plain sum over the group's live processes drops whenever one exits (the ML worker after every
    idle timeout), which Prometheus reads as a counter reset and turns into a spike. So the CPU time
    of a process that left the group is carried forward (as process-exporter does). A process that
    comes back (group membership flickered because the systemd source missed a cycle) is taken off
    the carried amount again, so nothing is counted twice. Keys are (pid, start time).
    """

    MAX_RETIRED = 512  # per group; a process gone for longer than that many exits is forgotten

    def __init__(self) -> None:
        self._live: dict[attr.Identity, dict[tuple[int, int | None], float]] = {}
        self._retired: dict[attr.Identity, dict[tuple[int, int | None], float]] = {}
        self._carried: dict[attr.Identity, float] = {}

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
                out[who] = carried + sum(cur.values())
            else:
                self._live.pop(who, None)
        return out


def process_samples(groups: Mapping[attr.Identity, Sequence[ProcView]],
                    cpu_totals: Mapping[attr.Identity, float] | None = None) -> list[Sample]:
    """The tuning in force per component group: lowest nice and memlock, summed RSS; CPU seconds
    from `cpu_totals` (CpuTotals, monotonic) or, without it, summed over the live processes."""
    out: list[Sample] = []
    for who, members in sorted(groups.items(), key=lambda kv: (kv[0].component, kv[0].unit, kv[0].container)):
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


def component_gpu_memory(reading: NvmlReading, procs: Mapping[int, ProcView], components: Iterable[str]) -> dict[str, int]:
    mem = {c: 0 for c in components}
    for g in reading.gpus:
        for pid, used in g.processes.items():
            if used is not None:
                c = procs[pid].who.component
                mem[c] = mem.get(c, 0) + used
    return mem


# --- the source ---------------------------------------------------------------------------------------

class NvmlSource(Source):
    name = "nvml"

    def __init__(self, config, hub):  # type: ignore[no-untyped-def]
        super().__init__(config, hub)
        self._worker = BlockingWorker("nvml")
        self._reader: NvmlReader | None = None
        self._inited = False
        self._next_init = 0.0  # monotonic time before which no init is tried
        self._down: SourceDown | None = None
        self._backoff = self._base_backoff
        self.patterns = {"ml": tuple(config["component.ml"]), "server": tuple(config["component.server"])}
        self._table = attr.ProcessTable(config["proc.root"])
        self._docker = DockerClient(config["docker.socket"])
        self._tracker = UtilTracker(hold=max(3 * self.interval, 15.0))
        self._cpu = CpuTotals()
        self._mounts: dict[str, str] | None = None

    @property
    def interval(self) -> float:
        return float(self.config["nvml.interval"])

    @property
    def _base_backoff(self) -> float:
        return min(self.interval, float(self.config["nvml.retry-interval"]))

    # -- worker-thread side ------------------------------------------------------------------------------
    def _ensure_init(self) -> NvmlReader:
        if self._inited and self._reader is not None:
            return self._reader
        now = time.monotonic()
        if now < self._next_init and self._down is not None:
            raise SourceDown(self._down.reason, f"{self._down.detail} (next attempt in {self._next_init - now:.0f}s)")
        try:
            import pynvml
        except ImportError:
            raise SourceDown("no_pynvml", "nvidia-ml-py is not installed") from None
        if self._reader is None:
            self._reader = NvmlReader(self.interval)
        try:
            self._reader.init()
        except pynvml.NVMLError_LibraryNotFound:
            self._next_init = now + float(self.config["nvml.retry-interval"])
            self._down = SourceDown("library_not_found", "libnvidia-ml.so.1 not found (no NVIDIA driver?)")
            raise self._down from None
        except pynvml.NVMLError as e:
            self._fail(e, "nvmlInit")
        self._inited = True
        self._down = None
        log.info("NVML initialised (driver %s)", self._reader.driver_version or "unknown")
        return self._reader

    def _fail(self, e: Exception, what: str) -> None:
        """Shut NVML down and schedule a re-init with exponential backoff."""
        if self._reader is not None and self._inited:
            self._reader.shutdown()
        self._inited = False
        self._next_init = time.monotonic() + self._backoff
        reason = error_reason(e) if type(e).__name__.startswith("NVMLError") else "error"
        self._down = SourceDown(reason, f"{what}: {e}; re-initialising in {self._backoff:g}s")
        self._backoff = min(self._backoff * 2, float(self.config["nvml.retry-interval"]))
        raise self._down from None

    def _mount_table(self) -> dict[str, str]:
        if self._mounts is None:
            try:
                with open("/proc/self/mountinfo") as f:
                    self._mounts = attr.cgroup_mounts(f.read())
            except OSError:
                self._mounts = {}
        return self._mounts

    def _read_gpus(self) -> tuple[NvmlReading, dict[int, attr.ProcessInfo | None]]:
        reader = self._ensure_init()
        nv = reader.nv
        try:
            reading = reader.read(time.time_ns() // 1000)
        except nv.NVMLError as e:
            if type(e).__name__ in REINIT_ERRORS:
                self._fail(e, "NVML")
            raise SourceDown(error_reason(e), f"NVML: {e}") from None
        self._backoff = self._base_backoff
        infos = {pid: self._table.lookup(pid) for g in reading.gpus for pid in g.processes}
        return reading, infos

    def _read_members(self, unit_pids: Mapping[str, Sequence[int]], cgroups: Iterable[tuple[str, str]],
                      keep: Iterable[int]) -> dict[int, attr.ProcessInfo | None]:
        """Processes of the Immich units and containers, also those not on the GPU (the gunicorn
        arbiter, the server's other workers): from systemd's facts, else from the cgroup tree."""
        mounts = self._mount_table()
        wanted = {p for pids in unit_pids.values() for p in pids}
        for hierarchy, path in cgroups:
            mount = mounts.get(hierarchy)
            if mount:
                wanted.update(attr.cgroup_pids(mount, path))
        keep = set(keep)
        infos = {pid: self._table.lookup(pid) for pid in wanted - keep}  # GPU PIDs were read this cycle
        self._table.evict_except(set(infos) | keep)
        return infos

    # -- event-loop side -----------------------------------------------------------------------------------
    async def collect(self) -> CollectResult:
        unit_pids = {u: tuple(p) for u, p in (self.hub.facts("systemd").get("unit_pids") or {}).items()
                     if attr.component_of(self.patterns, u) != attr.OTHER}
        reading, infos = await self._worker.call(self._read_gpus)
        ids = {i.placement.container_id for i in infos.values() if i is not None and i.placement.container_id}
        names = await self._docker.names(ids) if ids else {}
        self._docker.forget_except(ids)

        def view(pid: int, info: attr.ProcessInfo | None) -> ProcView:
            if info is None:  # gone, or in a PID namespace we cannot see
                return ProcView(pid, "", attr.Identity(attr.OTHER, "", ""))
            return ProcView(pid, info.comm, attr.identity(info.placement, self.patterns, names),
                            info.nice, info.memlock, info.rss_bytes, info.cpu_seconds, info.start_ticks)

        views = {pid: view(pid, info) for pid, info in infos.items()}
        # Immich groups seen on the GPU whose membership systemd does not already give.
        cgroups = {(i.placement.hierarchy, i.placement.owner_cgroup) for pid, i in infos.items()
                   if i is not None and views[pid].who.component != attr.OTHER and i.placement.owner_cgroup
                   and (i.placement.container_id or i.placement.unit not in unit_pids)}
        groups: dict[attr.Identity, dict[int, ProcView]] = {}
        if unit_pids or cgroups:
            members = await self._worker.call(self._read_members, unit_pids, cgroups, infos)
            by_unit = {p: u for u, pids in unit_pids.items() for p in pids}
            for pid, info in members.items():
                v = views.get(pid) or view(pid, info)
                if pid in by_unit and not (info and info.placement.container_id):
                    u = by_unit[pid]
                    v = dataclasses.replace(v, who=attr.Identity(attr.component_of(self.patterns, u), u, ""))
                if v.who.component != attr.OTHER and v.nice is not None:
                    groups.setdefault(v.who, {})[pid] = v
        else:
            self._table.evict_except(infos)  # the worker is idle: its last call has returned
        for pid, v in views.items():
            if v.who.component != attr.OTHER and v.nice is not None:
                groups.setdefault(v.who, {})[pid] = v

        now = time.monotonic()
        utils = {g.uuid: self._tracker.update(g.uuid, g.samples, g.processes, now) for g in reading.gpus}
        self._tracker.forget_except((g.uuid, pid) for g in reading.gpus for pid in g.processes)

        samples = gpu_samples(reading, utils, views, bool(self.config["gpu.pid-labels"]))
        grouped = {k: list(v.values()) for k, v in groups.items()}
        samples += process_samples(grouped, self._cpu.update(grouped))
        facts = {
            "component_gpu_memory": component_gpu_memory(reading, views, self.patterns),
            "gpu_pids": tuple(sorted(views)),
        }
        return CollectResult(tuple(samples), facts, reading.errors)

    async def close(self) -> None:
        reader = self._reader
        if reader is not None and self._inited:
            try:
                self._worker.submit_nowait(reader.shutdown)
            except RuntimeError:
                pass
        self._worker.shutdown()
        await self._docker.close()
