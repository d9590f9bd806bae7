"""`immich-gpu-exporter check`: the guide's validation script, done with the exporter's own probes.

What it owns: the verdicts. The facts come from two places, each read once:

* the sources themselves, run for one cycle each in dependency order (systemd, then processes and
  NVML, then the journal, then the Immich API), so every check sees exactly what the daemon would
  export: the same NVML reading, the same unit properties, the same provider verdict;
* a few host files the daemon does not read (`/proc/modules`, `/dev/nvidia*`, CDI specs, Docker's
  daemon.json, the ML processes' command lines and environments, the model cache), under a
  configurable root so tests and containers can point it elsewhere.

`evaluate()` is pure: `Evidence` in, `Finding`s out. `run_check()` is the shell: gather, evaluate,
print a table or JSON, exit 0 (nothing failed), 1 (something failed) or 2 (usage or config).
The JSON structure is documented in docs/check.md and versioned by its "format" key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import stat
import sys
import tempfile
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

from .core import EMPTY, Sample, Snapshot, SourceState

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
JSON_FORMAT = 1
NVIDIA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
GATHER_TIMEOUT = 20.0  # seconds for all sources together; each source also has its own timeout
MAX_FILE = 1 << 20  # bytes read from any host file (a hostile or huge file never stalls check)

# Variables that look like settings but do nothing in Immich (see ../shared/research/immich.md 1.5).
_NO_EFFECT = {
    "ONNXRUNTIME_PROVIDER": "Immich has no such variable: the provider follows the onnxruntime wheel installed",
    "ORT_TENSORRT_CACHE_PATH": "Immich never uses the TensorRT provider, so its cache path has no effect",
    "ORT_TENSORRT_ENGINE_CACHE_ENABLE": "Immich never uses the TensorRT provider",
    "MACHINE_LEARNING_TENSORRT_CACHE": "Immich has no TensorRT support",
}


@dataclasses.dataclass(frozen=True)
class Finding:
    id: str
    title: str
    status: str  # PASS, WARN, FAIL, SKIP
    finding: str
    fix: str = ""
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "status": self.status, "finding": self.finding,
                "fix": self.fix or None, "details": dict(self.details)}


# --------------------------------------------------------------------------------------------------
# host files (under a root)
# --------------------------------------------------------------------------------------------------

class Host:
    """Read-only view of host files under `root` ("/" on a real host)."""

    def __init__(self, root: str = "/") -> None:
        self.root = root or "/"

    def path(self, p: str) -> str:
        return os.path.join(self.root, p.lstrip("/"))

    def read(self, p: str, limit: int = MAX_FILE) -> str | None:
        """Text of a regular file, at most `limit` bytes; None if absent, unreadable or not regular
        (a FIFO or device must never block check)."""
        try:
            fd = os.open(self.path(p), os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return os.read(fd, limit).decode("utf-8", "replace")
        except OSError:
            return None
        finally:
            os.close(fd)

    def read_bytes(self, p: str, limit: int = MAX_FILE) -> bytes | None:
        try:
            with open(self.path(p), "rb") as f:
                return f.read(limit)
        except OSError:
            return None

    def exists(self, p: str) -> bool:
        return os.path.lexists(self.path(p))

    def listdir(self, p: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(p)))
        except OSError:
            return []

    def stat(self, p: str) -> os.stat_result | None:
        try:
            return os.stat(self.path(p))
        except OSError:
            return None


# --------------------------------------------------------------------------------------------------
# evidence
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MLProcess:
    pid: int
    cmdline: tuple[str, ...]
    environ: Mapping[str, str] | None  # None: not readable (permission)
    uid: int | None
    gids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Evidence:
    """Everything the checks judge: one cycle of each source plus host files."""

    snapshot: Snapshot
    enabled: tuple[str, ...]  # sources that ran
    host: Host
    config: Mapping[str, Any]
    ml_processes: tuple[MLProcess, ...] = ()
    unit_environment: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def state(self, source: str) -> SourceState | None:
        return self.snapshot.sources.get(source) if source in self.enabled else None

    def samples(self, name: str, source: str | None = None) -> list[Sample]:
        out = []
        for sname, st in self.snapshot.sources.items():
            if source is not None and sname != source:
                continue
            out.extend(s for s in st.samples if s.name == name)
        return out

    def facts(self, source: str) -> Mapping[str, Any]:
        return self.snapshot.facts(source)


def _labels(s: Sample) -> dict[str, str]:
    return dict(s.labels)


def _value_of(samples: Iterable[Sample], **want: str) -> float | None:
    for s in samples:
        lab = _labels(s)
        if all(lab.get(k) == v for k, v in want.items()):
            return s.value
    return None


def _one_of(samples: Iterable[Sample], label: str) -> str | None:
    """The label value of the series whose value is 1 (an enum gauge)."""
    for s in samples:
        if s.value == 1:
            return _labels(s).get(label)
    return None


def _ml_unit_names(ev: Evidence) -> list[str]:
    return list(ev.config.get("journal.unit") or ())


def _down_text(st: SourceState) -> str:
    return f"{st.last_reason}: {st.last_error}" if st.last_error and st.last_error != st.last_reason \
        else st.last_reason or "down"


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB"


# --------------------------------------------------------------------------------------------------
# the checks (pure)
# --------------------------------------------------------------------------------------------------

def _role(ev: Evidence) -> str:
    return str(ev.config.get("deployment.role") or "all")


def check_role(ev: Evidence) -> Finding:
    t = "role of this host"
    role = _role(ev)
    if role == "all":
        return Finding("role", t, PASS, "all: the server and the ML service run on this host "
                       "(--deployment.role=ml/server when the ML service runs elsewhere; docs/remote-ml.md)")
    if role == "ml":
        return Finding("role", t, PASS, "ml: this host's GPU, ML unit or container and the provider verdict are "
                       "checked here; job queues, seconds per job and Immich's ML settings only on the server "
                       "host's exporter (give both scrape targets the same `immich` label)")
    st = ev.state("remote")
    urls = list(ev.config.get("remote-ml.exporter-url") or ())
    if not urls:
        return Finding("role", t, WARN, "server: no --remote-ml.exporter-url, so seconds per job carry no "
                       "provider and the ML verdict is not seen from here",
                       "set --remote-ml.exporter-url to the ML host exporter's /metrics URL")
    ups = {dict(s.labels).get("exporter"): s.value == 1 for s in ev.samples("immich_remote_ml_exporter_up", "remote")}
    down = [u for u, ok in ups.items() if not ok]
    facts = ev.facts("remote")
    serving = facts.get("serving_ml_url")
    eff = facts.get("effective_provider")
    details = {"exporters": ups, "serving_ml_url": serving, "effective_provider": eff}
    if st is None or not st.up or down or not ups:
        which = ", ".join(down) or ", ".join(urls)
        return Finding("role", t, WARN, f"server: the ML host's exporter ({which}) does not answer; seconds per "
                       "job carry no provider meanwhile", "check that exporter and its listen address/firewall",
                       details)
    return Finding("role", t, PASS, f"server: the ML work goes to {serving or '?'} (inferred: the first healthy ML "
                   f"URL), whose exporter reports {eff or 'no provider yet'}; its GPU, units and log are checked "
                   "on that host", details=details)


def check_driver(ev: Evidence) -> Finding:
    t = "NVIDIA driver and NVML"
    st = ev.state("nvml")
    if st is None:
        return Finding("driver", t, SKIP, "the nvml collector is disabled (--no-collector.nvml)")
    if not st.up:
        fix = {"library_not_found": "install the NVIDIA driver (NixOS: hardware.nvidia + services.xserver.videoDrivers"
                                    " = [\"nvidia\"]; Debian/Ubuntu: the nvidia-driver package) and reboot",
               "driver_not_loaded": "load the kernel module (modprobe nvidia) or reboot after installing the driver",
               "no_permission": "let the exporter open /dev/nvidiactl and /dev/nvidia* (DeviceAllow=, group video)",
               }.get(st.last_reason, "see the reason; `nvidia-smi` should work on this host")
        return Finding("driver", t, FAIL, f"NVML is not usable ({_down_text(st)})", fix)
    gpus = []
    totals = {(_labels(s).get("gpu")): s.value for s in ev.samples("immich_gpu_memory_total_bytes", "nvml")}
    driver = ""
    for s in ev.samples("immich_gpu_info", "nvml"):
        lab = _labels(s)
        driver = lab.get("driver_version", driver)
        mem = totals.get(lab.get("gpu"))
        cc = (ev.facts("nvml").get("compute_capability") or {}).get(lab.get("gpu"))
        gpus.append(f"{lab.get('gpu')}: {lab.get('name')}" + (f" ({_gib(mem)})" if mem else "")
                    + (f" compute capability {cc}" if cc else ""))
    if not gpus:
        return Finding("driver", t, FAIL, f"NVML loads (driver {driver or '?'}) but sees no GPU",
                       "check `nvidia-smi -L`; a GPU passed to a VM or container needs its device nodes",
                       {"driver_version": driver})
    return Finding("driver", t, PASS, f"driver {driver}, {len(gpus)} GPU(s): " + "; ".join(gpus),
                   details={"driver_version": driver, "gpus": gpus})


def check_modules(ev: Evidence) -> Finding:
    t = "kernel modules"
    text = ev.host.read("/proc/modules")
    if text is None:
        return Finding("modules", t, SKIP, f"{ev.host.path('/proc/modules')} is not readable")
    loaded = {line.split(" ", 1)[0] for line in text.splitlines() if line.strip()}
    have = sorted(m for m in loaded if m.startswith("nvidia"))
    details = {"loaded": have}
    if "nvidia" not in loaded:
        return Finding("modules", t, FAIL, "the nvidia kernel module is not loaded",
                       "install the driver for this kernel and `modprobe nvidia` (NixOS: hardware.nvidia, then reboot)",
                       details)
    if "nvidia_uvm" not in loaded:
        return Finding("modules", t, WARN, "nvidia is loaded, nvidia_uvm is not (it loads on the first CUDA use; "
                       "if CUDA fails before that, it never loads)",
                       "`nvidia-modprobe -u -c=0` at boot, or load nvidia_uvm (NixOS: boot.kernelModules)", details)
    extra = "" if {"nvidia_drm", "nvidia_modeset"} & loaded else \
        " (nvidia_drm/nvidia_modeset not loaded: not needed on a headless host)"
    return Finding("modules", t, PASS, "nvidia and nvidia_uvm are loaded" + extra, details=details)


def _dev_nodes(host: Host) -> dict[str, bool]:
    names = host.listdir("/dev")
    return {"ctl": "nvidiactl" in names, "gpus": any(re.fullmatch(r"nvidia\d+", n) for n in names),
            "uvm": "nvidia-uvm" in names, "dri": bool(host.listdir("/dev/dri"))}


def check_devices(ev: Evidence) -> Finding:
    t = "device nodes"
    nodes = _dev_nodes(ev.host)
    listed = [n for n in ev.host.listdir("/dev") if n.startswith("nvidia")]
    details: dict[str, Any] = {"nodes": listed, "dri": ev.host.listdir("/dev/dri")}
    access = {}
    for s in ev.samples("immich_unit_device_access_info", "systemd"):
        lab = _labels(s)
        if lab.get("unit") in _ml_unit_names(ev):
            access[lab["unit"]] = lab.get("nvidia_devices", "")
    details["unit_access"] = access
    if not nodes["ctl"] or not nodes["gpus"]:
        missing = [p for p, ok in (("/dev/nvidiactl", nodes["ctl"]), ("/dev/nvidia0..N", nodes["gpus"])) if not ok]
        return Finding("devices", t, FAIL, "missing " + ", ".join(missing),
                       "the driver creates them when it loads (nvidia-modprobe); in a container pass the GPU "
                       "(--gpus / CDI)", details)
    blocked = {u: a for u, a in access.items() if a != "allowed"}
    if blocked:
        u, a = next(iter(blocked.items()))
        why = "PrivateDevices=yes hides /dev/nvidia*" if a == "private_devices" else \
            "DeviceAllow= does not allow /dev/nvidiactl, /dev/nvidiaN and /dev/nvidia-uvm read-write"
        return Finding("devices", t, FAIL, f"{u} cannot open the GPU: {why}",
                       "NixOS: services.immich.accelerationDevices = null (or list /dev/nvidia0, /dev/nvidiactl, "
                       "/dev/nvidia-uvm, /dev/nvidia-uvm-tools); elsewhere: DeviceAllow=/PrivateDevices=no", details)
    if not nodes["uvm"]:
        return Finding("devices", t, WARN, "/dev/nvidia-uvm is missing (created on the first CUDA use)",
                       "create it at boot: `nvidia-modprobe -u -c=0`", details)
    where = f"; reachable by {', '.join(access)}" if access else \
        "; the ML unit's device access is unknown (systemd collector down or unit not found)"
    return Finding("devices", t, PASS, "/dev/nvidiactl, /dev/nvidia0..N and /dev/nvidia-uvm present" + where,
                   details=details)


def _cdi_specs(host: Host) -> list[tuple[str, str]]:
    out = []
    for d in ("/etc/cdi", "/var/run/cdi", "/run/cdi"):
        for n in host.listdir(d):
            if n.endswith((".yaml", ".yml", ".json")):
                text = host.read(f"{d}/{n}")
                if text is not None and "nvidia.com" in text:
                    out.append((f"{d}/{n}", text))
    return out


def check_container_gpu(ev: Evidence) -> Finding:
    t = "container GPU access (CDI / runtime)"
    specs = _cdi_specs(ev.host)
    driver = next((_labels(s).get("driver_version") for s in ev.samples("immich_gpu_info", "nvml")), None)
    if driver is None:
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", ev.host.read("/proc/driver/nvidia/version") or "")
        driver = m.group(1) if m else None
    daemon_json = ev.host.read("/etc/docker/daemon.json")
    nvidia_runtime = False
    if daemon_json:
        try:
            nvidia_runtime = "nvidia" in (json.loads(daemon_json).get("runtimes") or {})
        except (ValueError, AttributeError):
            nvidia_runtime = False
    details = {"cdi_specs": [p for p, _ in specs], "nvidia_runtime": nvidia_runtime, "driver_version": driver}
    if specs:
        stale = [p for p, text in specs if driver and driver not in text and re.search(r"\.so\.\d+\.\d+", text)]
        if stale:
            return Finding("container_gpu", t, WARN,
                           f"CDI spec {stale[0]} names another driver version than the loaded {driver}",
                           "regenerate it: NixOS `systemctl restart nvidia-container-toolkit-cdi-generator`, "
                           "elsewhere `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml` (or nvidia-cdi-refresh)",
                           details)
        return Finding("container_gpu", t, PASS, f"CDI spec present: {', '.join(p for p, _ in specs)}"
                       + (f" (driver {driver})" if driver else ""), details=details)
    if nvidia_runtime:
        return Finding("container_gpu", t, PASS, "Docker has the nvidia runtime configured (/etc/docker/daemon.json)",
                       details=details)
    return Finding("container_gpu", t, SKIP, "no NVIDIA CDI spec (/etc/cdi, /var/run/cdi) and no nvidia runtime in "
                   "Docker: containers are not given the GPU this way (fine when Immich runs as units)",
                   details=details)


def check_services(ev: Evidence) -> Finding:
    t = "Immich services running"
    st = ev.state("systemd")
    if st is None or not st.up:
        why = "the systemd collector is disabled" if st is None else f"systemd is not reachable ({_down_text(st)})"
        return Finding("services", t, SKIP, why)
    wanted = list(ev.config.get("journal.server-unit") or ()) + _ml_unit_names(ev)
    states = {}
    for s in ev.samples("immich_unit_state", "systemd"):
        lab = _labels(s)
        if s.value == 1 and lab.get("unit") in wanted:
            states[lab["unit"]] = lab.get("state", "")
    loads = {_labels(s).get("unit"): _labels(s).get("load_state") for s in ev.samples("immich_unit_info", "systemd")}
    details = {"units": {u: states.get(u, "unknown") for u in wanted}}
    missing = [u for u in wanted if loads.get(u) == "not-found"]
    bad = [u for u in wanted if u not in missing and states.get(u) != "active"]
    if missing and len(missing) == len(wanted):
        return Finding("services", t, SKIP, "no Immich unit on this host (" + ", ".join(missing) + " not found); "
                       "Immich may run in containers or on another host", details=details)
    if bad or missing:
        parts = [f"{u} is {states.get(u, '?')}" for u in bad] + [f"{u} not found" for u in missing]
        return Finding("services", t, FAIL, "; ".join(parts),
                       "`systemctl status` / `journalctl -u` the unit; NixOS: services.immich.enable and "
                       "services.immich.machine-learning.enable", details)
    return Finding("services", t, PASS, ", ".join(f"{u} active" for u in wanted), details=details)


def check_provider(ev: Evidence) -> Finding:
    t = "ONNX execution provider (journal)"
    if _role(ev) == "server":
        eff = ev.facts("remote").get("effective_provider")
        return Finding("provider", t, SKIP, "role server: the ML service's log is on the ML host; its exporter "
                       f"reports {eff or 'no provider'} (run check there for the evidence)")
    st = ev.state("journal")
    if st is None:
        return Finding("provider", t, SKIP, "the journal collector is disabled")
    if not st.up:
        hint = {"no_permission": "run check as root or as a member of systemd-journal / adm",
                "no_journal": "the ML service logs elsewhere (Docker's json-file driver?) or journald keeps no "
                              "journal here; --journal.directory reads another one",
                }.get(st.last_reason, "see the reason")
        return Finding("provider", t, SKIP, f"cannot read the ML journal ({_down_text(st)})", hint)
    pref = _one_of(ev.samples("immich_ml_preferred_execution_provider", "journal"), "provider")
    eff = _one_of(ev.samples("immich_ml_execution_provider", "journal"), "provider")
    fallback = _value_of(ev.samples("immich_ml_cpu_fallback", "journal")) == 1
    facts = ev.facts("journal")
    line = facts.get("evidence") or ""
    errors = {f"{_labels(s).get('provider')}/{_labels(s).get('kind')}": int(s.value)
              for s in ev.samples("immich_ml_provider_errors_total", "journal") if s.value > 0}
    details = {"preferred": pref, "effective": eff, "cpu_fallback": fallback, "errors": errors,
               "evidence": line or None}
    if pref is None:
        return Finding("provider", t, WARN, "no 'Setting execution providers' line in the ML journal since the "
                       "unit's last start (no model loaded yet)",
                       "run a Smart Search (or any ML job) so the ML service loads a model, then check again",
                       details)
    if fallback:
        return Finding("provider", t, FAIL, f"{pref} is preferred but the ML service runs on {eff or 'the CPU'}"
                       + (f": {line[:300]}" if line else ""),
                       "see docs/journal.md; usually CUDA/cuDNN libraries or the driver are missing, or the unit "
                       "cannot open /dev/nvidia*", details)
    if pref not in NVIDIA_PROVIDERS and pref != "CPUExecutionProvider":
        return Finding("provider", t, PASS, f"preferred {pref}, effective {eff}", details=details)
    if pref == "CPUExecutionProvider":
        return Finding("provider", t, WARN, "the ML service only offers the CPU provider (a CPU-only onnxruntime)",
                       "install the CUDA flavour: the -cuda image, or onnxruntime-gpu / NixOS cudaSupport", details)
    return Finding("provider", t, PASS, f"preferred {pref}, effective {eff}", details=details)


def check_gpu_memory(ev: Evidence) -> Finding:
    t = "GPU memory held by the ML service"
    if _role(ev) == "server":
        return Finding("gpu_memory", t, SKIP, "role server: the ML processes run on the ML host (run check there)")
    st = ev.state("nvml")
    if st is None or not st.up:
        return Finding("gpu_memory", t, SKIP, "NVML is not usable here (see the driver check)")
    mem = sum(s.value for s in ev.samples("immich_gpu_process_memory_used_bytes", "nvml")
              if _labels(s).get("component") == "ml")
    loaded = ev.facts("journal").get("models_loaded")
    pref = _one_of(ev.samples("immich_ml_preferred_execution_provider", "journal"), "provider")
    details = {"ml_gpu_memory_bytes": mem, "models_loaded": loaded}
    if mem > 0:
        return Finding("gpu_memory", t, PASS, f"the ML processes hold {mem / 2**20:.0f} MiB of GPU memory",
                       details=details)
    if not loaded:
        return Finding("gpu_memory", t, SKIP, "no model is loaded right now: Immich unloads models after "
                       "MACHINE_LEARNING_MODEL_TTL (300 s) without requests, and the GPU memory goes with them",
                       "run a Smart Search, then check again within the TTL", details)
    if pref in NVIDIA_PROVIDERS:
        return Finding("gpu_memory", t, FAIL, f"{loaded} model(s) loaded on {pref}, but the ML processes hold no "
                       "GPU memory: the sessions run on the CPU",
                       "see the provider check; the ML unit must reach /dev/nvidia* and the CUDA libraries", details)
    return Finding("gpu_memory", t, SKIP, f"models are loaded on {pref or 'an unknown provider'}, which NVML "
                   "cannot see", details=details)


def check_ml_features(ev: Evidence) -> Finding:
    t = "Immich ML features and /ping"
    st = ev.state("immich")
    if st is None and _role(ev) == "ml":
        return Finding("ml_features", t, SKIP, "role ml: Immich's API is on the server host (run check there)")
    if st is None:
        return Finding("ml_features", t, SKIP, "the immich collector is disabled")
    up = _value_of(ev.samples("immich_server_up", "immich"))
    ml_up = _value_of(ev.samples("immich_ml_up", "immich"))
    feats = {_labels(s).get("feature"): s.value == 1 for s in ev.samples("immich_server_feature_enabled", "immich")}
    want = ("smartSearch", "facialRecognition", "ocr")
    details = {"server_up": up == 1, "ml_up": ml_up == 1, "features": {f: feats.get(f) for f in want}}
    if up != 1:
        return Finding("ml_features", t, SKIP, f"the Immich server at {ev.config.get('immich.url')} does not answer"
                       + (f" ({_down_text(st)})" if not st.up else ""),
                       "set --immich.url to the server's address", details)
    off = [f for f in want if feats.get(f) is False]
    if ml_up != 1:
        return Finding("ml_features", t, FAIL, f"the ML service at {ev.config.get('immich.ml-url')} does not answer "
                       "/ping", "check the ML unit/container and --immich.ml-url", details)
    if off:
        return Finding("ml_features", t, WARN, "disabled in Immich: " + ", ".join(off),
                       "Administration > Settings > Machine Learning: enable them (or IMMICH_MACHINE_LEARNING_ENABLED)",
                       details)
    return Finding("ml_features", t, PASS, "ML /ping answers; smartSearch, facialRecognition and ocr enabled",
                   details=details)


def check_transcode(ev: Evidence) -> Finding:
    """Configured video acceleration (API) against what the server's log shows (transcode.py)."""
    from .transcode import check_report

    t = "Video acceleration: configured vs used"
    st = ev.state("journal")
    configured = ev.facts("immich").get("transcode_configured")
    observed = ev.facts("journal").get("transcode") if st is not None and st.up else None
    ok, lines = check_report(configured, observed)
    details = {"configured": dict(configured) if configured else None,
               "last_started": list(observed["last_start"]) if observed and observed.get("last_start") else None,
               "last_finished": list(observed["last_completed"]) if observed and observed.get("last_completed")
               else None, "fallback": bool(observed and observed.get("fallback"))}
    text = "; ".join(lines)
    if observed is None or not observed.get("last_start"):
        return Finding("transcode", t, SKIP, text, "the server's journal shows no transcode (none since its last "
                       "start, or the journal is not readable); upload a video or run Jobs > Transcode videos",
                       details)
    if details["fallback"]:
        return Finding("transcode", t, FAIL, text, "see docs/alerts.md#immichtranscodefallback: ffmpeg's reason is "
                       "in the server log's 'Error occurred during transcoding' lines", details)
    if not ok:
        return Finding("transcode", t, WARN, text, "a transcode after the change will show the new acceleration",
                       details)
    return Finding("transcode", t, PASS, text, details=details)


