"""Latency against the REAL Immich v3.1.0 server's telemetry (tests/fixtures/real-server/v3.1.0): the
families, labels, layout and "appears after its first call" behaviour the exporter relies on, the fake's
layout (tests/support/immich_telemetry.py) checked against them, and the exporter's numbers against the
known latencies of the fake ML service the real server called.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from immich_gpu_exporter import immich_api as api, latency
from immich_gpu_exporter.latency import IMMICH_BOUNDS, LatencyAccumulator, parse
from tests.support.immich_telemetry import TelemetrySim

CAP = pathlib.Path(__file__).parent / "fixtures" / "real-server" / "v3.1.0"
CUDA = "CUDAExecutionProvider"
TASK_OF = {"encode_text": "text", "encode_image": "image", "detect_faces": "faces", "ocr": "ocr"}


def text(name: str) -> str:
    return (CAP / name).read_text()


def ml_calls(name: str) -> list[dict]:
    return [json.loads(line) for line in (CAP / name).read_text().splitlines()]


def family_block(exposition: str, family: str) -> list[str]:
    return [ln for ln in exposition.splitlines() if re.match(rf"^(# \w+ )?{family}(_count|_sum|_bucket)?[{{ ]", ln)]


def shape(lines: list[str]) -> list[str]:
    """A block with its numbers blanked: the layout alone (names, labels, le spelling, order)."""
    return [re.sub(r"} \S+$| \d\S*$", " N", ln) if not ln.startswith("#") else ln for ln in lines]


def test_api_process_serves_encode_text_and_search_smart_only_after_their_first_call():
    before, after = parse(text("telemetry-api-8081-before.prom")), parse(text("telemetry-api-8081-after.prom"))
    assert before.repo_enabled and before.histograms == {} and before.malformed == 0  # on, nothing called yet
    assert after.malformed == 0 and set(after.histograms) == {("ml", "encode_text"), ("search", "search_smart")}
    searches = json.loads(text("searches-after.json"))
    calls = ml_calls("ml-calls-after.jsonl")
    assert after.histograms[("search", "search_smart")].count == len(searches)
    # cached queries (repeated text) call no ML: encode_text counts the fake's text calls exactly
    assert after.histograms[("ml", "encode_text")].count == sum(c["task"] == "text" for c in calls) \
        == sum(not s.get("cached") for s in searches)


def test_microservices_process_serves_the_jobs_ml_calls():
    before, after = (parse(text(f"telemetry-microservices-8082-{s}.prom")) for s in ("before", "after"))
    assert before.repo_enabled and before.histograms == {}
    calls = ml_calls("ml-calls-after.jsonl")
    for method in ("encode_image", "detect_faces", "ocr"):
        h = after.histograms[("ml", method)]
        assert h.count == sum(c["task"] == TASK_OF[method] for c in calls) == 6
        assert h.bounds == IMMICH_BOUNDS  # Immich's aggregationBoundaries, in ms


@pytest.mark.parametrize("method", ["encode_text", "encode_image", "detect_faces", "ocr"])
def test_durations_are_the_fakes_known_latency_plus_the_servers_own_overhead(method):
    worker = "api-8081" if method == "encode_text" else "microservices-8082"
    h = parse(text(f"telemetry-{worker}-after.prom")).histograms[("ml", method)]
    calls = [c for c in ml_calls("ml-calls-after.jsonl") if c["task"] == TASK_OF[method]]
    fake_side_ms = 1000 * sum(c["end"] - c["start"] for c in calls) / len(calls)
    delay_ms = 1000 * calls[0]["delay_s"]
    mean_ms = h.sum / h.count
    # the server's measure wraps the HTTP call: never below the fake's own time, and within the
    # overhead of reading the image and building the form (measured: 4-26 ms on this machine)
    assert fake_side_ms <= mean_ms <= fake_side_ms + 40, (method, fake_side_ms, mean_ms)
    # every call lands in a bucket at or above the known delay
    below = max(i for i, b in enumerate(IMMICH_BOUNDS) if b < delay_ms)
    assert h.cumulative[below] == 0, (method, h.cumulative)


def test_with_telemetry_include_job_there_are_no_repository_durations_to_read():
    for name in ("telemetry-api-8081-include-job.prom", "telemetry-microservices-8082-include-job.prom"):
        r = parse(text(name))
        assert not r.repo_enabled and r.histograms == {}, name
    assert "# no registered metrics" in text("telemetry-api-8081-include-job.prom")
    # the job group is still there: job counters parse
    assert api.parse_telemetry(text("telemetry-microservices-8082-include-job.prom")).series > 0


def test_no_http_series_even_with_telemetry_include_all():
    for name in ("telemetry-api-8081-after.prom", "telemetry-microservices-8082-after.prom"):
        assert not re.search(r"^http_", text(name), re.M)


def test_the_fakes_families_have_the_real_layout():
    sim = TelemetrySim()
    sim.record("api", "machine_learning", "encode_text", 48.0)
    sim.record("api", "search", "search_smart", 4.0)
    real, fake = text("telemetry-api-8081-after.prom"), sim.render("api")
    for family in ("immich_machine_learning_repository_encode_text_duration",
                   "immich_search_repository_search_smart_duration"):
        assert shape(family_block(fake, family)) == shape(family_block(real, family)), family
    assert shape(family_block(real, "immich_machine_learning_repository_encode_text_duration"))[:3] == [
        "# HELP immich_machine_learning_repository_encode_text_duration The elapsed time in ms for the Machine "
        "Learning Repository to encode_text",
        "# UNIT immich_machine_learning_repository_encode_text_duration ms",
        "# TYPE immich_machine_learning_repository_encode_text_duration histogram"]


def test_the_exporter_re_exports_the_real_increase_in_seconds():
    acc = LatencyAccumulator()
    for worker, port in (("api", "8081"), ("microservices", "8082")):
        acc.observe(worker, parse(text(f"telemetry-{worker}-{port}-before.prom")), CUDA)
    for worker, port in (("api", "8081"), ("microservices", "8082")):
        acc.observe(worker, parse(text(f"telemetry-{worker}-{port}-after.prom")), CUDA)
    got = {(s.name, s.labels): s.value for s in acc.samples()}
    api_after = parse(text("telemetry-api-8081-after.prom"))
    for method in ("encode_text", "encode_image", "detect_faces", "ocr"):
        worker = "api-8081" if method == "encode_text" else "microservices-8082"
        real = parse(text(f"telemetry-{worker}-after.prom")).histograms[("ml", method)]
        labels = (("call", method), ("provider", CUDA))
        assert got[("immich_ml_call_duration_seconds_count", labels)] == real.count
        assert got[("immich_ml_call_duration_seconds_sum", labels)] == pytest.approx(real.sum / 1000)
        le_100ms = tuple(sorted(labels + (("le", "0.1"),)))
        assert got[("immich_ml_call_duration_seconds_bucket", le_100ms)] == \
            real.cumulative[IMMICH_BOUNDS.index(100.0)]
    smart = api_after.histograms[("search", "search_smart")]
    assert got[("immich_smart_search_query_duration_seconds_count", (("provider", CUDA),))] == smart.count
    assert got[("immich_server_telemetry_repo_enabled", (("worker", "api"),))] == 1
    assert latency.WORKER_KEYS["api"] == (("ml", "encode_text"), ("search", "search_smart"))


def test_names_per_version_are_the_ones_the_exporter_reads():
    """Every version's families (read from its source) are parsed as the call they are."""
    names = json.loads((CAP.parent / "telemetry-names.json").read_text())
    for version, v in names.items():
        if version.startswith("_"):
            continue
        assert tuple(float(b) for b in v["boundaries_ms"]) == IMMICH_BOUNDS, version
        families = {**{("ml", call): fam for call, fam in v["ml_calls"].items()},
                    ("search", "search_smart"): v["smart_search"]}
        body = "".join(f'{fam}_count 1\n{fam}_sum 2\n{fam}_bucket{{le="+Inf"}} 1\n' for fam in families.values())
        assert set(parse(body).histograms) == set(families), version
