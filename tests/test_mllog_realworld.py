"""Real-world ML log lines through the parser and the provider state machine (pure, no I/O).

Every fixture line below is data quoted as seen in a public report (the source is named next to it)
or rendered byte for byte the way Immich's `CustomRichHandler` renders it: rich 15.0.0,
`Console(color_system="standard")`, `show_path=False`, `omit_repeated_times=False`, not a terminal, so
ANSI codes (colour *and* bold/dim) are emitted and every line is right-padded to the console width
(80, or `COLUMNS`). Reports copied from `docker compose logs` lost the ANSI codes and the padding;
where the journal would hold them, the helpers put them back (`rich_ansi`, `pad`).

Each scenario asserts the resulting metric values: preferred/effective provider, cpu_fallback,
provider errors by kind, model loads, worker exits by reason, unrecognised counts.
"""

from __future__ import annotations

import pytest

from immich_gpu_exporter import metrics
from immich_gpu_exporter.mllog import CPU, MLState, Parser

U = "immich-machine-learning.service"
SRV = "immich-server.service"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
OV = "OpenVINOExecutionProvider"
MIGX = "MIGraphXExecutionProvider"
ROCM = "ROCMExecutionProvider"
C29 = " " * 29
DIM = "\x1b[2;36m"  # rich's "log.time" style under color_system="standard"
RST = "\x1b[0m"
LEVEL_STYLE = {"DEBUG": "\x1b[32m", "INFO": "\x1b[34m", "WARNING": "\x1b[31m", "ERROR": "\x1b[1;31m",
               "CRITICAL": "\x1b[1;7;31m"}


def pad(line: str, width: int = 80) -> str:
    """Rich's grid is `expand=True`: every physical line is padded with spaces to the console width."""
    return line + " " * max(0, width - len(line))


def rich_ansi(line: str, width: int = 80) -> str:
    """A plain Rich line (as quoted from a report) back in the form Immich writes it to the journal:
    styled time column (blank but styled on continuation lines), styled level, padding."""
    if line.startswith("["):
        ts, rest = line[:19], line[20:]
        lvl, msg = rest[:8], rest[9:]
        style = LEVEL_STYLE[lvl.strip()]
        return f"{DIM}{ts}{RST}{DIM} {RST}{style}{lvl}{RST} " + pad(msg, width - 29)
    return f"{DIM}{' ' * 20}{RST}" + pad(line[20:], width - 20)


def ml(msg, pid=4242, unit=U, priority=6, ts=1_785_000_000_000_000, **extra):
    e = {"MESSAGE": msg, "PRIORITY": str(priority), "__REALTIME_TIMESTAMP": str(ts), "__CURSOR": f"c{ts}",
         "_SYSTEMD_UNIT": unit, "_PID": str(pid), "SYSLOG_IDENTIFIER": "machine-learning"}
    e.update(extra)
    return e


def docker(msg, container="immich_machine_learning", priority=6, **extra):
    """Docker's journald log driver: _PID and _SYSTEMD_UNIT are dockerd's, SYSLOG_IDENTIFIER the short
    container id (as in immich #21910: `a63982a0e983[801]: ...`)."""
    e = {"MESSAGE": msg, "PRIORITY": str(priority), "__REALTIME_TIMESTAMP": "1785000000000000",
         "_SYSTEMD_UNIT": "docker.service", "_PID": "801", "SYSLOG_IDENTIFIER": "a63982a0e983",
         "CONTAINER_NAME": container, "CONTAINER_ID": "a63982a0e983"}
    e.update(extra)
    return e


def as_bytes(e):
    """journalctl -o json prints a field with control characters (ANSI ESC) as an array of byte values."""
    e = dict(e)
    e["MESSAGE"] = list(e["MESSAGE"].encode())
    return e


def run(entries, state=None, parser=None):
    parser = parser or Parser([SRV], ["immich_server"])
    state = state or MLState(grace=60)
    for e in entries:
        e = ml(e) if isinstance(e, str) else e
        for ev in parser.feed(e):
            state.apply(ev)
    for ev in parser.flush():
        state.apply(ev)
    for s in state.samples():
        metrics.check_sample(s)
    return state


def summary(s: MLState) -> dict:
    return {"preferred": s.preferred, "effective": s.effective, "cpu_fallback": s.cpu_fallback,
            "errors": dict(s.errors), "exits": dict(s.exits), "unrecognized": dict(s.unrecognized)}


# ==================================================================================================
# Real sequences (one scenario per report)
# ==================================================================================================

# immich #21910 (v1.142-ish, Docker journald log driver, seen through journalctl): lines padded to 80.
I21910 = [pad(x) for x in [
    "[09/13/25 13:50:22] INFO     Starting gunicorn 23.0.0",
    "[09/13/25 13:50:22] INFO     Listening at: http://[::]:3003 (7)",
    "[09/13/25 13:50:22] INFO     Using worker: immich_ml.config.CustomUvicornWorker",
    "[09/13/25 13:50:22] INFO     Booting worker with pid: 8",
    "[09/13/25 13:50:32] INFO     Started server process [8]",
    "[09/13/25 13:50:32] INFO     Waiting for application startup.",
    "[09/13/25 13:50:32] INFO     Created in-memory cache with unloading after 300s",
    C29 + "of inactivity.",
    "[09/13/25 13:50:32] INFO     Initialized request thread pool with 2 threads.",
    "[09/13/25 13:50:32] INFO     Application startup complete.",
]]