def check_tuning(ev: Evidence) -> Finding:
    t = "tuning in force (nice, memlock)"
    units = _ml_unit_names(ev)
    conf_nice = {_labels(s)["unit"]: s.value for s in ev.samples("immich_unit_nice", "systemd")}
    conf_mem = {_labels(s)["unit"]: s.value for s in ev.samples("immich_unit_memlock_limit_bytes", "systemd")}
    proc_nice = {_labels(s).get("unit"): s.value for s in ev.samples("immich_process_nice")}
    proc_mem = {_labels(s).get("unit"): s.value for s in ev.samples("immich_process_memlock_limit_bytes")}
    unit = next((u for u in units if u in conf_nice or u in proc_nice), None)
    if unit is None:
        return Finding("tuning", t, SKIP, "neither the ML unit's configuration nor its processes were seen "
                       "(systemd collector down, unit not found or not running)")
    details = {"unit": unit, "configured_nice": conf_nice.get(unit), "process_nice": proc_nice.get(unit),
               "configured_memlock_bytes": conf_mem.get(unit), "process_memlock_bytes": proc_mem.get(unit)}
    if unit not in proc_nice:
        return Finding("tuning", t, SKIP, f"no running process of {unit} to compare with its configuration",
                       details=details)
    diffs = []
    if unit in conf_nice and conf_nice[unit] != proc_nice[unit]:
        diffs.append(f"Nice={conf_nice[unit]:g} configured, processes run at {proc_nice[unit]:g}")
    if unit in conf_mem and unit in proc_mem and conf_mem[unit] != proc_mem[unit]:
        diffs.append(f"LimitMEMLOCK={_bytes_text(conf_mem[unit])} configured, processes have "
                     f"{_bytes_text(proc_mem[unit])}")
    if diffs:
        return Finding("tuning", t, WARN, "; ".join(diffs),
                       f"restart the unit to apply its configuration (systemctl restart {unit})", details)
    return Finding("tuning", t, PASS, f"{unit}: nice {proc_nice[unit]:g}, memlock "
                   f"{_bytes_text(proc_mem.get(unit))} as configured", details=details)


