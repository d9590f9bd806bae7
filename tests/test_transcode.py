"""Table tests of the transcoding log parser and its counters/verdict (pure, no I/O)."""

from __future__ import annotations

import json
import pathlib

import pytest

from immich_gpu_exporter import metrics
from immich_gpu_exporter.transcode import (DISABLED, Event, TranscodeState, check_report, classify, envelope,
                                           stage)

FIX = pathlib.Path(__file__).parent / "fixtures" / "transcode"
# Nest ConsoleLogger version in each supported Immich release's lockfile (docs/transcode.md)
RENDERED = {"v1.130.3": "nest-11.0.11-console.json", "v2.0.1": "nest-11.1.6-console.json",
            "v3.1.0": "nest-11.1.28-console.json", "v3.1.0-json": "nest-11.1.28-json.json"}
A = "0f1e2d3c-0000-4000-8000-000000000001"
PREFIX = "[Nest] 7  - 07/30/2026, 12:40:00 PM     LOG [Microservices:MediaService] "
EPREFIX = "[Nest] 7  - 07/30/2026, 12:40:00 PM   ERROR [Microservices:MediaService] "


def rendered(version: str) -> dict[str, list[dict]]:
    return json.loads((FIX / RENDERED[version]).read_text())


CLASSIFY = [
    (PREFIX + f"Transcoding video {A} with NVENC-accelerated encoding and decoding",
     Event("start", "7", A, "nvenc", "hardware")),
    (PREFIX + f"Transcoding video {A} with NVENC-accelerated encoding and software decoding",
     Event("start", "7", A, "nvenc", "software")),
    (PREFIX + f"Transcoding video {A} without hardware acceleration", Event("start", "7", A, DISABLED, "software")),
    (PREFIX + f"Transcoding video {A} with QSV-accelerated encoding and decoding", Event("start", "7", A, "qsv", "hardware")),
    (PREFIX + f"Transcoding video {A} with VAAPI-accelerated encoding and software decoding",
     Event("start", "7", A, "vaapi", "software")),
    (PREFIX + f"Transcoding video {A} with RKMPP-accelerated encoding and decoding",
     Event("start", "7", A, "rkmpp", "hardware")),
    # an acceleration a later Immich might add: bounded label
    (PREFIX + f"Transcoding video {A} with AMF-accelerated encoding and decoding", Event("start", "7", A, "other", "hardware")),
    (EPREFIX + "Retrying with NVENC-accelerated encoding and software decoding", Event("retry_decode", "7", accel="nvenc")),
    (EPREFIX + "Retrying with NVENC acceleration disabled", Event("retry_software", "7", accel="nvenc")),
    (EPREFIX + "Retrying with RKMPP acceleration disabled", Event("retry_software", "7", accel="rkmpp")),
    (PREFIX + f"Successfully encoded {A}", Event("done", "7", A)),
    # JSON format (IMMICH_LOG_FORMAT=json, v2.5.0+)
    ('{"level":"log","pid":31,"timestamp":1785415200000,"message":"Transcoding video ' + A
     + ' with NVENC-accelerated encoding and decoding","context":"MediaService"}', Event("start", "31", A, "nvenc", "hardware")),
    ('{"level":"error","pid":31,"timestamp":1785415200000,"message":"Retrying with NVENC acceleration disabled",'
     '"context":"MediaService"}', Event("retry_software", "31", accel="nvenc")),
    # colours as Nest writes them
    ("\x1b[32m[Nest] 7  - \x1b[39m07/30/2026, 12:40:04 PM \x1b[32m    LOG\x1b[39m \x1b[33m[Microservices:MediaService]"
     f"\x1b[39m \x1b[32mSuccessfully encoded {A}\x1b[39m", Event("done", "7", A)),
    # a prefix already stripped by the log pipeline
    (f"Successfully encoded {A}", Event("done", "", A)),
    # lines that are not ours
    (EPREFIX + "Error occurred during transcoding: ffmpeg exited with code 234: Conversion failed!", None),
    (PREFIX + f"Transcoded video exists for asset {A}, but is no longer required. Deleting...", None),
    (PREFIX + f"Skipped transcoding for asset {A}: no video streams found", None),
    (PREFIX + "Machine learning server became healthy", None),
    ('{"level":"log","pid":31,"message":"Successfully encoded"}', None),
    ("{not json Retrying with ", None),
]


@pytest.mark.parametrize("line,want", CLASSIFY)
def test_classify_reads_every_transcoding_line_of_both_formats(line, want):
    assert classify(line) == want


def test_envelope_takes_pid_level_and_context_from_both_formats():
    assert envelope(EPREFIX + "x") == ("7", "error", "Microservices:MediaService", "x")
    assert envelope('{"level":"warn","pid":9,"timestamp":1,"message":"m","context":"MediaService"}') == (
        "9", "warn", "MediaService", "m")
    assert envelope("plain text") == ("", "", "", "plain text")


