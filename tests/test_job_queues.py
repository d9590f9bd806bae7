"""Every job of every supported release maps to its queue (tests/fixtures/immich-jobs, derived from
Immich's source by scripts/derive_job_queues.py), so no job's work goes uncounted; the generated table
is what the fixtures say; the names are the ones the real server writes, and snake_case is lodash's."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess

import pytest

from immich_gpu_exporter import immich_api as api, job_queues
from tests.support.fake_immich import JOB_NAMES

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIR = ROOT / "tests/fixtures/immich-jobs"


def vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.lstrip("v").split("."))


FIXTURES = sorted(DIR.glob("v*.json"), key=lambda p: vtuple(p.stem))
RELEASES = {p.stem: json.loads(p.read_text()) for p in FIXTURES}
V310 = RELEASES["v3.1.0"]
# The real v3.1.0 server's telemetry (tests/fixtures/real-server/v3.1.0, captured).
REAL = sorted((ROOT / "tests/fixtures/real-server/v3.1.0").glob("*.prom"))
# Job counters research/immich.md §3 names for v3.x (shared/research, not in the repository).
RESEARCH_NAMES = ("smart_search", "asset_detect_faces", "ocr", "asset_encode_video")


def script():
    spec = importlib.util.spec_from_file_location("derive_job_queues", ROOT / "scripts/derive_job_queues.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fixtures_are_the_last_patch_of_every_minor_from_v1_106_to_v3_1():
    versions = [vtuple(v) for v in RELEASES]
    assert versions[0] == (1, 106, 4) and versions[-1] == (3, 1, 0)
    minors = [v[:2] for v in versions]
    assert len(set(minors)) == len(minors), "one release per minor"
    for major in {m for m, _ in minors}:
        got = [n for m, n in minors if m == major]
        assert got == list(range(got[0], got[0] + len(got))), f"a minor of v{major} is missing: {got}"
    assert [m for m, _ in minors].count(2) == 8 and (2, 0) in minors and (3, 0) in minors
    assert tuple(RELEASES) == job_queues.RELEASES
    assert len(RELEASES) == 49


@pytest.mark.parametrize("version", list(RELEASES))
def test_every_job_of_the_release_maps_to_its_queue(version):
    fx = RELEASES[version]
    assert fx["version"] == version and re.fullmatch(r"[0-9a-f]{40}", fx["commit"])
    assert len(fx["jobs"]) >= 47 and len({r["job"] for r in fx["jobs"]}) == len(fx["jobs"])
    for row in fx["jobs"]:
        assert api.job_queue(row["telemetry"]) == row["queue"], row
        assert row["queue"] in fx["queues"] and row["queue"] in api.KNOWN_QUEUES, row


@pytest.mark.parametrize("version", list(RELEASES))
def test_telemetry_names_are_what_the_release_writes(version):
    """Up to v1.135 Immich wrote `name.replaceAll('-', '_')` of kebab values, from v1.136 lodash
    `snakeCase` of PascalCase values; either way a name the exporter's parser reads."""
    fx = RELEASES[version]
    old = vtuple(version) < (1, 136)
    assert fx["naming"] == ("replaceAll('-', '_')" if old else "snakeCase")
    for row in fx["jobs"]:
        assert row["telemetry"] == (row["job"].replace("-", "_") if old else api.snake_case(row["job"])), row
        assert ("-" in row["job"] or row["job"].islower()) if old else row["job"][0].isupper(), row
        line = f'immich_jobs_{row["telemetry"]}_success_total{{otel_scope_name="nestjs-otel"}} 3\n'
        assert api.parse_telemetry(line).by_queue() == {(row["queue"], row["telemetry"]): 3.0}, row