def _bytes_text(v: float | None) -> str:
    if v is None:
        return "?"
    if v == float("inf"):
        return "infinity"
    return f"{v / 2**20:.0f} MiB" if v >= 2**20 else f"{v:.0f} B"


def _launch(cmdline: Sequence[str]) -> str:
    """'image' (python -m immich_ml: gunicorn_conf.py's pre_fork runs), 'gunicorn' (gunicorn started
    directly, as nixpkgs does: no pre_fork) or 'unknown'."""
    joined = " ".join(cmdline)
    if re.search(r"-m\s+immich_ml\b", joined) or "gunicorn_conf.py" in joined:
        return "image"
    if "gunicorn" in joined:
        return "gunicorn"
    return "unknown"


def _unit_env(ev: Evidence) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    sources: list[str] = []
    for unit in _ml_unit_names(ev):
        u = ev.unit_environment.get(unit) or {}
        for item in u.get("Environment", ()):
            k, _, v = str(item).partition("=")
            env[k] = v
        for path, _optional in u.get("EnvironmentFiles", ()):
            text = ev.host.read(str(path), 256 * 1024)
            if text is None:
                sources.append(f"{path} (unreadable)")
                continue
            sources.append(str(path))
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith(("#", ";")) and "=" in line:
                    k, _, v = line.partition("=")
                    env[k.strip().removeprefix("export ").strip()] = v.strip().strip("'\"")
    return env, sources


