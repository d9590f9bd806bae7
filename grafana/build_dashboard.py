"""Builds grafana/immich-gpu-dashboard.json from plain Python (no SDK needed).

    python grafana/build_dashboard.py          # rewrite the JSON
    python grafana/build_dashboard.py --check  # exit 1 if the JSON is out of date (a test runs this)

Every query names only metrics from immich_gpu_exporter/metrics.py and filters by the
dashboard variables `$immich` (the installation: the `immich` target label of a two-host, remote-ML
set-up, docs/remote-ml.md; "All" matches hosts without it), `$instance` and (for GPU panels) `$gpu`. The layout is computed: panels
flow left to right in rows of 24 columns.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

OUT = pathlib.Path(__file__).resolve().parent / "immich-gpu-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
I = 'immich=~"$immich", instance=~"$instance"'  # noqa: E741 - the filter every query carries
G = f'{I}, gpu=~"$gpu"'
ML_QUEUES = 'queue=~"smartSearch|faceDetection|ocr"'

EXPECTED = """\
**What the guide promises** (its *Expected Performance Improvements* table), to compare with the
seconds per job measured here from your own library:

| Operation | CPU | CUDA | Speed-up |
|---|---|---|---|
| Smart Search indexing (`smartSearch`) | ~2 s per image | ~0.4-1 s per image | 2-5x |
| Face detection (`faceDetection`) | ~1.5 s per face | ~0.3-0.8 s per face | 2-5x |
| Thumbnail generation (`thumbnailGeneration`, ffmpeg/libvips, not ONNX) | ~0.8 s per image | ~0.3-0.5 s per image | 1.5-3x |

