"""Table tests of the ML log parser and the provider state machine (pure, no I/O)."""

from __future__ import annotations

import json

import pytest

from immich_gpu_exporter import metrics
from immich_gpu_exporter.mllog import CPU, MAX_MODELS, MAX_PROVIDERS, MLState, Parser, classify, message_text, strip_ansi

U = "immich-machine-learning.service"
C29 = " " * 29
CUDA = "CUDAExecutionProvider"


def entry(msg, pid=4242, unit=U, container=None, priority=6, ts=1_785_000_000_000_000):
    e = {"MESSAGE": msg, "PRIORITY": str(priority), "__REALTIME_TIMESTAMP": str(ts), "__CURSOR": f"c{ts}"}
    if container:
        e.update({"CONTAINER_NAME": container, "_SYSTEMD_UNIT": "docker.service", "_PID": "900"})
    else:
        e.update({"_SYSTEMD_UNIT": unit, "_PID": str(pid)})
    return e


def run(lines, state=None, parser=None, **kw):
    parser = parser or Parser(["immich-server.service"], ["immich_server"])
    state = state or MLState(grace=60)
    for ln in lines:
        for ev in parser.feed(entry(ln, **kw) if isinstance(ln, str) else ln):
            state.apply(ev)
    for ev in parser.flush():
        state.apply(ev)
    return state


# --- classify: one logical message -> event ---------------------------------------------------
CLASSIFY = [
    ("Setting execution providers to ['CUDAExecutionProvider', 'CPUExecutionProvider'], in descending order of "
     "preference", ("providers", (CUDA, CPU), None)),
    ("Setting 'ViT-B-32__openai' execution providers to ['CUDAExecutionProvider', 'CPUExecutionProvider'], in "
     "descending order of preference", ("providers", (CUDA, CPU), None)),
    ("Setting execution providers to ['MIGraphXExecutionProvider', 'CPUExecutionProvider'], in descending order "
     "of preference", ("providers", ("MIGraphXExecutionProvider", CPU), None)),
    ("Setting execution providers to ['CoreMLExecutionProvider', 'CPUExecutionProvider'], in descending order of "
     "preference", ("providers", ("CoreMLExecutionProvider", CPU), None)),
    ("Setting execution providers to ['CPUExecutionProvider'], in descending order of preference",
     ("providers", (CPU,), None)),
    # Rich folded a long word: whitespace inside the list does not matter
    ("Setting execution providers to ['CUDAExecution Provider', 'CPUExecutionProvider'], in descending order",
     ("providers", (CUDA, CPU), None)),
    ("Loading visual model 'ViT-B-32__openai' to memory", ("model_load", "visual", "ViT-B-32__openai")),
    ("Loading detection model 'PP-OCRv5_mobile' to memory", ("model_load", "detection", "PP-OCRv5_mobile")),
    ("Attempt #2 to load recognition model 'antelopev2' to memory", ("model_load", "recognition", "antelopev2")),
    ("Loading facial recognition model 'buffalo_l' to memory", ("model_load", "facial_recognition", "buffalo_l")),
    ("Loading clip model 'XLM-Roberta-Large-Vit-B-16Plus'", ("model_load", "clip", "XLM-Roberta-Large-Vit-B-16Plus")),
    ("Shutting down due to inactivity.", ("idle_shutdown", None, None)),
    ("Booting worker with pid: 17", ("worker_boot", "17", None)),
    ("WORKER TIMEOUT (pid:17)", ("worker_exit", "17", "timeout")),
    ("Worker (pid:17) was sent SIGKILL! Perhaps out of memory?", ("worker_exit", "17", "oom_kill")),
    ("Worker (pid:17) was sent SIGTERM!", ("worker_exit", "17", "signal")),
    ("Worker (pid:17) was sent SIGSEGV!", ("worker_exit", "17", "signal")),
    ("Worker (pid:550) was sent code 139!", ("worker_exit", "550", "signal")),
    ("Worker (pid:17) exited with code 1.", ("worker_exit", "17", "error")),
    ("Worker (pid:17) exited with code 3", ("worker_exit", "17", "error")),
    ("Worker exiting (pid: 17)", ("worker_gone", "17", None)),
    ("Starting gunicorn 25.3.0", ("arbiter_start", None, None)),
    ("Initializing Immich ML [v3.1.0]", ("arbiter_start", None, None)),
    ("Shutting down: Master", ("arbiter_stop", None, None)),
    ("Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*. Please install all dependencies",
     ("provider_error", CUDA, "create_failed")),
    ("Failed to create TensorrtExecutionProvider. Please reference https://onnxruntime.ai/docs/",
     ("provider_error", "TensorrtExecutionProvider", "create_failed")),
    ("/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1209 onnxruntime::Provider& "
     "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
     "libonnxruntime_providers_cuda.so with error: libcublasLt.so.11: cannot open shared object file",
     ("provider_error", CUDA, "library_load")),
    ("Failed to load library libonnxruntime_providers_rocm.so with error: libamdhip64.so.6: cannot open",
     ("provider_error", "ROCMExecutionProvider", "library_load")),
    ("Failed to load library libonnxruntime_providers_migraphx.so with error: libmigraphx_c.so.3: cannot open",
     ("provider_error", "MIGraphXExecutionProvider", "library_load")),
    ("Failed to load library /usr/lib/python3/site-packages/onnxruntime/capi/libonnxruntime_providers_openvino.so "
     "with error: libopenvino.so.2500: cannot open", ("provider_error", "OpenVINOExecutionProvider", "library_load")),
    ("/nix/store/x/onnxruntime_inference_collection.py:69: UserWarning: Specified provider 'CUDAExecutionProvider' "
     "is not in available provider names.Available providers: 'CPUExecutionProvider'",
     ("provider_error", CUDA, "not_available")),
    ("CUDA failure 100: no CUDA-capable device is detected ; GPU=-1 ; hostname=x", ("provider_error", CUDA, "cuda_failure")),
    ("CUDA failure 2: out of memory ; GPU=0", ("provider_error", CUDA, "cuda_failure")),
    ("CUDNN failure 4: CUDNN_STATUS_INTERNAL_ERROR ; GPU=0", ("provider_error", CUDA, "cuda_failure")),
    ("CUDA error cudaErrorNoKernelImageForDevice:no kernel image is available for execution on the device",
     ("provider_error", CUDA, "cuda_failure")),
    ("HIP failure 100: no ROCm-capable device is detected", ("provider_error", None, "cuda_failure")),
    ("OpenVINO: No GPU found, using CPU", ("provider_error", "OpenVINOExecutionProvider", "not_available")),
    ("Machine learning server became healthy (http://localhost:3003).", ("server_health", True, None)),
    ("Machine learning server became unhealthy (http://localhost:3003).", ("server_health", False, None)),
]