# immich #14808 (v1.123, docker compose logs): CUDA failure 100, then ORT's Python fallback block whose
# "when using" sits on its own line (the exception text ends with a newline), then the next model load.
I14808 = [
    "[12/19/24 04:55:15] INFO     Loading detection model 'buffalo_l' to memory",
    "[12/19/24 04:55:15] INFO     Setting execution providers to",
    C29 + "['CUDAExecutionProvider', 'CPUExecutionProvider'],",
    C29 + "in descending order of preference",
    "2024-12-19 04:55:15.116539945 [E:onnxruntime:Default, cuda_call.cc:118 CudaCall] CUDA failure 100: no "
    "CUDA-capable device is detected ; GPU=-1 ; hostname=cpai.esco.ghaar ; file=/onnxruntime_src/onnxruntime/core/"
    "providers/cuda/cuda_execution_provider_info.cc ; line=66 ; expr=cudaGetDeviceCount(&num_devices);",
    "*************** EP Error ***************",
    "EP Error /onnxruntime_src/onnxruntime/core/providers/cuda/cuda_execution_provider_info.cc:59 static "
    "onnxruntime::CUDAExecutionProviderInfo onnxruntime::CUDAExecutionProviderInfo::FromProviderOptions(const "
    "onnxruntime::ProviderOptions&) [ONNXRuntimeError] : 1 : FAIL : provider_options_utils.h:151 Parse Failed to "
    "parse provider option \"device_id\": CUDA failure 100: no CUDA-capable device is detected ; GPU=-1 ; "
    "hostname=cpai.esco.ghaar ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_execution_provider_info"
    ".cc ; line=66 ; expr=cudaGetDeviceCount(&num_devices);",
    " when using ['CUDAExecutionProvider', 'CPUExecutionProvider']",
    "Falling back to ['CPUExecutionProvider'] and retrying.",
    "****************************************",
    "[12/19/24 04:55:17] INFO     Loading detection model 'antelopev2' to memory",
    "[12/19/24 04:55:17] INFO     Setting execution providers to",
    C29 + "['CUDAExecutionProvider', 'CPUExecutionProvider'],",
    C29 + "in descending order of preference",
]

# nixpkgs #543096 (NixOS, immich-machine-learning.service, journalctl): an empty entry, then ORT's
# creation warning; ORT silently runs on CPU. Then a FastAPI deprecation warning (Python warnings format).
N543096 = [
    "[07/18/26 02:33:27] INFO     Loading visual model 'ViT-B-32__openai' to memory",
    "[07/18/26 02:33:27] INFO     Setting execution providers to",
    C29 + "['CUDAExecutionProvider', 'CPUExecutionProvider'], in",
    C29 + "descending order of preference",
    "",
    "2026-07-18 02:33:28.754265029 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1094 "
    "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*. "
    "Please install all dependencies as mentioned in the GPU requirements page (https://onnxruntime.ai/docs/"
    "execution-providers/CUDA-ExecutionProvider.html#requirements), make sure they're in the PATH, and that your GPU "
    "is supported.",
    "/nix/store/h67aqrvnv3zgv6crzyl3201ryl10d5d2-python3.13-fastapi-0.135.3/lib/python3.13/site-packages/fastapi/"
    "routing.py:328: FastAPIDeprecationWarning: ORJSONResponse is deprecated, FastAPI now serializes data directly to "
    "JSON bytes via Pydantic when a return type or response model is set, which is faster and doesn't need a custom "
    "response class. Read more in the FastAPI docs: https://fastapi.tiangolo.com",
]

# immich #10726 (v1.106, Synology log viewer, reversed there; here in journal order): the old
# "Setting '<model>' execution providers" form, wrapped, then a segfault reported as "code 139".
I10726 = [
    "[07/01/24 10:11:02] INFO     Setting 'XLM-Roberta-Large-Vit-B-16Plus' execution",
    C29 + "providers to ['CUDAExecutionProvider',",
    C29 + "'CPUExecutionProvider'], in descending order of",
    C29 + "preference",
    "[07/01/24 10:11:02] INFO     Loading visual model",
    C29 + "'XLM-Roberta-Large-Vit-B-16Plus' to memory",
    "[07/01/24 10:11:29] ERROR    Worker (pid:550) was sent code 139!",
    "[07/01/24 10:11:29] INFO     Booting worker with pid: 596",
    "[07/01/24 10:11:32] INFO     Started server process [596]",
]

# immich #5634 (v1.90): timeouts followed by SIGKILL, the SIGKILL line wrapped at "Perhaps out of".
I5634 = [
    "[12/11/23 18:39:47] INFO     Booting worker with pid: 47",
    "[12/11/23 18:41:48] CRITICAL WORKER TIMEOUT (pid:47)",
    "[12/11/23 18:41:50] ERROR    Worker (pid:47) was sent SIGKILL! Perhaps out of",
    C29 + "memory?",
    "[12/11/23 18:41:51] INFO     Booting worker with pid: 67",
    "[12/11/23 18:43:51] CRITICAL WORKER TIMEOUT (pid:67)",
    "[12/11/23 18:43:55] ERROR    Worker (pid:67) was sent SIGKILL! Perhaps out of",
    C29 + "memory?",
]

