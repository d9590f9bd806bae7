"""Contract: the fake answers like Immich v3.1.0's OpenAPI spec and the client asks like it.

Every scenario of the source tests is replayed here; every request the exporter made and every
response the fake served is then checked against `../shared/immich/immich-openapi-specs.json`.
Responses the fake means to be off-spec are checked to be *rejected* for exactly the intended
reason, so the validator cannot silently pass everything.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from immich_gpu_exporter import config as configmod
from immich_gpu_exporter.core import SourceDown
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.probe import ProbeSource
from tests.support import immich_spec, shared
from tests.support.fake_immich import AUTH, FEATURES_V3, METHODS, QUEUE_ADDED, FakeImmich, Key
from tests.support.immich_source import make_source

SPEC = immich_spec.load()
pytestmark = shared.needs(immich_spec.SPEC_PATH)


async def _run(src, n: int) -> None:  # type: ignore[no-untyped-def]
    """n collections of a source, each bounded by its timeout; a source going down is expected here."""
    try:
        for _ in range(n):
            try:
                await asyncio.wait_for(src.collect(), src.timeout)
            except SourceDown:
                pass
    finally:
        await src.close()


async def _cycles(fake: FakeImmich, n: int = 2, **kw) -> None:
    await _run(make_source(fake, **kw), n)


SEARCH_KEY = Key(admin=False, permissions=frozenset({"asset.read"}))


async def _probes(fake: FakeImmich, key_file, n: int = 2) -> None:
    cfg = configmod.defaults().replace(immich_url=fake.url, probe_interval=60.0, probe_key_file=str(key_file))
    await _run(ProbeSource(cfg, Hub(lambda: None)), n)


async def tour(tmp) -> list[FakeImmich]:
    """Every scenario, one fake each; returns the fakes with their request/response logs."""
    fakes = []

    async def scenario(fake: FakeImmich, setup=lambda f: None, **kw) -> None:
        with fake:
            setup(fake)
            await _cycles(fake, **kw)
        fakes.append(fake)

    await scenario(FakeImmich(), immich_telemetry_url=None)
    await scenario(FakeImmich(version=(1, 140, 0, None)))
    await scenario(FakeImmich(version=(3, 1, 0, None), with_queues_endpoint=False))
    await scenario(FakeImmich(keys={"user": Key(admin=False)}), key="user")
    await scenario(FakeImmich(keys={"jobs-only": Key(permissions=frozenset({"job.read"}))}), key="jobs-only")
    config_key = Key(permissions=frozenset({"queue.read", "job.read", "systemConfig.read"}))
    await scenario(FakeImmich(keys={"cfg": config_key}), key="cfg")
    await scenario(FakeImmich(version=(1, 130, 3, None), keys={"cfg": config_key}), key="cfg")
    await scenario(FakeImmich(), key="wrong")
    await scenario(FakeImmich(), key=None)
    await scenario(FakeImmich(), lambda f: f.status.update({"/api/queues": 500}))
    await scenario(FakeImmich(), lambda f: f.garbage.update({"/api/queues", "/api/server/features"}))
    await scenario(FakeImmich(), lambda f: f.extra_queues.update(
        {"aiCaptioning": {"active": 0, "completed": 0, "failed": 0, "delayed": 0, "waiting": 1, "paused": 0}}))
    await scenario(FakeImmich(), lambda f: f.broken_entries.add("ocr"))
    await scenario(FakeImmich(version=(1, 140, 0, None)), lambda f: f.broken_entries.add("smartSearch"))
    # the Smart Search probe (docs/probe.md): a search key, a wrong key, the admin key, smart search off
    for key, features_off in (("search", ()), ("wrong", ()), ("good-key", ()), ("search", ("smartSearch",))):
        key_file = tmp / f"probe-{len(fakes)}.key"
        key_file.write_text(key + "\n")
        with FakeImmich(keys={"search": SEARCH_KEY, "good-key": Key()}) as fake:
            fake.features_off.update(features_off)
            await _probes(fake, key_file)
        fakes.append(fake)
    return fakes


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    return asyncio.run(tour(tmp_path_factory.mktemp("contract")))


def test_the_fakes_auth_rules_are_the_specs():
    for path, (needs_auth, admin_only, perm) in AUTH.items():
        assert SPEC.permission(METHODS.get(path, "GET"), path) == (needs_auth, admin_only, perm), path


def test_the_fake_knows_every_queue_and_feature_of_the_spec():
    assert set(QUEUE_ADDED) == set(SPEC.queue_names())
    assert set(FEATURES_V3) == set(SPEC.feature_names())


def test_every_request_of_the_client_follows_the_spec(fakes):
    api_requests = [r for f in fakes for r in f.requests if r.server == "api"]
    assert len(api_requests) > 30
    for r in api_requests:
        assert SPEC.request_errors(r.method, r.path, r.query, r.headers, r.body) == [], r


def test_every_spec_response_of_the_fake_validates(fakes):
    checked = {r.path for f in fakes for r in f.responses if r.tag == "spec"}
    assert checked == {"/api/server/ping", "/api/server/version", "/api/server/features", "/api/queues",
                       "/api/jobs", "/api/system-config", "/api/search/smart"}
    for f in fakes:
        for r in f.responses:
            if r.tag == "spec":
                assert SPEC.response_errors(r.method, r.path, r.status, r.body) == [], (f.version, r.path)


def test_older_version_responses_differ_only_by_what_that_version_lacked(fakes):
    seen = 0
    for f in fakes:
        missing = {q for q, added in QUEUE_ADDED.items() if f.version[:2] < added} | {"prerelease"}
        missing |= {"ocr"} if f.version[:2] < (2, 2) else set()
        missing |= {"realtimeTranscoding"} if f.version[:2] < (3, 0) else set()
        allowed = [rf"'{name}' is a required property" for name in missing]
        for r in f.responses:
            if r.tag == "older_version":
                seen += 1
                errors = SPEC.response_errors(r.method, r.path, r.status, r.body)
                assert errors, "an older answer that the v3.1 spec accepts should be tagged spec"
                assert immich_spec.only(errors, allowed) == []
    assert seen


def test_newer_version_responses_differ_only_by_new_queue_names(fakes):
    seen = 0
    for f in fakes:
        for r in f.responses:
            if r.tag == "newer_version" and r.path == "/api/queues":
                seen += 1
                errors = SPEC.response_errors(r.method, r.path, r.status, r.body)
                assert errors and immich_spec.only(errors, [r"\.name: 'aiCaptioning' is not one of"]) == []
    assert seen


def test_deliberate_faults_are_rejected_by_the_validator(fakes):
    faults = [r for f in fakes for r in f.responses if r.tag == "fault"]
    assert {r.path for r in faults} >= {"/api/queues", "/api/jobs", "/api/server/features"}
    for r in faults:
        assert SPEC.response_errors(r.method, r.path, r.status, r.body), r


def test_error_answers_have_immichs_error_shape(fakes):
    statuses = set()
    for f in fakes:
        for r in f.responses:
            if r.tag == "error":
                statuses.add(r.status)
                body = json.loads(r.body)
                assert body["statusCode"] == r.status and body["message"] and body["error"]
                assert str(r.status) not in SPEC.operation(r.method, r.path).get("responses", {}) \
                    if SPEC.operation(r.method, r.path) else True
    assert statuses == {400, 401, 403, 404, 500}


def test_the_validator_rejects_a_wrong_shape():
    body = json.dumps([{"name": "smartSearch", "isPaused": "no", "statistics": {"active": 1}}])
    errors = SPEC.response_errors("GET", "/api/queues", 200, body)
    assert any("isPaused" in e for e in errors) and any("'waiting' is a required property" in e for e in errors)
    assert SPEC.request_errors("GET", "/api/server/ping", {}, {"x-api-key": "k"}, b"")
    assert SPEC.request_errors("GET", "/api/queues", {"apiKey": "k"}, {}, b"")
    search = {"x-api-key": "k"}
    assert SPEC.request_errors("POST", "/api/search/smart", {}, search, b'{"query": "dog", "size": 1}') == []
    assert any("1001 is greater than the maximum" in e for e in
               SPEC.request_errors("POST", "/api/search/smart", {}, search, b'{"query": "dog", "size": 1001}'))
    assert SPEC.request_errors("POST", "/api/search/smart", {}, search, b"")


def test_the_probe_meets_each_answer_of_the_search_endpoint(fakes):
    probed = [f for f in fakes if f.api_requests("/api/search/smart")]
    assert [sorted({r.status for r in f.responses}) for f in probed] == [[200], [401], [403], [400]]
    assert b"Smart search is not enabled" in probed[3].responses[0].body
    assert len(probed[0].smart_queries) == 2