def test_snake_case_is_lodashs_on_every_name():
    """Checked against lodash's own snakeCase (run under node when the fixtures were derived, captured):
    every job and queue value of every release, and harder probes (acronyms, digits)."""
    cap = json.loads((DIR / "lodash-snakecase.json").read_text())
    assert cap["lodash"].startswith("4.")
    names = cap["snakeCase"]
    every = ({r["job"] for fx in RELEASES.values() for r in fx["jobs"]}
             | {q for fx in RELEASES.values() for q in fx["queues"]})
    assert every <= set(names)
    assert {"Asset3DModel", "HTTPServer", "JobV2", "IOError"} <= set(names)
    wrong = {n: (s, api.snake_case(n)) for n, s in names.items() if api.snake_case(n) != s}
    assert not wrong


def test_kebab_values_snake_case_as_immich_replaced_dashes():
    """Before v1.136 the name was `replaceAll('-', '_')`, not snakeCase: for every kebab value of those
    releases the two agree (so fake_immich may write either)."""
    kebab = {r["job"] for v, fx in RELEASES.items() if vtuple(v) < (1, 136) for r in fx["jobs"]}
    assert len(kebab) > 50
    assert all(api.snake_case(n) == n.replace("-", "_") for n in kebab)


def test_v3_1_0_has_66_jobs_on_every_queue_the_old_table_missed():
    rows = {r["telemetry"]: r["queue"] for r in V310["jobs"]}
    assert len(rows) == 66 and len(V310["queues"]) == 19
    by_queue: dict[str, set[str]] = {}
    for job, q in rows.items():
        by_queue.setdefault(q, set()).add(job)
    assert rows["asset_edit_thumbnail_generation"] == "editor"
    assert rows["workflow_asset_trigger"] == "workflow"
    assert {"file_delete", "asset_delete", "user_delete", "version_check"} <= by_queue["backgroundTask"]
    assert {"integrity_missing_files", "integrity_untracked_files"} <= by_queue["integrityCheck"]
    # The 28 that the issue saw unmapped on the real server: every job of these four queues.
    missed = by_queue["backgroundTask"] | by_queue["integrityCheck"] | by_queue["editor"] | by_queue["workflow"]
    assert len(missed) == 28
    for job, q in rows.items():
        assert api.job_queue(job) == q


def test_no_job_changed_queue_between_releases():
    seen: dict[str, tuple[str, str]] = {}
    for v, fx in RELEASES.items():
        for r in fx["jobs"]:
            assert seen.setdefault(r["telemetry"], (r["queue"], v))[0] == r["queue"], (r, seen[r["telemetry"]])
    assert set(seen) == set(job_queues.JOB_QUEUES)


def test_generated_module_is_what_the_fixtures_give():
    """Regenerating job_queues.py from the fixtures gives the same bytes (computed, not written)."""
    mod = script()
    assert (ROOT / "immich_gpu_exporter/job_queues.py").read_text() == mod.module_text(mod.load_fixtures()), \
        "run: python scripts/derive_job_queues.py --from-fixtures"
    assert api.KNOWN_QUEUES == job_queues.QUEUES == {q for fx in RELEASES.values() for q in fx["queues"]}


def test_fixtures_are_written_as_the_script_writes_them():
    mod = script()
    for p in FIXTURES:
        assert p.read_text() == mod.dump_fixture(json.loads(p.read_text())), p.name


def test_the_union_refuses_a_job_that_changed_queue():
    mod = script()
    def release(version: str, queue: str) -> dict:
        return {"version": version, "naming": "snakeCase", "queues": ["x", "y"],
                "jobs": [{"job": "A", "telemetry": "a", "queue": queue}]}
    a, b = release("v1.0.0", "x"), release("v1.1.0", "y")
    assert mod.union([a, a]) == {"a": "x"}
    with pytest.raises(SystemExit, match="a: queue x in v1.0.0, y in v1.1.0"):
        mod.union([a, b])