@pytest.mark.parametrize("msg,want", CLASSIFY, ids=[c[0][:50] for c in CLASSIFY])
def test_classify_recognises_real_log_texts(msg, want):
    assert classify(msg) == (True, want)


@pytest.mark.parametrize("msg", [
    "Created in-memory cache with unloading after 300s of inactivity.", "Listening at: http://[::]:3003 (7)",
    "Application startup complete.", "Available ORT providers: {'CUDAExecutionProvider', 'CPUExecutionProvider'}",
    "Downloading visual model 'ViT-B-32__openai' to /cache/clip/ViT-B-32__openai. This may take a while.",
    "Exception in ASGI application", "Handling signal: term",
])
def test_known_lines_without_events_are_recognised(msg):
    assert classify(msg) == (True, None)


def test_unknown_text_is_unrecognised():
    assert classify("totally new message format 42") == (False, None)


# --- physical lines -------------------------------------------------------------------------------
def test_message_field_forms():
    assert message_text("a") == "a"
    assert message_text(list(b"caf\xc3\xa9\nx")) == "café\nx"
    assert message_text(list(b"\xff ok")) == "\ufffd ok"
    assert message_text(None) == ""


def test_ansi_codes_are_stripped():
    assert strip_ansi("\x1b[2m[07/30/26 12:00:00]\x1b[0m \x1b[34mINFO    \x1b[0m hi") == "[07/30/26 12:00:00] INFO     hi"


