"""The journal source against real journal files (systemd-journal-remote) and a real journald.

The exporter runs as a subprocess (`--once`, or the daemon via `Exporter`) with
`--journal.directory` pointing at the files; nothing of our own I/O is mocked.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from tests.support.exposition import parse, value
from tests.support.journal import ML_UNIT, Clock, entries, fixture, write_journal
from tests.support.proc import ROOT, Exporter, exporter_env, run_cli, wait_for

ONLY_JOURNAL = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.immich"]
C29 = " " * 29

pytestmark = pytest.mark.skipif(not os.access("/lib/systemd/systemd-journal-remote", os.X_OK),
                                reason="systemd-journal-remote is not installed")


def once(jdir, state, *extra):
    r = run_cli(["--once", *ONLY_JOURNAL, f"--journal.directory={jdir}", f"--state.directory={state}", *extra])
    assert r.returncode == 0, r.stderr
    return parse(r.stdout)


def v(m, name, **labels):
    return value(m, name, **labels)


@pytest.fixture
def jdir(tmp_path):
    d = tmp_path / "journal"
    d.mkdir()
    return d


# --- one scenario per fixture, --once -------------------------------------------------------------
def test_cuda_create_failure_is_a_cpu_fallback(jdir, tmp_path):
    write_journal(jdir / "x.journal", fixture("cuda_create_failed.export"))
    m = once(jdir, tmp_path / "st")
    assert v(m, "immich_gpu_exporter_source_up", source="journal") == 1
    assert v(m, "immich_ml_preferred_execution_provider", provider="CUDAExecutionProvider") == 1
    assert v(m, "immich_ml_execution_provider", provider="CPUExecutionProvider") == 1
    assert v(m, "immich_ml_execution_provider", provider="CUDAExecutionProvider") == 0
    assert v(m, "immich_ml_cpu_fallback") == 1
    assert v(m, "immich_ml_provider_errors_total", provider="CUDAExecutionProvider", kind="create_failed") == 2
    assert v(m, "immich_ml_provider_errors_total", provider="CUDAExecutionProvider", kind="library_load") == 1
    assert v(m, "immich_ml_model_loads_total", model_type="visual", model_name="ViT-B-32__openai") == 1
    assert v(m, "immich_ml_model_loaded", model_type="detection", model_name="buffalo_l") == 0  # idle shutdown
    assert v(m, "immich_ml_worker_exits_total", reason="inactivity") == 1
    assert v(m, "immich_ml_worker_boots_total") == 2
    assert v(m, "immich_gpu_exporter_journal_unrecognized_total", unit=ML_UNIT) == 1
    assert v(m, "immich_ml_log_entries_total", unit=ML_UNIT, level="warning") == 2
    assert v(m, "immich_ml_log_entries_total", unit=ML_UNIT, level="error") == 1
    assert v(m, "immich_ml_log_entries_total", unit=ML_UNIT, level="info") == 26


def test_working_cuda_is_effective(jdir, tmp_path):
    write_journal(jdir / "x.journal", fixture("cuda_ok.export"))
    m = once(jdir, tmp_path / "st")
    assert v(m, "immich_ml_execution_provider", provider="CUDAExecutionProvider") == 1
    assert v(m, "immich_ml_cpu_fallback") == 0
    assert v(m, "immich_ml_model_loaded", model_type="textual", model_name="ViT-B-32__openai") == 1
    errors = {k: n for k, n in m.items() if k[0] == "immich_ml_provider_errors_total"}
    assert errors and set(errors.values()) == {0}  # present at 0 from the start, none counted


def test_ep_error_block_and_binary_traceback(jdir, tmp_path):
    write_journal(jdir / "x.journal", fixture("ep_fallback.export"))
    m = once(jdir, tmp_path / "st")
    assert v(m, "immich_ml_cpu_fallback") == 1
    assert v(m, "immich_ml_provider_errors_total", provider="CUDAExecutionProvider", kind="ep_fallback") == 1
    assert v(m, "immich_ml_provider_errors_total", provider="CUDAExecutionProvider", kind="cuda_failure") == 1
    # the traceback (one entry, binary field) is one record; "RuntimeError: ..." is a known shape
    assert v(m, "immich_gpu_exporter_journal_unrecognized_total", unit=ML_UNIT) is None


def test_old_provider_line_with_model_name(jdir, tmp_path):
    write_journal(jdir / "x.journal", fixture("old_format.export"))
    m = once(jdir, tmp_path / "st")
    assert v(m, "immich_ml_execution_provider", provider="CUDAExecutionProvider") == 1
    assert v(m, "immich_ml_model_loads_total", model_type="facial_recognition", model_name="buffalo_l") == 1
    assert v(m, "immich_ml_model_loads_total", model_type="clip", model_name="ViT-B-32__openai") == 1


def test_docker_journald_driver_entries(jdir, tmp_path):
    write_journal(jdir / "x.journal", fixture("docker.export"))
    m = once(jdir, tmp_path / "st")
    assert v(m, "immich_ml_execution_provider", provider="OpenVINOExecutionProvider") == 1
    assert v(m, "immich_ml_worker_exits_total", reason="timeout") == 1
    assert v(m, "immich_ml_worker_exits_total", reason="oom_kill") == 1
    assert v(m, "immich_ml_worker_exits_total", reason="signal") == 1
    assert v(m, "immich_ml_worker_exits_total", reason="error") == 0  # the exit after the timeout is not counted twice
    assert v(m, "immich_ml_worker_boots_total") == 4
    assert v(m, "immich_ml_server_healthy") == 1
    assert v(m, "immich_ml_log_entries_total", unit="immich_machine_learning", level="critical") == 1


def test_server_unit_health_line(jdir, tmp_path):
    write_journal(jdir / "x.journal", fixture("server_unhealthy.export"))
    m = once(jdir, tmp_path / "st")
    assert v(m, "immich_ml_server_healthy") == 0
    assert v(m, "immich_ml_log_entries_total", unit="immich-server.service", level="warning") == 1


def test_backfill_starts_at_the_units_last_start_and_is_capped(jdir, tmp_path):
    write_journal(jdir / "x.journal", fixture("cuda_create_failed.export") + fixture("cuda_ok.export"))
    m = once(jdir, tmp_path / "st")
    # only the run that began with the second "Starting gunicorn" counts
    assert v(m, "immich_ml_cpu_fallback") == 0
    assert v(m, "immich_ml_worker_boots_total") == 1
    m = once(jdir, tmp_path / "st2", "--journal.backfill-entries=3")
    assert sum(n for (name, _), n in m.items() if name == "immich_ml_log_entries_total") == 3


def test_no_journal_files_or_no_journalctl_is_source_down(jdir, tmp_path):
    m = once(jdir, tmp_path / "st")
    assert v(m, "immich_gpu_exporter_source_up", source="journal") == 0
    assert v(m, "immich_gpu_exporter_source_errors_total", source="journal", reason="no_journal") == 1
    m = once(jdir, tmp_path / "st", "--journal.journalctl=/nonexistent/journalctl")
    assert v(m, "immich_gpu_exporter_source_errors_total", source="journal", reason="no_journalctl") == 1


def test_daemon_and_once_give_the_same_reason_for_a_missing_journalctl(jdir, tmp_path):
    """The real cause (no journalctl) wins over its consequence (no journal files read), in both modes."""
    missing = "--journal.journalctl=/nonexistent/journalctl"
    m = once(jdir, tmp_path / "st", missing)
    assert v(m, "immich_gpu_exporter_source_errors_total", source="journal", reason="no_journalctl") == 1
    assert ("immich_gpu_exporter_source_errors_total", (("reason", "no_journal"), ("source", "journal"))) not in m
    with Exporter([*ONLY_JOURNAL, f"--journal.directory={jdir}", f"--state.directory={tmp_path / 'st'}",
                   missing]) as e:
        reasons = {dict(labels)["reason"] for (name, labels), n in parse(e.metrics()).items()
                   if name == "immich_gpu_exporter_source_errors_total" and n > 0}
    assert reasons == {"no_journalctl"}


def test_a_saved_state_without_a_cursor_is_not_announced_as_a_resume(jdir, tmp_path):
    # the daemon saves its state at shutdown even when it read no entry: the cursor is then null
    with exporter(jdir, tmp_path / "st", tmp_path / "log"):
        pass
    state = json.loads((tmp_path / "st" / "journal-state.json").read_text())
    assert state["cursor"] is None
    r = run_cli(["--once", *ONLY_JOURNAL, f"--journal.directory={jdir}", f"--state.directory={tmp_path / 'st'}"])
    assert r.returncode == 0, r.stderr
    assert "resuming after the persisted cursor" not in r.stderr + (tmp_path / "log").read_text()
    write_journal(jdir / "x.journal", fixture("cuda_ok.export"))
    with exporter(jdir, tmp_path / "st", tmp_path / "log") as e:
        wait_for(lambda: total_entries(e) > 0, 10, what="entries read")
    assert json.loads((tmp_path / "st" / "journal-state.json").read_text())["cursor"]
    r = run_cli(["--once", *ONLY_JOURNAL, f"--journal.directory={jdir}", f"--state.directory={tmp_path / 'st'}"])
    assert "resuming after the persisted cursor" in r.stderr  # a real cursor still is


# A host without a system journal, also on a booted host that has one: the exporter runs in a private
# mount namespace where empty tmpfs hide the system journal directories (journalctl's and ours).
HIDE_SYSTEM_JOURNAL = r"""
for d in /var/log/journal /run/log/journal; do [ -d "$d" ] && mount -t tmpfs -o mode=0755 tmpfs "$d"; done
exec "$@"
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="hiding the system journal needs root (a private mount namespace)")
def test_once_without_any_system_journal_reports_down(tmp_path):
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", HIDE_SYSTEM_JOURNAL, "sh",
                        sys.executable, "-m", "immich_gpu_exporter", "--once", *ONLY_JOURNAL,
                        f"--state.directory={tmp_path}"], env=exporter_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert v(parse(r.stdout), "immich_gpu_exporter_source_up", source="journal") == 0
    assert "no journal files" in r.stderr


