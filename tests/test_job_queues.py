"""Every job of every supported release maps to its queue (tests/fixtures/immich-jobs, derived from
Immich's source by scripts/derive_job_queues.py), so no job's work goes uncounted; the generated table
is what the fixtures say; the names are the ones the real server writes."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

from immich_gpu_exporter import immich_api as api, job_queues

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = sorted((ROOT / "tests/fixtures/immich-jobs").glob("v*.json"),
                  key=lambda p: tuple(int(x) for x in p.stem[1:].split(".")))
REAL = ROOT / "tests/fixtures/real-server/v3.1.0"


def load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def test_fixtures_cover_every_minor_from_v1_113_to_v3_1():
    versions = [p.stem for p in FIXTURES]
    assert versions[0] == "v1.113.1" and versions[-1] == "v3.1.0" and len(versions) >= 40
    assert tuple(versions) == job_queues.RELEASES


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_every_job_of_the_release_maps_to_its_queue(path):
    fx = load(path)
    for row in fx["jobs"]:
        assert api.job_queue(row["telemetry"]) == row["queue"], (fx["version"], row)


def test_v3_1_0_has_66_jobs_and_those_the_old_table_missed():
    rows = {r["telemetry"]: r["queue"] for r in load(ROOT / "tests/fixtures/immich-jobs/v3.1.0.json")["jobs"]}
    assert len(rows) == 66
    by_queue: dict[str, list[str]] = {}
    for job, q in rows.items():
        by_queue.setdefault(q, []).append(job)
    assert rows["asset_edit_thumbnail_generation"] == "editor"
    assert rows["workflow_asset_trigger"] == "workflow"
    assert {"backgroundTask", "integrityCheck"} <= set(by_queue)
    assert "file_delete" in by_queue["backgroundTask"]
    assert all(api.job_queue(j) == q for j, q in rows.items())


def test_generated_module_is_what_the_fixtures_give(tmp_path):
    before = (ROOT / "immich_gpu_exporter/job_queues.py").read_text()
    r = subprocess.run([sys.executable, "scripts/derive_job_queues.py", "--from-fixtures"], cwd=ROOT,
                       capture_output=True, text=True)
    after = (ROOT / "immich_gpu_exporter/job_queues.py").read_text()
    if after != before:
        (ROOT / "immich_gpu_exporter/job_queues.py").write_text(before)
    assert r.returncode == 0, r.stderr
    assert after == before, "run: python scripts/derive_job_queues.py --from-fixtures"


@pytest.mark.parametrize("value, snake", [
    ("AssetDetectFacesQueueAll", "asset_detect_faces_queue_all"), ("Ocr", "ocr"), ("face-detection", "face_detection"),
    ("SidecarQueueAll", "sidecar_queue_all"), ("AssetEditThumbnailGeneration", "asset_edit_thumbnail_generation"),
    ("PersonGenerateThumbnail", "person_generate_thumbnail"), ("queue-face-detection", "queue_face_detection"),
])
def test_snake_case_is_lodashs(value, snake):
    assert api.snake_case(value) == snake
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import derive_job_queues
    finally:
        sys.path.pop(0)
    assert derive_job_queues.snake_case(value) == snake


def test_every_fixture_name_is_its_values_snake_case():
    for path in FIXTURES:
        for row in load(path)["jobs"]:
            assert api.snake_case(row["job"]) == row["telemetry"], row


def test_names_the_real_server_wrote_are_in_the_table():
    """The job counters of the real v3.1.0 server's telemetry (captured) all map to a queue."""
    text = "".join(p.read_text() for p in REAL.glob("telemetry-microservices-*.prom"))
    names = set(re.findall(r"^immich_jobs_([a-z0-9_]+?)_(?:success|failed|skipped)_total", text, re.M))
    assert {"smart_search", "asset_detect_faces", "ocr", "file_delete"} <= names
    assert all(api.job_queue(n) is not None for n in names), sorted(n for n in names if api.job_queue(n) is None)
