"""The timing state machine, driven by a virtual clock and by the fake's deterministic queue schedule."""

from __future__ import annotations

import re

import pytest

from immich_gpu_exporter.immich_api import QueueStats
from immich_gpu_exporter.timings import METHOD_BACKLOG, METHOD_TELEMETRY, Observation, QueueTimings
from tests.support.fake_immich import QueueSim, drain_with_arrivals
from tests.support.proc import ROOT

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def q(name: str, waiting: int = 0, active: int = 0, delayed: int = 0) -> QueueStats:
    return QueueStats(name, waiting=waiting, active=active, delayed=delayed)


def obs(t: float, *queues: QueueStats, telemetry=None, provider=None) -> Observation:
    return Observation(t, {x.name: x for x in queues}, telemetry, provider)


def test_first_sample_is_a_baseline_without_a_jump():
    tm = QueueTimings(METHOD_BACKLOG)
    tm.observe(obs(100.0, q("smartSearch", waiting=500, active=2), provider=CUDA))
    rep = tm.report()["smartSearch"]
    assert rep.active_seconds == {CUDA: 0.0} and rep.processed == {CUDA: 0.0}
    assert rep.last_run is None


def test_active_is_integrated_with_the_trapezoid_rule():
    tm = QueueTimings(METHOD_BACKLOG)
    tm.observe(obs(0.0, q("thumbnailGeneration", waiting=10, active=3)))
    tm.observe(obs(5.0, q("thumbnailGeneration", waiting=4, active=3)))
    tm.observe(obs(7.0, q("thumbnailGeneration", waiting=0, active=1)))
    rep = tm.report()["thumbnailGeneration"]
    assert rep.active_seconds == {"": pytest.approx(3 * 5 + (3 + 1) / 2 * 2)}
    assert rep.processed == {"": 6 + 6}


def test_backlog_increase_is_not_processing_and_arrivals_mask_completions():
    tm = QueueTimings(METHOD_BACKLOG)
    tm.observe(obs(0, q("ocr", waiting=10, active=1)))
    tm.observe(obs(5, q("ocr", waiting=14, active=1)))  # 2 finished, 6 arrived: counts 0
    tm.observe(obs(10, q("ocr", waiting=12, active=1)))  # 3 finished, 1 arrived: counts 2
    assert tm.report()["ocr"].processed == {"": 2.0}


def test_provider_label_only_on_ml_queues():
    tm = QueueTimings(METHOD_BACKLOG)
    for t, w in ((0, 10), (5, 5)):
        tm.observe(obs(t, q("smartSearch", waiting=w, active=1), q("videoConversion", waiting=w, active=1),
                       provider=CUDA))
    r = tm.report()
    assert set(r["smartSearch"].processed) == {CUDA}
    assert set(r["videoConversion"].processed) == {""}


def test_provider_change_splits_counters_and_new_series_start_at_zero():
    tm = QueueTimings(METHOD_BACKLOG)
    tm.observe(obs(0, q("faceDetection", waiting=100, active=2), provider=CPU))
    tm.observe(obs(10, q("faceDetection", waiting=90, active=2), provider=CPU))
    tm.observe(obs(20, q("faceDetection", waiting=80, active=2), provider=CUDA))
    # The switch is seen at t=20: the interval (10, 20] still belongs to CPU, CUDA starts at 0.
    r = tm.report()["faceDetection"]
    assert r.active_seconds == {CPU: 40.0, CUDA: 0.0} and r.processed == {CPU: 20.0, CUDA: 0.0}
    tm.observe(obs(30, q("faceDetection", waiting=40, active=2), provider=CUDA))
    r = tm.report()["faceDetection"]
    assert r.active_seconds == {CPU: 40.0, CUDA: 20.0} and r.processed == {CPU: 20.0, CUDA: 40.0}


def test_unknown_provider_is_the_empty_label():
    tm = QueueTimings(METHOD_BACKLOG)
    tm.observe(obs(0, q("smartSearch", waiting=3, active=1), provider=None))
    assert set(tm.report()["smartSearch"].active_seconds) == {""}


