"""latency.py: Immich's repository-method duration histograms -> the exporter's latency histograms.

Table tests of the pure parts; the real server's captures are checked in test_real_server_latency.py and
a real Prometheus computes the dashboard's PromQL in test_latency_e2e.py.
"""

from __future__ import annotations

import math

import pytest

from immich_gpu_exporter import latency
from immich_gpu_exporter.latency import IMMICH_BOUNDS, Histogram, LatencyAccumulator, parse
from immich_gpu_exporter.metrics import check_sample
from tests.support.immich_telemetry import TelemetrySim

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def text_of(sim: TelemetrySim, worker: str) -> str:
    return sim.render(worker)


def by_name(samples) -> dict:
    return {(s.name, s.labels): s.value for s in samples}


def test_parse_reads_the_families_sums_label_sets_and_ignores_the_rest():
    sim = TelemetrySim()
    sim.record("api", "machine_learning", "encode_text", 42.0)
    sim.record("api", "machine_learning", "encode_text", 3000.0)
    sim.record("api", "search", "search_smart", 7.0)
    sim.record("api", "search", "search_assets", 7.0)  # another search method: not Smart Search
    sim.record("api", "machine_learning", "predict", 41.0)  # internal to the ML repository
    sim.record("api", "asset", "get_by_ids", 1.0)
    text = text_of(sim, "api")
    # a second label set of the same family (another OTel scope) adds up
    text += 'immich_search_repository_search_smart_duration_count{otel_scope_name="other"} 2\n'
    text += 'immich_search_repository_search_smart_duration_sum{otel_scope_name="other"} 20\n'
    text += 'immich_search_repository_search_smart_duration_bucket{otel_scope_name="other",le="+Inf"} 2\n'
    r = parse(text)
    assert r.repo_enabled and r.malformed == 0
    assert set(r.histograms) == {("ml", "encode_text"), ("search", "search_smart")}
    et = r.histograms[("ml", "encode_text")]
    assert et.bounds == IMMICH_BOUNDS and et.count == 2 and et.sum == 3042.0
    assert et.cumulative[IMMICH_BOUNDS.index(50.0)] == 1 and et.cumulative[IMMICH_BOUNDS.index(2500.0)] == 1
    assert et.cumulative[IMMICH_BOUNDS.index(5000.0)] == 2
    ss = r.histograms[("search", "search_smart")]
    assert ss.count == 3 and ss.sum == 27.0


def test_parse_tells_repo_off_from_no_call_yet():
    off = "# HELP target_info Target metadata\ntarget_info{service_name=\"immich\"} 1\n" \
          "immich_jobs_smart_search_success_total 3\n"
    assert not parse(off).repo_enabled
    sim = TelemetrySim()
    sim.record("api", "system_metadata", "get", 0.4)  # repo on, no ML call yet
    r = parse(sim.render("api"))
    assert r.repo_enabled and r.histograms == {}


@pytest.mark.parametrize("bad", [
    'immich_machine_learning_repository_encode_text_duration_count NaN',
    'immich_machine_learning_repository_encode_text_duration_count -1',
    'immich_machine_learning_repository_encode_text_duration_count 1e308',
    'immich_machine_learning_repository_encode_text_duration_bucket{le="x"} 1',
    'immich_machine_learning_repository_encode_text_duration_bucket 1',
    'immich_machine_learning_repository_encode_text_duration_sum{le="1" 1',
])
def test_parse_counts_malformed_lines_and_keeps_going(bad):
    sim = TelemetrySim()
    sim.record("api", "search", "search_smart", 5.0)
    r = parse(bad + "\n" + sim.render("api"))
    assert r.malformed >= 1
    assert r.histograms[("search", "search_smart")].count == 1


def test_parse_rejects_a_histogram_that_is_not_cumulative():
    text = ("immich_machine_learning_repository_ocr_duration_count 2\n"
            "immich_machine_learning_repository_ocr_duration_sum 3\n"
            'immich_machine_learning_repository_ocr_duration_bucket{le="1"} 2\n'
            'immich_machine_learning_repository_ocr_duration_bucket{le="2"} 1\n'
            'immich_machine_learning_repository_ocr_duration_bucket{le="+Inf"} 2\n')
    r = parse(text)
    assert r.malformed == 1 and ("ml", "ocr") not in r.histograms


