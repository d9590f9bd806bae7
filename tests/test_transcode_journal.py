"""Video transcoding metrics from the server's journal: real journal files, the exporter as a subprocess.

The log lines are those of tests/fixtures/transcode (rendered by the real NestJS ConsoleLogger of
each Immich version's lockfile from the message templates of that version's media.service.ts; see
render.cjs), written to real journal files by systemd-journal-remote, read by journalctl.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal

import pytest

from tests.support.exposition import parse, series, value
from tests.support.journal import SERVER_UNIT, export_entry, write_journal
from tests.support.proc import Exporter, run_cli, wait_for

FIX = pathlib.Path(__file__).parent / "fixtures" / "transcode"
ONLY_JOURNAL = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.immich"]
BOOT_ID = "0123456789abcdef0123456789abcdef"
VERSIONS = {"v1.130.3": "nest-11.0.11-console.json", "v2.0.1": "nest-11.1.6-console.json",
            "v3.1.0": "nest-11.1.28-console.json", "v3.1.0 IMMICH_LOG_FORMAT=json": "nest-11.1.28-json.json"}

pytestmark = pytest.mark.skipif(not os.access("/lib/systemd/systemd-journal-remote", os.X_OK),
                                reason="systemd-journal-remote is not installed")


def server_entries(lines: list[dict], container: str | None = None) -> bytes:
    """Journal entries as journald stores a unit's (or the Docker journald driver's) stdout/stderr."""
    out = bytearray()
    for i, x in enumerate(lines):
        rt = x["t"] * 1000 + i  # ms -> us; +i keeps lines of the same millisecond in order
        f: dict[str, str | bytes] = {"__REALTIME_TIMESTAMP": str(rt), "__MONOTONIC_TIMESTAMP": str(rt - 1_785_000_000_000_000),
                                     "_BOOT_ID": BOOT_ID}
        if container:
            # journald's own fields of an entry that dockerd (root) wrote: the only container entries trusted
            f.update({"_SYSTEMD_UNIT": "docker.service", "_PID": "900", "_UID": "0", "_COMM": "dockerd",
                      "_TRANSPORT": "journal", "CONTAINER_NAME": container,
                      "SYSLOG_IDENTIFIER": container, "PRIORITY": "3" if x["stream"] == "stderr" else "6"})
        else:
            f.update({"_SYSTEMD_UNIT": SERVER_UNIT, "_PID": "7", "SYSLOG_IDENTIFIER": "immich", "PRIORITY": "6"})
        f["MESSAGE"] = x["line"].encode()
        out += export_entry(f)
    return bytes(out)


def nonzero(m, name):
    """Series that counted something; the others exist at 0 from a video's start (transcode.py)."""
    return {k: v for k, v in series(m, name).items() if v}


def scenario(version: str, name: str) -> list[dict]:
    return json.loads((FIX / VERSIONS[version]).read_text())[name]


def once(jdir, state, *extra):
    r = run_cli(["--once", *ONLY_JOURNAL, f"--journal.directory={jdir}", f"--state.directory={state}", *extra])
    assert r.returncode == 0, r.stderr
    return parse(r.stdout)


@pytest.fixture
def jdir(tmp_path):
    d = tmp_path / "journal"
    d.mkdir()
    return d


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_nvenc_failing_for_every_video_shows_the_verdict_the_retries_and_software_seconds(version, jdir, tmp_path):
    write_journal(jdir / "s.journal", server_entries(scenario(version, "nvenc_fails_every_video")))
    m = once(jdir, tmp_path / "st")
    assert value(m, "immich_transcode_fallback") == 1
    assert series(m, "immich_transcode_jobs_total") == {frozenset({("accel", "nvenc"), ("decode", "hardware")}): 5}
    assert value(m, "immich_transcode_fallbacks_total", **{"from": "nvenc_hw_decode", "to": "nvenc_sw_decode"}) == 5
    assert value(m, "immich_transcode_fallbacks_total", **{"from": "nvenc_sw_decode", "to": "software"}) == 5
    # every video ended in software: 1 s NVENC+NVDEC, 1 s NVENC, 30 s software per video (render.cjs)
    assert nonzero(m, "immich_transcode_completed_total") == {frozenset({("accel", "disabled"), ("decode", "software")}): 5}
    secs = value(m, "immich_transcode_seconds_total", accel="disabled", decode="software")
    assert secs / 5 == pytest.approx(32.0, abs=0.001)


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_healthy_nvenc_shows_no_fallback_and_nvenc_seconds(version, jdir, tmp_path):
    write_journal(jdir / "s.journal", server_entries(scenario(version, "nvenc_healthy")))
    m = once(jdir, tmp_path / "st")
    assert value(m, "immich_transcode_fallback") == 0
    assert nonzero(m, "immich_transcode_fallbacks_total") == {}
    assert value(m, "immich_transcode_completed_total", accel="nvenc", decode="hardware") == 5
    assert value(m, "immich_transcode_seconds_total", accel="nvenc", decode="hardware") / 5 == pytest.approx(4.0, abs=0.001)