def check_environment(ev: Evidence) -> Finding:
    t = "ML environment"
    unit_env, files = _unit_env(ev)
    procs = ev.ml_processes
    proc_env = next((p.environ for p in procs if p.environ is not None), None)
    if not unit_env and proc_env is None and not ev.unit_environment:
        why = "no ML process is running" if not procs else \
            "the ML processes' environment is not readable (run check as root or as the ML service's user)"
        return Finding("environment", t, SKIP, why + "; and the ML unit's Environment= was not read")
    env = dict(unit_env)
    if proc_env is not None:
        env.update(proc_env)
    launch = next((_launch(p.cmdline) for p in procs if _launch(p.cmdline) != "unknown"), "unknown")
    warns: list[tuple[str, str]] = []
    for k, why in _NO_EFFECT.items():
        if k in env:
            warns.append((f"{k} is set: {why}", f"remove {k}"))
    if launch == "image" and "MACHINE_LEARNING_DEVICE_ID" in env and "MACHINE_LEARNING_DEVICE_IDS" not in env:
        warns.append(("MACHINE_LEARNING_DEVICE_ID is overwritten by gunicorn_conf.py's pre_fork under "
                      "`python -m immich_ml` (from MACHINE_LEARNING_DEVICE_IDS, default \"0\")",
                      "set MACHINE_LEARNING_DEVICE_IDS instead"))
    if launch == "gunicorn" and "MACHINE_LEARNING_DEVICE_IDS" in env:
        warns.append(("MACHINE_LEARNING_DEVICE_IDS is ignored when gunicorn is started without gunicorn_conf.py "
                      "(the nixpkgs launch)", "set MACHINE_LEARNING_DEVICE_ID instead"))
    ngpu = len(ev.samples("immich_gpu_info", "nvml"))
    for k in ("MACHINE_LEARNING_DEVICE_ID", "MACHINE_LEARNING_DEVICE_IDS"):
        ids = [x.strip() for x in env.get(k, "").split(",") if x.strip()]
        bad = [x for x in ids if not x.isdigit() or (ngpu and int(x) >= ngpu)]
        if bad and ngpu:
            warns.append((f"{k}={env[k]} names a device beyond the {ngpu} GPU(s) NVML sees",
                          f"use ids 0..{ngpu - 1}"))
    if procs and env.get("PYTHONUNBUFFERED", "") in ("", "0"):
        warns.append(("PYTHONUNBUFFERED is not set: ONNX Runtime's fallback block is print()ed into a buffered "
                      "stdout and can reach the journal hours late",
                      "set PYTHONUNBUFFERED=1 in the ML service's environment (our NixOS module does)"))
    if "COLUMNS" not in env:
        warns.append(("COLUMNS is not set: Rich wraps log lines at 80 columns (the exporter joins them, "
                      "but greps of the journal miss wrapped text)", "set COLUMNS=250 in the ML environment"))
    cache = env.get("MACHINE_LEARNING_CACHE_FOLDER")
    cache_note = ""
    if cache:
        cache_note = _cache_problem(ev, cache, next((p.uid for p in procs if p.uid is not None), None))
        if cache_note:
            warns.append((cache_note, f"create {cache} owned by the ML service's user"))
    details = {"launch": launch, "environment_files": files,
               "variables_seen": sorted(k for k in env if k.startswith(("MACHINE_LEARNING_", "IMMICH_", "PYTHON",
                                                                        "COLUMNS", "ORT_", "ONNX")))}
    if warns:
        # COLUMNS alone is advice, the others are mistakes: lead with the first mistake
        warns.sort(key=lambda w: w[0].startswith("COLUMNS"))
        return Finding("environment", t, WARN, "; ".join(w[0] for w in warns[:3])
                       + (f" (+{len(warns) - 3} more)" if len(warns) > 3 else ""), warns[0][1],
                       {**details, "warnings": [w[0] for w in warns]})
    return Finding("environment", t, PASS, f"launch: {launch}; nothing set that Immich ignores or overrides",
                   details=details)