# --- the daemon: follow, restart, rotation ---------------------------------------------------------
def exporter(jdir, state, log_path):
    return Exporter([*ONLY_JOURNAL, f"--journal.directory={jdir}", f"--state.directory={state}",
                     "--log.level=debug"], log_path=log_path)


def metric(e, name, **labels):
    return value(e.metrics(), name, **labels)


def total_entries(e):
    return sum(n for (name, _), n in parse(e.metrics()).items() if name == "immich_ml_log_entries_total")


def test_follow_mode_applies_new_entries_live_without_restarting_journalctl(jdir, tmp_path):
    write_journal(jdir / "x.journal", fixture("cuda_ok.export"))
    with exporter(jdir, tmp_path / "st", tmp_path / "log") as e:
        wait_for(lambda: metric(e, "immich_ml_execution_provider", provider="CUDAExecutionProvider") == 1, 10,
                 what="backfill")
        write_journal(jdir / "x.journal", entries([
            "2026-07-30 13:05:00.000000001 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1094 "
            "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.*"],
            pid=5000, clock=Clock(1_786_000_000_000_000)))
        # the timeout guards against a hang only: the entry must come through the running follower
        wait_for(lambda: metric(e, "immich_ml_cpu_fallback") == 1, 30, what="cpu_fallback from the new entry")
        assert metric(e, "immich_gpu_exporter_source_up", source="journal") == 1
    log = (tmp_path / "log").read_text()
    assert "journalctl exited" not in log and "rejected the cursor" not in log, log[-2000:]