# imagegenius/docker-immich #181: gunicorn's own log format (no Rich), arbiter pid 1305.
IG181 = [
    "[2023-09-22 23:48:13 +0530] [2767] [INFO] Booting worker with pid: 2767",
    "[2023-09-22 23:48:43 +0530] [1305] [CRITICAL] WORKER TIMEOUT (pid:2767)",
    "[2023-09-22 23:48:45 +0530] [1305] [ERROR] Worker (pid:2767) was sent SIGKILL! Perhaps out of memory?",
    "[2023-09-22 23:48:45 +0530] [2821] [INFO] Booting worker with pid: 2821",
    "[2023-09-22 23:49:15 +0530] [1305] [CRITICAL] WORKER TIMEOUT (pid:2821)",
]

# immich #2865 (v1.62, older than the supported range, but the ORT UserWarning text is unchanged).
I2865 = [
    "/opt/venv/lib/python3.11/site-packages/onnxruntime/capi/onnxruntime_inference_collection.py:65: UserWarning: "
    "Specified provider 'CUDAExecutionProvider' is not in available provider names.Available providers: "
    "'CPUExecutionProvider'",
    "  warnings.warn(",
]

# immich #19714 (v1.135, kubernetes, IMMICH_LOG_LEVEL=debug): debug lines and the pre-v2.2 download line.
I19714 = [
    "[07/03/25 11:44:07] INFO     Booting worker with pid: 9",
    "[07/03/25 11:44:08] DEBUG    Could not load ANN shared libraries, using ONNX:",
    C29 + "libmali.so: cannot open shared object file: No such",
    C29 + "file or directory",
    "[07/03/25 11:44:08] DEBUG    RKNN is not available",
    "[07/03/25 11:44:14] DEBUG    Setting model format to onnx",
    "[07/03/25 11:44:14] INFO     Downloading detection model 'buffalo_l'. This may",
    C29 + "take a while.",
]

# immich PR #11063 (ROCm, run-time failure inside a Rich traceback: MIOpen status), abbreviated box.
PR11063 = [
    "[07/14/24 09:00:00] INFO     Setting execution providers to",
    C29 + "['ROCMExecutionProvider', 'CPUExecutionProvider'], in",
    C29 + "descending order of preference",
    "[07/14/24 09:00:05] ERROR    Exception in ASGI application",
    C29,
    C29 + "╭─────── Traceback (most recent call last) ───────╮",
    C29 + "│ ❱  266 │   │   │   return self._sess.run(output │",
    C29 + "│    267 │   │   except C.EPFail as err:          │",
    C29 + "│    268 │   │   │   if self._enable_fallback:    │",
    C29 + "│    269 │   │   │   │   print(f\"EP Error: {err!s │",
    C29 + "╰─────────────────────────────────────────────────╯",
    C29 + "Fail: [ONNXRuntimeError] : 1 : FAIL : Non-zero",
    C29 + "status code returned while running Conv node.",
    C29 + "Name:'Conv_426' Status Message: MIOPEN failure 7:",
    C29 + "miopenStatusUnknownError ; GPU=0 ;",
    C29 + "hostname=b86317b041da ;",
    C29 + "file=/code/onnxruntime/onnxruntime/core/providers/r",
    C29 + "ocm/nn/conv.cc ; line=1 ; expr=miopenFindConvolutionForwardAlgorithm",
]

# microsoft/onnxruntime #23301: cuDNN frontend failure lines (ORT 1.20+, same in Immich's CUDA image).
ORT23301 = [
    "2025-12-05 01:41:01.838744757 [E:onnxruntime:Default, cudnn_fe_call.cc:33 "
    "CudaErrString<cudnn_frontend::error_object>] execute(handle, plan->get_raw_desc(), "
    "variant_pack_descriptor.get_ptr()) failed with message: , and code: CUDNN_STATUS_EXECUTION_FAILED_CUDART",
    "2025-12-05 01:41:01.838766991 [E:onnxruntime:Default, cudnn_fe_call.cc:93 CudaCall] CUDNN_FE failure 11: "
    "CUDNN_BACKEND_API_FAILED ; GPU=0 ; hostname=acer ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/nn/"
    "conv.cc ; line=483 ; expr=s_.cudnn_fe_graph->execute(cudnn_handle, s_.variant_pack, ws.get()); ",
]

PROVIDERS_CUDA = ["[12/19/24 04:55:15] INFO     Setting execution providers to",
                  C29 + "['CUDAExecutionProvider', 'CPUExecutionProvider'],", C29 + "in descending order of preference"]


def test_21910_docker_journald_padded_lines_are_all_recognised():
    s = run([docker(x) for x in I21910])
    assert s.unrecognized == {}
    assert s.boots == 1
    assert s.entries == {("immich_machine_learning", "info"): 10}
    assert (s.preferred, s.effective) == (None, None)


def test_21910_with_real_rich_ansi_as_byte_arrays():
    s = run([as_bytes(docker(rich_ansi(x))) for x in I21910 + PROVIDERS_CUDA])
    assert s.unrecognized == {}
    assert (s.preferred, s.effective, s.cpu_fallback) == (CUDA, CUDA, False)