def test_parse_takes_the_milliseconds_suffix_of_newer_otel_exporters():
    text = ("immich_machine_learning_repository_ocr_duration_milliseconds_count 1\n"
            "immich_machine_learning_repository_ocr_duration_milliseconds_sum 60\n"
            'immich_machine_learning_repository_ocr_duration_milliseconds_bucket{le="75"} 1\n'
            'immich_machine_learning_repository_ocr_duration_milliseconds_bucket{le="+Inf"} 1\n')
    assert parse(text).histograms[("ml", "ocr")].sum == 60


def feed(acc: LatencyAccumulator, sim: TelemetrySim, provider: str | None) -> None:
    for worker in ("api", "microservices"):
        acc.observe(worker, parse(sim.render(worker)), provider)


def count_of(acc: LatencyAccumulator, metric: str, **labels: str) -> float | None:
    want = tuple(sorted(labels.items()))
    return by_name(acc.samples()).get((metric + "_count", want))


def test_baseline_first_then_every_call_to_the_provider_in_force_at_the_start_of_the_interval():
    sim, acc = TelemetrySim(), LatencyAccumulator()
    sim.record("microservices", "machine_learning", "encode_image", 100.0)  # before the exporter: baseline
    sim.record("api", "system_metadata", "get", 1.0)
    feed(acc, sim, CPU)
    # every series of each process exists at 0 from the first reading (increase() sees the first calls)
    assert count_of(acc, "immich_ml_call_duration_seconds", call="encode_image", provider=CPU) == 0
    assert count_of(acc, "immich_ml_call_duration_seconds", call="encode_text", provider=CPU) == 0
    assert count_of(acc, "immich_smart_search_query_duration_seconds", provider=CPU) == 0
    sim.record("microservices", "machine_learning", "encode_image", 200.0)
    sim.record("api", "machine_learning", "encode_text", 40.0)  # a family that appears: counted from zero
    sim.record("api", "search", "search_smart", 10.0)
    feed(acc, sim, CUDA)  # the switch is seen at this poll: the interval before it was CPU's
    assert count_of(acc, "immich_ml_call_duration_seconds", call="encode_image", provider=CPU) == 1
    assert count_of(acc, "immich_ml_call_duration_seconds", call="encode_text", provider=CPU) == 1
    assert count_of(acc, "immich_ml_call_duration_seconds", call="encode_image", provider=CUDA) == 0
    sim.record("microservices", "machine_learning", "encode_image", 20.0)
    feed(acc, sim, CUDA)
    got = by_name(acc.samples())
    cuda = (("call", "encode_image"), ("provider", CUDA))
    assert got[("immich_ml_call_duration_seconds_count", cuda)] == 1
    assert got[("immich_ml_call_duration_seconds_sum", cuda)] == pytest.approx(0.020)
    assert got[("immich_ml_call_duration_seconds_bucket", tuple(sorted(cuda + (("le", "0.01"),))))] == 0
    assert got[("immich_ml_call_duration_seconds_bucket", tuple(sorted(cuda + (("le", "0.025"),))))] == 1
    assert got[("immich_server_telemetry_repo_enabled", (("worker", "api"),))] == 1
    for s in acc.samples():
        check_sample(s)


def test_server_restart_counts_what_happened_since_and_an_unreadable_poll_loses_nothing():
    sim, acc = TelemetrySim(), LatencyAccumulator()
    sim.record("microservices", "machine_learning", "detect_faces", 80.0)
    feed(acc, sim, CUDA)
    for _ in range(3):
        sim.record("microservices", "machine_learning", "detect_faces", 80.0)
    acc.observe("microservices", None, CUDA)  # a poll that failed: no reading, nothing lost
    assert ("immich_server_telemetry_repo_enabled", (("worker", "microservices"),)) not in by_name(acc.samples())
    feed(acc, sim, CUDA)
    assert count_of(acc, "immich_ml_call_duration_seconds", call="detect_faces", provider=CUDA) == 3
    sim.restart("microservices")  # counts start over; the family is gone until its first call
    feed(acc, sim, CUDA)
    sim.record("microservices", "machine_learning", "detect_faces", 80.0)
    sim.record("microservices", "machine_learning", "detect_faces", 80.0)
    feed(acc, sim, CUDA)
    assert count_of(acc, "immich_ml_call_duration_seconds", call="detect_faces", provider=CUDA) == 5
    # a restart that is followed by more calls than before before the next poll is invisible as a
    # restart (counts went up); the increase is then undercounted, like any counter read across a reset
    got = by_name(acc.samples())
    assert got[("immich_ml_call_duration_seconds_sum", (("call", "detect_faces"), ("provider", CUDA)))] == \
        pytest.approx(0.4)