def test_kill_9_and_restart_neither_lose_nor_double_count(jdir, tmp_path):
    st, logp, j = tmp_path / "st", tmp_path / "log", jdir / "x.journal"
    clock = Clock(1_786_000_000_000_000)
    boot = ["[07/30/26 12:00:00] INFO     Starting gunicorn 23.0.0",
            "[07/30/26 12:00:00] INFO     Booting worker with pid: 4242"]
    load = ["[07/30/26 12:00:01] INFO     Loading visual model 'ViT-B-32__openai' to memory",
            "[07/30/26 12:00:01] INFO     Setting execution providers to",
            C29 + "['CUDAExecutionProvider', 'CPUExecutionProvider'], in",
            C29 + "descending order of preference"]
    fail = ["2026-07-30 12:00:01.5 [W:onnxruntime:Default, x.cc:1 F] Failed to create CUDAExecutionProvider."]
    written = write_journal(j, entries(boot + load, clock=clock))
    e = exporter(jdir, st, logp).start()
    try:
        wait_for(lambda: total_entries(e) == written, 10, what="first batch")
        e.stop(signal.SIGKILL)
        # appended while the exporter is down, then a restart from the persisted state
        written += write_journal(j, entries(load + fail, clock=clock))
        e = exporter(jdir, st, logp).start()
        wait_for(lambda: total_entries(e) == written, 10, what="second batch")
        assert metric(e, "immich_ml_model_loads_total", model_type="visual", model_name="ViT-B-32__openai") == 2
        assert metric(e, "immich_ml_provider_errors_total", provider="CUDAExecutionProvider", kind="create_failed") == 1
        assert metric(e, "immich_ml_cpu_fallback") == 1
        # kill -9 right after new entries arrived (state maybe not yet persisted), restart: still exact
        written += write_journal(j, entries(load + fail + load, clock=clock))
        wait_for(lambda: total_entries(e) == written, 10, what="third batch")
        e.stop(signal.SIGKILL)
        e = exporter(jdir, st, logp).start()
        wait_for(lambda: metric(e, "immich_gpu_exporter_source_up", source="journal") == 1, 10, what="up")
        wait_for(lambda: total_entries(e) >= written, 10, what="resume")
        m = parse(e.metrics())
        assert total_entries(e) == written
        assert v(m, "immich_ml_model_loads_total", model_type="visual", model_name="ViT-B-32__openai") == 4
        assert v(m, "immich_ml_provider_errors_total", provider="CUDAExecutionProvider", kind="create_failed") == 2
        assert v(m, "immich_ml_worker_boots_total") == 1
        assert v(m, "immich_ml_cpu_fallback") == 1
        # a clean stop writes the state; a restart then reads nothing twice
        e.stop(signal.SIGTERM)
        state = json.loads((st / "journal-state.json").read_text())
        assert state["cursor"]
        e = exporter(jdir, st, logp).start()
        wait_for(lambda: metric(e, "immich_gpu_exporter_source_up", source="journal") == 1, 10, what="up")
        assert total_entries(e) == written
    finally:
        e.stop()