def test_14808_ep_error_block_with_when_using_on_its_own_line():
    s = run([docker(x) for x in I14808])
    assert summary(s) == {"preferred": CUDA, "effective": CPU, "cpu_fallback": True,
                          "errors": {(CUDA, "cuda_failure"): 1, (CUDA, "ep_fallback"): 1}, "exits": {},
                          "unrecognized": {}}
    assert s.model_loads == {("detection", "buffalo_l"): 1, ("detection", "antelopev2"): 1}


def test_543096_nixos_create_failed_is_a_silent_cpu_fallback():
    s = run(N543096)
    assert summary(s) == {"preferred": CUDA, "effective": CPU, "cpu_fallback": True,
                          "errors": {(CUDA, "create_failed"): 1}, "exits": {}, "unrecognized": {}}


def test_10726_old_format_and_code_139():
    s = run([docker(x) for x in I10726])
    assert (s.preferred, s.effective) == (CUDA, CUDA)
    assert s.exits == {"signal": 1}
    assert s.model_loads == {("visual", "XLM-Roberta-Large-Vit-B-16Plus"): 1}
    assert s.unrecognized == {}


def test_5634_timeout_then_sigkill_is_one_timeout_exit_per_worker():
    s = run([docker(x) for x in I5634])
    assert s.exits == {"timeout": 2}
    assert s.boots == 2
    assert s.unrecognized == {}


def test_ig181_gunicorn_default_format_on_a_systemd_host():
    s = run([ml(x, pid=1305 if "[1305]" in x else int(x.split("pid: ")[1])) for x in IG181])
    assert s.exits == {"timeout": 2}
    assert s.boots == 2
    assert s.entries == {(U, "info"): 2, (U, "critical"): 2, (U, "error"): 1}
    assert s.unrecognized == {}


def test_2865_user_warning_not_available():
    s = run(I2865, )
    assert s.errors == {(CUDA, "not_available"): 1}
    assert s.unrecognized == {}


def test_19714_debug_lines_are_recognised():
    s = run([docker(x) for x in I19714])
    assert s.unrecognized == {}
    assert s.entries == {("immich_machine_learning", "info"): 3, ("immich_machine_learning", "debug"): 5}


def test_11063_rocm_runtime_failure_in_a_traceback_counts_but_keeps_rocm():
    s = run([docker(rich_ansi(x) if x.startswith("[") or x.startswith(C29) else x) for x in PR11063])
    assert summary(s) == {"preferred": ROCM, "effective": ROCM, "cpu_fallback": False,
                          "errors": {(ROCM, "cuda_failure"): 1}, "exits": {}, "unrecognized": {}}


def test_23301_cudnn_frontend_failure_is_a_cuda_failure():
    s = run(PROVIDERS_CUDA + ORT23301)
    assert s.errors == {(CUDA, "cuda_failure"): 1}
    assert (s.effective, s.cpu_fallback) == (CUDA, False)
    assert s.unrecognized == {}


# ==================================================================================================
# Provider lists of every image variant and custom builds
# ==================================================================================================

def providers_line(names, width=80, ts="[07/30/26 12:00:00]"):
    """`Setting execution providers to [...]` wrapped the way Rich wraps it at `width` (word wrap of
    the message column; continuation lines indented to the message column)."""
    msg = f"Setting execution providers to {names!r}, in descending order of preference"
    col = len(ts) + 10
    room = width - col
    lines, cur = [], ""
    for word in msg.split(" "):
        if cur and len(cur) + 1 + len(word) > room:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    lines.append(cur)
    return [pad(f"{ts} INFO     {lines[0]}", width)] + [pad(" " * col + x, width) for x in lines[1:]]


@pytest.mark.parametrize("names", [
    [CUDA, CPU],  # cuda image
    [OV, CPU],  # openvino image
    [ROCM, CPU],  # rocm image v1.130 .. v2.5
    [MIGX, CPU],  # rocm image since v2.6
    ["CoreMLExecutionProvider", CPU],  # macOS (v2.2+)
    [CUDA, OV, CPU],  # nixpkgs onnxruntime with both (nixpkgs #560185)
    [TRT, CUDA, CPU],  # custom builds (imagegenius/docker-immich #679)
    [CPU],
])
@pytest.mark.parametrize("width", [80, 120, 200, 10000])
def test_provider_lists_at_any_width(names, width):
    s = run([as_bytes(ml(rich_ansi(x, width))) for x in providers_line(names, width)])
    assert (s.preferred, s.effective, s.cpu_fallback) == (names[0], names[0], False)
    assert s.unrecognized == {}


@pytest.mark.parametrize("ts", ["[07/30/26 12:00:00]", "[30.07.26 12:00:00]", "[2026-07-30 12:00:00]",
                                "[07/30/2026 12:00:00 PM]", "[30/07/26 12:00:00]"])
def test_provider_lists_with_other_locales(ts):
    s = run(providers_line([CUDA, CPU], 80, ts) + [CREATE_FAILED_TRT.replace("Tensorrt", "CUDA")])
    assert (s.preferred, s.effective, s.cpu_fallback) == (CUDA, CPU, True)