def test_rich_wrapped_provider_list_is_joined_and_ansi_ignored():
    s = run(["\x1b[2;36m[07/30/26 12:34:57]\x1b[0m \x1b[34mINFO    \x1b[0m Setting execution providers to",
             C29 + "['CUDAExecutionProvider',", C29 + "'CPUExecutionProvider'], in descending order of",
             C29 + "preference"])
    assert (s.preferred, s.effective) == (CUDA, CUDA)
    assert s.entries == {(U, "info"): 4}
    assert s.unrecognized == {}


@pytest.mark.parametrize("prefix", ["[07/30/26 12:34:57]", "[30.07.26 12:34:57]", "[2026-07-30 12:34:57]",
                                    "[30/07/2026 12:34:57]", "[07/30/2026 12:34:57 PM]"])
def test_other_locales_time_column(prefix):
    pad = " " * (len(prefix) + 10)
    s = run([f"{prefix} INFO     Setting execution providers to", pad + "['MIGraphXExecutionProvider',",
             pad + "'CPUExecutionProvider'], in descending order of preference"])
    assert s.preferred == "MIGraphXExecutionProvider"


def test_rich_line_with_omitted_time_starts_a_record():
    s = run(["[07/30/26 12:34:57] INFO     Booting worker with pid: 4242",
             " " * 20 + "INFO     Loading visual model 'ViT-B-32__openai' to",
             C29 + "memory"])
    assert s.model_loads == {("visual", "ViT-B-32__openai"): 1}


def test_wrapping_at_another_width_and_a_folded_model_name():
    s = run(["[07/30/26 12:34:57] INFO     Loading visual model 'nllb-clip-large-siglip__mrl",
             C29 + "_v1' to memory"])
    assert s.model_loads == {("visual", "nllb-clip-large-siglip__mrl_v1"): 1}


def test_continuations_are_joined_per_stream_even_when_interleaved():
    p = Parser()
    s = MLState()
    feed = [entry("[07/30/26 12:00:00] INFO     Setting execution providers to", pid=1),
            entry("[07/30/26 12:00:00] INFO     Loading visual model 'ViT-B-32__openai' to", pid=2),
            entry(C29 + "['CUDAExecutionProvider', 'CPUExecutionProvider'], in", pid=1),
            entry(C29 + "memory", pid=2),
            entry(C29 + "descending order of preference", pid=1)]
    for e in feed:
        for ev in p.feed(e):
            s.apply(ev)
    for ev in p.flush():
        s.apply(ev)
    assert s.preferred == CUDA
    assert s.model_loads == {("visual", "ViT-B-32__openai"): 1}


def test_ort_native_lines_with_and_without_timestamp():
    s = run(["[W:onnxruntime:Default, onnxruntime_pybind_state.cc:965 CreateExecutionProviderFactoryInstance] "
             "Failed to create CUDAExecutionProvider. Please reference https://onnxruntime.ai/docs/",
             "2026-07-30 12:00:00.123456789 [E:onnxruntime:Default, provider_bridge_ort.cc:1992 "
             "TryGetProviderInfo_TensorRT] some other message Failed to load provider",
             "2026-07-30 12:00:00.2 [W:onnxruntime:, session_state.cc:1166 VerifyEachNodeIsAssignedToAnEp] Some nodes "
             "were not assigned to the preferred execution providers"])
    assert s.errors == {(CUDA, "create_failed"): 1, ("TensorrtExecutionProvider", "library_load"): 1}
    assert s.entries == {(U, "warning"): 2, (U, "error"): 1}
    assert s.unrecognized == {}


def test_level_of_plain_lines_comes_from_priority():
    s = run(["some plain stderr line"], priority=3)
    assert s.entries == {(U, "error"): 1}
    assert s.unrecognized == {U: 1}


# --- provider rules -------------------------------------------------------------------------------
PROVIDERS = "[07/30/26 12:00:00] INFO     Setting execution providers to ['CUDAExecutionProvider', " \
            "'CPUExecutionProvider'], in descending order of preference"
CREATE_FAILED = "2026-07-30 12:00:00.1 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1094 " \
                "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.*"