def test_backlog_run_duration_jobs_and_eta():
    tm = QueueTimings(METHOD_BACKLOG)
    tm.observe(obs(0, q("smartSearch")))
    tm.observe(obs(5, q("smartSearch", waiting=18, active=2)))
    assert tm.report()["smartSearch"].drain_eta is None  # nothing processed yet: unknown
    tm.observe(obs(10, q("smartSearch", waiting=13, active=2)))
    assert tm.report()["smartSearch"].drain_eta == pytest.approx(15 / (5 / 5))
    tm.observe(obs(15, q("smartSearch", waiting=3, active=2)))
    assert tm.report()["smartSearch"].drain_eta == pytest.approx(5 / (15 / 10))
    tm.observe(obs(20, q("smartSearch")))
    r = tm.report()["smartSearch"]
    assert r.last_run == (15.0, 20.0) and r.drain_eta == 0.0


def test_a_run_under_way_at_start_is_not_reported_as_last_run():
    tm = QueueTimings(METHOD_BACKLOG)
    tm.observe(obs(0, q("ocr", waiting=4, active=1)))
    tm.observe(obs(5, q("ocr")))
    assert tm.report()["ocr"].last_run is None
    tm.observe(obs(10, q("ocr", waiting=1, active=1)))
    tm.observe(obs(15, q("ocr")))
    assert tm.report()["ocr"].last_run == (5.0, 2.0)


def test_a_gap_restarts_counting_without_a_jump():
    tm = QueueTimings(METHOD_BACKLOG, max_gap=30)
    tm.observe(obs(0, q("smartSearch", waiting=100, active=2)))
    tm.observe(obs(5, q("smartSearch", waiting=90, active=2)))
    tm.observe(obs(125, q("smartSearch", waiting=10, active=2)))  # 2 minutes unobserved
    r = tm.report()["smartSearch"]
    assert r.processed == {"": 10.0} and r.active_seconds == {"": 10.0} and tm.rebaselines == 1
    tm.observe(obs(130, q("smartSearch", waiting=5, active=2)))
    assert tm.report()["smartSearch"].processed == {"": 15.0}


def test_a_missing_queue_is_rebaselined_when_it_returns():
    tm = QueueTimings(METHOD_BACKLOG)
    tm.observe(obs(0, q("ocr", waiting=10, active=1), q("smartSearch")))
    tm.observe(obs(5, q("smartSearch")))
    tm.observe(obs(10, q("ocr", waiting=2, active=1), q("smartSearch")))
    assert tm.report()["ocr"].processed == {"": 0.0}


def test_telemetry_counts_exactly_and_handles_new_series_and_resets():
    tm = QueueTimings(METHOD_TELEMETRY)
    busy = q("smartSearch", waiting=50, active=2)
    tm.observe(obs(0, busy, telemetry={}, provider=CUDA))  # baseline: no counter yet
    tm.observe(obs(5, busy, telemetry={("smartSearch", "smart_search"): 7.0}, provider=CUDA))
    assert tm.report()["smartSearch"].processed == {CUDA: 7.0}
    tm.observe(obs(10, busy, telemetry={("smartSearch", "smart_search"): 12.0}, provider=CUDA))
    # Immich restarted: the counter starts over; 3 jobs since.
    tm.observe(obs(15, busy, telemetry={("smartSearch", "smart_search"): 3.0}, provider=CUDA))
    assert tm.report()["smartSearch"].processed == {CUDA: 15.0}
    assert tm.report()["smartSearch"].active_seconds == {CUDA: 30.0}


def test_telemetry_mode_counts_nothing_before_the_first_reading():
    tm = QueueTimings(METHOD_TELEMETRY)
    busy = q("ocr", waiting=50, active=1)
    tm.observe(obs(0, busy, telemetry=None))
    tm.observe(obs(5, busy, telemetry=None))
    assert tm.report()["ocr"].active_seconds == {"": 0.0}
    tm.observe(obs(10, busy, telemetry={("ocr", "ocr"): 100.0}))
    tm.observe(obs(15, busy, telemetry={("ocr", "ocr"): 104.0}))
    assert tm.report()["ocr"].active_seconds == {"": 5.0} and tm.report()["ocr"].processed == {"": 4.0}


def test_a_missed_telemetry_reading_is_split_over_providers_by_job_seconds():
    tm = QueueTimings(METHOD_TELEMETRY)
    key = ("faceDetection", "asset_detect_faces")
    tm.observe(obs(0, q("faceDetection", waiting=90, active=2), telemetry={key: 0.0}, provider=CPU))
    tm.observe(obs(10, q("faceDetection", waiting=80, active=2), telemetry=None, provider=CUDA))
    tm.observe(obs(20, q("faceDetection", waiting=60, active=2), telemetry={key: 30.0}, provider=CUDA))
    r = tm.report()["faceDetection"]
    assert r.processed == {CPU: pytest.approx(15.0), CUDA: pytest.approx(15.0)}


