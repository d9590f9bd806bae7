"""The CPU-fallback verdict on the REAL Immich ML service's journals, entry by entry.

Each capture in tests/fixtures/real-ml/<variant>/ is what the real service printed (unit.export: a journal
export with its real timestamps, PIDs and bytes; docker.jsonl: Docker's json-file view of the same program),
plus manifest.json with the truth recorded *inside* the service's processes (which worker created which ORT
session on which provider, which died, and when), never read from the log. A capture is written into a real
journal file (systemd-journal-remote), read back by the real journalctl with the journal source's own command
line, and applied through the journal source one entry at a time. After every entry the exported preferred
provider, effective provider and immich_ml_cpu_fallback are compared with the truth at that moment: from the
first evidence entry on for captures with a fallback or a crash, from the first session on for the others.

"The exporter's answer after entry i" is what a scrape sees once the journal has been quiet after entry i for
FLUSH_AFTER (0.15 s): a wrapped Rich record is complete only then. The probe copies the source's state (through
its persisted JSON form, so persistence is checked at every entry too) and reports from the copy; the delay this
adds is measured in bench/bench_verdict.py and written in BENCHMARKS.md.

The truth (`Truth`) is derived from the manifest alone: workers live from their boot to the master's line
about their exit; a live worker with a session that fell back runs on CPU, one with only sessions on the
requested provider runs there, one that dies while creating a session runs on nothing; when no live worker
has a session the unit keeps its previous truth.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import pytest

from immich_gpu_exporter import config as configmod
from immich_gpu_exporter.core import Snapshot, SourceState
from immich_gpu_exporter.metrics import check_sample
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.journal import JournalSource
from tests.support.journal import BOOT_ID, export_entry, write_journal

REAL_ML = pathlib.Path(__file__).resolve().parent / "fixtures" / "real-ml"
CAPTURES = sorted(p.parent for p in REAL_ML.glob("*/manifest.json"))
SYNTHETIC_ML = pathlib.Path(__file__).resolve().parent / "fixtures" / "synthetic-ml"
SYNTHETIC = sorted(p.parent for p in SYNTHETIC_ML.glob("*/manifest.json"))
GPU_MEMORY = {"component_gpu_memory": {"ml": 812 << 20}}  # the NVML source's fact: the ML processes' GPU memory
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
ML_CONTAINER = "immich_machine_learning"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

pytestmark = pytest.mark.skipif(not os.access("/lib/systemd/systemd-journal-remote", os.X_OK),
                                reason="systemd-journal-remote is not installed")


# --------------------------------------------------------------------------------------------------
# the truth, from the manifest only
# --------------------------------------------------------------------------------------------------
class Truth:
    def __init__(self, manifest: dict[str, Any]) -> None:
        t = manifest["truth"]
        self.workers = t["workers"]
        self.sessions = t["sessions"]
        self.unit: str | None = None  # the unit's effective provider so far ("" = none: crashed)

    def at(self, us: int) -> tuple[str | None, str | None, bool]:
        """(preferred, effective, cpu_fallback) at journal time `us`; call in time order."""
        created = [s for s in self.sessions if s["create_realtime_us"] <= us]
        preferred = created[-1]["requested"][0] if created else None
        fell, ok, dying = [], [], []
        for w in self.workers:
            booted, gone = w["booted_realtime_us"], w["exit_realtime_us"]
            if (booted is not None and us < booted) or (gone is not None and us >= gone):
                continue
            mine = [s for s in created if s["pid"] == w["pid"]]
            if any(s["outcome"] == "fell_back" for s in mine):
                fell.append(next(s["providers"][0] for s in mine if s["outcome"] == "fell_back"))
            elif any(s["outcome"] == "preferred" for s in mine):
                ok.append(next(s["providers"][0] for s in mine if s["outcome"] == "preferred"))
            elif any(s["outcome"].startswith("worker_died") for s in mine):
                dying.append(w["pid"])
        if fell:
            self.unit = CPU if CPU in fell else fell[-1]
        elif ok:
            self.unit = ok[-1]
        elif dying:
            self.unit = ""
        effective = self.unit or None
        return preferred, effective, bool(preferred and preferred != CPU and effective == CPU)


# --------------------------------------------------------------------------------------------------
# captures -> real journal files -> real journalctl -> the journal source
# --------------------------------------------------------------------------------------------------
def docker_export(fx: pathlib.Path) -> bytes:
    """docker.jsonl as Docker's journald log driver stores it (CONTAINER_NAME, dockerd's _PID, PRIORITY 6
    for stdout and 3 for stderr). Synthetic in its envelope only: every MESSAGE and time is the capture's."""
    out = bytearray()
    for i, line in enumerate((fx / "docker.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        t = datetime.strptime(rec["time"][:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc)
        us = int(t.timestamp()) * 1_000_000 + t.microsecond
        out += export_entry({"__REALTIME_TIMESTAMP": str(us), "__MONOTONIC_TIMESTAMP": str(1_000_000 + i),
                             "_BOOT_ID": BOOT_ID, "_SYSTEMD_UNIT": "docker.service", "_PID": "900",
                             "_UID": "0", "_COMM": "dockerd", "_TRANSPORT": "journal",  # journald's own fields
                             "CONTAINER_NAME": ML_CONTAINER, "SYSLOG_IDENTIFIER": "a63982a0e983",
                             "PRIORITY": "6" if rec["stream"] == "stdout" else "3",
                             "MESSAGE": rec["log"].rstrip("\n").encode()})
    return bytes(out)


def make_source(jdir: pathlib.Path, nvml: dict[str, Any] | None = None, driver: bool = True) -> JournalSource:
    """The journal source as the daemon builds it; `driver`: whether the host-driver paths exist."""
    paths = (str(jdir),) if driver else (str(jdir / "no-such-driver"),)
    cfg = configmod.defaults().replace(journal_directory=str(jdir), journal_nvidia_driver_path=paths,
                                       state_directory=str(jdir / "state"))
    facts = MappingProxyType(nvml or {})

    def snapshot() -> Snapshot:
        st = SourceState("nvml", up=bool(nvml), facts=facts)
        return Snapshot(1, MappingProxyType({"nvml": st}), MappingProxyType({}))

    return JournalSource(cfg, Hub(snapshot))


def journal_lines(src: JournalSource) -> list[str]:
    """The entries as the source's own journalctl command line prints them (no --follow)."""
    r = subprocess.run(src.base_args() + src.matches(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [x for x in r.stdout.splitlines() if x.strip()]


def probe(src: JournalSource, now: float) -> tuple[str | None, str | None, bool, dict[str, float]]:
    """What a scrape at `now` reports once the journal has been quiet: a copy of the source's state (via its
    persisted JSON form), flushed, observed. The source itself is left as it was."""
    copy = make_source(pathlib.Path(src.directory), dict(src.hub.facts("nvml")) or None,
                       driver=bool(src.driver_paths) and os.path.exists(src.driver_paths[0]))
    copy.parser.load(json.loads(json.dumps(src.parser.dump())))
    copy.ml.load(json.loads(json.dumps(src.ml.dump())))
    copy.flush()
    return exported(copy.observe(now))


def exported(result) -> tuple[str | None, str | None, bool, dict[str, float]]:
    """(preferred, effective, cpu_fallback, workers by provider) as the samples say."""
    pref = eff = None
    fallback = False
    workers: dict[str, float] = {}
    for s in result.samples:
        check_sample(s)
        labels = dict(s.labels)
        if s.name == "immich_ml_preferred_execution_provider" and s.value == 1:
            pref = labels["provider"]
        elif s.name == "immich_ml_execution_provider" and s.value == 1:
            eff = labels["provider"]
        elif s.name == "immich_ml_cpu_fallback":
            fallback = s.value == 1
        elif s.name == "immich_ml_workers":
            workers[labels["provider"]] = s.value
    return pref, eff, fallback, workers


def load_capture(fx: pathlib.Path, jdir: pathlib.Path) -> tuple[dict[str, Any], list[str]]:
    manifest = json.loads((fx / "manifest.json").read_text())
    export = (fx / "unit.export").read_bytes() if (fx / "unit.export").exists() else docker_export(fx)
    write_journal(jdir / "capture.journal", export)
    return manifest, export


def start_index(manifest: dict[str, Any], entries: list[dict[str, Any]]) -> int:
    """Where the comparison starts: the first evidence entry, else the first session's creation."""
    truth = manifest["truth"]
    ev = truth["first_evidence"]
    if ev is not None:
        if ev.get("cursor") is None:  # docker.jsonl: the line index is the entry index
            return ev["index"]
        for i, e in enumerate(entries):
            if int(e["__REALTIME_TIMESTAMP"]) == ev["realtime_us"] and str(e.get("_PID")) == str(ev["pid"]):
                return i
        raise AssertionError(f"first evidence not found: {ev}")
    # no evidence: from the first session on, once its provider record (three wrapped entries that journald
    # may time-stamp after the session's creation began) is complete
    first = min(s["create_realtime_us"] for s in truth["sessions"])
    i = next(i for i, e in enumerate(entries) if int(e["__REALTIME_TIMESTAMP"]) >= first)
    while i + 1 < len(entries) and ANSI.sub("", message(entries[i + 1])).startswith(" " * 20):
        i += 1  # a Rich continuation: the record is complete at its last entry
    return i


def replay(fx: pathlib.Path, jdir: pathlib.Path, driver: bool = True, nvml: dict[str, Any] | None = None):
    """Yields (index, entry, truth tuple, exported tuple, workers) for every entry of the capture."""
    manifest, _ = load_capture(fx, jdir)
    src = make_source(jdir, nvml, driver)
    lines = journal_lines(src)
    entries = [json.loads(x) for x in lines]
    truth = Truth(manifest)
    start = start_index(manifest, entries)
    for i, (line, e) in enumerate(zip(lines, entries)):
        src.apply_line(line)
        us = int(e["__REALTIME_TIMESTAMP"])
        want = truth.at(us)
        pref, eff, fb, workers = probe(src, us / 1e6)
        yield i, e, start, want, (pref, eff, fb), workers


def message(e: dict[str, Any]) -> str:
    m = e.get("MESSAGE")
    return bytes(m).decode(errors="replace") if isinstance(m, list) else str(m)


# --------------------------------------------------------------------------------------------------
# the verdict on every real capture, at every entry
# --------------------------------------------------------------------------------------------------
def test_there_are_real_captures_with_fallbacks_crashes_and_healthy_runs():
    kinds = set()
    for fx in CAPTURES:
        t = json.loads((fx / "manifest.json").read_text())["truth"]
        kinds.add("crash" if t["crash"] else "fallback" if t["fallback"] else "clean")
    assert {"crash", "fallback", "clean"} <= kinds, kinds


@pytest.mark.parametrize("fx", CAPTURES, ids=lambda p: p.name)
def test_verdict_matches_the_truth_after_every_entry(fx, tmp_path):
    mismatches = []
    checked = 0
    for i, e, start, want, got, _ in replay(fx, tmp_path):
        if i < start:
            continue
        checked += 1
        if got != want:
            mismatches.append(f"entry {i} ({message(e)[:90]!r}): exported {got}, truth {want}")
    assert checked, "nothing compared"
    assert not mismatches, "\n".join(mismatches[:20])


@pytest.mark.parametrize("fx", [f for f in CAPTURES if json.loads((f / "manifest.json").read_text())["truth"][
    "crash"]], ids=lambda p: p.name)
def test_a_worker_crashing_while_creating_its_session_is_on_no_provider_and_counted(fx, tmp_path):
    last_workers: dict[str, float] = {}
    for i, e, start, want, got, workers in replay(fx, tmp_path):
        if i >= start:
            assert got[1] is None and got[2] is False, (i, message(e), got)  # never CUDA, never "on CPU"
            assert workers.get(CUDA, 0) == 0, (i, workers)
        last_workers = workers
    src = make_source(tmp_path)
    for line in journal_lines(src):
        src.apply_line(line)
    src.flush()
    samples = {(s.name, tuple(s.labels)): s.value for s in src.observe(0).samples}
    crashes = sum(1 for w in json.loads((fx / "manifest.json").read_text())["truth"]["workers"]
                  if w["provider"] == "none (crashed creating a session)")
    assert samples[("immich_ml_session_crashes_total", ())] == crashes
    assert samples[("immich_ml_worker_exits_total", (("reason", "signal"),))] >= crashes
    assert CUDA not in last_workers or last_workers[CUDA] == 0


@pytest.mark.parametrize("fx", CAPTURES, ids=lambda p: p.name)
def test_reading_a_whole_capture_at_once_ends_at_the_final_truth(fx, tmp_path):
    # a backlog (the first start's backfill, catching up after a restart) has no quiet moment between
    # entries: records complete by journal time, so a worker that died after its provider line still
    # counts as crashed, not as a session of the next line's worker
    manifest, _ = load_capture(fx, tmp_path)
    src = make_source(tmp_path)
    lines = journal_lines(src)
    src.apply_lines(lines)
    src.flush()
    truth = Truth(manifest)
    for e in lines:
        want = truth.at(int(json.loads(e)["__REALTIME_TIMESTAMP"]))
    pref, eff, fb, _ = probe(src, 0)
    assert (pref, eff, fb) == want
    crashes = sum(1 for s in manifest["truth"]["sessions"] if s["outcome"].startswith("worker_died"))
    assert src.ml.session_crashes == crashes


# --------------------------------------------------------------------------------------------------
# synthetic negative cases (tests/fixtures/synthetic-ml: a real capture with its evidence removed)
# --------------------------------------------------------------------------------------------------
def test_synthetic_fixtures_say_so():
    assert SYNTHETIC
    for fx in SYNTHETIC:
        m = json.loads((fx / "manifest.json").read_text())
        assert m["synthetic"] is True and m["description"].startswith("SYNTHETIC")


@pytest.mark.parametrize("fx", SYNTHETIC, ids=lambda p: p.name)
def test_healthy_cuda_is_never_a_fallback_at_any_moment(fx, tmp_path):
    checked = 0
    for i, e, start, want, got, workers in replay(fx, tmp_path, nvml=GPU_MEMORY):
        assert got[2] is False, (i, message(e))
        if i >= start:
            assert got == want == (CUDA, CUDA, False), (i, message(e), got, want)
            assert workers.get(CPU, 0) == 0
            checked += 1
    assert checked


def test_oom_during_inference_is_counted_and_not_a_fallback(tmp_path):
    fx = SYNTHETIC_ML / "v3.1.0-cuda-oom-during-inference"
    manifest, _ = load_capture(fx, tmp_path)
    src = make_source(tmp_path, GPU_MEMORY)
    lines = journal_lines(src)
    oom_at = manifest["truth"]["runtime_errors"][0]["realtime_us"]
    for line in lines:
        src.apply_line(line)
        if int(json.loads(line)["__REALTIME_TIMESTAMP"]) >= oom_at:
            assert probe(src, oom_at / 1e6)[:3] == (CUDA, CUDA, False)
    src.flush()
    assert src.ml.errors[(CUDA, "cuda_failure")] == 1
    assert src.ml.errors[(CUDA, "run_failed")] == 1
    assert sum(n for (p, k), n in src.ml.errors.items() if k not in ("cuda_failure", "run_failed")) == 0


# --------------------------------------------------------------------------------------------------
# one test per evidence rule (docs/journal.md, "Evidence"), on the real lines it matches; each fails
# when its rule is removed
# --------------------------------------------------------------------------------------------------
def capture_lines(name: str, tmp: pathlib.Path) -> list[str]:
    fx = REAL_ML / name if (REAL_ML / name).exists() else SYNTHETIC_ML / name
    load_capture(fx, tmp)
    return journal_lines(make_source(tmp))


def upto(lines: list[str], needle: str, nth: int = 1) -> list[str]:
    """The entries up to and including the nth whose message contains `needle`."""
    for i, line in enumerate(lines):
        if needle in ANSI.sub("", message(json.loads(line))):
            nth -= 1
            if nth == 0:
                return lines[:i + 1]
    raise AssertionError(f"{needle!r} not in the capture")


def without(lines: list[str], *needles: str) -> list[str]:
    return [x for x in lines if not any(n in ANSI.sub("", message(json.loads(x))) for n in needles)]


def verdict(lines: list[str], tmp: pathlib.Path, driver: bool = True, nvml: dict[str, Any] | None = None,
            at: float | None = None) -> tuple[tuple[str | None, str | None, bool], JournalSource]:
    src = make_source(tmp, nvml, driver)
    for line in lines:
        src.apply_line(line)
    src.flush()
    now = at if at is not None else int(json.loads(lines[-1])["__REALTIME_TIMESTAMP"]) / 1e6
    src.observe(now)
    return probe(src, now)[:3], src


PROVIDER_RECORD = "in descending order of preference"


def test_e1_device_enumeration_failing_while_a_session_is_created(tmp_path):
    # [E:onnxruntime:Default, cuda_call.cc:116 CudaCall] CUDA failure 35: ... expr=cudaGetDeviceCount(&num_devices);
    lines = upto(capture_lines("v3.1.0-gpu-nodriver-nixpkgs", tmp_path), "cudaGetDeviceCount")
    got, src = verdict(lines, tmp_path)
    assert got == (CUDA, CPU, True)
    assert src.ml.errors[(CUDA, "cuda_failure")] == 1


def test_e1_is_no_evidence_outside_a_sessions_creation(tmp_path):
    # the same real line after the worker moved on (its next model load): counted, not a fallback
    lines = capture_lines("v3.1.0-gpu-nodriver-nixpkgs", tmp_path)
    first = upto(lines, PROVIDER_RECORD)
    enumeration = upto(lines, "cudaGetDeviceCount")[-1]
    next_load = upto(lines, "Loading detection model")[-1]
    got, src = verdict(first + [next_load, enumeration], tmp_path)
    assert got == (CUDA, CUDA, False)
    assert src.ml.errors[(CUDA, "cuda_failure")] == 1


def test_e2_provider_library_failing_to_load(tmp_path):
    # [E:onnxruntime:Default, provider_bridge_ort.cc:2369 TryGetProviderInfo_CUDA] ... Failed to load library
    # libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: cannot open shared object file ...
    lines = upto(capture_lines("v3.1.0-gpu-nixpkgs", tmp_path), "Failed to load library")
    got, src = verdict(lines, tmp_path)
    assert got == (CUDA, CPU, True)
    assert src.ml.errors[(CUDA, "library_load")] == 1


def test_e3_failed_to_create_the_provider(tmp_path):
    # [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1094 CreateExecutionProviderFactoryInstance] Failed to
    # create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.* ...
    lines = without(upto(capture_lines("v3.1.0-gpu-nixpkgs", tmp_path), "Failed to create CUDAExecutionProvider"),
                    "Failed to load library")
    got, src = verdict(lines, tmp_path)
    assert got == (CUDA, CPU, True)
    assert src.ml.errors[(CUDA, "create_failed")] == 1


def test_e4_the_ep_error_block(tmp_path):
    # *************** EP Error *************** / EP Error ... when using [...] / Falling back to
    # ['CPUExecutionProvider'] and retrying. (PYTHONUNBUFFERED=1: in order)
    lines = without(upto(capture_lines("v3.1.0-gpu-nodriver-image", tmp_path), "Falling back to"),
                    "cudaGetDeviceCount")
    got, src = verdict(lines, tmp_path)
    assert got == (CUDA, CPU, True)
    assert src.ml.errors[(CUDA, "ep_fallback")] == 1


def test_crash_while_creating_a_session_is_no_provider(tmp_path):
    # v2.0.1, onnxruntime-gpu 1.19.2, no driver: the provider line, then ERROR Worker (pid:N) was sent SIGSEGV!
    lines = upto(capture_lines("v2.0.1-gpu-nodriver-nixpkgs", tmp_path), "was sent SIGSEGV")
    got, src = verdict(lines, tmp_path)
    assert got == (CUDA, None, False)
    assert src.ml.session_crashes == 1
    assert src.ml.exits == {"signal": 1}


def test_h1_host_without_the_nvidia_driver(tmp_path):
    # before any ORT error: the provider line alone, on a host where /proc/driver/nvidia/version and
    # /sys/module/nvidia do not exist
    lines = upto(capture_lines("v3.1.0-cuda-healthy", tmp_path), PROVIDER_RECORD)
    got, src = verdict(lines, tmp_path, driver=False)
    assert got == (CUDA, CPU, True)
    assert src.ml.errors[(CUDA, "no_driver")] == 1
    assert probe(src, 0)[3] == {CUDA: 0, CPU: 1, "none": 0}
    got, _ = verdict(lines, tmp_path, driver=True)
    assert got == (CUDA, CUDA, False)


def test_h2_a_loaded_model_without_gpu_memory_after_the_grace(tmp_path):
    lines = upto(capture_lines("v3.1.0-cuda-healthy", tmp_path), PROVIDER_RECORD)
    t = int(json.loads(lines[-1])["__REALTIME_TIMESTAMP"]) / 1e6
    src = make_source(tmp_path, {"component_gpu_memory": {"ml": 0}})
    for line in lines:
        src.apply_line(line)
    src.flush()
    grace = src.ml.grace
    assert exported(src.observe(t))[:3] == (CUDA, CUDA, False)
    assert exported(src.observe(t + grace - 1))[:3] == (CUDA, CUDA, False)
    assert exported(src.observe(t + grace))[:3] == (CUDA, CPU, True)
    assert src.ml.errors[(CUDA, "no_gpu_memory")] == 1


def test_a_late_block_confirms_its_session_and_counts_once(tmp_path):
    # nixpkgs launch: each block arrives after its native line; the rebooted worker's last one only at stop
    lines = capture_lines("v3.1.0-gpu-nodriver-nixpkgs", tmp_path)
    first_native = json.loads(upto(lines, "cudaGetDeviceCount")[-1])
    got, src = verdict(lines, tmp_path)
    assert got == (CUDA, CPU, True)
    blocks = sum("Falling back to" in message(json.loads(x)) for x in lines)
    assert src.ml.errors[(CUDA, "ep_fallback")] == blocks
    # the verdict changed at the first native line and never again (the late blocks changed nothing)
    assert src.ml.last_change == int(first_native["__REALTIME_TIMESTAMP"]) / 1e6
    fell = [s for w in src.ml.workers.values() for s in w["sessions"] if s["st"] == "fell_back"]
    assert fell and all(s["conf"] for s in fell)


def test_a_block_arriving_after_its_worker_exited_belongs_to_that_worker(tmp_path):
    # SYNTHETIC ORDER of real lines, in a container (_PID is not the worker): worker A's EP Error block reaches
    # the journal only after A's exit and B's boot. It judges A's session; B, with no session, stays "none".
    real = capture_lines("v3.1.0-gpu-nodriver-nixpkgs", tmp_path)
    a_session = upto(real, PROVIDER_RECORD)
    block = [x for x in upto(real, "****************************************")
             if x not in upto(real, "cudaGetDeviceCount")]
    a_exit = [x for x in real if any(n in ANSI.sub("", message(json.loads(x)))
                                     for n in ("Shutting down due to inactivity", "was sent SIGINT"))]
    b_boot = [x for x in real if "Booting worker with pid: 35" in ANSI.sub("", message(json.loads(x)))]
    assert len(a_exit) == 2 and len(b_boot) == 1
    order = a_session + a_exit + b_boot + block
    t0 = int(json.loads(order[0])["__REALTIME_TIMESTAMP"])
    docker = []
    for k, x in enumerate(order):
        e = json.loads(x)
        e.update(_SYSTEMD_UNIT="docker.service", _PID="900", _UID="0", _COMM="dockerd", _TRANSPORT="journal",
                 CONTAINER_NAME=ML_CONTAINER,
                 __REALTIME_TIMESTAMP=str(t0 + 1000 * k))
        docker.append(json.dumps(e))
    got, src = verdict(docker, tmp_path)
    assert got == (CUDA, CPU, True)
    assert probe(src, 0)[3] == {CUDA: 0, CPU: 0, "none": 1}
