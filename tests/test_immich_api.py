"""Decoding Immich's answers: queues (new and legacy), version, features, telemetry text."""

from __future__ import annotations

import pytest

from immich_gpu_exporter import immich_api as api

COUNTS = {"active": 1, "completed": 0, "failed": 0, "delayed": 0, "waiting": 57, "paused": 0}

# v3.1.0 /api/queues, abridged (research/immich.md §2.3)
QUEUES_V3 = [
    {"name": "smartSearch", "isPaused": False, "statistics": COUNTS},
    {"name": "faceDetection", "isPaused": True,
     "statistics": {"active": 0, "completed": 0, "failed": 2, "delayed": 1, "waiting": 3, "paused": 0}},
]
# v1.94-era /api/jobs: fewer queues, same shape (research/immich.md §2.2)
JOBS_V1 = {
    "thumbnailGeneration": {"jobCounts": {"active": 3, "completed": 0, "failed": 0, "delayed": 0, "waiting": 120,
                                          "paused": 0}, "queueStatus": {"isActive": True, "isPaused": False}},
    "smartSearch": {"jobCounts": COUNTS, "queueStatus": {"isActive": True, "isPaused": False}},
}


def test_queues_endpoint_decodes_counts_and_paused_flag():
    d = api.decode_queues(QUEUES_V3)
    assert d.malformed == 0
    by = {q.name: q for q in d.queues}
    assert by["smartSearch"].waiting == 57 and by["smartSearch"].active == 1 and by["smartSearch"].backlog == 58
    assert by["faceDetection"].is_paused and by["faceDetection"].failed == 2 and by["faceDetection"].backlog == 4


def test_legacy_jobs_endpoint_decodes_to_the_same_shape():
    d = api.decode_jobs_legacy(JOBS_V1)
    by = {q.name: q for q in d.queues}
    assert by["smartSearch"] == api.decode_queues(QUEUES_V3[:1]).queues[0]
    assert by["thumbnailGeneration"].active == 3


def test_unknown_queue_names_are_kept():
    future = {"name": "aiCaptioning", "isPaused": False, "statistics": COUNTS}
    d = api.decode_queues([*QUEUES_V3, future])
    assert "aiCaptioning" in {q.name for q in d.queues} and d.malformed == 0


@pytest.mark.parametrize("entry", [
    {"name": "smartSearch", "isPaused": False},  # no statistics
    {"name": "smartSearch", "isPaused": False, "statistics": {**COUNTS, "waiting": "57"}},  # string count
    {"name": "smartSearch", "isPaused": False, "statistics": {**COUNTS, "active": -1}},
    {"name": "smartSearch", "isPaused": False, "statistics": {**COUNTS, "active": 1.5}},
    {"name": "smartSearch", "isPaused": False, "statistics": {k: v for k, v in COUNTS.items() if k != "delayed"}},
    {"name": 7, "statistics": COUNTS},
    {"name": "bad name with spaces", "statistics": COUNTS},
    "smartSearch",
    None,
])
def test_a_malformed_entry_is_counted_not_fatal(entry):
    d = api.decode_queues([QUEUES_V3[1], entry])
    assert d.malformed == 1
    assert [q.name for q in d.queues] == ["faceDetection"]


def test_extra_fields_and_missing_optional_counts_are_tolerated():
    stats = {"active": 2, "failed": 0, "delayed": 0, "waiting": 5, "prioritized": 9}  # no completed/paused
    d = api.decode_queues([{"name": "ocr", "isPaused": False, "statistics": stats, "concurrency": 1}])
    assert d.malformed == 0 and d.queues[0].backlog == 7 and d.queues[0].completed == 0


def test_legacy_malformed_entries_are_counted():
    d = api.decode_jobs_legacy({**JOBS_V1, "ocr": {"jobCounts": {"active": "x"}}, "editor": []})
    assert d.malformed == 2 and len(d.queues) == 2


@pytest.mark.parametrize("decode,body", [
    (api.decode_queues, {"smartSearch": {}}),
    (api.decode_queues, "pong"),
    (api.decode_jobs_legacy, []),
    (api.decode_version, ["3", "1"]),
    (api.decode_version, {"major": 3, "minor": "1", "patch": 0}),
    (api.decode_features, None),
])
def test_wrong_top_level_shape_is_a_bad_answer(decode, body):
    with pytest.raises(api.BadAnswer):
        decode(body)