# --- accuracy against the fake's schedule -----------------------------------------------------

def simulate(sims, poll: float, until: float, method: str, provider_at=lambda t: "", start: float = -1.0):
    """Poll the schedules like the exporter does and feed the state machine."""
    tm = QueueTimings(method, max_gap=max(6 * poll, 30.0))
    t = start
    while t <= until:
        queues = {s.name: QueueStats(s.name, **{k: v for k, v in s.counts(t).items()}) for s in sims}
        tele = {(s.name, "job"): float(s.finished(t)) for s in sims}
        tm.observe(Observation(t, queues, tele if method == METHOD_TELEMETRY else None, provider_at(t)))
        t += poll
    return tm


def seconds_per_job(tm: QueueTimings, queue: str, provider: str = "") -> float:
    r = tm.report()[queue]
    return r.active_seconds[provider] / r.processed[provider]


# A library import on CPU: 200 photos queued at once, smartSearch concurrency 2 (Immich's default),
# 2 s per photo, new uploads arriving every 3 s while it drains, polled every 5 s (the default).
IMPORT = dict(initial=200, arrival_every=3.0, arrivals=60, concurrency=2, job_seconds=2.0, poll=5.0)


def import_scenario():
    p = IMPORT
    sim = QueueSim("smartSearch", concurrency=p["concurrency"],
                   arrivals=drain_with_arrivals(0.0, p["initial"], p["arrival_every"], p["arrivals"]),
                   job_seconds=p["job_seconds"])
    until = sim.last_end + 3 * p["poll"]
    return sim, until


def backlog_error_percent() -> float:
    sim, until = import_scenario()
    est = seconds_per_job(simulate([sim], IMPORT["poll"], until, METHOD_BACKLOG), "smartSearch")
    return (est - sim.truth()) / sim.truth() * 100


def test_seconds_per_job_within_10_percent_with_telemetry():
    sim, until = import_scenario()
    tm = simulate([sim], IMPORT["poll"], until, METHOD_TELEMETRY)
    assert tm.report()["smartSearch"].processed[""] == len(sim.jobs)
    assert seconds_per_job(tm, "smartSearch") == pytest.approx(sim.truth(), rel=0.10)


def test_backlog_estimate_error_is_the_one_the_docs_state():
    """The backlog method undercounts while uploads arrive during a drain; docs/immich.md states the
    error measured here, and this test keeps that statement true."""
    err = backlog_error_percent()
    assert err > 0  # undercounted jobs -> more seconds per job
    text = (ROOT / "docs" / "immich.md").read_text()
    m = re.search(r"measured backlog-estimate error: \+?(-?[0-9.]+) %", text)
    assert m, "docs/immich.md must state the measured backlog-estimate error"
    assert float(m.group(1)) == pytest.approx(err, abs=0.1)


def test_backlog_estimate_is_exact_without_arrivals():
    sim = QueueSim("smartSearch", concurrency=2, arrivals=[0.0] * 100, job_seconds=2.0)
    tm = simulate([sim], 5.0, sim.last_end + 15, METHOD_BACKLOG, start=0.0)  # baseline sees the queue
    assert tm.report()["smartSearch"].processed[""] == 100
    assert seconds_per_job(tm, "smartSearch") == pytest.approx(2.0, rel=0.10)
    assert tm.report()["smartSearch"].last_run is None  # it was under way at the baseline


@pytest.mark.parametrize("method", [METHOD_TELEMETRY, METHOD_BACKLOG])
def test_cpu_to_cuda_switch_gives_two_seconds_per_job_values(method):
    switch = 200.0

    def provider_at(t: float) -> str:
        return CPU if t < switch else CUDA

    sim = QueueSim("faceDetection", concurrency=2, arrivals=[0.0] * 400,
                   job_seconds={CPU: 2.0, CUDA: 0.4}, provider_at=provider_at)
    tm = simulate([sim], 5.0, sim.last_end + 15, method, provider_at, start=0.0)
    cpu, cuda = seconds_per_job(tm, "faceDetection", CPU), seconds_per_job(tm, "faceDetection", CUDA)
    assert cpu == pytest.approx(sim.truth(CPU), rel=0.10)
    assert cuda == pytest.approx(sim.truth(CUDA), rel=0.10)
    r = tm.report()["faceDetection"]
    assert sum(r.processed.values()) == 400