def nz(d: dict) -> dict:
    """The series that counted something (the others exist at 0, see the next test)."""
    return {k: v for k, v in d.items() if v}


def test_series_a_video_may_increment_exist_at_zero_from_its_start():
    # increase() cannot see the increment that creates a series; these are born before it
    s = TranscodeState()
    s.feed_line(PREFIX + f"Transcoding video {A} with NVENC-accelerated encoding and decoding", 0)
    assert s.fallbacks == {("nvenc_hw_decode", "nvenc_sw_decode"): 0, ("nvenc_sw_decode", "software"): 0}
    assert s.completed == {("nvenc", "hardware"): 0} and s.seconds == {("nvenc", "hardware"): 0}
    s.feed_line(EPREFIX + "Retrying with NVENC-accelerated encoding and software decoding", 1)
    assert s.completed == {("nvenc", "hardware"): 0, ("nvenc", "software"): 0}
    s.feed_line(EPREFIX + "Retrying with NVENC acceleration disabled", 2)
    assert s.completed == {("nvenc", "hardware"): 0, ("nvenc", "software"): 0, (DISABLED, "software"): 0}


def feed(state: TranscodeState, lines: list[tuple[float, str]]) -> TranscodeState:
    for ts, line in lines:
        state.feed_line(line, ts)
    return state


def run_video(t: float, asset: str, steps: list[str], end: float, pid: str = "7") -> list[tuple[float, str]]:
    """Lines of one video: its start line, retry lines, then its end at `end`."""
    p = PREFIX.replace("] 7 ", f"] {pid} ")
    e = EPREFIX.replace("] 7 ", f"] {pid} ")
    out = [(t, p + f"Transcoding video {asset} " + steps[0])]
    for s in steps[1:]:
        t += 1
        out.append((t, e + s))
    out.append((end, p + f"Successfully encoded {asset}"))
    return out


HW = "with NVENC-accelerated encoding and decoding"
HW_SW = "with NVENC-accelerated encoding and software decoding"
SW = "without hardware acceleration"
R_DEC = "Retrying with NVENC-accelerated encoding and software decoding"
R_SW = "Retrying with NVENC acceleration disabled"


def test_every_video_falling_back_to_software_counts_steps_seconds_and_sets_the_verdict():
    s = TranscodeState(window=5)
    t = 1000.0
    for i in range(3):
        feed(s, run_video(t, f"v{i}", [HW, R_DEC, R_SW], t + 32))
        t += 40
    assert s.jobs == {("nvenc", "hardware"): 3}
    assert nz(s.fallbacks) == {("nvenc_hw_decode", "nvenc_sw_decode"): 3, ("nvenc_sw_decode", "software"): 3}
    assert nz(s.completed) == {(DISABLED, "software"): 3}
    assert nz(s.seconds) == {(DISABLED, "software"): 96.0}
    assert s.fallback
    assert s.open == {}


def test_healthy_nvenc_has_no_fallback_and_hardware_seconds():
    s = TranscodeState(window=5)
    for i in range(4):
        feed(s, run_video(100.0 * i, f"v{i}", [HW], 100.0 * i + 4))
    assert nz(s.fallbacks) == {}
    assert nz(s.completed) == {("nvenc", "hardware"): 4} and nz(s.seconds) == {("nvenc", "hardware"): 16.0}
    assert not s.fallback


def test_a_decode_fallback_alone_is_no_software_fallback():
    s = feed(TranscodeState(), run_video(0, "v", [HW, R_DEC], 6))
    assert nz(s.fallbacks) == {("nvenc_hw_decode", "nvenc_sw_decode"): 1}
    assert nz(s.completed) == {("nvenc", "software"): 1}
    assert not s.fallback


def test_software_decoding_configured_falls_back_in_one_step():
    s = feed(TranscodeState(), run_video(0, "v", [HW_SW, R_SW], 31))
    assert s.jobs == {("nvenc", "software"): 1}
    assert nz(s.fallbacks) == {("nvenc_sw_decode", "software"): 1}
    assert nz(s.completed) == {(DISABLED, "software"): 1}
    assert s.fallback


def test_acceleration_disabled_is_software_without_a_verdict():
    s = feed(TranscodeState(), run_video(0, "v", [SW], 30))
    assert s.jobs == {(DISABLED, "software"): 1}
    assert nz(s.completed) == {(DISABLED, "software"): 1}
    assert not s.fallback


def test_the_verdict_clears_after_window_healthy_starts_and_not_before():
    s = feed(TranscodeState(window=3), run_video(0, "bad", [HW, R_DEC, R_SW], 30))
    for i in range(2):
        feed(s, run_video(100 + i * 10, f"ok{i}", [HW], 105 + i * 10))
        assert s.fallback, i  # the failed video's start is still among the last 3
    feed(s, run_video(200, "ok2", [HW], 205))
    assert not s.fallback