def test_names_the_real_server_wrote_are_v3_1_0_jobs():
    """The job counters and queue gauges of the real v3.1.0 server's telemetry (captured) are names of
    the v3.1.0 fixture, and every job counter maps to a queue."""
    text = "".join(p.read_text() for p in REAL)
    jobs = set(re.findall(r"^immich_jobs_([a-z0-9_]+?)_(?:success|failed|skipped)_total\b", text, re.M))
    assert len(jobs) >= 9 and {"smart_search", "asset_detect_faces", "ocr", "file_delete"} <= jobs
    known = {r["telemetry"] for r in V310["jobs"]}
    assert jobs | set(RESEARCH_NAMES) <= known, sorted((jobs | set(RESEARCH_NAMES)) - known)
    assert all(api.job_queue(n) is not None for n in jobs)
    parsed = api.parse_telemetry(text)
    assert not parsed.unmapped and {j for j, _ in parsed.counters} == jobs
    queues = set(re.findall(r"^immich_queues_([a-z0-9_]+)_active\b", text, re.M))
    assert len(queues) >= 9 and queues <= {api.snake_case(q) for q in V310["queues"]}


def test_the_fake_servers_job_names_are_real():
    """tests/support/fake_immich.py writes, for each era, a job name that a release of that era has, on
    that queue (where the queue exists in that era)."""
    for queue, names in JOB_NAMES.items():
        for era, name in enumerate(names):
            fxs = [fx for v, fx in RELEASES.items() if (vtuple(v) >= (1, 136)) == bool(era) and queue in fx["queues"]]
            if not fxs:
                continue
            assert any({"job": name, "telemetry": api.snake_case(name), "queue": queue} in fx["jobs"] for fx in fxs), \
                (queue, name)


def test_an_unknown_job_has_no_queue_not_a_guessed_one():
    assert api.job_queue("library_some_future_job") is None
    assert api.job_queue("some_future_job") is None
    parsed = api.parse_telemetry('immich_jobs_library_some_future_job_success_total 2\n')
    assert parsed.unmapped == {"library_some_future_job"} and parsed.by_queue() == {}


# --- the script's reading of a source tree (a small synthetic one, in a temporary git repository) ---

ENUM_TS = """export enum QueueName {
  Thumbs = 'thumbnailGeneration',
  Background = 'backgroundTask',
}

export enum JobName {
  // thumbnails
  AssetGenerateThumbnails = 'AssetGenerateThumbnails',
  FileDelete = 'FileDelete',
  HTTPCheckV2 = 'HTTPCheckV2',
}
"""
SERVICE_TS = """export class SomeService {
  @OnJob({ name: JobName.AssetGenerateThumbnails, queue: QueueName.Thumbs })
  async a() {}

  @OnJob({
    name: JobName.FileDelete,
    queue: QueueName.Background,
  })
  async b() {}
%s}
"""
CHECK_TS = "  @OnJob({ name: JobName.HTTPCheckV2, queue: QueueName.Background })\n  async c() {}\n"
TELEMETRY_TS = "const jobMetric = `immich.jobs.${snakeCase(job.name)}.${status}`;\n"
OLD_INTERFACE_TS = """export enum QueueName {
  THUMBNAIL_GENERATION = 'thumbnailGeneration',
}

export enum JobName {
  GENERATE_PREVIEW = 'generate-preview',
  QUEUE_GENERATE_THUMBNAILS = 'queue-generate-thumbnails',
}
"""
OLD_REPOSITORY_TS = """export const JOBS_TO_QUEUE: Record<JobName, QueueName> = {
  [JobName.GENERATE_PREVIEW]: QueueName.THUMBNAIL_GENERATION,
  [JobName.QUEUE_GENERATE_THUMBNAILS]: QueueName.THUMBNAIL_GENERATION,
};
const jobMetric = `immich.jobs.${name.replaceAll('-', '_')}.${status}`;
"""