# imagegenius/docker-immich #679 and onnxruntime's provider bridge: a TensorRT-first custom build
# without libnvinfer: ORT logs the library failure and the creation warning, then runs on CUDA.
LIB_TRT = ("2025-03-01 10:00:00.000000000 [E:onnxruntime:Default, provider_bridge_ort.cc:2022 "
           "TryGetProviderInfo_TensorRT] /onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1695 "
           "onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load "
           "library libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: cannot open shared object file: "
           "No such file or directory")
CREATE_FAILED_TRT = ("2025-03-01 10:00:00.000000001 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1000 "
                     "CreateExecutionProviderFactoryInstance] Failed to create TensorrtExecutionProvider. Require "
                     "cuDNN 9.* and CUDA 12.*, and TensorRT 10.*. Please install all dependencies as mentioned in the "
                     "GPU requirements page, make sure they're in the PATH, and that your GPU is supported.")


def test_tensorrt_first_build_without_tensorrt_runs_on_cuda():
    s = run(providers_line([TRT, CUDA, CPU]) + [LIB_TRT, CREATE_FAILED_TRT])
    assert summary(s) == {"preferred": TRT, "effective": CUDA, "cpu_fallback": False,
                          "errors": {(TRT, "library_load"): 1, (TRT, "create_failed"): 1}, "exits": {},
                          "unrecognized": {}}


def test_tensorrt_ep_error_falls_back_to_cuda_not_cpu():
    # ORT's Python fallback list is CUDA+CPU whenever TensorRT is available (pythongosssss/ComfyUI-WD14-Tagger
    # #59 shows the block; onnxruntime_inference_collection.py sets _fallback_providers so)
    s = run(providers_line([TRT, CUDA, CPU]) + [
        "*************** EP Error ***************",
        "EP Error /onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:539 void "
        "onnxruntime::python::RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const ProviderOptions&) Please "
        "install TensorRT libraries as mentioned in the GPU requirements page, make sure they're in the PATH or "
        "LD_LIBRARY_PATH, and that your GPU is supported.",
        " when using ['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider']",
        "Falling back to ['CUDAExecutionProvider', 'CPUExecutionProvider'] and retrying.",
        "****************************************"])
    assert summary(s) == {"preferred": TRT, "effective": CUDA, "cpu_fallback": False,
                          "errors": {(TRT, "ep_fallback"): 1}, "exits": {}, "unrecognized": {}}


def test_cuda_path_ep_error_falling_back_to_the_same_list_is_cpu():
    # pythongosssss/ComfyUI-WD14-Tagger #59 (Windows text, same ORT Python code): the fallback list still
    # names CUDA, but CUDA is the provider that just failed in this process
    s = run(providers_line([CUDA, CPU]) + [
        "*************** EP Error ***************",
        "EP Error C:\\a\\_work\\1\\s\\onnxruntime\\python\\onnxruntime_pybind_state.cc:866 "
        "onnxruntime::python::CreateExecutionProviderInstance CUDA_PATH is set but CUDA wasnt able to be loaded. "
        "Please install the correct version of CUDA andcuDNN as mentioned in the GPU requirements page  "
        "(https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements),  make sure "
        "they're in the PATH, and that your GPU is supported.",
        " when using ['CUDAExecutionProvider', 'CPUExecutionProvider']",
        "Falling back to ['CUDAExecutionProvider', 'CPUExecutionProvider'] and retrying.",
        "****************************************"])
    assert (s.effective, s.cpu_fallback) == (CPU, True)
    assert s.errors == {(CUDA, "ep_fallback"): 1}


@pytest.mark.parametrize("line", [
    # CUDA error 35: driver too old for the runtime (immich discussions, many)
    "2024-05-01 10:00:00.000000000 [E:onnxruntime:Default, cuda_call.cc:118 CudaCall] CUDA failure 35: CUDA driver "
    "version is insufficient for CUDA runtime version ; GPU=0 ; hostname=2f4a ; file=/onnxruntime_src/onnxruntime/"
    "core/providers/cuda/cuda_execution_provider.cc ; line=280 ; expr=cudaSetDevice(info_.device_id);",
    # immich #13045: CUDA failure 999
    "2024-09-30 10:00:00.000000000 [E:onnxruntime:Default, cuda_call.cc:118 CudaCall] CUDA failure 999: unknown "
    "error ; GPU=0 ; hostname=6c1d ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_execution_provider.cc "
    "; line=280 ; expr=cudaSetDevice(info_.device_id);",
    # triton-inference-server/server #4766: cuDNN failure at run time
    "2022-08-13 11:42:42.261057647 [E:onnxruntime:log, cuda_call.cc:118 CudaCall] CUDNN failure 8: "
    "CUDNN_STATUS_EXECUTION_FAILED ; GPU=0 ; hostname=asr5.jd.163.org ; expr=cudnnConvolutionForward(s_.handle, "
    "&alpha, s_.x_tensor, s_.x_data, s_.w_desc, s_.w_data, s_.conv_desc, s_.algo, workspace.get(), "
    "s_.workspace_bytes, &beta, s_.y_tensor, s_.y_data);",
    # immich #8097 / imagegenius #692: no kernel image (GPU too old for the build)
    "2024-03-20 10:00:00.000000000 [E:onnxruntime:, sequential_executor.cc:516 ExecuteKernel] Non-zero status code "
    "returned while running Gather node. Name:'/token_embedding/Gather' Status Message: CUDA error "
    "cudaErrorNoKernelImageForDevice:no kernel image is available for execution on the device",
] + ORT23301[1:])
def test_runtime_cuda_errors_count_but_keep_cuda(line):
    s = run(providers_line([CUDA, CPU]) + [line])
    assert s.errors == {(CUDA, "cuda_failure"): 1}
    assert (s.effective, s.cpu_fallback) == (CUDA, False)
    assert s.unrecognized == {}


