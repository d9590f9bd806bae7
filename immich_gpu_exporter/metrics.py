"""The one place where metrics are named, and snapshot -> exposition rendering.

`METRICS` lists every metric the exporter may expose: its type, HELP text and label names.
Sources emit `core.Sample`s that must name a metric from this table with exactly its labels
(tests enforce it); `render()` turns a `Snapshot` into the text exposition formats. The
rendering is pure and runs once per snapshot change, never per scrape.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
from typing import TYPE_CHECKING, Any, Iterator

from .core import LabelPairs, Sample, Snapshot

if TYPE_CHECKING:  # client_python is imported only by the tests that compare our output with it
    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry

FRESHNESS = (
    " Collected in the background by the exporter's own loop, not at scrape time: the value is "
    "as old as immich_gpu_exporter_source_last_success_timestamp_seconds of its source."
)


@dataclasses.dataclass(frozen=True)
class MetricDef:
    name: str
    type: str  # "gauge", "counter" or "histogram" (samples NAME_bucket{le}, NAME_count, NAME_sum)
    help: str
    labels: tuple[str, ...] = ()
    source: str = "exporter"  # the source that emits it, for the docs

    def __post_init__(self) -> None:
        if self.type == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name} must end in _total")
        if self.type != "counter" and self.name.endswith("_total"):
            raise ValueError(f"gauge {self.name} must not end in _total")
        if self.type == "histogram" and "le" in self.labels:
            raise ValueError(f"histogram {self.name}: le is the bucket label, not a declared one")


def _m(name: str, type_: str, help_: str, labels: Iterable[str] = (), source: str = "exporter") -> MetricDef:
    return MetricDef(name, type_, help_, tuple(labels), source)


_GPU = ("gpu", "uuid")
_GROUP = ("gpu", "uuid", "component", "unit", "container")
_PROC_GROUP = ("component", "unit", "container")

_DEFS: list[MetricDef] = [
    # --- exporter self-health -------------------------------------------------------------
    _m("immich_gpu_exporter_build_info", "gauge",
       "Version of the exporter and of the Python running it; always 1. mode is \"demo\" when every value is "
       "the built-in replay of `immich-gpu-exporter demo`, invented and not read from this host, else \"live\". "
       "role is --deployment.role: all (one host), ml or server (remote machine learning; docs/remote-ml.md).",
       ("version", "python_version", "mode", "role")),
    _m("immich_gpu_exporter_source_up", "gauge",
       "1 if the source's last collection succeeded, 0 if it is down (see source_errors_total for why).",
       ("source",)),
    _m("immich_gpu_exporter_source_last_success_timestamp_seconds", "gauge",
       "Unix time of the source's last successful collection; values of a source are this old.", ("source",)),
    _m("immich_gpu_exporter_source_duration_seconds", "gauge",
       "Wall time of the source's last collection cycle, successful or not.", ("source",)),
    _m("immich_gpu_exporter_source_errors_total", "counter",
       "Failed or partly failed collections of the source, by short reason (library_not_found, no_bus, timeout, "
       "unauthorized, ...).", ("source", "reason")),
    # --- systemd -------------------------------------------------------------------------------
    _m("immich_unit_state", "gauge",
       "1 for the unit's current ActiveState, 0 for the others (node_exporter's node_systemd_unit_state shape).",
       ("unit", "state"), "systemd"),
    _m("immich_unit_info", "gauge", "Load state, sub state and unit-file state of a watched unit; always 1.",
       ("unit", "load_state", "sub_state", "unit_file_state"), "systemd"),
    _m("immich_unit_restarts_total", "counter", "Automatic restarts of the unit (systemd's NRestarts).", ("unit",),
       "systemd"),
    _m("immich_unit_active_enter_timestamp_seconds", "gauge",
       "Unix time the unit last entered the active state (0 if never).", ("unit",), "systemd"),
    _m("immich_unit_nice", "gauge", "Nice= that systemd applies to the unit's processes (configured tuning).",
       ("unit",), "systemd"),
    _m("immich_unit_memlock_limit_bytes", "gauge",
       "LimitMEMLOCK= soft limit systemd applies to the unit, in bytes (+Inf for infinity; configured tuning).",
       ("unit",), "systemd"),
    _m("immich_unit_device_access_info", "gauge",
       "The unit's DevicePolicy= and whether /dev/nvidia* device nodes are reachable (allowed, denied, "
       "private_devices); always 1.", ("unit", "device_policy", "nvidia_devices"), "systemd"),
    _m("immich_unit_processes", "gauge", "Processes in the unit's control group.", ("unit",), "systemd"),
    # --- Docker containers ---------------------------------------------------------------------
    _m("immich_container_state", "gauge",
       "1 for the Immich container's current state (created, running, paused, restarting, removing, exited, "
       "dead), 0 for the others; the container counterpart of immich_unit_state.", ("container", "state"), "docker"),
    _m("immich_container_health", "gauge",
       "1 for the container's health-check status (starting, healthy, unhealthy), 0 for the others; only for "
       "containers with a health check.", ("container", "health"), "docker"),
    _m("immich_container_restarts_total", "counter",
       "Restarts of the container by its restart policy (Docker's RestartCount; a recreated container starts "
       "at 0).", ("container",), "docker"),
    _m("immich_container_exit_code", "gauge",
       "Exit code of the container's last run (0 while running or after a clean stop; 137 after SIGKILL).",
       ("container",), "docker"),
    _m("immich_container_start_timestamp_seconds", "gauge", "Unix time the container last started.",
       ("container",), "docker"),
    _m("immich_container_info", "gauge",
       "An Immich container: its component, compose service, image, the image's hardware flavour (cuda, "
       "openvino, rocm, armnn, rknn, none), how it was given accelerators (gpu_access: device_request, "
       "nvidia_runtime, cdi, nvidia_devices, dri, kfd joined by '+', or none) and its log driver; always 1. "
       "Environment values are never read into metrics.",
       ("container", "component", "service", "image", "flavour", "gpu_access", "log_driver"), "docker"),
    _m("immich_container_log_gaps_total", "counter",
       "Times lines of the ML container's log were rotated away before the exporter read them (while it was "
       "down): the one loss the logs API allows.", ("container",), "docker"),
    # --- journal / ML service ------------------------------------------------------------------
    _m("immich_ml_execution_provider", "gauge",
       "1 for the ONNX Runtime execution provider the ML service effectively runs on, 0 for others seen.",
       ("provider",), "journal"),
    _m("immich_ml_preferred_execution_provider", "gauge",
       "1 for the first provider of the latest 'Setting execution providers to [...]' line, 0 for others seen.",
       ("provider",), "journal"),
    _m("immich_ml_cpu_fallback", "gauge",
       "1 when a GPU execution provider is preferred but the ML service runs on CPU, else 0.", (), "journal"),
    _m("immich_ml_provider_errors_total", "counter",
       "Execution-provider failures seen in the ML log, by provider and kind (create_failed, library_load, "
       "cuda_failure, ep_fallback, not_available, no_gpu_memory, no_driver, run_failed).", ("provider", "kind"),
       "journal"),
    _m("immich_ml_workers", "gauge",
       "Live ML worker processes by the execution provider their ONNX Runtime sessions really use ('none': no "
       "session yet).", ("provider",), "journal"),
    _m("immich_ml_session_crashes_total", "counter",
       "ML workers that died by a crash signal (SIGSEGV, SIGABRT, ...) while creating an ONNX Runtime session.",
       (), "journal"),
    _m("immich_ml_model_loads_total", "counter", "Model loads logged by the ML service.",
       ("model_type", "model_name"), "journal"),
    _m("immich_ml_model_loaded", "gauge", "1 while the model is loaded in the ML worker (0 after idle shutdown).",
       ("model_type", "model_name"), "journal"),
    _m("immich_ml_worker_exits_total", "counter",
       "ML worker exits by reason (inactivity, timeout, oom_kill, signal, error).", ("reason",), "journal"),
    _m("immich_ml_worker_boots_total", "counter", "ML worker processes booted by gunicorn.", (), "journal"),
    _m("immich_ml_server_healthy", "gauge",
       "1 if the Immich server last logged the ML service healthy, 0 if unhealthy.", (), "journal"),
    _m("immich_ml_log_entries_total", "counter", "Journal entries read from the unit, by log level.",
       ("unit", "level"), "journal"),
    _m("immich_gpu_exporter_journal_unrecognized_total", "counter",
       "Journal entries that matched no parser rule (not an error; a hint for new log formats).", ("unit",),
       "journal"),
    _m("immich_gpu_exporter_journal_entries_dropped_total", "counter",
       "Journal entries read but not used: untrusted (a container name not written by the container "
       "runtime as root: forgeable by any local user) or oversized (over the per-entry byte bound).",
       ("reason",), "exporter"),
    _m("immich_gpu_exporter_journal_gaps_total", "counter",
       "Times the exporter found the journal entry it had read last deleted (the journal was rotated and "
       "vacuumed while it was stopped or journalctl was down): the units' entries logged in between were "
       "lost unread, the one loss the journal allows.", (), "exporter"),
    _m("immich_gpu_exporter_journal_entries_lost_total", "counter",
       "Journal entries deleted unread in those gaps, from journald's sequence numbers: the entries between "
       "the last one read and the oldest one left. journald numbers the entries of all units together, so "
       "this is the ML and server units' loss at most (other units' entries deleted in the same range count "
       "too). A gap whose size cannot be told (the journal begun afresh) adds to gaps only.", (), "exporter"),
    _m("immich_gpu_exporter_journal_labels_dropped_total", "counter",
       "Label values from the journal exposed as \"other\" because their label reached its cardinality cap.",
       ("label",), "exporter"),
    _m("immich_gpu_exporter_immich_labels_dropped_total", "counter",
       "Queue names (label=queue) or telemetry job names (label=job) from the Immich API left out because "
       "their cardinality cap was reached (known Immich names always count).", ("label",), "exporter"),
    _m("immich_ml_last_provider_change_timestamp_seconds", "gauge",
       "Unix time the effective execution provider last changed.", (), "journal"),
    # --- journal / server: video transcoding (transcode.py, docs/transcode.md) ------------------
    _m("immich_transcode_jobs_total", "counter",
       "Video transcodes started, by the acceleration the server logged it attempts first (accel: nvenc, qsv, "
       "vaapi, rkmpp, disabled = software, other; decode: hardware, software).", ("accel", "decode"), "journal"),
    _m("immich_transcode_fallbacks_total", "counter",
       "Fallback steps the server logged after a failed transcode (from/to: <accel>_hw_decode, <accel>_sw_decode, "
       "software); retry lines name no video, so steps are counted, not videos.", ("from", "to"), "journal"),
    _m("immich_transcode_fallback", "gauge",
       "1 if a fallback to software was logged after the N-th most recent transcode start (journal.transcode-window) "
       "and the latest start asked for hardware acceleration, else 0.", (), "journal"),
    _m("immich_transcode_seconds_total", "counter",
       "Wall seconds from a video's 'Transcoding video' line to its 'Successfully encoded' line, retries included, by "
       "the acceleration that produced the file.", ("accel", "decode"), "journal"),
    _m("immich_transcode_completed_total", "counter",
       "Videos the server logged as successfully encoded whose start was seen, by the acceleration that produced the "
       "file (divide immich_transcode_seconds_total by it for seconds per video).", ("accel", "decode"), "journal"),
    # --- Immich API ----------------------------------------------------------------------------
    _m("immich_transcode_configured_info", "gauge",
       "Video acceleration configured in Immich (GET /api/system-config: ffmpeg.accel, ffmpeg.accelDecode as "
       "hardware/software); absent without systemConfig.read; always 1.", ("accel", "decode"), "immich"),
    _m("immich_server_up", "gauge", "1 if the Immich server answered /api/server/ping.", (), "immich"),
    _m("immich_ml_up", "gauge", "1 if the ML service answered /ping (any of its URLs, with failover URLs).", (),
       "immich"),
    _m("immich_ml_url_up", "gauge", "1 if this ML URL (scheme://host:port of --immich.ml-url or a failover URL) "
       "answered /ping.", ("url",), "immich"),
    _m("immich_ml_serving", "gauge", "1 for the ML URL that serves Immich's ML work, inferred as Immich picks: the "
       "first healthy URL of its list (Immich does not log it).", ("url",), "immich"),
    _m("immich_remote_ml_exporter_up", "gauge", "1 if the exporter on a remote ML host (--remote-ml.exporter-url) "
       "answered; its verdict gives the provider in force on a server-role host.", ("exporter",), "remote"),
    _m("immich_server_info", "gauge", "Version of the Immich server; always 1.", ("version",), "immich"),
    _m("immich_server_feature_enabled", "gauge", "1 if the server reports the feature enabled.", ("feature",),
       "immich"),
    _m("immich_queue_jobs", "gauge",
       "Jobs in the queue by state (waiting, active, delayed, failed, paused). 'completed' is omitted: Immich "
       "removes finished jobs.", ("queue", "state"), "immich"),
    _m("immich_queue_paused", "gauge", "1 if the queue is paused.", ("queue",), "immich"),
    _m("immich_queue_active_job_seconds_total", "counter",
       "Integral of active jobs over time (job-seconds of work), by the ML provider in force.", ("queue", "provider"),
       "immich"),
    _m("immich_queue_jobs_processed_total", "counter",
       "Jobs finished, by the ML provider in force; exact with telemetry, estimated from backlog decreases "
       "otherwise (see immich_queue_processed_method_info).", ("queue", "provider"), "immich"),
    _m("immich_queue_processed_method_info", "gauge",
       "How jobs_processed_total is counted: telemetry (exact) or backlog (estimate); always 1.", ("method",),
       "immich"),
    _m("immich_queue_last_run_duration_seconds", "gauge",
       "Duration of the queue's last backlog run (idle -> busy -> idle).", ("queue",), "immich"),
    _m("immich_queue_last_run_jobs", "gauge", "Jobs processed during the queue's last backlog run.", ("queue",),
       "immich"),
    _m("immich_queue_drain_eta_seconds", "gauge",
       "Estimated seconds until the busy queue's backlog is empty, at the current run's rate.", ("queue",), "immich"),
    # --- latency, from the server's own telemetry (docs/latency.md) -----------------------------
    _m("immich_ml_call_duration_seconds", "histogram",
       "Duration of the Immich server's successful calls to the machine-learning service, by call (encode_image, "
       "encode_text, detect_faces, ocr), as the server's telemetry measures them (repository group, both "
       "processes), re-exported in seconds with Immich's own bucket boundaries and labelled with the ONNX "
       "execution provider in force when the exporter read them (empty before a verdict). Kept across "
       "exporter restarts (the state directory); a server restart is not a reset here.", ("call", "provider"), "immich"),
    _m("immich_smart_search_query_duration_seconds", "histogram",
       "Duration of the server's smart-search database query (the search repository's searchSmart, API process), "
       "in seconds, by the provider in force. A Smart Search request costs this plus an encode_text ML call "
       "when the query's embedding is not cached: mean response time = (sum of both _sum) / this _count "
       "(docs/latency.md).", ("provider",), "immich"),
    _m("immich_smart_search_probe_duration_seconds", "histogram",
       "Round trip of the exporter's own Smart Search through the API (the opt-in probe, --probe.interval; "
       "docs/probe.md), successful ones only, by the ONNX execution provider in force at the time. Each query "
       "is new to the server's embedding cache, so each one includes an encode_text ML call. Buckets from 0.01 s "
       "to 30 s; counts from the exporter's start.", ("provider",),
       "probe"),
    _m("immich_smart_search_probes_total", "counter",
       "Probe searches by result: ok, disabled (the server's smart search is off), unauthorized (the probe key "
       "is refused or lacks asset.read), error, timeout.", ("result",), "probe"),
    _m("immich_server_telemetry_repo_enabled", "gauge",
       "1 if the server process's telemetry serves the repository-method durations that latency needs "
       "(IMMICH_TELEMETRY_INCLUDE has repo or all), 0 if its telemetry answers without them; absent when its "
       "telemetry URL is not configured or does not answer. worker is api (port 8081) or microservices (8082).",
       ("worker",), "immich"),
    # --- NVML --------------------------------------------------------------------
    _m("immich_gpu_info", "gauge", "A GPU seen by NVML; always 1.", ("gpu", "uuid", "name", "driver_version"),
       "nvml"),
    _m("immich_gpu_utilization_ratio", "gauge", "Fraction of time a kernel ran on the GPU (0-1).", _GPU, "nvml"),
    _m("immich_gpu_memory_used_bytes", "gauge", "GPU memory in use, in bytes.", _GPU, "nvml"),
    _m("immich_gpu_memory_total_bytes", "gauge", "GPU memory in total, in bytes.", _GPU, "nvml"),
    _m("immich_gpu_process_memory_used_bytes", "gauge",
       "GPU memory held by the processes of an Immich component (unit or container), summed.", _GROUP, "nvml"),
    _m("immich_gpu_process_sm_utilization_ratio", "gauge",
       "SM utilisation of the group's processes (0-1, summed).", _GROUP, "nvml"),
    _m("immich_gpu_process_memory_utilization_ratio", "gauge",
       "Memory-controller utilisation of the group's processes (0-1, summed).", _GROUP, "nvml"),
    _m("immich_gpu_process_encoder_utilization_ratio", "gauge",
       "NVENC utilisation of the group's processes (0-1, summed).", _GROUP, "nvml"),
    _m("immich_gpu_process_decoder_utilization_ratio", "gauge",
       "NVDEC utilisation of the group's processes (0-1, summed).", _GROUP, "nvml"),
    _m("immich_gpu_processes", "gauge", "Processes of the group that use the GPU.", _GROUP, "nvml"),
    _m("immich_gpu_pid_memory_used_bytes", "gauge",
       "GPU memory of one process (only with --gpu.pid-labels; PID labels churn).",
       ("gpu", "uuid", "component", "unit", "container", "pid", "comm"), "nvml"),
    _m("immich_gpu_pid_sm_utilization_ratio", "gauge",
       "SM utilisation of one process (only with --gpu.pid-labels).",
       ("gpu", "uuid", "component", "unit", "container", "pid", "comm"), "nvml"),
    # --- processes -----------------------------------------------------------------------------
    _m("immich_process_nice", "gauge", "Lowest nice value among the component's processes (applied tuning).",
       _PROC_GROUP, "processes"),
    _m("immich_process_memlock_limit_bytes", "gauge",
       "RLIMIT_MEMLOCK soft limit of the component's processes, lowest over the group (+Inf if unlimited).",
       _PROC_GROUP, "processes"),
    _m("immich_process_resident_memory_bytes", "gauge", "Resident memory of the component's processes, summed.",
       _PROC_GROUP, "processes"),
    _m("immich_process_cpu_seconds_total", "counter",
       "CPU time (user + system) of the component's processes, those that exited since the exporter started "
       "included, so it does not drop when the ML worker restarts.", _PROC_GROUP, "processes"),
    _m("immich_ml_cpu_seconds_total", "counter",
       "CPU time (user + system) of the ML component's processes, by the execution provider in force when it "
       "was spent (the journal's verdict; empty before one). Divided by immich_queue_jobs_processed_total of "
       "smartSearch, faceDetection and ocr with the same provider it gives CPU seconds per ML job: low on a "
       "GPU, high on a CPU fallback. Persisted across exporter restarts.", ("provider",), "processes"),
]

METRICS: dict[str, MetricDef] = {d.name: d for d in _DEFS}
assert len(METRICS) == len(_DEFS), "duplicate metric definition"

# A histogram's samples are named NAME_bucket (with an `le` label), NAME_count and NAME_sum.
HISTOGRAM_PARTS = (("_bucket", 0), ("_count", 1), ("_sum", 2))
_PART_OF: dict[str, tuple[MetricDef, int]] = {
    d.name + suffix: (d, rank) for d in _DEFS if d.type == "histogram" for suffix, rank in HISTOGRAM_PARTS}


def definition(sample_name: str) -> MetricDef | None:
    """The definition a sample belongs to (a histogram's _bucket/_count/_sum samples belong to it)."""
    d = METRICS.get(sample_name)
    if d is not None and d.type != "histogram":
        return d
    part = _PART_OF.get(sample_name)
    return part[0] if part else None


def _le(labels: LabelPairs) -> float:
    for k, v in labels:
        if k == "le":
            return float(v)
    return math.inf


def _without_le(labels: LabelPairs) -> LabelPairs:
    return tuple(p for p in labels if p[0] != "le")


def _hist_order(s: Sample) -> tuple:
    """Histogram samples grouped by label set: buckets by ascending le, then _count, then _sum."""
    rank = _PART_OF[s.name][1]
    return (_without_le(s.labels), rank, _le(s.labels) if rank == 0 else 0.0)


class UnknownMetric(ValueError):
    pass


def check_sample(s: Sample) -> None:
    """Raise if a sample names an undefined metric or the wrong label set (used by tests)."""
    d = definition(s.name)
    if d is None:
        raise UnknownMetric(f"{s.name} is not defined in metrics.METRICS")
    got = tuple(k for k, _ in s.labels)
    want = d.labels + (("le",) if d.type == "histogram" and s.name.endswith("_bucket") else ())
    if tuple(sorted(want)) != got:
        raise UnknownMetric(f"{s.name}: labels {got} != defined {tuple(sorted(want))}")


def self_health_samples(snapshot: Snapshot) -> Iterator[Sample]:
    from .core import sample

    yield sample("immich_gpu_exporter_build_info", 1, **snapshot.build)
    for name, st in sorted(snapshot.sources.items()):
        yield sample("immich_gpu_exporter_source_up", 1 if st.up else 0, source=name)
        if st.last_success is not None:
            yield sample("immich_gpu_exporter_source_last_success_timestamp_seconds", st.last_success, source=name)
        if st.duration is not None:
            yield sample("immich_gpu_exporter_source_duration_seconds", st.duration, source=name)
        for reason, n in sorted(st.errors.items()):
            yield sample("immich_gpu_exporter_source_errors_total", n, source=name, reason=reason)


def _help(d: MetricDef) -> str:
    if d.source == "exporter" and not d.name.startswith("immich_gpu_exporter_source"):
        return d.help
    return d.help + FRESHNESS


def grouped(snapshot: Snapshot) -> list[tuple[MetricDef, list[Sample]]]:
    """Snapshot -> (definition, samples) in METRICS order, samples sorted, duplicates dropped."""
    by_name: dict[str, list[Sample]] = {}
    for s in self_health_samples(snapshot):
        by_name.setdefault(s.name, []).append(s)
    for _, st in sorted(snapshot.sources.items()):
        for s in st.samples:
            part = _PART_OF.get(s.name)
            by_name.setdefault(part[0].name if part else s.name, []).append(s)
    out: list[tuple[MetricDef, list[Sample]]] = []
    for d in _DEFS:
        samples = by_name.get(d.name)
        if not samples:
            continue
        unique: dict[tuple[str, LabelPairs], Sample] = {}
        for s in samples:  # two places must never emit the same series; the first wins
            unique.setdefault((s.name, s.labels), s)
        if d.type == "histogram":
            out.append((d, sorted(unique.values(), key=_hist_order)))
        else:
            out.append((d, [unique[k] for k in sorted(unique)]))
    return out


def families(snapshot: Snapshot) -> list[Metric]:
    return _to_families(grouped(snapshot))


def _to_families(groups: list[tuple[MetricDef, list[Sample]]]) -> list[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    out: list[Metric] = []
    for d, samples in groups:
        if d.type == "histogram":
            hist = HistogramMetricFamily(d.name, _help(d), labels=d.labels)
            sets: dict[LabelPairs, dict[str, Any]] = {}
            for s in samples:
                one = sets.setdefault(_without_le(s.labels), {"buckets": [], "sum": 0.0})
                if s.name.endswith("_bucket"):
                    one["buckets"].append((dict(s.labels)["le"], s.value))
                elif s.name.endswith("_sum"):
                    one["sum"] = s.value
            for labels, one in sets.items():
                lab = dict(labels)
                hist.add_metric([lab.get(n, "") for n in d.labels], one["buckets"], one["sum"])
            out.append(hist)
            continue
        if d.type == "counter":
            fam: Metric = CounterMetricFamily(d.name[: -len("_total")], _help(d), labels=d.labels)
        else:
            fam = GaugeMetricFamily(d.name, _help(d), labels=d.labels)
        for s in samples:
            lab = dict(s.labels)
            fam.add_metric([lab.get(n, "") for n in d.labels], s.value)
        out.append(fam)
    return out


def _esc_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _esc_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def go_float(v: float) -> str:
    """A sample value as client_python writes it (so our text equals its text, byte for byte):
    Python's shortest repr, +Inf/-Inf/NaN spelled the Prometheus way, and a positive number with
    more than 6 integer digits in repr written in Go's exponent form (1786000000.5 -> 1.7860000005e+09)."""
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    text = repr(v)
    point = text.find(".")
    if v <= 0 or point <= 6:
        return text
    digits = (text[:point] + text[point + 1:]).rstrip("0")
    mantissa = (digits[0] + "." + digits[1:]).rstrip(".")
    return f"{mantissa}e+{point - 1:02d}"


def render_text(groups: list[tuple[MetricDef, list[Sample]]]) -> bytes:
    """Text format 0.0.4. Hand-written because it is the hot part of every snapshot change
    (several times faster than building client_python families), with client_python's value
    formatting so the output is the same."""
    lines: list[str] = []
    add = lines.append
    for d, samples in groups:
        add(f"# HELP {d.name} {_esc_help(_help(d))}")
        add(f"# TYPE {d.name} {d.type}")
        for s in samples:
            labels = s.labels
            if labels:
                text = ",".join(f'{k}="{_esc_label(v)}"' for k, v in labels)
                add(f"{s.name}{{{text}}} {go_float(s.value)}")
            else:
                add(f"{s.name} {go_float(s.value)}")
    add("")
    return "\n".join(lines).encode()


def _esc_om(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_openmetrics(groups: list[tuple[MetricDef, list[Sample]]]) -> bytes:
    """OpenMetrics 1.0 text, as client_python's openmetrics `generate_latest` writes the same
    families (the tests compare them byte for byte): a counter's family is named without `_total`,
    its samples with it; HELP and label values escape backslash, newline and double quote; `# EOF`.
    Hand-written, because Prometheus asks for OpenMetrics by default and client_python would cost
    ~3 MiB of resident memory for it."""
    lines: list[str] = []
    add = lines.append
    for d, samples in groups:
        family = d.name[: -len("_total")] if d.type == "counter" else d.name
        add(f"# HELP {family} {_esc_om(_help(d))}")
        add(f"# TYPE {family} {d.type}")
        for s in samples:
            labels = s.labels
            if labels:
                text = ",".join(f'{k}="{_esc_om(v)}"' for k, v in labels)
                add(f"{s.name}{{{text}}} {go_float(s.value)}")
            else:
                add(f"{s.name} {go_float(s.value)}")
    add("# EOF\n")
    return "\n".join(lines).encode()


class Rendered:
    """The cached bytes served by /metrics for one snapshot version.

    Text and its gzip variant (what Prometheus asks for) are rendered eagerly; OpenMetrics only
    once somebody asked for it, then once per version like the others.
    """

    __slots__ = ("version", "text", "text_gzip", "_groups", "_openmetrics")

    def __init__(self, version: int, groups: list[tuple[MetricDef, list[Sample]]],
                 with_openmetrics: bool = False) -> None:
        self.version = version
        self._groups = groups
        self.text = render_text(groups)
        self.text_gzip = gzip.compress(self.text, compresslevel=6, mtime=0)
        self._openmetrics: bytes | None = None
        if with_openmetrics:
            self.openmetrics  # noqa: B018 - render now, off the scrape path

    @property
    def openmetrics(self) -> bytes:
        if self._openmetrics is None:
            self._openmetrics = render_openmetrics(self._groups)
        return self._openmetrics


CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _registry(fams: list[Metric]) -> CollectorRegistry:
    from prometheus_client.registry import CollectorRegistry

    class Families:  # a collector that yields the families already built
        def collect(self) -> list[Metric]:
            return fams

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Families())  # type: ignore[arg-type]
    return reg


def render(snapshot: Snapshot, with_openmetrics: bool = False) -> Rendered:
    return Rendered(snapshot.version, grouped(snapshot), with_openmetrics)
