"""The journal source against a hostile local user and hostile sizes (issue 14).

Real journal files written by systemd-journal-remote, which stores the `_`-prefixed fields as
given, so an entry can carry what journald would record for a forged `logger --journald` from an
unprivileged user next to what it records for the real ML unit and for dockerd's journald driver.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from immich_gpu_exporter import mllog
from immich_gpu_exporter.sources.journal import MAX_MESSAGE_CHARS, state_problem, trusted
from tests.support.exposition import parse, value
from tests.support.journal import BOOT_ID, ML_UNIT, Clock, entries, export_entry, fixture, write_journal
from tests.support.proc import run_cli

# the journals stand for other hosts': this host's NVIDIA driver (absent here) says nothing about them
ONLY_JOURNAL = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.immich",
                "--journal.nvidia-driver-path="]
CUDA = "CUDAExecutionProvider"
PROVIDERS_LINE = ("[07/30/26 12:00:00] INFO     Setting execution providers to ['CUDAExecutionProvider', "
                  "'CPUExecutionProvider'], in descending order of preference")
FAILED_LINE = ("2026-07-30 12:00:01.000000000 [E:onnxruntime:Default, provider_bridge_ort.cc:1848 "
               "TryGetProviderInfo_CUDA] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*.")

pytestmark = pytest.mark.skipif(not os.access("/lib/systemd/systemd-journal-remote", os.X_OK),
                                reason="systemd-journal-remote is not installed")


def forged(lines: list[str], clock: Clock, uid: str = "65534", container: str = "immich_machine_learning") -> bytes:
    """What journald stores for `logger --journald` run by `uid` with CONTAINER_NAME set: the
    client's own fields as sent, the trusted `_` fields from the kernel (its uid, comm, the user's
    session scope), never the ML unit or dockerd."""
    out = bytearray()
    for line in lines:
        rt, mono = clock.tick()
        out += export_entry({"__REALTIME_TIMESTAMP": rt, "__MONOTONIC_TIMESTAMP": mono, "_BOOT_ID": BOOT_ID,
                             "PRIORITY": "3", "_TRANSPORT": "journal", "_UID": uid, "_GID": uid, "_PID": "31337",
                             "_COMM": "logger", "_EXE": "/usr/bin/logger",
                             "_SYSTEMD_UNIT": "session-7.scope", "CONTAINER_NAME": container,
                             "SYSLOG_IDENTIFIER": container, "_SYSTEMD_UNIT_FORGED": ML_UNIT, "MESSAGE": line})
    return bytes(out)


def once(jdir, state, *extra):
    r = run_cli(["--once", *ONLY_JOURNAL, f"--journal.directory={jdir}", f"--state.directory={state}", *extra],
                timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return parse(r.stdout), r


def test_forged_container_entries_from_an_unprivileged_user_change_nothing(tmp_path):
    jdir = tmp_path / "journal"
    jdir.mkdir()
    clock = Clock()
    real = entries(["[07/30/26 12:00:00] INFO     Starting gunicorn 23.0.0", PROVIDERS_LINE], clock=clock)
    attack = forged(["[07/30/26 12:00:00] INFO     Starting gunicorn 23.0.0", PROVIDERS_LINE, FAILED_LINE,
                     "[07/30/26 12:00:02] INFO     Setting execution providers to ['CPUExecutionProvider'], in "
                     "descending order of preference"], clock)
    write_journal(jdir / "system.journal", real + attack)
    m, _ = once(jdir, tmp_path / "state")
    assert value(m, "immich_ml_execution_provider", provider=CUDA) == 1
    assert value(m, "immich_ml_cpu_fallback") == 0
    assert value(m, "immich_ml_provider_errors_total", provider=CUDA, kind="create_failed") == 0
    assert value(m, "immich_gpu_exporter_journal_entries_dropped_total", reason="untrusted") == 4


def test_forged_entries_alone_do_not_invent_an_ml_service(tmp_path):
    jdir = tmp_path / "journal"
    jdir.mkdir()
    write_journal(jdir / "system.journal", forged([PROVIDERS_LINE, FAILED_LINE], Clock()))
    m, _ = once(jdir, tmp_path / "state")
    assert value(m, "immich_ml_cpu_fallback") == 0
    assert value(m, "immich_ml_preferred_execution_provider", provider=CUDA) is None
    assert value(m, "immich_gpu_exporter_journal_entries_dropped_total", reason="untrusted") == 2


def test_container_entries_written_by_dockerd_as_root_are_trusted(tmp_path):
    jdir = tmp_path / "journal"
    jdir.mkdir()
    write_journal(jdir / "system.journal", fixture("docker.export"))
    m, _ = once(jdir, tmp_path / "state")
    assert value(m, "immich_ml_worker_boots_total") >= 1
    assert value(m, "immich_gpu_exporter_journal_entries_dropped_total", reason="untrusted") == 0


@pytest.mark.parametrize("entry,expected", [
    ({"_SYSTEMD_UNIT": ML_UNIT, "MESSAGE": "x"}, True),
    ({"_SYSTEMD_UNIT": "docker.service", "_UID": "0", "_COMM": "dockerd", "_TRANSPORT": "journal",
      "CONTAINER_NAME": "immich_machine_learning"}, True),
    ({"_UID": "0", "_COMM": "conmon", "_TRANSPORT": "journal", "CONTAINER_NAME": "immich_machine_learning"}, True),
    ({"_UID": "1000", "_COMM": "conmon", "_TRANSPORT": "journal", "CONTAINER_NAME": "immich_machine_learning"}, False),
    ({"_UID": "0", "_COMM": "logger", "_TRANSPORT": "journal", "CONTAINER_NAME": "immich_machine_learning"}, False),
    ({"_UID": "0", "_COMM": "dockerd", "_TRANSPORT": "stdout", "CONTAINER_NAME": "immich_machine_learning"}, False),
    ({"_UID": "65534", "CONTAINER_NAME": "immich_machine_learning", "SYSLOG_IDENTIFIER": ML_UNIT}, False),
    ({"_SYSTEMD_UNIT": "session-7.scope", "UNIT": ML_UNIT, "MESSAGE": "x"}, False),
])
def test_trust_follows_fields_only_journald_sets(entry, expected):
    assert trusted(entry, frozenset({ML_UNIT, "immich-server.service"})) is expected


def _parse_seconds(line: str, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        p, s = mllog.Parser(), mllog.MLState()
        t0 = time.perf_counter()
        for ev in p.feed({"_SYSTEMD_UNIT": ML_UNIT, "_PID": "1", "MESSAGE": line}):
            s.apply(ev)
        p.flush()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("prefix", ["[W:onnxruntime:", "2026-07-30 12:00:00.1 [E:onnxruntime:Default, ",
                                    "[07/30/26 12:00:00] INFO     ", "[Nest] 1  - "])
def test_a_long_line_without_its_closing_bracket_parses_in_linear_time(prefix):
    # 16 KB and 64 KB: linear code takes ~4x as long for 4x the input, the old ORT pattern took 16x
    small, big = (_parse_seconds(prefix + "a" * n) for n in (16_384, 65_536))
    assert big / max(small, 1e-6) < 8, (small, big)


def test_long_message_is_cut_before_the_parser_sees_it(tmp_path):
    jdir = tmp_path / "journal"
    jdir.mkdir()
    huge = "[W:onnxruntime:" + "a" * 200_000
    write_journal(jdir / "system.journal", entries([PROVIDERS_LINE, huge, *[" " * 29 + "b" * 100_000] * 30]))
    m, r = once(jdir, tmp_path / "state")
    assert value(m, "immich_gpu_exporter_source_up", source="journal") == 1
    assert value(m, "immich_ml_preferred_execution_provider", provider=CUDA) == 1
    assert MAX_MESSAGE_CHARS < 200_000


def _state(tmp_path, ml: dict | None = None, **top) -> os.PathLike:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    data = {"version": 1, "cursor": None, "parser": {"pending": {}, "ep_block": {}}, "ml": ml or {}}
    data.update(top)
    (state / "journal-state.json").write_text(json.dumps(data))
    return state


@pytest.mark.parametrize("ml,top", [
    ({"providers_seen": "CUDAExecutionProvider"}, {}),
    ({"boots": "many"}, {}),
    ({"errors": [["CUDAExecutionProvider", "create_failed", "x"]]}, {}),
    ({"workers": {"a": 3}}, {}),
    ({}, {"cursor": 17}),
    ({}, {"parser": {"pending": []}}),
    ({}, {"gaps": -1}),
    ({}, {"entries_lost": True}),
    ({}, {"entries_lost": 1e400}),
    ({}, {"gaps": 10 ** 400}),
    ({}, {"gap_at": ["s=1;i=2"]}),
    ({}, {"gap_at": [3, 4]}),
])
def test_wrong_typed_state_is_set_aside_with_one_warning_and_the_source_heals(tmp_path, ml, top):
    assert state_problem({"version": 1, "cursor": None, "parser": {}, "ml": ml, **top}) is not None
    jdir = tmp_path / "journal"
    jdir.mkdir()
    write_journal(jdir / "system.journal", entries(["[07/30/26 12:00:00] INFO     Starting gunicorn 23.0.0",
                                                    PROVIDERS_LINE]))
    state = _state(tmp_path, ml, **top)
    m, r = once(jdir, state)
    assert value(m, "immich_gpu_exporter_source_up", source="journal") == 1
    assert value(m, "immich_ml_preferred_execution_provider", provider=CUDA) == 1  # backfilled afresh
    warnings = [ln for ln in r.stderr.splitlines() if "state file" in ln]
    assert len(warnings) == 1 and "Traceback" not in r.stderr
    assert (state / "journal-state.json.bad").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_fifo_or_dev_zero_as_state_file_never_hangs(tmp_path, kind):
    jdir = tmp_path / "journal"
    jdir.mkdir()
    write_journal(jdir / "system.journal", entries([PROVIDERS_LINE]))
    state = tmp_path / "state"
    state.mkdir()
    if kind == "fifo":
        os.mkfifo(state / "journal-state.json")
    else:
        os.symlink("/dev/zero", state / "journal-state.json")
    m, r = once(jdir, state)
    assert value(m, "immich_ml_preferred_execution_provider", provider=CUDA) == 1
    assert "not a regular file" in r.stderr


def test_known_providers_keep_their_label_after_unknown_names_filled_the_slots():
    s = mllog.MLState()
    p = mllog.Parser()
    lines = [f"[07/30/26 12:00:00] INFO     Setting execution providers to ['Bogus{i}ExecutionProvider'], in "
             "descending order of preference" for i in range(40)]
    lines += [PROVIDERS_LINE, FAILED_LINE]
    for line in lines:
        for ev in p.feed({"_SYSTEMD_UNIT": ML_UNIT, "_PID": "1", "MESSAGE": line}):
            s.apply(ev)
    for ev in p.flush():
        s.apply(ev)
    assert CUDA in s.providers_seen and s.preferred == CUDA
    assert s.effective == "CPUExecutionProvider" and s.cpu_fallback
    assert s.labels_dropped.get("provider", 0) > 0
    assert sum(x not in mllog.KNOWN_PROVIDERS for x in s.providers_seen) <= mllog.MAX_UNKNOWN_PROVIDERS
    # and after a restart from the saved state
    s2 = mllog.MLState()
    s2.load(json.loads(json.dumps(s.dump())))
    assert s2._provider("ROCMExecutionProvider") == "ROCMExecutionProvider"


def test_entry_over_the_byte_bound_is_skipped_and_counted_and_the_next_one_is_read(tmp_path):
    jdir = tmp_path / "journal"
    jdir.mkdir()
    write_journal(jdir / "system.journal", entries(["x" * (3 << 20), PROVIDERS_LINE]))
    m, _ = once(jdir, tmp_path / "state")
    assert value(m, "immich_gpu_exporter_journal_entries_dropped_total", reason="oversized") == 1
    assert value(m, "immich_ml_preferred_execution_provider", provider=CUDA) == 1


def test_cursor_seqnum_reads_real_cursors_and_refuses_the_rest(tmp_path):
    import subprocess

    from immich_gpu_exporter.sources.journal import cursor_seqnum
    jdir = tmp_path / "journal"
    jdir.mkdir()
    write_journal(jdir / "system.journal", entries(["one", "two", "three"]))
    out = subprocess.run(["journalctl", f"--directory={jdir}", "-o", "json"], capture_output=True, text=True,
                         check=True).stdout
    got = [cursor_seqnum(json.loads(ln)["__CURSOR"]) for ln in out.splitlines()]
    assert len({sid for sid, _ in got}) == 1  # one journal, one seqnum_id
    assert [n for _, n in got] == list(range(got[0][1], got[0][1] + 3))  # consecutive
    for bad in ("", "i=zz;s=abc", "s=abc", "i=12", "garbage", None, 17):
        assert cursor_seqnum(bad) is None


def test_grow_pipe_of_a_child_that_exited_at_once_does_not_raise():
    """journalctl that fails at once (its pipe already closed when pump() grows it) is an ordinary exit,
    never a reading failure that resets the source's counters."""
    import asyncio

    from immich_gpu_exporter.sources.journal import _grow_pipe

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec("true", stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        assert await proc.stdout.read() == b""
        await proc.wait()
        await asyncio.sleep(0.05)  # the loop closes the pipe transport
        _grow_pipe(proc)

    asyncio.run(main())

