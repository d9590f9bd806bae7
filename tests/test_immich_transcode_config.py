"""The configured video acceleration from GET /api/system-config (fake Immich on loopback).

The fake serves a synthetic SystemConfigDto with planted secrets (tests/fixtures/immich); only
ffmpeg.accel and ffmpeg.accelDecode may come out of the source, and nothing of the answer may reach
the log."""

from __future__ import annotations

import json
import logging

import pytest

from immich_gpu_exporter import immich_api as api
from tests.support.fake_immich import SYSTEM_CONFIG, FakeImmich, Key
from tests.support.immich_source import collect, make_source, values

CFG = Key(permissions=frozenset({"queue.read", "job.read", "systemConfig.read"}))


async def cycles(fake, key, n=1, **kw):
    src = make_source(fake, key=key, **kw)
    try:
        return [await collect(src) for _ in range(n)]
    finally:
        await src.close()


@pytest.mark.parametrize("accel,decode,want", [
    ("nvenc", True, ("nvenc", "hardware")), ("nvenc", False, ("nvenc", "software")),
    ("qsv", True, ("qsv", "hardware")), ("vaapi", False, ("vaapi", "software")), ("rkmpp", True, ("rkmpp", "hardware")),
    ("disabled", False, ("disabled", "software")), ("amf", True, ("other", "hardware")),
])
async def test_the_configured_acceleration_is_an_info_series_and_a_fact(accel, decode, want):
    with FakeImmich(keys={"cfg": CFG}) as fake:
        fake.ffmpeg_accel = (accel, decode)
        (r,) = await cycles(fake, "cfg")
    assert values(r, "immich_transcode_configured_info") == {want: 1}
    assert r.facts["transcode_configured"] == {"accel": want[0], "decode": want[1]}
    assert not r.errors


async def test_without_systemconfig_read_it_says_so_once_and_goes_on_without(caplog):
    caplog.set_level(logging.DEBUG, "immich_gpu_exporter")
    with FakeImmich() as fake:  # the default key: queue.read and job.read only
        rs = await cycles(fake, "good-key", n=3, immich_interval=0.0)
        asked = len(fake.api_requests("/api/system-config"))
    for r in rs:
        assert values(r, "immich_transcode_configured_info") == {}
        assert values(r, "immich_queue_jobs")  # the queues are unaffected
        assert not r.errors and "transcode_configured" not in r.facts
    said = [x.getMessage() for x in caplog.records if "systemConfig.read" in x.getMessage()]
    assert len(said) == 1 and "server log alone" in said[0]
    assert asked == 1  # a refused key is not asked again every cycle


async def test_no_secret_of_the_answer_reaches_logs_samples_or_facts(caplog):
    caplog.set_level(logging.DEBUG)
    with FakeImmich(keys={"cfg": CFG}) as fake:
        rs = await cycles(fake, "cfg", n=2)
        fake.garbage.add("/api/system-config")  # a broken answer is reported without quoting it
        src = make_source(fake, key="cfg")
        try:
            broken = await collect(src)
        finally:
            await src.close()
        served = [r.body for r in fake.responses if r.path == "/api/system-config" and r.status == 200]
    assert any(b"PLANTED-oauth-client-secret" in b for b in served)  # the fake did send them
    text = caplog.text + repr([r.samples for r in rs]) + repr([r.facts for r in rs]) + repr(broken)
    for secret in ("PLANTED-oauth-client-secret", "PLANTED-smtp-password"):
        assert secret not in text
    assert "system_config_bad_json" in broken.errors


def test_decode_keeps_only_the_two_ffmpeg_keys():
    got = api.decode_ffmpeg_acceleration(json.loads(json.dumps(SYSTEM_CONFIG)))
    assert got == api.ConfiguredAcceleration("nvenc", "hardware")
    assert set(got.__slots__) == {"accel", "decode"}
    for bad in ({}, {"ffmpeg": []}, {"ffmpeg": {"accel": "nvenc"}}, {"ffmpeg": {"accel": 1, "accelDecode": True}}, []):
        with pytest.raises(api.BadAnswer) as e:
            api.decode_ffmpeg_acceleration(bad)
        assert "PLANTED" not in str(e.value)
