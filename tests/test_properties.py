"""Property-based tests (hypothesis) of everything that parses outside input (issue 14): the
config layers, the web config, the ML log parser and the Immich API decoders. Properties: no
exception but the one the caller handles (ConfigError, BadAnswer), bounded memory per input,
and time that grows linearly with the input (the ratio between two sizes, never an absolute time)."""

from __future__ import annotations

import json
import math
import string
import time
import tracemalloc

from hypothesis import HealthCheck, given, settings, strategies as st

from immich_gpu_exporter import config as configmod, immich_api as api, mllog
from immich_gpu_exporter.sources.journal import MAX_MESSAGE_CHARS, bound_message, trusted

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ML_UNIT = "immich-machine-learning.service"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=20), children, max_size=6),
    max_leaves=40)


# --- config layers ----------------------------------------------------------------------------
@SETTINGS
@given(st.sampled_from([o for o in configmod.OPTIONS]), st.text(max_size=200))
def test_any_text_for_any_option_is_a_value_or_a_config_error(opt, text):
    for layer in ("env", "flag"):
        try:
            if layer == "env":
                configmod.load({}, None, {opt.env: text})
            else:
                configmod.load({opt.key: [text] if opt.repeatable else text}, None, {})
        except configmod.ConfigError as e:
            assert "\n" not in str(e)


@SETTINGS
@given(st.binary(max_size=2000))
def test_any_bytes_as_toml_file_is_a_config_or_one_config_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("toml") / "c.toml"
    path.write_bytes(raw)
    try:
        configmod.load({}, str(path), {})
    except configmod.ConfigError as e:
        assert "\n" not in str(e)


@SETTINGS
@given(st.sampled_from([o for o in configmod.OPTIONS]), json_values)
def test_any_toml_value_for_any_option_is_a_value_or_a_config_error(tmp_path_factory, opt, value):
    import tomllib  # noqa: F401 - the writer below only needs to produce valid TOML for simple values

    def toml(v):  # a tiny TOML writer for the values hypothesis gives
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return {float("inf"): "inf", float("-inf"): "-inf"}.get(v, "nan" if v != v else repr(v))
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            parts = [toml(x) for x in v]
            return None if None in parts else "[" + ", ".join(parts) + "]"
        return None

    text = toml(value)
    if text is None:
        return
    section, name = opt.key.split(".", 1)
    path = tmp_path_factory.mktemp("toml") / "c.toml"
    path.write_text(f"[{section}]\n{json.dumps(name)} = {text}\n")
    try:
        configmod.load({}, str(path), {})
    except configmod.ConfigError as e:
        assert "\n" not in str(e)


@SETTINGS
@given(st.text(max_size=500))
def test_any_yaml_as_web_config_is_a_config_or_one_config_error(tmp_path_factory, text):
    from immich_gpu_exporter import webconfig

    path = tmp_path_factory.mktemp("web") / "web.yml"
    path.write_text(text)
    try:
        webconfig.load(str(path))
    except configmod.ConfigError as e:
        assert "\n" not in str(e)


# --- the log parser ---------------------------------------------------------------------------
def feed_all(entries) -> mllog.MLState:
    p, s = mllog.Parser(["immich-server.service"]), mllog.MLState()
    for e in entries:
        bound_message(e)
        for ev in p.feed(e):
            s.apply(ev)
    for ev in p.flush():
        s.apply(ev)
    s.samples()
    return s


messages = st.one_of(st.text(max_size=300), st.lists(st.integers(0, 255), max_size=300),
                     st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                     st.sampled_from(["[07/30/26 12:00:00] INFO     ", " " * 29, "[W:onnxruntime:", "EP Error ",
                                      "Falling back to ['", "[Nest] 1  - "]).flatmap(
                         lambda prefix: st.text(max_size=200).map(lambda t: prefix + t)))
entries = st.fixed_dictionaries({"_SYSTEMD_UNIT": st.sampled_from([ML_UNIT, "immich-server.service"]),
                                 "_PID": st.sampled_from(["1", "2", ""]), "MESSAGE": messages},
                                optional={"PRIORITY": st.sampled_from(["3", "6", "x"]),
                                          "__REALTIME_TIMESTAMP": st.one_of(st.text(max_size=20), st.integers())})


@SETTINGS
@given(st.lists(entries, max_size=30))
def test_any_sequence_of_log_lines_parses_without_exception(batch):
    s = feed_all(batch)
    assert len(s.providers_seen) <= mllog.MAX_PROVIDERS + len(mllog.KNOWN_PROVIDERS)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["_SYSTEMD_UNIT", "CONTAINER_NAME", "_UID", "_COMM", "_TRANSPORT", "MESSAGE"]),
                       json_values, max_size=6))
def test_any_journal_entry_shape_is_judged_without_exception(entry):
    trusted(entry, frozenset({ML_UNIT}))
    feed_all([dict(entry)]) if isinstance(entry.get("MESSAGE", ""), (str, list, type(None))) else None


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["[W:onnxruntime:", "[07/30/26 12:00:00] INFO     ", "2026-07-30 12:00:00.1 [E:onnxruntime:a, ",
                        "[Nest] 1  - ", "EP Error ", "", " " * 29, "Falling back to ['"]),
       st.text(alphabet=string.printable, min_size=1, max_size=8))