def test_creation_failure_after_the_provider_line_means_cpu():
    s = run([PROVIDERS, CREATE_FAILED])
    assert (s.preferred, s.effective, s.cpu_fallback) == (CUDA, CPU, True)


def test_creation_failure_before_the_provider_line_also_means_cpu():
    # stdout and stderr reach journald separately; the warning may be stored first
    s = run([CREATE_FAILED, PROVIDERS])
    assert (s.preferred, s.effective, s.cpu_fallback) == (CUDA, CPU, True)


def test_failure_stays_for_the_worker_but_a_new_worker_starts_clean():
    s = run([PROVIDERS, CREATE_FAILED, PROVIDERS], pid=10)
    assert s.effective == CPU  # second model load in the same broken worker
    s = run(["[07/30/26 12:10:00] INFO     Booting worker with pid: 11"], state=s, pid=11)
    assert s.effective == CPU  # nothing new known yet
    s = run([PROVIDERS], state=s, pid=11)
    assert (s.effective, s.cpu_fallback) == (CUDA, False)


def test_runtime_cuda_failure_alone_does_not_switch_to_cpu():
    s = run([PROVIDERS, "2026-07-30 12:00:00.1 [E:onnxruntime:Default, cuda_call.cc:118 CudaCall] CUDA failure 2: "
                        "out of memory ; GPU=0"])
    assert s.effective == CUDA
    assert s.errors == {(CUDA, "cuda_failure"): 1}


def test_ep_error_block_falls_back_and_counts_once():
    s = run([PROVIDERS, "*************** EP Error ***************",
             "EP Error [ONNXRuntimeError] : 1 : FAIL : CUDA failure 100: no CUDA-capable device is detected",
             "; GPU=-1 when using ['CUDAExecutionProvider', 'CPUExecutionProvider']",
             "Falling back to ['CPUExecutionProvider'] and retrying.", "*" * 40])
    assert s.errors == {(CUDA, "ep_fallback"): 1}
    assert (s.effective, s.cpu_fallback) == (CPU, True)
    assert s.unrecognized == {}


def test_runtime_ep_error_form():
    s = run([PROVIDERS, "EP Error: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION using ['CUDAExecutionProvider', "
                        "'CPUExecutionProvider']", "Falling back to ['CPUExecutionProvider'] and retrying."])
    assert s.errors == {(CUDA, "ep_fallback"): 1}
    assert s.effective == CPU


def test_fallback_line_without_its_error_line_blames_the_preferred_provider():
    s = run(["[07/30/26 12:00:00] INFO     Setting execution providers to ['MIGraphXExecutionProvider', "
             "'CPUExecutionProvider'], in descending order of preference",
             "Falling back to ['CPUExecutionProvider'] and retrying."])
    assert s.errors == {("MIGraphXExecutionProvider", "ep_fallback"): 1}
    assert s.cpu_fallback


def test_openvino_without_gpu_is_a_cpu_fallback():
    s = run(["[07/30/26 12:00:00] INFO     Setting execution providers to ['OpenVINOExecutionProvider', "
             "'CPUExecutionProvider'], in descending order of preference",
             "[07/30/26 12:00:00] DEBUG    OpenVINO: No GPU found, using CPU"])
    assert (s.effective, s.cpu_fallback) == (CPU, True)


def test_cpu_only_install_is_not_a_fallback():
    s = run(["[07/30/26 12:00:00] INFO     Setting execution providers to ['CPUExecutionProvider'], in descending "
             "order of preference"])
    assert (s.preferred, s.effective, s.cpu_fallback) == (CPU, CPU, False)


def test_provider_failure_before_any_provider_line_implies_the_preference():
    s = run([CREATE_FAILED])
    assert (s.preferred, s.effective, s.cpu_fallback) == (CUDA, CPU, True)