def test_openvino_runtime_failure_in_traceback_is_recognised():
    # immich #7487 (v1.95 openvino image): run-time failure of an OpenVINO subgraph in a Rich traceback
    s = run(providers_line([OV, CPU]) + [
        "[02/28/24 20:00:00] ERROR    Exception in ASGI application",
        C29,
        C29 + "╭─────── Traceback (most recent call last) ───────╮",
        C29 + "│   218 │   │   try:                              │",
        C29 + "│ ❱ 219 │   │   │   return self._sess.run(output_ │",
        C29 + "│   220 │   │   except C.EPFail as err:           │",
        C29 + "│   221 │   │   │   if self._enable_fallback:     │",
        C29 + "│   222 │   │   │   │   print(f\"EP Error: {str(er │",
        C29 + "╰─────────────────────────────────────────────────╯",
        C29 + "Fail: [ONNXRuntimeError] : 1 : FAIL : Non-zero",
        C29 + "status code returned while running",
        C29 + "OpenVINO-EP-subgraph_3 node.",
        C29 + "Name:'OpenVINOExecutionProvider_OpenVINO-EP-subgrap",
        C29 + "h_3_0' Status Message:",
        C29 + "/home/onnxruntimedev/onnxruntime/onnxruntime/core/p",
        C29 + "roviders/openvino/ov_interface.cc:53"])
    assert (s.preferred, s.effective, s.cpu_fallback) == (OV, OV, False)
    assert s.unrecognized == {}
    assert s.entries == {(U, "info"): len(providers_line([OV, CPU])), (U, "error"): 16}


def test_real_rich_traceback_with_ansi_and_blank_line_keeps_one_record():
    # rendered by rich 15.0.0 with Immich's handler settings (see the module docstring); the exception
    # text names the CUDA provider library, exactly as ORT raises it when fallback is disabled
    lines = [
        "\x1b[2;36m[11/26/26 18:56:17]\x1b[0m\x1b[2;36m \x1b[0m\x1b[1;31mERROR   \x1b[0m Exception in ASGI application"
        "                      ",
        "\x1b[2;36m                    \x1b[0m" + " " * 60,
        "\x1b[2;36m                    \x1b[0m         \x1b[31m╭─\x1b[0m\x1b[31m──────\x1b[0m\x1b[31m \x1b[0m\x1b[1;31m"
        "Traceback \x1b[0m\x1b[1;2;31m(most recent call last)\x1b[0m\x1b[31m \x1b[0m\x1b[31m──────\x1b[0m\x1b[31m─╮\x1b[0m",
        "\x1b[2;36m                    \x1b[0m         \x1b[31m│\x1b[0m      \x1b[33m: Failed to load library "
        "libonnxruntime_pr\x1b[0m \x1b[31m│\x1b[0m",
        "\x1b[2;36m                    \x1b[0m         \x1b[31m╰─────────────────────────────────────────────────╯"
        "\x1b[0m",
        "\x1b[2;36m                    \x1b[0m         \x1b[1;91mRuntimeError: \x1b[0m" + " " * 37,
        "\x1b[2;36m                    \x1b[0m         \x1b[1m[\x1b[0mONNXRuntimeError\x1b[1m]\x1b[0m : \x1b[1;36m1\x1b[0m : "
        "FAIL : Failed to load     ",
        "\x1b[2;36m                    \x1b[0m         library libonnxruntime_providers_cuda.so with      ",
        "\x1b[2;36m                    \x1b[0m         error: libcublasLt.so.\x1b[1;36m11\x1b[0m: cannot open shared "
        "object",
        "\x1b[2;36m                    \x1b[0m         file: No such file or directory                    ",
    ]
    s = run([as_bytes(ml(x)) for x in lines])
    assert s.errors == {(CUDA, "library_load"): 1}
    assert s.entries == {(U, "error"): len(lines)}
    assert s.unrecognized == {}


# ==================================================================================================
# Worker lifecycle as hosts really attribute it
# ==================================================================================================

def idle_cycle(worker_pid, ts="[07/30/26 12:00:00]"):
    """One worker's life in v1.107+ (immich main.py + uvicorn + gunicorn lines, as in #21910/#13679)."""
    return [f"{ts} INFO     Booting worker with pid: {worker_pid}",
            f"{ts} INFO     Started server process [{worker_pid}]",
            f"{ts} INFO     Waiting for application startup.",
            f"{ts} INFO     Created in-memory cache with unloading after 300s", C29 + "of inactivity.",
            f"{ts} INFO     Application startup complete.",
            f"{ts} INFO     Loading visual model 'ViT-B-32__openai' to memory",
            *providers_line([CUDA, CPU], ts=ts),
            f"{ts} INFO     Shutting down due to inactivity.",
            f"{ts} INFO     Shutting down",
            f"{ts} INFO     Waiting for application shutdown.",
            f"{ts} INFO     Application shutdown complete.",
            f"{ts} INFO     Finished server process [{worker_pid}]",
            f"{ts} INFO     Worker exiting (pid: {worker_pid})"]