def _cache_problem(ev: Evidence, cache: str, uid: int | None) -> str:
    st = ev.host.stat(cache)
    if st is None:
        return f"the model cache {cache} does not exist"
    if not stat.S_ISDIR(st.st_mode):
        return f"the model cache {cache} is not a directory"
    if uid is not None and uid != 0:
        writable = (st.st_uid == uid and st.st_mode & 0o200) or st.st_mode & 0o002
        if not writable and not (st.st_mode & 0o020):
            return f"the model cache {cache} is not writable by uid {uid}"
    return ""


def check_docker_ml(ev: Evidence) -> Finding:
    """The ML container on a Docker host: image flavour against the accelerators here, the GPU
    access it was given, and the provider its own log shows (docker source; docs/docker.md)."""
    from . import docker_check as dc

    t = "ML container (Docker)"
    st = ev.state("docker")
    if st is None:
        return Finding("docker_ml", t, SKIP, "the docker collector is disabled")
    if not st.up:
        return Finding("docker_ml", t, SKIP, f"cannot read the Docker API ({_down_text(st)})",
                       "add the exporter's user to the socket's group, or point --docker.socket at a socket proxy")
    if not ev.facts("docker").get("present"):
        return Finding("docker_ml", t, SKIP, "no Docker API socket at --docker.socket (no Docker here, or Podman's "
                       "socket elsewhere); fine when Immich runs as units")
    infos = [_labels(s) for s in ev.samples("immich_container_info", "docker") if _labels(s).get("component") == "ml"]
    if not infos:
        return Finding("docker_ml", t, SKIP, "no Immich ML container on this host (fine when Immich runs as units)")
    lab = infos[0]
    nodes = _dev_nodes(ev.host)
    acc = dc.Accelerators(nvidia=nodes["ctl"] or nodes["gpus"], dri=nodes["dri"], kfd=ev.host.exists("/dev/kfd"))
    view = dc.ContainerLike(lab["container"], lab.get("image", ""), lab.get("gpu_access", "none"))
    findings = [dc.flavour_fits(view, acc), dc.access_fits(view)]
    facts = ev.facts("docker")
    if facts.get("ml_logs"):
        findings.append(dc.verdict_of(lab["container"], facts.get("preferred_provider"),
                                      facts.get("effective_provider"),
                                      _value_of(ev.samples("immich_ml_cpu_fallback", "docker")) == 1))
    details = {"container": lab["container"], "image": lab.get("image"), "flavour": lab.get("flavour"),
               "gpu_access": lab.get("gpu_access"), "log_driver": lab.get("log_driver"),
               "findings": [f.detail for f in findings]}
    bad = [f for f in findings if f.ok is False]
    if bad:
        return Finding("docker_ml", t, FAIL, "; ".join(f.detail for f in bad),
                       "Immich's docker-compose.yml: the -cuda/-openvino/-rocm image tag and `extends` from "
                       "hwaccel.ml.yml for the same flavour; see docs/docker.md", details)
    return Finding("docker_ml", t, PASS, "; ".join(f.detail for f in findings if f.ok), details=details)