# --- workers and models ---------------------------------------------------------------------------
def test_idle_shutdown_unloads_models_and_counts_one_exit():
    s = run(["[07/30/26 12:00:00] INFO     Booting worker with pid: 4242",
             "[07/30/26 12:00:01] INFO     Loading visual model 'ViT-B-32__openai' to memory",
             "[07/30/26 12:05:01] INFO     Shutting down due to inactivity.",
             "[07/30/26 12:05:01] INFO     Worker exiting (pid: 4242)"])
    assert s.exits == {"inactivity": 1}
    assert s.loaded_models() == set()
    assert s.model_loads == {("visual", "ViT-B-32__openai"): 1}


def test_timeout_followed_by_exit_code_or_sigkill_is_one_exit():
    s = run(["[07/30/26 12:00:00] INFO     Booting worker with pid: 9",
             "[07/30/26 12:00:00] CRITICAL WORKER TIMEOUT (pid:9)",
             "[07/30/26 12:00:00] ERROR    Worker (pid:9) was sent SIGKILL! Perhaps out of memory?",
             "[07/30/26 12:00:00] ERROR    Worker (pid:9) exited with code 1."], pid=1)
    assert s.exits == {"timeout": 1}


def test_docker_lines_belong_to_the_worker_booted_last():
    lines = ["[07/30/26 12:00:00] INFO     Booting worker with pid: 8",
             "[07/30/26 12:00:01] INFO     Loading visual model 'ViT-B-32__openai' to memory",
             "[07/30/26 12:00:02] ERROR    Worker (pid:8) was sent SIGKILL! Perhaps out of memory?",
             "[07/30/26 12:00:03] INFO     Booting worker with pid: 9",
             "[07/30/26 12:00:04] INFO     Loading textual model 'ViT-B-32__openai' to memory"]
    s = run(lines, container="immich_machine_learning")
    assert s.exits == {"oom_kill": 1}
    assert s.boots == 2
    assert s.loaded_models() == {("textual", "ViT-B-32__openai")}


def test_arbiter_restart_unloads_everything():
    s = run(["[07/30/26 12:00:01] INFO     Loading visual model 'ViT-B-32__openai' to memory",
             "[07/30/26 12:00:09] INFO     Starting gunicorn 23.0.0"])
    assert s.loaded_models() == set()


def test_server_health_lines_from_the_server_unit():
    s = run(["[Nest] 7  - 07/30/2026, 3:00:31 PM     LOG [Microservices:MachineLearningRepository] Machine "
             "learning server became unhealthy (http://localhost:3003)."], unit="immich-server.service")
    assert s.server_healthy is False
    assert s.unrecognized == {}
    assert s.entries == {("immich-server.service", "info"): 1}


# --- NVML cross-check -----------------------------------------------------------------------------
def test_no_gpu_memory_for_longer_than_grace_is_a_fallback():
    s = run([PROVIDERS, "[07/30/26 12:00:01] INFO     Loading visual model 'ViT-B-32__openai' to memory"])
    s.observe_gpu(1000.0, 0)
    s.observe_gpu(1059.0, 0)
    assert not s.cpu_fallback
    s.observe_gpu(1060.0, 0)
    assert (s.effective, s.cpu_fallback) == (CPU, True)
    s.observe_gpu(1070.0, 0)
    assert s.errors == {(CUDA, "no_gpu_memory"): 1}  # once per episode
    s.observe_gpu(1080.0, 512 << 20)
    assert (s.effective, s.cpu_fallback) == (CUDA, False)


def test_cross_check_needs_nvml_models_and_an_nvidia_provider():
    s = run([PROVIDERS])  # no model loaded
    s.observe_gpu(0.0, 0)
    s.observe_gpu(1000.0, 0)
    assert not s.cpu_fallback
    s = run([PROVIDERS, "[07/30/26 12:00:01] INFO     Loading visual model 'ViT-B-32__openai' to memory"])
    s.observe_gpu(0.0, None)  # NVML down
    s.observe_gpu(1000.0, None)
    assert not s.cpu_fallback