@pytest.mark.parametrize("body,text,at_least_2_4", [
    ({"major": 3, "minor": 1, "patch": 0, "prerelease": None}, "3.1.0", True),
    ({"major": 3, "minor": 0, "patch": 0, "prerelease": 2}, "3.0.0-2", True),
    ({"major": 1, "minor": 140, "patch": 1}, "1.140.1", False),  # before v3.0: no prerelease
    ({"major": 2, "minor": 4, "patch": 0, "prerelease": None}, "2.4.0", True),
])
def test_version(body, text, at_least_2_4):
    v = api.decode_version(body)
    assert str(v) == text
    assert (api.preferred_queue_path(v) == api.QUEUES_PATH) is at_least_2_4


def test_permission_hint_depends_on_version_and_endpoint():
    assert "'all'" in api.needed_permission(api.QUEUES_PATH, api.Version(1, 136, 0))
    assert "queue.read" in api.needed_permission(api.QUEUES_PATH, api.Version(3, 1, 0))
    assert "job.read" in api.needed_permission(api.LEGACY_PATH, api.Version(1, 140, 0))
    assert "admin" in api.needed_permission(api.LEGACY_PATH, None)


def test_features_keep_booleans_only():
    f = api.decode_features({"smartSearch": True, "ocr": False, "weird": "yes", "map": True})
    assert f == {"map": True, "ocr": False, "smartSearch": True}


def test_ping():
    assert api.decode_ping({"res": "pong"}) and not api.decode_ping({"res": "nope"}) and not api.decode_ping([])


@pytest.mark.parametrize("name,snake", [
    ("AssetDetectFaces", "asset_detect_faces"), ("SmartSearch", "smart_search"), ("Ocr", "ocr"),
    ("SmartSearchQueueAll", "smart_search_queue_all"), ("face-detection", "face_detection"),
    ("queue-smart-search", "queue_smart_search"), ("AssetEncodeVideo", "asset_encode_video"),
    ("PartialAssetCleanupQueueAll", "partial_asset_cleanup_queue_all"),
])
def test_snake_case_matches_immich_metric_names(name, snake):
    assert api.snake_case(name) == snake


@pytest.mark.parametrize("job,queue", [
    ("smart_search", "smartSearch"), ("asset_detect_faces", "faceDetection"), ("face_detection", "faceDetection"),
    ("ocr", "ocr"), ("asset_encode_video", "videoConversion"), ("video_conversion", "videoConversion"),
    ("asset_generate_thumbnails", "thumbnailGeneration"), ("library_sync_files", "library"),
    ("facial_recognition", "facialRecognition"), ("some_future_job", None),
])
def test_job_to_queue_for_both_naming_eras(job, queue):
    assert api.job_queue(job) == queue


# Shape of @opentelemetry/exporter-prometheus output on :8082 (research/immich.md §3).
TELEMETRY = """\
# HELP target_info Target metadata
# TYPE target_info gauge
target_info{service_name="immich",service_version="3.1.0"} 1
# HELP immich_jobs_smart_search_success_total
# TYPE immich_jobs_smart_search_success_total counter
immich_jobs_smart_search_success_total{otel_scope_name="nestjs-otel"} 120
immich_jobs_smart_search_failed_total{otel_scope_name="nestjs-otel"} 3
immich_jobs_smart_search_queue_all_success_total{otel_scope_name="nestjs-otel"} 1
immich_jobs_asset_detect_faces_skipped_total{otel_scope_name="nestjs-otel"} 4
immich_jobs_face_detection_success_total 6
immich_jobs_brand_new_job_success_total{otel_scope_name="nestjs-otel"} 9
immich_jobs_ocr_success_total{otel_scope_name="nestjs-otel"} NaN
immich_jobs_ocr_success_total{otel_scope_name="nestjs-otel" garbage
immich_queues_smart_search_active{otel_scope_name="nestjs-otel"} 2
immich_machine_learning_repository_encode_image_duration_count 123
"""


def test_telemetry_counters_by_queue():
    t = api.parse_telemetry(TELEMETRY)
    assert t.malformed == 2
    assert t.unmapped == {"brand_new_job"}
    by = t.by_queue()
    assert by[("smartSearch", "smart_search")] == 123
    assert by[("smartSearch", "smart_search_queue_all")] == 1
    assert by[("faceDetection", "asset_detect_faces")] == 4
    assert by[("faceDetection", "face_detection")] == 6
    assert not any(q == "ocr" for q, _ in by)


def test_telemetry_without_job_metrics_is_empty_not_an_error():
    t = api.parse_telemetry("# HELP target_info x\ntarget_info 1\n")
    assert t.counters == {} and t.malformed == 0 and t.series == 1