def test_docker_idle_cycles_count_every_exit_and_reload():
    s = run([docker(x) for x in idle_cycle(8) + idle_cycle(31) + idle_cycle(54)[:-6]])
    assert s.exits == {"inactivity": 2}
    assert s.boots == 3
    assert s.loaded_models() == {("visual", "ViT-B-32__openai")}
    assert s.unrecognized == {}


def test_systemd_idle_cycles_with_per_worker_pid():
    # systemd >= 244 attributes stdout lines to the writing process (SCM_CREDENTIALS): _PID = worker
    s = run([ml(x, pid=p) for p in (101, 102) for x in idle_cycle(p)] + [ml(x, pid=103) for x in idle_cycle(103)[:-6]])
    assert s.exits == {"inactivity": 2}
    assert s.loaded_models() == {("visual", "ViT-B-32__openai")}


def test_systemd_before_244_gives_every_line_the_main_pid():
    # systemd < 244 (and RHEL 8 before its backport) keeps the credentials of the process that connected
    # the stream (systemd/systemd #13708, PR #13771): every worker's line carries the arbiter's _PID.
    # A broken first worker must not make later healthy workers look broken, and every idle exit counts.
    first = idle_cycle(101)
    first.insert(first.index(f"[07/30/26 12:00:00] INFO     Shutting down due to inactivity."),
                 CREATE_FAILED_TRT.replace("Tensorrt", "CUDA"))
    s = run([ml(x, pid=100) for x in first])
    assert (s.effective, s.cpu_fallback) == (CPU, True)
    s = run([ml(x, pid=100) for x in idle_cycle(102) + idle_cycle(103)[:-6]], state=s)
    assert s.exits == {"inactivity": 2}
    assert (s.effective, s.cpu_fallback) == (CUDA, False)
    assert s.loaded_models() == {("visual", "ViT-B-32__openai")}


def test_two_workers_on_systemd_are_tracked_apart():
    # MACHINE_LEARNING_WORKERS=2 with MACHINE_LEARNING_DEVICE_IDS=0,1: worker 201 cannot create CUDA,
    # worker 202 can. cpu_fallback is 1 while any live worker fell back; the broken worker's state does
    # not leak into the healthy one, and once it is gone the healthy one decides.
    boot = "[07/30/26 12:00:00] INFO     Booting worker with pid: {}"
    t = 1_785_000_000_000_000
    # 202's wrapped record stays pending until the journal goes quiet (flush), after 201's later lines
    s = run([ml(boot.format(201), pid=201, ts=t), ml(boot.format(202), pid=202, ts=t + 1),
             *[ml(x, pid=202, ts=t + 2) for x in providers_line([CUDA, CPU])],
             *[ml(x, pid=201, ts=t + 3) for x in providers_line([CUDA, CPU])],
             ml(CREATE_FAILED_TRT.replace("Tensorrt", "CUDA"), pid=201, ts=t + 4)])
    assert (s.preferred, s.effective, s.cpu_fallback) == (CUDA, CPU, True)
    assert s.errors == {(CUDA, "create_failed"): 1}
    s = run([ml(x, pid=202, ts=t + 5) for x in providers_line([CUDA, CPU])], state=s)
    assert (s.effective, s.cpu_fallback) == (CPU, True)  # 201 is still live and on the CPU
    assert s.worker_providers() == {CPU: 1, CUDA: 1}  # 202's first session was created without evidence
    # the broken worker times out and is replaced by a healthy one: no fallback any more
    s = run([ml("[07/30/26 12:10:00] CRITICAL WORKER TIMEOUT (pid:201)", pid=200, ts=t + 6),
             ml("[07/30/26 12:10:00] ERROR    Worker (pid:201) exited with code 1.", pid=200, ts=t + 7),
             ml("[07/30/26 12:10:01] INFO     Booting worker with pid: 203", pid=203, ts=t + 8),
             *[ml(x, pid=203, ts=t + 9) for x in providers_line([CUDA, CPU])]], state=s)
    assert (s.effective, s.cpu_fallback) == (CUDA, False)
    assert s.exits == {"timeout": 1}


def test_docker_two_workers_interleaving():
    # MACHINE_LEARNING_WORKERS=2 on Docker: both workers' lines carry dockerd's _PID; Rich writes each
    # record in one write() below PIPE_BUF, so records do not interleave inside themselves
    lines = ["[07/30/26 12:00:00] INFO     Booting worker with pid: 8",
             "[07/30/26 12:00:00] INFO     Booting worker with pid: 9",
             "[07/30/26 12:00:05] INFO     Loading visual model 'ViT-B-32__openai' to memory",
             *providers_line([CUDA, CPU]),
             "[07/30/26 12:00:05] INFO     Loading textual model 'ViT-B-32__openai' to memory",
             *providers_line([CUDA, CPU])]
    s = run([docker(x) for x in lines])
    assert (s.preferred, s.effective, s.cpu_fallback) == (CUDA, CUDA, False)
    assert s.boots == 2
    assert len(s.loaded_models()) == 2