_TELEMETRY_PORT = {"api": 8081, "microservices": 8082}
_TELEMETRY_OPTION = {"api": "--immich.api-telemetry-url", "microservices": "--immich.telemetry-url"}
_TELEMETRY_GIVES = {"api": "Smart Search and encode-text latency", "microservices": "ML call latency of jobs"}


def latency_advice(worker: str, status: Mapping[str, Any]) -> str:
    """What to enable for one server process's latency telemetry (check and the landing page)."""
    port = _TELEMETRY_PORT[worker]
    what = status.get("status")
    if what == "not_configured":
        return f"set {_TELEMETRY_OPTION[worker]}=http://SERVER:{port}/metrics"
    if what == "unreachable":
        return (f"set IMMICH_TELEMETRY_INCLUDE=all (or a list with repo) on the Immich server and make port {port} "
                "reachable from the exporter (Docker: publish it or share the compose network)")
    if what == "no_repo":
        return "add repo to the server's IMMICH_TELEMETRY_INCLUDE (or set it to all) and restart the server"
    return ""


def check_latency_telemetry(ev: Evidence) -> Finding:
    """Whether the server's telemetry carries what ML call and Smart Search latency need (docs/latency.md)."""
    t = "latency telemetry (Smart Search, ML calls)"
    st = ev.state("immich")
    status = ev.facts("immich").get("latency")
    if st is None:
        return Finding("latency_telemetry", t, SKIP, "the immich collector is disabled")
    if not st.up or status is None:
        return Finding("latency_telemetry", t, SKIP, f"the Immich server does not answer ({_down_text(st)})")
    details = {w: dict(status.get(w, {})) for w in ("api", "microservices")}
    parts, advice = [], []
    for worker in ("api", "microservices"):
        one = details[worker]
        if one.get("status") == "ok":
            calls = ", ".join(f"{k} {v:g}" for k, v in one.get("calls", {}).items()) or "no call yet"
            parts.append(f"{worker}: repository durations on ({calls} since the server started)")
        else:
            parts.append(f"{worker}: {one.get('status', 'not_configured').replace('_', ' ')}"
                         + (f" ({one['detail']})" if one.get("detail") else ""))
            advice.append(f"{worker} ({_TELEMETRY_GIVES[worker]}): {latency_advice(worker, one)}")
    if advice:
        return Finding("latency_telemetry", t, WARN, "; ".join(parts), "; ".join(advice), details)
    return Finding("latency_telemetry", t, PASS, "; ".join(parts), details=details)