Seconds per job = `increase(immich_queue_active_job_seconds_total)` / `increase(immich_queue_jobs_processed_total)`
over the dashboard's time range, split by the execution provider in force while the jobs ran. Pick a range that
covers a CPU run and a CUDA run to see both bars. Queue concurrency is included: with concurrency 2, two jobs
of 1 s each count as 2 job-seconds.
"""


# Smart Search response time: both halves of the requests, divided by the requests (docs/latency.md)
SMART_SEARCH_MEAN = (
    f"(sum by (provider) (increase(immich_smart_search_query_duration_seconds_sum{{{I}}}[$__range]))"
    f" + sum by (provider) (increase(immich_ml_call_duration_seconds_sum{{{I}, call=\"encode_text\"}}[$__range])))"
    f" / sum by (provider) (increase(immich_smart_search_query_duration_seconds_count{{{I}}}[$__range]))")
ML_CALL_MEAN = (f"sum by (call, provider) (increase(immich_ml_call_duration_seconds_sum{{{I}}}[$__range]))"
                f" / sum by (call, provider) (increase(immich_ml_call_duration_seconds_count{{{I}}}[$__range]))")


def quantile(q: float, metric: str, where: str = "", by: str = "provider") -> str:
    sel = f"{I}, {where}" if where else I
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))"


class Layout:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_h
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1
        self.x, self.row_h = 0, 0

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str | None = None) -> dict:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "refId": ref, "legendFormat": legend or "__auto"}
    if instant:
        t["instant"] = True
        t["range"] = False
    if fmt:
        t["format"] = fmt
    return t


def panel(kind: str, title: str, targets: list[dict], unit: str | None = None, description: str = "",
          **extra: Any) -> dict:
    defaults: dict[str, Any] = {}
    if unit:
        defaults["unit"] = unit
    p: dict[str, Any] = {"type": kind, "title": title, "datasource": DS, "targets": targets,
                         "fieldConfig": {"defaults": defaults, "overrides": []}, "options": {}}
    if description:
        p["description"] = description
    for k, v in extra.items():
        if k == "mappings":
            defaults["mappings"] = v
        elif k == "thresholds":
            defaults["thresholds"] = {"mode": "absolute", "steps": v}
        elif k in ("min", "max", "decimals"):
            defaults[k] = v
        else:
            p[k] = v
    return p


def stat(title: str, expr: str, legend: str = "", unit: str | None = None, text_mode: str = "auto",
         description: str = "", **extra: Any) -> dict:
    p = panel("stat", title, [target(expr, legend, instant=True)], unit, description, **extra)
    p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "textMode": text_mode, "colorMode": "background", "graphMode": "none"}
    return p


def bars(title: str, expr: str, legend: str, unit: str, description: str) -> dict:
    """Horizontal bars of one instant query over the time range (the before/after comparisons)."""
    p = panel("bargauge", title, [target(expr, legend, instant=True)], unit, description, min=0)
    p["options"] = {"orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return p


def ts(title: str, targets: list[dict], unit: str | None = None, description: str = "", **extra: Any) -> dict:
    p = panel("timeseries", title, targets, unit, description, **extra)
    p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi"}}
    return p


def build() -> dict[str, Any]:
    L = Layout()
    red_green = [{"color": "green", "value": None}, {"color": "red", "value": 1}]

    L.row("Verdict: is Immich on the GPU?")
    L.add(stat("Data", f'count(immich_gpu_exporter_build_info{{{I}, mode="demo"}}) or vector(0)',
               thresholds=red_green,
               mappings=[{"type": "value", "options": {"0": {"text": "live"}}},
                         {"type": "range", "options": {"from": 1, "to": None, "result": {"text": "DEMO"}}}],
               description="DEMO when an instance shown is `immich-gpu-exporter demo` (build_info mode=\"demo\"): "
                           "its values are a built-in replay, not a real host."), 4, 4)
    L.add(stat("Effective provider", f"immich_ml_execution_provider{{{I}}} == 1", "{{provider}}", text_mode="name",
               description="The ONNX Runtime execution provider the ML service really runs on (from its journal)."),
          4, 4)
    L.add(stat("Preferred provider", f"immich_ml_preferred_execution_provider{{{I}}} == 1", "{{provider}}",
               text_mode="name", description="First provider of the latest 'Setting execution providers' line."),
          4, 4)
    L.add(stat("CPU fallback", f"max(immich_ml_cpu_fallback{{{I}}})", thresholds=red_green,
               mappings=[{"type": "value", "options": {"0": {"text": "no"}, "1": {"text": "FALLBACK"}}}],
               description="1 when a GPU provider is preferred but the ML service runs on the CPU."), 4, 4)
    L.add(stat("GPU memory held by Immich ML",
               f'sum(immich_gpu_process_memory_used_bytes{{{G}, component="ml"}}) or vector(0)', unit="bytes",
               description="0 while a GPU provider is preferred and models are loaded means the work is on the CPU."),
          4, 4)
    L.add(stat("Units active",
               f'sum(immich_unit_state{{{I}, state="active"}}) / count(immich_unit_info{{{I}, load_state="loaded"}})',
               unit="percentunit", description="Share of the watched, existing units that are active.",
               thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]), 4, 4)

    L.row("Before / after: seconds per job, CPU vs CUDA")
    # provider="" is ML work done before the exporter knew the provider (no provider line read yet)
    known = f'{ML_QUEUES}, provider!=""'
    spj = (f"sum by (queue, provider) (increase(immich_queue_active_job_seconds_total{{{I}, {known}}}[$__range]))"
           f" / sum by (queue, provider) (increase(immich_queue_jobs_processed_total{{{I}, {known}}}[$__range]))")
    p = panel("bargauge", "Seconds per job by queue and provider", [target(spj, "{{queue}} {{provider}}",
                                                                           instant=True)], "s",
              "Job-seconds of work divided by jobs finished, over the dashboard's time range.", min=0)
    p["options"] = {"orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    L.add(p, 8, 8)
    cpu_per_job = (f"sum by (provider) (increase(immich_ml_cpu_seconds_total{{{I}, provider!=\"\"}}[$__range]))"
                   f" / on (provider) sum by (provider) (increase(immich_queue_jobs_processed_total{{{I}, {known}}}"
                   f"[$__range]))")
    p = panel("bargauge", "ML CPU seconds per job by provider", [target(cpu_per_job, "{{provider}}", instant=True)],
              "s", "CPU time the ML processes spent, divided by the smartSearch, faceDetection and ocr jobs finished, "
              "by the provider in force, over the time range. Falls sharply on a GPU; stays high on a CPU "
              "fallback, whatever the logs say.", min=0)
    p["options"] = {"orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    L.add(p, 6, 8)
    speedup = (f"(sum by (queue) (increase(immich_queue_active_job_seconds_total{{{I}, {ML_QUEUES}, provider=\"CPUExecutionProvider\"}}[$__range]))"
               f" / sum by (queue) (increase(immich_queue_jobs_processed_total{{{I}, {ML_QUEUES}, provider=\"CPUExecutionProvider\"}}[$__range])))"
               f" / (sum by (queue) (increase(immich_queue_active_job_seconds_total{{{I}, {ML_QUEUES}, provider=\"CUDAExecutionProvider\"}}[$__range]))"
               f" / sum by (queue) (increase(immich_queue_jobs_processed_total{{{I}, {ML_QUEUES}, provider=\"CUDAExecutionProvider\"}}[$__range])))")
    L.add(stat("Speed-up CUDA vs CPU", speedup, "{{queue}}", unit="x", decimals=1,
               description="CPU seconds per job divided by CUDA seconds per job, per ML queue, over the time range.",
               thresholds=[{"color": "orange", "value": None}, {"color": "green", "value": 2}]), 4, 8)
    text = panel("text", "What the guide expected", [])
    del text["datasource"], text["targets"]
    text["options"] = {"mode": "markdown", "content": EXPECTED}
    L.add(text, 6, 8)
    L.add(ts("Throughput (jobs per second)",
             [target(f"sum by (queue, provider) (rate(immich_queue_jobs_processed_total{{{I}}}[$__rate_interval]))",
                     "{{queue}} {{provider}}")], "ops"), 12, 8)
    L.add(ts("Seconds per job over time",
             [target(f"sum by (queue, provider) (rate(immich_queue_active_job_seconds_total{{{I}, {known}}}[$__rate_interval]))"
                     f" / sum by (queue, provider) (rate(immich_queue_jobs_processed_total{{{I}, {known}}}[$__rate_interval]))",
                     "{{queue}} {{provider}}")], "s"), 12, 8)
    p = panel("table", "Last backlog runs", [
        target(f"immich_queue_last_run_duration_seconds{{{I}}}", ref="A", instant=True, fmt="table"),
        target(f"immich_queue_last_run_jobs{{{I}}}", ref="B", instant=True, fmt="table"),
    ], description="Duration and jobs of each queue's last idle -> busy -> idle run.")
    p["transformations"] = [{"id": "merge", "options": {}},
                            {"id": "organize", "options": {"excludeByName": {"Time": True, "__name__": True,
                                                                              "job": True},
                                                           "renameByName": {"Value #A": "duration (s)",
                                                                            "Value #B": "jobs"}}}]
    L.add(p, 24, 7)

    L.row("Smart Search and ML call latency, CPU vs GPU")
    # From the server's telemetry (docs/latency.md): needs IMMICH_TELEMETRY_INCLUDE with repo (or all)
    # and --immich.api-telemetry-url / --immich.telemetry-url.
    L.add(bars("Smart Search mean response time by provider", SMART_SEARCH_MEAN, "{{provider}}", "s",
               "Mean time of a Smart Search request over the time range: the server's text-encoding ML calls plus "
               "its smart-search database query, divided by the searches (a query whose embedding was cached costs "
               "no ML call). From the API process's telemetry; empty until it is read (see the exporter's landing "
               "page for what to enable)."), 8, 8)
    L.add(bars("ML call mean duration by call and provider", ML_CALL_MEAN, "{{call}} {{provider}}", "s",
               "Mean duration of the server's calls to the ML service over the time range, by call "
               "(encode_image and detect_faces and ocr from jobs, encode_text from Smart Search), by the ONNX "
               "execution provider in force."), 8, 8)
    L.add(ts("Smart Search p50 / p95: text encoding and database query",
             [target(quantile(0.5, "immich_ml_call_duration_seconds", 'call="encode_text"'),
                     "encode_text p50 {{provider}}", "A"),
              target(quantile(0.95, "immich_ml_call_duration_seconds", 'call="encode_text"'),
                     "encode_text p95 {{provider}}", "B"),
              target(quantile(0.5, "immich_smart_search_query_duration_seconds"), "query p50 {{provider}}", "C"),
              target(quantile(0.95, "immich_smart_search_query_duration_seconds"), "query p95 {{provider}}", "D")],
             "s", "Quantiles from the server's histograms (Immich's bucket boundaries: a quantile is exact to one "
             "bucket). The two halves of a Smart Search request; their quantiles do not add up to the request's."),
          8, 8)
    L.add(ts("ML call p95 by call and provider",
             [target(quantile(0.95, "immich_ml_call_duration_seconds", by="call, provider"),
                      "{{call}} {{provider}}")], "s",
             "95th percentile of the server's ML calls, per call and provider, from Immich's bucket boundaries."),
          12, 8)
    L.add(ts("Smart Search probe p50 / p95 (opt-in)",
             [target(quantile(0.5, "immich_smart_search_probe_duration_seconds"), "p50 {{provider}}", "A"),
              target(quantile(0.95, "immich_smart_search_probe_duration_seconds"), "p95 {{provider}}", "B")],
             "s", "Round trip of the exporter's own Smart Search through the API (docs/probe.md), for servers "
             "without telemetry; empty unless --probe.interval is set."), 12, 8)

    L.row("GPU per Immich component")
    group = "{{component}} {{unit}}{{container}}"
    L.add(ts("SM utilisation by component",
             [target(f"sum by (component, unit, container) (immich_gpu_process_sm_utilization_ratio{{{G}}})", group)],
             "percentunit", min=0), 8, 8)
    L.add(ts("GPU memory by component",
             [target(f"sum by (component, unit, container) (immich_gpu_process_memory_used_bytes{{{G}}})", group)],
             "bytes", min=0), 8, 8)
    L.add(ts("GPU processes by component",
             [target(f"sum by (component, unit, container) (immich_gpu_processes{{{G}}})", group)], "short",
             min=0, description="The ML worker PID changes after every idle shutdown; the count stays meaningful."),
          8, 8)
    L.add(ts("Whole GPU",
             [target(f"immich_gpu_utilization_ratio{{{G}}}", "utilisation gpu {{gpu}}", "A"),
              target(f"immich_gpu_memory_used_bytes{{{G}}} / immich_gpu_memory_total_bytes{{{G}}}",
                     "memory used gpu {{gpu}}", "B")], "percentunit", min=0, max=1), 8, 8)
    L.add(ts("Other GPU users (not Immich)",
             [target(f'sum by (component, unit, container) (immich_gpu_process_memory_used_bytes{{{G}, component="other"}})',
                     group)], "bytes", min=0), 8, 8)
    L.add(ts("Video engines (NVENC / NVDEC) by component",
             [target(f"sum by (component) (immich_gpu_process_encoder_utilization_ratio{{{G}}})", "encoder {{component}}",
                     "A"),
              target(f"sum by (component) (immich_gpu_process_decoder_utilization_ratio{{{G}}})", "decoder {{component}}",
                     "B")], "percentunit", min=0), 8, 8)

    L.row("video: GPU vs software")
    L.add(stat("Transcode fallback", f"max(immich_transcode_fallback{{{I}}})", thresholds=red_green,
               mappings=[{"type": "value", "options": {"0": {"text": "no"}, "1": {"text": "SOFTWARE"}}}],
               description="1 when the server's log shows a fallback to software within the latest transcodes "
                           "while hardware acceleration is asked for (docs/transcode.md)."), 4, 4)
    L.add(stat("Configured acceleration", f"immich_transcode_configured_info{{{I}}}", "{{accel}} / {{decode}} decoding",
               text_mode="name", description="ffmpeg.accel and accelDecode from /api/system-config (needs the "
                                             "systemConfig.read permission; empty without it)."), 5, 4)
    L.add(ts("Transcodes started by acceleration attempted",
             [target(f"sum by (accel, decode) (increase(immich_transcode_jobs_total{{{I}}}[$__rate_interval]))",
                     "{{accel}} {{decode}} decoding")], "short", min=0), 8, 8)
    L.add(ts("Fallback steps",
             [target(f'sum by (from, to) (increase(immich_transcode_fallbacks_total{{{I}}}[$__rate_interval]))',
                     "{{from}} -> {{to}}")], "short", min=0,
             description="Retry lines of the server: the decoder fell back (<accel>_hw_decode -> <accel>_sw_decode) "
                         "or the encoder (-> software)."), 7, 8)
    vspj = (f"sum by (accel, decode) (increase(immich_transcode_seconds_total{{{I}}}[$__range]))"
            f" / sum by (accel, decode) (increase(immich_transcode_completed_total{{{I}}}[$__range]))")
    p = panel("bargauge", "Seconds per video by acceleration that produced it",
              [target(vspj, "{{accel}} {{decode}} decoding", instant=True)], "s",
              "From each video's 'Transcoding video' line to its 'Successfully encoded' line, failed attempts "
              "included, over the dashboard's time range.", min=0)
    p["options"] = {"orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    L.add(p, 12, 6)
    L.add(ts("NVENC / NVDEC of the server (its ffmpeg children)",
             # no server process on the GPU is an encoder use of 0, not a gap
             [target(f'sum(immich_gpu_process_encoder_utilization_ratio{{{G}, component="server"}}) or vector(0)',
                     "encoder", "A"),
              target(f'sum(immich_gpu_process_decoder_utilization_ratio{{{G}, component="server"}}) or vector(0)',
                     "decoder", "B")],
             "percentunit", min=0), 12, 6)

    L.row("Queues")
    L.add(ts("Backlog by state",
             [target(f'sum by (queue, state) (immich_queue_jobs{{{I}, state=~"waiting|active|delayed"}})',
                     "{{queue}} {{state}}")], "short", min=0), 12, 8)
    L.add(ts("Drain ETA of busy queues", [target(f"immich_queue_drain_eta_seconds{{{I}}}", "{{queue}}")], "s", min=0),
          6, 8)
    L.add(stat("Paused queues", f"sum(immich_queue_paused{{{I}}})", thresholds=[{"color": "green", "value": None},
                                                                                {"color": "orange", "value": 1}]),
          6, 4)
    L.add(stat("Immich reachable", f"min(immich_server_up{{{I}}}) + min(immich_ml_up{{{I}}})",
               mappings=[{"type": "value", "options": {"2": {"text": "server + ML"}, "1": {"text": "one down"},
                                                      "0": {"text": "both down"}}}],
               thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 2}]), 6, 4)

    L.row("Units and tuning")
    # containers (Docker Compose hosts) beside units: the same timeline and restarts panels
    p = panel("state-timeline", "Unit state", [target(f"immich_unit_state{{{I}}} == 1", "{{unit}}: {{state}}"),
                                               target(f"immich_container_state{{{I}}} == 1", "{{container}}: {{state}}", "B")])
    p["options"] = {"showValue": "never", "mergeValues": True}
    L.add(p, 12, 8)
    L.add(ts("Unit restarts", [target(f"increase(immich_unit_restarts_total{{{I}}}[$__rate_interval])", "{{unit}}"),
                               target(f"increase(immich_container_restarts_total{{{I}}}[$__rate_interval])",
                                      "{{container}}", "B")],
             "short", min=0), 12, 8)
    p = panel("table", "Nice: configured (unit) vs applied (processes)", [
        target(f"immich_unit_nice{{{I}}}", ref="A", instant=True, fmt="table"),
        target(f"immich_process_nice{{{I}}}", ref="B", instant=True, fmt="table"),
    ], description="Configured Nice= from systemd next to the lowest nice value of the unit's processes.")
    p["transformations"] = [{"id": "merge", "options": {}}]
    L.add(p, 12, 7)
    p = panel("table", "Memlock: configured (unit) vs applied (processes)", [
        target(f"immich_unit_memlock_limit_bytes{{{I}}}", ref="A", instant=True, fmt="table"),
        target(f"immich_process_memlock_limit_bytes{{{I}}}", ref="B", instant=True, fmt="table"),
    ], "bytes", "LimitMEMLOCK= from systemd vs RLIMIT_MEMLOCK of the processes (+Inf = unlimited).")
    p["transformations"] = [{"id": "merge", "options": {}}]
    L.add(p, 12, 7)
    p = panel("table", "Device access of the units", [
        target(f"immich_unit_device_access_info{{{I}}}", ref="A", instant=True, fmt="table")],
        description="Whether /dev/nvidia* is reachable for each unit (DevicePolicy, DeviceAllow, PrivateDevices).")
    L.add(p, 12, 6)
    L.add(ts("ML worker lifecycle",
             [target(f"sum by (reason) (increase(immich_ml_worker_exits_total{{{I}}}[$__rate_interval]))",
                     "exit: {{reason}}", "A"),
              target(f"sum(immich_ml_model_loaded{{{I}}})", "models loaded", "B")], "short", min=0), 12, 6)

    L.row("Exporter health")
    L.add(ts("Source up", [target(f"immich_gpu_exporter_source_up{{{I}}}", "{{source}}")], min=0, max=1), 8, 6)
    L.add(ts("Age of the values",
             [target(f"time() - immich_gpu_exporter_source_last_success_timestamp_seconds{{{I}}}", "{{source}}")],
             "s", min=0), 8, 6)
    L.add(ts("Source errors",
             [target(f"sum by (source, reason) (increase(immich_gpu_exporter_source_errors_total{{{I}}}[$__rate_interval]))",
                     "{{source}} {{reason}}")], "short", min=0), 8, 6)

    variables = [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "options": []},
        # An installation on two hosts (remote ML) is one `immich` value; "All" (.*) also matches the
        # hosts that have no such label (one-host installations need none).
        {"type": "query", "name": "immich", "label": "Installation", "datasource": DS,
         "query": {"query": "label_values(immich_gpu_exporter_build_info, immich)", "refId": "immich"},
         "definition": "label_values(immich_gpu_exporter_build_info, immich)", "refresh": 2, "includeAll": True,
         "multi": True, "allValue": ".*", "current": {}, "options": [], "sort": 1},
        {"type": "query", "name": "instance", "label": "Instance", "datasource": DS,
         "query": {"query": 'label_values(immich_gpu_exporter_build_info{immich=~"$immich"}, instance)',
                   "refId": "instance"},
         "definition": 'label_values(immich_gpu_exporter_build_info{immich=~"$immich"}, instance)', "refresh": 2,
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "options": [], "sort": 1},
        {"type": "query", "name": "gpu", "label": "GPU", "datasource": DS,
         "query": {"query": f'label_values(immich_gpu_info{{{I}}}, gpu)', "refId": "gpu"},
         "definition": f'label_values(immich_gpu_info{{{I}}}, gpu)', "refresh": 2,
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "options": [], "sort": 1},
    ]
    return {
        "uid": "immich-gpu",
        "title": "Immich GPU: before / after",
        "description": "Is Immich on the GPU, and how much faster is it? From immich-gpu-exporter.",
        "tags": ["immich", "gpu", "nvidia", "immich-gpu-exporter"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-24h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "links": [],
        "panels": L.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python grafana/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
