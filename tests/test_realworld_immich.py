"""The Immich decoders and source against answers as real servers of several versions give them.

Shapes from Immich's server code and OpenAPI history (research/immich.md §2-3 and the server
sources of v1.94-v3.1): `/api/jobs` (every key, `jobCounts` + `queueStatus`), `/api/queues`
(v2.4+), `/api/server/version` with and without `prerelease`, `/api/server/features` of several
eras, the `{message, error, statusCode}` error bodies, servers before v1.113 that only have
`/api/server-info/*`, the older ML app whose `/ping` answers the JSON string "pong", and the
telemetry exposition as @opentelemetry/exporter-prometheus writes it (HELP/TYPE, `otel_scope_name`,
`target_info`, `_total` counters, kebab-derived job names before v1.136 and PascalCase-derived
after, other `immich_jobs_*` families such as a job-duration histogram).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from immich_gpu_exporter import immich_api as api
from immich_gpu_exporter.core import CollectResult, SourceDown
from immich_gpu_exporter.sources.immich import ImmichSource
from tests.support.fake_immich import FakeImmich, Key, QueueSim
from tests.support.immich_source import make_source, values

V194_QUEUES = ("thumbnailGeneration", "metadataExtraction", "videoConversion", "faceDetection", "facialRecognition",
               "smartSearch", "backgroundTask", "storageTemplateMigration", "migration", "search", "sidecar", "library")


def counts(active=0, completed=0, failed=0, delayed=0, waiting=0, paused=0):  # type: ignore[no-untyped-def]
    return {"active": active, "completed": completed, "failed": failed, "delayed": delayed, "waiting": waiting,
            "paused": paused}


def legacy(names, **special):  # type: ignore[no-untyped-def]
    out = {}
    for n in names:
        c, paused = special.get(n, (counts(), False))
        out[n] = {"jobCounts": c, "queueStatus": {"isActive": c["active"] > 0, "isPaused": paused}}
    return out


def test_api_jobs_of_v1_94_every_key():
    body = json.loads(json.dumps(legacy(V194_QUEUES, smartSearch=(counts(active=2, waiting=1530), False),
                                        faceDetection=(counts(waiting=7, paused=0), True),
                                        videoConversion=(counts(failed=3, delayed=1), False))))
    d = api.decode_jobs_legacy(body)
    assert d.malformed == 0 and [q.name for q in d.queues] == sorted(V194_QUEUES)
    q = {q.name: q for q in d.queues}
    assert (q["smartSearch"].active, q["smartSearch"].waiting, q["smartSearch"].backlog) == (2, 1530, 1532)
    assert q["faceDetection"].is_paused and not q["smartSearch"].is_paused
    assert (q["videoConversion"].failed, q["videoConversion"].delayed) == (3, 1)


def test_api_jobs_of_v2_3_with_newer_queues():
    names = V194_QUEUES + ("notifications", "duplicateDetection", "backupDatabase", "ocr", "workflow")
    d = api.decode_jobs_legacy(legacy(names, ocr=(counts(active=1, waiting=40), False)))
    assert d.malformed == 0 and len(d.queues) == 17
    assert {q.name: q.backlog for q in d.queues}["ocr"] == 41


def test_api_queues_of_v3_1_with_a_paused_queue():
    body = [{"name": "smartSearch", "isPaused": True, "statistics": counts(waiting=12)},
            {"name": "integrityCheck", "isPaused": False, "statistics": counts()},
            {"name": "editor", "isPaused": False, "statistics": counts(active=1)}]
    d = api.decode_queues(body)
    q = {q.name: q for q in d.queues}
    assert q["smartSearch"].is_paused and q["smartSearch"].waiting == 12 and q["editor"].active == 1


@pytest.mark.parametrize("body,text", [
    ({"major": 1, "minor": 94, "patch": 1}, "1.94.1"),
    ({"major": 2, "minor": 3, "patch": 1}, "2.3.1"),
    ({"major": 3, "minor": 1, "patch": 0, "prerelease": None}, "3.1.0"),
    ({"major": 3, "minor": 0, "patch": 0, "prerelease": 2}, "3.0.0-2"),
])
def test_versions_with_and_without_prerelease(body, text):
    v = api.decode_version(body)
    assert str(v) == text
    assert api.preferred_queue_path(v) == (api.LEGACY_PATH if not v.at_least(2, 4) else api.QUEUES_PATH)


@pytest.mark.parametrize("body", [
    # v1.94 (/api/server-info/features)
    {"clipEncode": True, "configFile": False, "facialRecognition": True, "map": True, "trash": True,
     "reverseGeocoding": True, "oauth": False, "oauthAutoLaunch": False, "passwordLogin": True, "sidecar": True,
     "search": True, "smartSearch": True},
    # v1.106
    {"smartSearch": True, "facialRecognition": True, "duplicateDetection": True, "map": True, "reverseGeocoding": True,
     "importFaces": False, "sidecar": True, "search": True, "trash": True, "oauth": False, "oauthAutoLaunch": False,
     "passwordLogin": True, "configFile": False, "email": False},
    # v3.1
    {f: f != "oauth" for f in ("configFile", "duplicateDetection", "email", "facialRecognition", "importFaces", "map",
                               "oauth", "oauthAutoLaunch", "ocr", "passwordLogin", "realtimeTranscoding",
                               "reverseGeocoding", "search", "sidecar", "smartSearch", "trash")},
])
def test_features_of_several_versions(body):
    assert api.decode_features(body) == dict(sorted(body.items()))


@pytest.mark.parametrize("text,up", [("pong", True), ('"pong"', True), ("pong\n", True),
                                     ('{"message":"Immich ML"}', False), ("", False)])
def test_ml_ping_old_json_and_new_text(text, up):
    assert api.decode_ml_ping(text) is up


# The exposition of @opentelemetry/exporter-prometheus on :8082, before and after v1.136.
TARGET = ('# HELP target_info Target metadata\n# TYPE target_info gauge\n'
          'target_info{{service_name="immich",telemetry_sdk_language="nodejs",telemetry_sdk_name="opentelemetry",'
          'telemetry_sdk_version="1.25.1",service_version="{v}"}} 1\n')


def counter(name: str, value: float) -> str:
    return (f"# HELP {name} \n# TYPE {name} counter\n"
            f'{name}{{otel_scope_name="nestjs-otel",otel_scope_version=""}} {value}\n')


PRE_136 = (TARGET.format(v="1.125.7")
           + "# HELP immich_queues_smart_search_active \n# TYPE immich_queues_smart_search_active gauge\n"
           'immich_queues_smart_search_active{otel_scope_name="nestjs-otel"} 2\n'
           + counter("immich_jobs_smart_search_success_total", 118)
           + counter("immich_jobs_queue_smart_search_success_total", 1)
           + counter("immich_jobs_face_detection_success_total", 40)
           + counter("immich_jobs_face_detection_skipped_total", 4)
           + counter("immich_jobs_face_detection_failed_total", 1)
           + counter("immich_jobs_metadata_extraction_success_total", 50)
           + counter("immich_jobs_link_live_photos_success_total", 50)
           + counter("immich_jobs_generate_thumbnails_success_total", 51)
           + counter("immich_jobs_video_conversion_success_total", 3)
           + counter("immich_queues_smart_search_started_total", 1))
# Repository timings and a job-duration histogram: other families, not job counters.
HISTOGRAMS = ("# HELP immich_machine_learning_repository_encode_image_duration \n"
              "# TYPE immich_machine_learning_repository_encode_image_duration histogram\n"
              'immich_machine_learning_repository_encode_image_duration_bucket{otel_scope_name="nestjs-otel",le="100"} 8\n'
              'immich_machine_learning_repository_encode_image_duration_sum{otel_scope_name="nestjs-otel"} 612.5\n'
              "# HELP immich_jobs_duration Duration in ms of each job run, labeled by job name\n"
              "# TYPE immich_jobs_duration histogram\n"
              'immich_jobs_duration_bucket{job_name="smart_search",otel_scope_name="nestjs-otel",le="+Inf"} 9\n'
              'immich_jobs_duration_sum{job_name="smart_search",otel_scope_name="nestjs-otel"} 5210\n'
              'immich_jobs_duration_count{job_name="smart_search",otel_scope_name="nestjs-otel"} 9\n')
POST_136 = (HISTOGRAMS + TARGET.format(v="3.1.0")
            + counter("immich_jobs_smart_search_success_total", 9)
            + counter("immich_jobs_smart_search_queue_all_success_total", 1)
            + counter("immich_jobs_asset_detect_faces_success_total", 7)
            + counter("immich_jobs_ocr_success_total", 5)
            + counter("immich_jobs_ocr_skipped_total", 2)
            + counter("immich_jobs_asset_generate_thumbnails_success_total", 12)
            + counter("immich_jobs_person_generate_thumbnail_success_total", 3)
            + counter("immich_jobs_asset_encode_video_success_total", 1)
            + counter("immich_jobs_sidecar_check_success_total", 4)
            + counter("immich_jobs_library_sync_files_success_total", 2)
)


def test_telemetry_before_v1_136():
    t = api.parse_telemetry(PRE_136)
    assert t.malformed == 0 and t.unmapped == frozenset()
    assert t.by_queue() == {
        ("smartSearch", "smart_search"): 118, ("smartSearch", "queue_smart_search"): 1,
        ("faceDetection", "face_detection"): 45,
        ("metadataExtraction", "metadata_extraction"): 50, ("metadataExtraction", "link_live_photos"): 50,
        ("thumbnailGeneration", "generate_thumbnails"): 51, ("videoConversion", "video_conversion"): 3}


def test_telemetry_after_v1_136_with_histograms():
    t = api.parse_telemetry(POST_136)
    assert t.malformed == 0 and t.unmapped == frozenset()
    assert t.by_queue() == {
        ("smartSearch", "smart_search"): 9, ("smartSearch", "smart_search_queue_all"): 1,
        ("faceDetection", "asset_detect_faces"): 7, ("ocr", "ocr"): 7,
        ("thumbnailGeneration", "asset_generate_thumbnails"): 12,
        ("thumbnailGeneration", "person_generate_thumbnail"): 3,
        ("videoConversion", "asset_encode_video"): 1, ("sidecar", "sidecar_check"): 4,
        ("library", "library_sync_files"): 2}


def test_telemetry_counter_without_total_suffix_and_with_timestamp():
    t = api.parse_telemetry('immich_jobs_smart_search_success{otel_scope_name="nestjs-otel"} 3 1718000000000\n')
    assert t.counters == {("smart_search", "success"): 3.0} and t.malformed == 0


# --- the source against the fake server -----------------------------------------------------------

async def cycles(src: ImmichSource, n: int) -> list[CollectResult]:
    out = []
    try:
        for _ in range(n):
            out.append(await asyncio.wait_for(src.collect(), src.timeout))
    finally:
        await src.close()
    return out


async def test_server_before_v1_113_answers_on_server_info():
    with FakeImmich(version=(1, 106, 0, None), keys={"good-key": Key(permissions=frozenset({"all"}))}) as fake:
        r1, r2 = await cycles(make_source(fake), 2)
        assert values(r2, "immich_server_up") == {(): 1}
        assert values(r2, "immich_server_info") == {("1.106.0",): 1}
        assert values(r2, "immich_server_feature_enabled")[("smartSearch",)] == 1
        queues = {q for q, _ in values(r2, "immich_queue_jobs")}
        assert "duplicateDetection" in queues and "backupDatabase" not in queues
        assert r1.errors == () and r2.errors == ()
        # the base is remembered: the second cycle goes straight to /api/server-info
        assert len(fake.api_requests("/api/server/ping")) == 1
        assert len(fake.api_requests("/api/server-info/ping")) == 2
        assert not fake.api_requests("/api/queues")


async def test_upgrade_past_v1_113_switches_back_to_api_server():
    with FakeImmich(version=(1, 106, 0, None), keys={"good-key": Key(permissions=frozenset({"all"}))}) as fake:
        src = make_source(fake)
        try:
            await asyncio.wait_for(src.collect(), src.timeout)
            fake.version = (1, 118, 0, None)
            r = await asyncio.wait_for(src.collect(), src.timeout)
        finally:
            await src.close()
        assert values(r, "immich_server_up") == {(): 1} and values(r, "immich_server_info") == {("1.118.0",): 1}
        assert r.errors == ()


async def test_old_ml_app_json_pong_is_up():
    with FakeImmich() as fake:
        fake.ml_ping_json = True
        (r,) = await cycles(make_source(fake), 1)
        assert values(r, "immich_ml_up") == {(): 1}


async def test_error_bodies_of_401_and_403_mark_the_source_down():
    with FakeImmich(keys={"k-nonadmin-7f3": Key(admin=False), "k-scoped-91a": Key(permissions=frozenset({"asset.read"}))}) as fake:
        for key, reason in (("k-wrong-55b", "unauthorized"), ("k-nonadmin-7f3", "forbidden"), ("k-scoped-91a", "forbidden")):
            src = make_source(fake, key=key)
            try:
                with pytest.raises(SourceDown) as e:
                    await asyncio.wait_for(src.collect(), src.timeout)
            finally:
                await src.close()
            assert e.value.reason == reason and key not in e.value.detail
        bodies = [json.loads(r.body) for r in fake.responses if r.status in (401, 403)]
        assert bodies and all(set(b) >= {"message", "error", "statusCode"} for b in bodies)


async def test_telemetry_with_other_job_families_is_not_malformed():
    sim = QueueSim("smartSearch", concurrency=2, arrivals=[0.0] * 4, job_seconds=0.05)
    with FakeImmich(queues=[sim]) as fake:
        plain = fake.telemetry_text
        fake.telemetry_text = lambda t: plain(t) + HISTOGRAMS
        results = await cycles(make_source(fake, immich_telemetry_url=fake.telemetry_url), 3)
        assert values(results[-1], "immich_queue_processed_method_info") == {("telemetry",): 1}
        assert all("telemetry_malformed" not in r.errors for r in results)