def test_podman_quadlet_units_carry_container_names():
    # podman's journald log driver (conmon) adds CONTAINER_NAME; under quadlet the entries also carry the
    # unit, and the default container name is "systemd-<unit name>". The server unit stays the server.
    srv = {"_SYSTEMD_UNIT": SRV, "_PID": "3100", "CONTAINER_NAME": "systemd-immich-server",
           "SYSLOG_IDENTIFIER": "systemd-immich-server"}
    mlu = {"_PID": "3000", "CONTAINER_NAME": "systemd-immich-machine-learning"}
    s = run([ml("[Nest] 7  - 07/30/2026, 3:00:31 PM     LOG [Microservices:MachineLearningRepository] Machine "
                "learning server became unhealthy (http://immich-machine-learning:3003).", **srv),
             *[ml(x, **mlu) for x in providers_line([CUDA, CPU])]])
    assert s.server_healthy is False
    assert s.entries[(SRV, "info")] == 1
    assert s.preferred == CUDA
    assert s.unrecognized == {}


def test_a_clock_stepped_back_does_not_freeze_the_provider():
    # a host without RTC boots with a clock hours behind the last persisted entry
    t = 1_785_000_000_000_000
    s = run([ml(x, ts=t) for x in providers_line([CUDA, CPU])])
    s = run([ml(x, pid=77, ts=t - 6 * 3600 * 10**6) for x in ["[01/01/70 00:00:10] INFO     Starting gunicorn 23.0.0",
                                                              *providers_line([CUDA, CPU], ts="[01/01/70 00:00:11]"),
                                                              CREATE_FAILED_TRT.replace("Tensorrt", "CUDA")]], state=s)
    assert (s.effective, s.cpu_fallback) == (CPU, True)


# ==================================================================================================
# journalctl's JSON as real hosts produce it (sources/journal.py helpers and Parser.feed)
# ==================================================================================================

def test_repeated_fields_come_as_lists():
    # journalctl -o json: a field present several times in one entry is an array of its values
    # (each a string or a byte array)
    e = ml(["[07/30/26 12:00:00] INFO     Booting worker with pid: 9", list(b"second")], pid=9)
    e["_SYSTEMD_UNIT"] = [U, "session-1.scope"]
    e["_PID"] = ["9", "10"]
    s = run([e])
    assert s.boots == 1
    assert (U, "info") in s.entries


def test_backfill_start_is_found_in_ansi_byte_array_messages():
    from immich_gpu_exporter.sources.journal import ml_start_index
    window = [as_bytes(docker(rich_ansi(x))) for x in I21910[:1] + I21910 + I21910[4:]]
    assert ml_start_index(window, lambda e: True) == len(I21910[:1])


def test_podman_server_unit_is_not_ml_for_the_backfill():
    from immich_gpu_exporter.sources.journal import JournalSource
    src = JournalSource.__new__(JournalSource)
    src.server_units, src.server_containers = (SRV,), ("immich_server",)
    assert not src._is_ml({"_SYSTEMD_UNIT": SRV, "CONTAINER_NAME": "systemd-immich-server"})
    assert not src._is_ml({"_SYSTEMD_UNIT": "docker.service", "CONTAINER_NAME": "immich_server"})
    assert src._is_ml({"_SYSTEMD_UNIT": U, "CONTAINER_NAME": "systemd-immich-machine-learning"})
    assert src._is_ml({"_SYSTEMD_UNIT": U})


def test_journal_files_readable_only_as_own_user_journal_is_permission_denied(tmp_path):
    # An exporter without the systemd-journal group (e.g. DynamicUser) can read its own
    # user-<uid>.journal but not system.journal: journalctl would follow silently and see nothing.
    import os
    import tempfile

    root = tempfile.mkdtemp(prefix="qa-journal-")
    try:
        os.chmod(root, 0o755)
        mid = os.path.join(root, "0123456789abcdef0123456789abcdef")
        os.mkdir(mid, 0o755)
        for name, mode in (("system.journal", 0o640), ("user-65534.journal", 0o644)):
            with open(os.path.join(mid, name), "w"):
                pass
            os.chmod(os.path.join(mid, name), mode)
        os.mkdir(os.path.join(root, "0123456789abcdef0123456789abcdef.immich"), 0o755)  # a namespace
        from immich_gpu_exporter.sources import journal as j

        def as_nobody():
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: drop to nobody, look where journalctl looks, report, leave at once
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    j.SYSTEM_JOURNAL_DIRS = (root,)
                    d = j.find_journal_files(None)
                    os.write(w, (d.reason if d else "ok").encode())
                finally:
                    os._exit(0)
            os.close(w)
            out = os.read(r, 100).decode()
            os.close(r)
            os.waitpid(pid, 0)
            return out

        assert as_nobody() == "permission_denied"
        os.chmod(os.path.join(mid, "system.journal"), 0o644)
        assert as_nobody() == "ok"
    finally:
        import shutil
        shutil.rmtree(root)