# --- bounded cardinality, metrics contract, persistence -------------------------------------------
def test_label_values_are_bounded():
    lines = [f"[07/30/26 12:00:00] INFO     Loading visual model 'model{i}' to memory" for i in range(MAX_MODELS + 10)]
    lines += [f"[07/30/26 12:00:00] INFO     Setting execution providers to ['P{i}ExecutionProvider', "
              "'CPUExecutionProvider'], in descending order of preference" for i in range(MAX_PROVIDERS + 5)]
    s = run(lines)
    names = {m for _, m in s.model_loads}
    assert len(names) == MAX_MODELS + 1 and "other" in names
    assert sum(s.model_loads.values()) == MAX_MODELS + 10
    assert len(s.providers_seen) == MAX_PROVIDERS
    prov = {dict(x.labels)["provider"] for x in s.samples() if x.name == "immich_ml_execution_provider"}
    assert len(prov) <= MAX_PROVIDERS + 1


def test_samples_follow_the_metric_table():
    s = run([PROVIDERS, CREATE_FAILED, "[07/30/26 12:00:01] INFO     Loading visual model 'ViT-B-32__openai' to "
             "memory", "[07/30/26 12:00:01] CRITICAL WORKER TIMEOUT (pid:4242)", "??"])
    s.apply(next(e for e in Parser(["srv"]).feed(entry("Machine learning server became healthy (x).", unit="srv"))
                 if e.kind == "server_health"))
    names = set()
    for x in s.samples():
        metrics.check_sample(x)
        names.add(x.name)
    # the journal source's transcoding metrics come from transcode.TranscodeState (tests/test_transcode.py)
    assert {m.name for m in metrics.METRICS.values() if m.source == "journal"
            and not m.name.startswith("immich_transcode_")} <= names


def test_state_round_trips_through_json():
    p, s = Parser(), MLState()
    run([PROVIDERS, CREATE_FAILED, "[07/30/26 12:00:01] INFO     Loading visual model 'ViT-B-32__openai' to memory"],
        state=s, parser=p)
    for ev in p.feed(entry("[07/30/26 12:00:02] INFO     Setting execution providers to")):
        s.apply(ev)
    p2, s2 = Parser(), MLState()
    p2.load(json.loads(json.dumps(p.dump())))
    s2.load(json.loads(json.dumps(s.dump())))
    assert s2.samples() == s.samples()
    # the pending half record continues after the "restart"
    for ev in p2.feed(entry(C29 + "['CPUExecutionProvider'], in descending order of preference")) + p2.flush():
        s2.apply(ev)
    assert s2.preferred == CPU


def test_old_masters_late_stop_does_not_end_the_new_worker():
    """A restart read in one batch (backfill, catching up). Under systemd every line of the unit carries
    the main process's _PID (the stdout stream is one connection), so the old master's last record is
    completed only at the final flush, after the new master's worker booted and loaded a model: it must
    end only the workers that existed before it."""
    t = 1_785_000_000_000_000
    old, new = 99, 199
    lines = [
        entry("[07/30/26 12:00:00] INFO     Booting worker with pid: 100", pid=old, ts=t),
        entry("[07/30/26 12:00:01] INFO     Loading visual model 'ViT-B-32__openai' to memory", pid=old, ts=t + 1),
        entry("[07/30/26 12:00:05] INFO     Shutting down: Master", pid=old, ts=t + 5_000_000),
        entry("[07/30/26 12:00:06] INFO     Starting gunicorn 23.0.0", pid=new, ts=t + 6_000_000),
        entry("[07/30/26 12:00:06] INFO     Booting worker with pid: 200", pid=new, ts=t + 6_000_001),
        entry("[07/30/26 12:00:07] INFO     Loading textual model 'ViT-B-32__openai' to memory", pid=new,
              ts=t + 7_000_000),
        entry("[07/30/26 12:00:07] INFO     Setting execution providers to ['CPUExecutionProvider'], in "
              "descending order of preference", pid=new, ts=t + 7_000_001),
        entry("[07/30/26 12:10:07] INFO     Shutting down due to inactivity.", pid=new, ts=t + 607_000_000),
        entry("[07/30/26 12:10:08] INFO     Booting worker with pid: 300", pid=new, ts=t + 608_000_000),
    ]
    s = run(lines[:7])
    assert s.loaded_models() == {("textual", "ViT-B-32__openai")}
    s = run(lines)
    assert s.loaded_models() == set()
    assert s.exits.get("inactivity") == 1