@pytest.mark.parametrize("name,verdict,jobs,steps,done", [
    ("success", 0, ("nvenc", "hardware"), {}, ("nvenc", "hardware")),
    ("decode_fallback", 0, ("nvenc", "hardware"), {("nvenc_hw_decode", "nvenc_sw_decode"): 1}, ("nvenc", "software")),
    ("full_fallback", 1, ("nvenc", "hardware"), {("nvenc_hw_decode", "nvenc_sw_decode"): 1,
                                                  ("nvenc_sw_decode", "software"): 1}, ("disabled", "software")),
    ("sw_decode_fallback", 1, ("nvenc", "software"), {("nvenc_sw_decode", "software"): 1}, ("disabled", "software")),
    ("disabled", 0, ("disabled", "software"), {}, ("disabled", "software")),
])
@pytest.mark.parametrize("container", [None, "immich_server"])
def test_each_path_of_the_server_through_unit_and_container_journals(name, verdict, jobs, steps, done, container,
                                                                     jdir, tmp_path):
    write_journal(jdir / "s.journal", server_entries(scenario("v3.1.0", name), container))
    m = once(jdir, tmp_path / "st")
    assert value(m, "immich_transcode_fallback") == verdict
    assert series(m, "immich_transcode_jobs_total") == {frozenset({("accel", jobs[0]), ("decode", jobs[1])}): 1}
    got = {(dict(k)["from"], dict(k)["to"]): v for k, v in nonzero(m, "immich_transcode_fallbacks_total").items()}
    assert got == steps
    assert nonzero(m, "immich_transcode_completed_total") == {frozenset({("accel", done[0]), ("decode", done[1])}): 1}


def test_ml_lines_and_other_units_are_not_read_as_transcodes(jdir, tmp_path):
    lines = scenario("v3.1.0", "full_fallback")
    other = server_entries(lines).replace(SERVER_UNIT.encode(), b"somebody-else.service")
    write_journal(jdir / "s.journal", other)
    m = once(jdir, tmp_path / "st")
    assert series(m, "immich_transcode_jobs_total") == {}
    assert value(m, "immich_transcode_fallback") == 0


def test_kill_9_mid_video_and_restart_neither_lose_nor_double_count(jdir, tmp_path):
    lines = scenario("v3.1.0", "nvenc_fails_every_video")
    # cut inside the third video, between its two retry lines
    cut = [i for i, x in enumerate(lines) if "acceleration disabled" in x["line"]][2]
    entries = server_entries(lines)
    first, rest = entries.split(b"\n\n")[:cut], entries.split(b"\n\n")[cut:]
    j, st = jdir / "s.journal", tmp_path / "st"
    write_journal(j, b"\n\n".join(first) + b"\n\n")
    args = [*ONLY_JOURNAL, f"--journal.directory={jdir}", f"--state.directory={st}"]
    e = Exporter(args, log_path=tmp_path / "log").start()
    try:
        wait_for(lambda: value(e.metrics(), "immich_transcode_jobs_total", accel="nvenc") == 3, 10, what="3 starts")
        wait_for(lambda: (st / "journal-state.json").exists(), 10, what="state written")
        e.stop(signal.SIGKILL)
        write_journal(j, b"\n\n".join(x for x in rest if x.strip()) + b"\n\n")
        e = Exporter(args, log_path=tmp_path / "log").start()
        # 14 entries arrived while it was down: more than the ten that --follow alone would replay
        wait_for(lambda: value(e.metrics(), "immich_transcode_completed_total", accel="disabled") == 5, 10,
                 what="all five videos")
        m = parse(e.metrics())
        assert value(m, "immich_transcode_jobs_total", accel="nvenc") == 5
        assert value(m, "immich_transcode_fallbacks_total", **{"from": "nvenc_sw_decode", "to": "software"}) == 5
        assert value(m, "immich_transcode_seconds_total", accel="disabled") / 5 == pytest.approx(32.0, abs=0.001)
        assert value(m, "immich_transcode_fallback") == 1
    finally:
        e.stop()