CHECKS: tuple[Callable[[Evidence], Finding], ...] = (
    check_role, check_driver, check_modules, check_devices, check_container_gpu, check_services, check_provider,
    check_gpu_memory, check_ml_features, check_transcode, check_tuning, check_environment, check_docker_ml,
    check_latency_telemetry,
)


def evaluate(ev: Evidence) -> list[Finding]:
    out = []
    for fn in CHECKS:
        try:
            out.append(fn(ev))
        except Exception as e:  # a bug in one check must not hide the others
            name = fn.__name__.removeprefix("check_")
            out.append(Finding(name, name, SKIP, f"internal error: {type(e).__name__}: {e}"))
    return out


def exit_code(findings: Sequence[Finding]) -> int:
    return 1 if any(f.status == FAIL for f in findings) else 0


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------

def render_table(findings: Sequence[Finding], width: int = 100) -> str:
    idw = max(len(f.id) for f in findings)
    lines = [f"{'CHECK':<{idw}}  RESULT  FINDING"]
    for f in findings:
        lines.append(f"{f.id:<{idw}}  {f.status:<6}  {f.finding}")
        if f.fix and f.status in (WARN, FAIL):
            lines.append(f"{'':<{idw}}  {'':<6}  fix: {f.fix}")
        elif f.fix and f.status == SKIP:
            lines.append(f"{'':<{idw}}  {'':<6}  hint: {f.fix}")
    counts = {s: sum(1 for f in findings if f.status == s) for s in (PASS, WARN, FAIL, SKIP)}
    lines.append("")
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items())
                 + f"; exit {exit_code(findings)}")
    return "\n".join(lines) + "\n"