def commit_tree(tmp_path, files: dict[str, str], message: str) -> tuple[str, str]:
    work = tmp_path / "src"
    gd = str(tmp_path / "git")
    if not (tmp_path / "git").exists():
        subprocess.run(["git", "init", "-q", "--bare", gd], check=True)
    for path, text in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(text)
    g = ["git", f"--git-dir={gd}", f"--work-tree={work}", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*g, "add", "-A"], check=True)
    subprocess.run([*g, "commit", "-q", "-m", message], check=True)
    return gd, subprocess.run([*g, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def test_script_reads_on_job_decorators_and_snake_case_naming(tmp_path):
    mod = script()
    gd, c = commit_tree(tmp_path, {"server/package.json": '{"version": "3.1.0"}', "server/src/enum.ts": ENUM_TS,
                                   "server/src/services/some.service.ts": SERVICE_TS % CHECK_TS,
                                   "server/src/services/telemetry.service.ts": TELEMETRY_TS}, "chore: version v3.1.0")
    assert mod.releases(gd) == [((3, 1, 0), c)]
    fx = mod.derive(gd, (3, 1, 0), c)
    assert fx["bindings"] == ["@OnJob"] and fx["naming"] == "snakeCase"
    assert fx["jobs"] == [
        {"job": "AssetGenerateThumbnails", "telemetry": "asset_generate_thumbnails", "queue": "thumbnailGeneration"},
        {"job": "FileDelete", "telemetry": "file_delete", "queue": "backgroundTask"},
        {"job": "HTTPCheckV2", "telemetry": "http_check_v_2", "queue": "backgroundTask"}]


def test_script_fails_naming_the_job_without_a_queue(tmp_path):
    mod = script()
    gd, c = commit_tree(tmp_path, {"server/package.json": '{"version": "3.1.0"}', "server/src/enum.ts": ENUM_TS,
                                   "server/src/services/some.service.ts": SERVICE_TS % "",
                                   "server/src/services/telemetry.service.ts": TELEMETRY_TS}, "chore: version v3.1.0")
    with pytest.raises(SystemExit, match=r"^v3\.1\.0: jobs without a queue binding: HTTPCheckV2$"):
        mod.derive(gd, (3, 1, 0), c)


def test_script_fails_on_a_decorator_it_does_not_understand(tmp_path):
    mod = script()
    odd = "  @OnJob({ queue: QueueName.Background, name: JobName.HTTPCheckV2 })\n  async c() {}\n"
    gd, c = commit_tree(tmp_path, {"server/package.json": '{"version": "3.1.0"}', "server/src/enum.ts": ENUM_TS,
                                   "server/src/services/some.service.ts": SERVICE_TS % odd,
                                   "server/src/services/telemetry.service.ts": TELEMETRY_TS}, "chore: version v3.1.0")
    with pytest.raises(SystemExit, match="@OnJob decorator not understood"):
        mod.derive(gd, (3, 1, 0), c)


def test_script_reads_the_jobs_to_queue_map_and_dash_naming(tmp_path):
    mod = script()
    gd, c = commit_tree(tmp_path, {"server/package.json": '{"version": "1.106.4"}',
                                   "server/src/interfaces/job.interface.ts": OLD_INTERFACE_TS,
                                   "server/src/repositories/job.repository.ts": OLD_REPOSITORY_TS}, "Version v1.106.4")
    fx = mod.derive(gd, (1, 106, 4), c)
    assert fx["bindings"] == ["JOBS_TO_QUEUE"] and fx["naming"] == "replaceAll('-', '_')"
    assert [r["telemetry"] for r in fx["jobs"]] == ["generate_preview", "queue_generate_thumbnails"]
    bad = OLD_REPOSITORY_TS.replace("name.replaceAll('-', '_')", "name.toLowerCase()")
    gd, c = commit_tree(tmp_path, {"server/src/repositories/job.repository.ts": bad}, "Version v1.106.4")
    with pytest.raises(SystemExit, match="expression not understood: 'name.toLowerCase\\(\\)'"):
        mod.derive(gd, (1, 106, 4), c)