def test_switching_acceleration_off_clears_the_verdict_at_the_next_transcode():
    s = feed(TranscodeState(window=10), run_video(0, "bad", [HW, R_DEC, R_SW], 30))
    assert s.fallback
    feed(s, run_video(100, "sw", [SW], 130))
    assert not s.fallback


def test_concurrent_videos_a_late_fallback_of_an_old_video_counts_in_the_window():
    # A starts, then 3 healthy videos start (window 3 holds only them), then A falls back:
    # the fallback line came after the window's first start, so the verdict is 1
    s = TranscodeState(window=3)
    feed(s, [(0, PREFIX + f"Transcoding video A {HW}")])
    for i in range(3):
        feed(s, [(1 + i, PREFIX + f"Transcoding video B{i} {HW}")])
    feed(s, [(10, EPREFIX + R_DEC), (11, EPREFIX + R_SW)])
    assert s.fallback
    # the retry lines moved the oldest open video at that step (A), the others end on NVENC
    feed(s, [(20 + i, PREFIX + f"Successfully encoded B{i}") for i in range(3)] + [(60, PREFIX + "Successfully encoded A")])
    assert nz(s.completed) == {("nvenc", "hardware"): 3, (DISABLED, "software"): 1}
    assert s.seconds[(DISABLED, "software")] == 60.0


def test_retries_attach_to_videos_of_the_same_process_only():
    s = TranscodeState()
    feed(s, [(0, PREFIX.replace("] 7 ", "] 8 ") + f"Transcoding video X {HW}"),
             (1, PREFIX + f"Transcoding video Y {HW}"),
             (2, EPREFIX + R_DEC), (3, EPREFIX + R_SW),
             (5, PREFIX.replace("] 7 ", "] 8 ") + "Successfully encoded X"), (9, PREFIX + "Successfully encoded Y")])
    assert nz(s.completed) == {("nvenc", "hardware"): 1, (DISABLED, "software"): 1}
    assert nz(s.seconds) == {("nvenc", "hardware"): 5.0, (DISABLED, "software"): 8.0}


def test_an_end_without_its_start_counts_nothing_and_open_videos_are_bounded():
    s = TranscodeState(max_open=4)
    feed(s, [(0, PREFIX + "Successfully encoded nobody")])
    assert nz(s.completed) == {}
    feed(s, [(i, PREFIX + f"Transcoding video v{i} {HW}") for i in range(10)])
    assert list(s.open) == ["v6", "v7", "v8", "v9"]


def test_state_survives_dump_and_load_exactly():
    s = feed(TranscodeState(window=4), run_video(0, "a", [HW, R_DEC, R_SW], 30) + [(40, PREFIX + f"Transcoding video b {HW}")])
    again = TranscodeState(window=4)
    again.load(json.loads(json.dumps(s.dump())))
    assert again.dump() == s.dump()
    assert again.samples() == s.samples()
    feed(again, [(50, PREFIX + "Successfully encoded b")])
    assert again.completed[("nvenc", "hardware")] == 1 and again.seconds[("nvenc", "hardware")] == 10.0


def test_samples_use_only_declared_metrics_and_bounded_labels():
    s = TranscodeState()
    for i, (accel, dec) in enumerate([("NVENC", ""), ("QSV", " software"), ("VAAPI", ""), ("RKMPP", ""), ("X1", ""),
                                      ("X2", "")]):
        feed(s, [(i, PREFIX + f"Transcoding video v{i} with {accel}-accelerated encoding and{dec} decoding")])
    feed(s, [(9, EPREFIX + R_DEC), (10, EPREFIX + R_SW)])
    out = s.samples()
    for smp in out:
        metrics.check_sample(smp)
    accels = {dict(x.labels)["accel"] for x in out if x.name == "immich_transcode_jobs_total"}
    assert accels == {"nvenc", "qsv", "vaapi", "rkmpp", "other"}


def test_every_transcode_metric_of_the_journal_source_is_emitted():
    s = feed(TranscodeState(), run_video(0, "a", [HW, R_DEC, R_SW], 30))
    want = {m.name for m in metrics.METRICS.values() if m.source == "journal" and m.name.startswith("immich_transcode_")}
    assert want == {x.name for x in s.samples()}


def test_stage_names():
    assert stage("nvenc", "hardware") == "nvenc_hw_decode"
    assert stage("qsv", "software") == "qsv_sw_decode"
    assert stage(DISABLED, "software") == "software"