def render_json(findings: Sequence[Finding]) -> str:
    code = exit_code(findings)
    worst = FAIL if code else (WARN if any(f.status == WARN for f in findings) else PASS)
    return json.dumps({"format": JSON_FORMAT, "result": worst, "exit_code": code,
                       "checks": [f.as_json() for f in findings]}, indent=2, sort_keys=False) + "\n"


# --------------------------------------------------------------------------------------------------
# gathering (I/O)
# --------------------------------------------------------------------------------------------------

# Sources run in this order so that each sees the facts it needs (unit PIDs before NVML/processes,
# NVML memory before the journal's cross-check, the provider before the Immich timings).
ORDER = ("systemd", "docker", "processes", "nvml", "journal", "immich", "remote")


def _read_proc(proc_root: str, pid: int) -> MLProcess | None:
    base = os.path.join(proc_root, str(pid))
    try:
        with open(os.path.join(base, "cmdline"), "rb") as f:
            cmd = tuple(x.decode("utf-8", "replace") for x in f.read(65536).split(b"\0") if x)
    except OSError:
        return None
    environ: dict[str, str] | None
    try:
        with open(os.path.join(base, "environ"), "rb") as f:
            environ = {}
            for item in f.read(256 * 1024).split(b"\0"):
                k, sep, v = item.decode("utf-8", "replace").partition("=")
                if sep:
                    environ[k] = v
    except OSError:
        environ = None
    uid = None
    try:
        with open(os.path.join(base, "status")) as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        pass
    return MLProcess(pid, cmd, MappingProxyType(environ) if environ is not None else None, uid)


async def gather(cfg: Mapping[str, Any], root: str = "/", timeout: float = GATHER_TIMEOUT) -> Evidence:
    from . import config as configmod, sources
    from .daemon import Daemon

    with tempfile.TemporaryDirectory(prefix="immich-gpu-check-") as state_dir:
        # A private state directory: check must never move the daemon's journal cursor or counters,
        # and reads the unit's last start afresh (the backfill), as a first start would.
        values = dict(cfg)
        values["state.directory"] = state_dir
        # the journal source's host-driver evidence reads the same host files as the rows below
        values["journal.nvidia-driver-path"] = tuple(Host(root).path(p)
                                                     for p in values.get("journal.nvidia-driver-path") or ())
        run_cfg = configmod.Config(values)
        daemon = Daemon()
        # the probe is a synthetic Smart Search: check never sends one (docs/probe.md)
        enabled = [n for n in sources.enabled(run_cfg) if n != "probe"]
        names = [n for n in ORDER if n in enabled] + [n for n in enabled if n not in ORDER]
        for n in names:
            daemon.add(sources.create(n, run_cfg, daemon.hub))
        try:
            await asyncio.wait_for(daemon.run_once(sequential=True), timeout)
        except asyncio.TimeoutError:
            await daemon.close_sources()
        snap = daemon.snapshot
    unit_env = await _unit_environment(cfg, snap)
    proc_root = str(cfg.get("proc.root") or "/proc")
    pids = []
    for u in cfg.get("journal.unit") or ():
        pids.extend((snap.facts("systemd").get("unit_pids") or {}).get(u, ()))
    procs = tuple(p for p in (_read_proc(proc_root, pid) for pid in sorted(set(pids))) if p is not None)
    return Evidence(snap, tuple(names), Host(root), MappingProxyType(dict(cfg)), procs, unit_env)


async def _unit_environment(cfg: Mapping[str, Any], snap: Snapshot) -> Mapping[str, Any]:
    """Environment= and EnvironmentFiles= of the ML units, from the systemd source's reading."""
    env = snap.facts("systemd").get("unit_environment")
    return MappingProxyType(dict(env)) if env else MappingProxyType({})


def run_check(cfg: Mapping[str, Any], as_json: bool = False, root: str = "/", out: Any = None) -> int:
    out = out or sys.stdout
    if cfg.get("log.level") != "debug":
        # every source's trouble is a row of the table; the daemon's "source down" lines would repeat it
        logging.getLogger("immich_gpu_exporter").setLevel(logging.ERROR)
    ev = asyncio.run(gather(cfg, root))
    findings = evaluate(ev)
    out.write(render_json(findings) if as_json else render_table(findings))
    out.flush()
    return exit_code(findings)