def test_other_bucket_boundaries_start_the_family_over():
    acc = LatencyAccumulator()
    one = lambda bounds, n: latency.Reading({("ml", "ocr"): Histogram(bounds, (n,) * len(bounds), n, 10.0 * n)}, True)  # noqa: E731
    acc.observe("microservices", one((1.0, 10.0), 0), CPU)
    acc.observe("microservices", one((1.0, 10.0), 2), CPU)
    assert count_of(acc, "immich_ml_call_duration_seconds", call="ocr", provider=CPU) == 2
    acc.observe("microservices", one((5.0, 50.0, 500.0), 3), CPU)  # an upgraded server: a new baseline
    acc.observe("microservices", one((5.0, 50.0, 500.0), 4), CPU)
    got = by_name(acc.samples())
    labels = (("call", "ocr"), ("provider", CPU))
    assert got[("immich_ml_call_duration_seconds_count", labels)] == 1
    assert ("immich_ml_call_duration_seconds_bucket", tuple(sorted(labels + (("le", "0.001"),)))) not in got
    assert got[("immich_ml_call_duration_seconds_bucket", tuple(sorted(labels + (("le", "0.5"),))))] == 1


def test_no_series_for_a_process_without_repository_durations():
    acc = LatencyAccumulator()
    acc.observe("api", parse("immich_jobs_ocr_success_total 1\n"), CUDA)
    acc.observe("api", parse("immich_jobs_ocr_success_total 2\n"), CUDA)
    samples = acc.samples()
    assert [(s.name, s.value) for s in samples] == [("immich_server_telemetry_repo_enabled", 0.0)]


def test_parse_is_linear_in_the_size_of_the_text():
    """No absolute time: the work for 8x the input is within 16x of the work for 1x (a quadratic
    parser gives 64x). Measured as the best of three runs to keep the machine's noise out."""
    import time

    def cost(n: int) -> float:
        line = 'immich_search_repository_search_smart_duration_bucket{le="' + "9" * 200 + '"} 1\n'
        junk = "immich_x_repository_" + "a" * 5000 + "\n"
        text = (line + junk) * n
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            parse(text)
            best = min(best, time.perf_counter() - t)
        return best

    small, large = cost(200), cost(1600)
    assert large < 16 * small, (small, large)


def test_state_round_trip_keeps_every_series_and_the_baselines():
    import json

    sim, acc = TelemetrySim(), LatencyAccumulator()
    sim.record("api", "system_metadata", "get", 1.0)
    feed(acc, sim, CPU)
    sim.record("api", "machine_learning", "encode_text", 90.0)
    feed(acc, sim, CUDA)
    restored = LatencyAccumulator()
    restored.load(json.loads(json.dumps(acc.dump())))
    assert [s for s in restored.samples() if "repo_enabled" not in s.name] == \
        [s for s in acc.samples() if "repo_enabled" not in s.name]
    # the restored baselines: a call made meanwhile is counted once, under the provider of the last poll
    sim.record("api", "machine_learning", "encode_text", 12.0)
    feed(restored, sim, CUDA)
    assert count_of(restored, "immich_ml_call_duration_seconds", call="encode_text", provider=CUDA) == 1
    assert count_of(restored, "immich_ml_call_duration_seconds", call="encode_text", provider=CPU) == 1


@pytest.mark.parametrize("bad", [
    None, [], {"last": {}, "acc": {}, "provider": {}}, {"last": {"gpu": []}, "acc": [], "provider": {}},
    {"last": {}, "acc": [["ml", "predict", "", [1.0], [0.0], 0, 0]], "provider": {}},
    {"last": {}, "acc": [["ml", "ocr", "", [1.0, 0.5], [0.0, 0.0], 0, 0]], "provider": {}},
    {"last": {}, "acc": [["ml", "ocr", "", [1.0], [3.0], 2, 0]], "provider": {}},
    {"last": {}, "acc": [["ml", "ocr", "", [1.0], [float("inf")], 2, 0]], "provider": {}},
    {"last": {}, "acc": [["ml", "ocr", 7, [1.0], [0.0], 0, 0]], "provider": {}},
    {"last": {}, "acc": [["ml", "ocr", "", [1.0], [0.0], True, 0]], "provider": {}},
    {"last": {"api": [["search", "search_smart", [1.0], [1.0]]]}, "acc": [], "provider": {}},
])
def test_a_bad_state_is_refused_whole(bad):
    acc = LatencyAccumulator()
    with pytest.raises(ValueError):
        acc.load(bad)
    assert acc.samples() == []