def test_a_new_journal_file_in_the_directory_is_picked_up(jdir, tmp_path):
    write_journal(jdir / "system.journal", fixture("cuda_ok.export"))
    with exporter(jdir, tmp_path / "st", tmp_path / "log") as e:
        wait_for(lambda: metric(e, "immich_ml_cpu_fallback") == 0, 10, what="backfill")
        # journald rotated: the old file is archived, new entries go to a new file
        os.rename(jdir / "system.journal", jdir / "system@0000-0001.journal")
        write_journal(jdir / "system.journal", entries(
            ["[07/30/26 13:10:00] INFO     Booting worker with pid: 5001",
             "[07/30/26 13:10:01] INFO     Setting execution providers to ['CUDAExecutionProvider', "
             "'CPUExecutionProvider'], in descending order of preference",
             "*************** EP Error ***************",
             "EP Error CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version when using "
             "['CUDAExecutionProvider', 'CPUExecutionProvider']",
             "Falling back to ['CPUExecutionProvider'] and retrying.", "*" * 40],
            pid=5001, clock=Clock(1_786_000_000_000_000)))
        wait_for(lambda: metric(e, "immich_ml_cpu_fallback") == 1, 5, what="entries of the new file")
        assert metric(e, "immich_ml_worker_boots_total") == 2


def test_unwritable_state_directory_runs_without_persistence(jdir, tmp_path):
    write_journal(jdir / "x.journal", fixture("cuda_ok.export"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with Exporter([*ONLY_JOURNAL, f"--journal.directory={jdir}", f"--state.directory={blocker}/sub"],
                  log_path=tmp_path / "log") as e:
        wait_for(lambda: metric(e, "immich_ml_cpu_fallback") == 0, 10, what="metrics")
    assert "not writable" in (tmp_path / "log").read_text()


# --- end to end with a real systemd and journald ----------------------------------------------------
FAKE_ML = r'''
import sys, time
C = " " * 29
out = [
    "[07/30/26 12:00:00] INFO     Starting gunicorn 23.0.0",
    "[07/30/26 12:00:00] INFO     Booting worker with pid: 4242",
    "[07/30/26 12:00:01] INFO     Loading visual model 'ViT-B-32__openai' to memory",
    "[07/30/26 12:00:01] INFO     Setting execution providers to",
    C + "['CUDAExecutionProvider', 'CPUExecutionProvider'], in",
    C + "descending order of preference",
]
print("\n".join(out), flush=True)
print("2026-07-30 12:00:01.754265029 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1094 "
      "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and "
      "CUDA 12.*.", file=sys.stderr, flush=True)
time.sleep(600)
'''


@pytest.mark.integration
def test_end_to_end_with_a_real_journald(tmp_path):
    from tests.support import nested_systemd as nsmod

    reason = nsmod.unavailable_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path / "ns"
    base.mkdir()
    script = base / "fake_ml.py"
    script.write_text(FAKE_ML)
    os.chmod(base, 0o755)
    py = shutil.which("python3") or sys.executable
    unit = f"[Service]\nExecStart={py} {script}\n"
    ns = nsmod.start_nested_systemd(base, {ML_UNIT: unit})
    try:
        ns.start_unit(ML_UNIT)
        with exporter(ns.journal_dir, tmp_path / "st", tmp_path / "log") as e:
            wait_for(lambda: metric(e, "immich_ml_cpu_fallback") == 1, 15, what="cpu fallback from journald")
            assert metric(e, "immich_ml_preferred_execution_provider", provider="CUDAExecutionProvider") == 1
            assert metric(e, "immich_ml_model_loaded", model_type="visual", model_name="ViT-B-32__openai") == 1
    finally:
        nsmod.stop_nested_systemd(ns)