def test_parse_time_grows_linearly_with_the_line(prefix, unit):
    def seconds(n: int) -> float:
        line = prefix + (unit * (n // len(unit) + 1))[:n]
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            feed_all([{"_SYSTEMD_UNIT": ML_UNIT, "_PID": "1", "MESSAGE": line}])
            best = min(best, time.perf_counter() - t0)
        return best

    # above the per-line bound every size costs the same; below it, 4x the input may cost ~4x
    small, big = seconds(MAX_MESSAGE_CHARS // 8), seconds(MAX_MESSAGE_CHARS // 2)
    assert big / max(small, 5e-4) < 10, (small, big)


def test_memory_per_huge_line_is_bounded():
    head = "[07/30/26 12:00:00] INFO     " + "é" * (8 << 20)
    tail = " " * 29 + "b" * (1 << 20)
    batch = [{"_SYSTEMD_UNIT": ML_UNIT, "_PID": "1", "MESSAGE": head}]
    batch += [{"_SYSTEMD_UNIT": ML_UNIT, "_PID": "1", "MESSAGE": tail} for _ in range(199)]
    tracemalloc.start()
    try:
        feed_all(batch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 9 MiB of one Rich record in, at most ~200 cut lines held (UTF-8 é: up to 4 bytes a character)
    assert peak < 200 * MAX_MESSAGE_CHARS * 4 + (1 << 20), peak


# --- the Immich API decoders ------------------------------------------------------------------
@SETTINGS
@given(json_values)
def test_any_json_is_decoded_or_a_bad_answer(body):
    for decode in (api.decode_queues, api.decode_jobs_legacy, api.decode_version, api.decode_features,
                   api.decode_ffmpeg_acceleration):
        try:
            decode(body)
        except api.BadAnswer:
            pass
    api.decode_ping(body)


@SETTINGS
@given(st.lists(st.fixed_dictionaries({"name": json_values, "isPaused": json_values,
                                       "statistics": st.dictionaries(st.sampled_from(
                                           ["active", "completed", "failed", "delayed", "waiting", "paused"]),
                                           json_values)}), max_size=10))
def test_decoded_queue_counts_are_always_sane_integers(body):
    for q in api.decode_queues(body).queues:
        for state in ("waiting", "active", "delayed", "failed", "paused", "completed"):
            assert isinstance(q.count(state), int) and 0 <= q.count(state) <= api.MAX_COUNT


@SETTINGS
@given(st.text(max_size=2000))
def test_any_telemetry_text_parses_to_finite_counters(text):
    t = api.parse_telemetry(text)
    assert all(0 <= v <= api.MAX_TELEMETRY_VALUE * 1000 for v in t.counters.values())


def test_telemetry_parse_time_grows_linearly():
    def seconds(n: int) -> float:
        text = "".join(f'immich_jobs_j{i}_success_total{{a="{"x" * 20}"}} {i}\n' for i in range(n))
        t0 = time.perf_counter()
        api.parse_telemetry(text)
        return time.perf_counter() - t0

    small, big = min(seconds(2000) for _ in range(3)), min(seconds(8000) for _ in range(3))
    assert big / small < 10, (small, big)


# -- latency telemetry (docs/latency.md) -----------------------------------------------------------
_LATENCY_FAMILY = st.sampled_from(["immich_machine_learning_repository_encode_text_duration",
                                   "immich_search_repository_search_smart_duration",
                                   "immich_machine_learning_repository_ocr_duration_milliseconds",
                                   "immich_asset_repository_get_duration"])
_latency_line = st.builds(
    lambda fam, part, labels, value: f"{fam}_{part}{labels} {value}",
    _LATENCY_FAMILY, st.sampled_from(["bucket", "sum", "count", "x"]),
    st.sampled_from(["", '{le="5"}', '{le="+Inf"}', '{otel_scope_name="immich",le="0.1"}', '{le="', "{le=\"1e999\"}"]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8)))


@SETTINGS
@given(st.lists(st.one_of(_latency_line, st.text(max_size=80)), max_size=60))
def test_any_latency_telemetry_parses_to_sane_cumulative_histograms(lines):
    from immich_gpu_exporter import latency

    r = latency.parse("\n".join(lines))
    for h in r.histograms.values():
        assert len(h.bounds) == len(h.cumulative) <= latency.MAX_BUCKETS
        assert list(h.bounds) == sorted(h.bounds) and all(math.isfinite(b) for b in h.bounds)
        assert all(0 <= a <= b <= h.count for a, b in zip(h.cumulative, h.cumulative[1:] + (h.count,)))
        assert 0 <= h.sum and math.isfinite(h.sum)
    acc = latency.LatencyAccumulator()
    acc.observe("api", r, "CUDAExecutionProvider")
    acc.observe("api", r, None)
    for s in acc.samples():
        assert math.isfinite(s.value) and s.value >= 0