@pytest.mark.parametrize("version", sorted(RENDERED))
def test_lines_rendered_from_each_versions_source_give_the_expected_counts(version):
    want = {  # scenario -> (jobs, fallbacks, completed)
        "success": ({("nvenc", "hardware"): 1}, {}, {("nvenc", "hardware"): 1}),
        "decode_fallback": ({("nvenc", "hardware"): 1}, {("nvenc_hw_decode", "nvenc_sw_decode"): 1},
                            {("nvenc", "software"): 1}),
        "full_fallback": ({("nvenc", "hardware"): 1}, {("nvenc_hw_decode", "nvenc_sw_decode"): 1,
                                                       ("nvenc_sw_decode", "software"): 1}, {(DISABLED, "software"): 1}),
        "sw_decode_fallback": ({("nvenc", "software"): 1}, {("nvenc_sw_decode", "software"): 1},
                               {(DISABLED, "software"): 1}),
        "disabled": ({(DISABLED, "software"): 1}, {}, {(DISABLED, "software"): 1}),
        "qsv": ({("qsv", "hardware"): 1}, {}, {("qsv", "hardware"): 1}),
        "vaapi": ({("vaapi", "software"): 1}, {}, {("vaapi", "software"): 1}),
        "rkmpp": ({("rkmpp", "hardware"): 1}, {}, {("rkmpp", "hardware"): 1}),
        "nvenc_fails_every_video": ({("nvenc", "hardware"): 5}, {("nvenc_hw_decode", "nvenc_sw_decode"): 5,
                                                                 ("nvenc_sw_decode", "software"): 5},
                                    {(DISABLED, "software"): 5}),
        "nvenc_healthy": ({("nvenc", "hardware"): 5}, {}, {("nvenc", "hardware"): 5}),
    }
    scenarios = rendered(version)
    assert set(scenarios) == set(want)
    for name, lines in scenarios.items():
        s = TranscodeState()
        counted = s.feed_lines((x["line"], x["t"] / 1000) for x in lines)
        assert (s.jobs, nz(s.fallbacks), nz(s.completed)) == want[name], name
        assert counted == sum(1 for x in lines if "Error occurred" not in x["line"]), name
        assert s.fallback == (name in ("full_fallback", "sw_decode_fallback", "nvenc_fails_every_video")), name


def test_check_report_says_configured_and_observed_and_flags_a_fallback():
    s = feed(TranscodeState(), run_video(0, "a", [HW, R_DEC, R_SW], 30))
    ok, lines = check_report({"accel": "nvenc", "decode": "hardware"}, s.facts()["transcode"])
    assert not ok
    assert lines[0] == "configured acceleration: NVENC encoding, hardware decoding"
    assert "observed acceleration (last transcode started): NVENC encoding, hardware decoding" in lines
    assert "last transcode finished with: software (no hardware acceleration)" in lines
    assert any(x.startswith("FALLBACK") for x in lines)
    healthy = feed(TranscodeState(), run_video(0, "a", [HW], 3))
    assert check_report({"accel": "nvenc", "decode": "hardware"}, healthy.facts()["transcode"])[0]
    ok, lines = check_report({"accel": "disabled", "decode": "software"}, healthy.facts()["transcode"])
    assert not ok and any(x.startswith("MISMATCH") for x in lines)
    ok, lines = check_report(None, None)
    assert ok and "unknown" in lines[0] and "no transcode" in lines[1]


def _evidence(journal_facts, immich_facts):
    from types import MappingProxyType

    from immich_gpu_exporter.check import Evidence, Host
    from immich_gpu_exporter.core import Snapshot, SourceState

    sources = {"journal": SourceState("journal", up=True, facts=MappingProxyType(journal_facts)),
               "immich": SourceState("immich", up=True, facts=MappingProxyType(immich_facts))}
    return Evidence(Snapshot(1, MappingProxyType(sources), MappingProxyType({})), ("journal", "immich"),
                    Host("/nonexistent"), MappingProxyType({}))


def test_the_check_fails_on_a_fallback_warns_on_a_mismatch_and_passes_when_they_agree():
    from immich_gpu_exporter.check import check_transcode

    nvenc = {"transcode_configured": {"accel": "nvenc", "decode": "hardware"}}
    bad = feed(TranscodeState(), run_video(0, "a", [HW, R_DEC, R_SW], 30)).facts()
    good = feed(TranscodeState(), run_video(0, "a", [HW], 3)).facts()
    soft = feed(TranscodeState(), run_video(0, "a", [SW], 3)).facts()
    f = check_transcode(_evidence(bad, nvenc))
    assert f.status == "FAIL" and f.fix and f.details["fallback"] and f.details["last_finished"] == ["disabled", "software"]
    assert check_transcode(_evidence(good, nvenc)).status == "PASS"
    assert check_transcode(_evidence(good, {})).status == "PASS"  # no systemConfig.read: the log alone
    assert check_transcode(_evidence(soft, nvenc)).status == "WARN"
    assert check_transcode(_evidence(TranscodeState().facts(), nvenc)).status == "SKIP"
