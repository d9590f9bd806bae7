"""The opt-in Smart Search probe (docs/probe.md), against the fake Immich's POST /api/search/smart
(tests/support/fake_immich.py: asset.read, Immich's error answers) with a known latency, mostly
through the real exporter process."""

from __future__ import annotations

import logging
from types import MappingProxyType

import pytest

from immich_gpu_exporter import config as configmod
from immich_gpu_exporter.core import Snapshot, SourceDown, SourceState
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.probe import BOUNDS, ProbeSource
from tests.support.exposition import parse, value
from tests.support.fake_immich import FakeImmich, Key
from tests.support.proc import Exporter, http_get, run_cli, wait_for

KEY = "probe-key-3f9a1c77"  # a key with only asset.read, as docs/probe.md says to create it
ADMIN = "admin-key-88e0b1d4"  # the queue key: queue.read and job.read, no asset.read
SEARCH = "/api/search/smart"
OFF = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.journal", "--no-collector.docker",
       "--no-collector.processes", "--no-collector.immich"]


def fake_immich() -> FakeImmich:
    return FakeImmich(keys={KEY: Key(admin=False, permissions=frozenset({"asset.read"})), ADMIN: Key()})


def key_file(tmp_path, key: str = KEY, name: str = "probe.key") -> str:
    p = tmp_path / name
    p.write_text(key + "\n")
    p.chmod(0o600)
    return str(p)


def probe_args(fake: FakeImmich, tmp_path, interval: float = 0.3, timeout: float = 5.0, key: str = KEY) -> list[str]:
    return [*OFF, f"--immich.url={fake.url}", f"--probe.interval={interval}", f"--probe.timeout={timeout}",
            f"--probe.key-file={key_file(tmp_path, key)}"]


def probes(exp: Exporter, result: str) -> float:
    return value(parse(exp.metrics()), "immich_smart_search_probes_total", result=result) or 0


@pytest.mark.integration
def test_probe_measures_a_known_latency_with_fresh_queries_and_keeps_the_key_secret(tmp_path):
    # 1.05 s lies just above the 1 s bound, 1.45 s below the next (2.5 s): each probe is in that bucket
    delay = 1.05
    with fake_immich() as fake:
        fake.delay[SEARCH] = delay
        with Exporter(probe_args(fake, tmp_path), log_path=tmp_path / "e.log") as exp:
            wait_for(lambda: probes(exp, "ok") >= 3, 30, what="three probes")
            text = exp.metrics()
            _, _, page = http_get(exp.url + "/")
            log = exp.logs()
    m = parse(text)
    n = value(m, "immich_smart_search_probe_duration_seconds_count", provider="")
    total = value(m, "immich_smart_search_probe_duration_seconds_sum", provider="")
    assert n == value(m, "immich_smart_search_probes_total", result="ok") >= 3
    assert delay <= total / n < delay + 0.5, (n, total)
    assert value(m, "immich_smart_search_probe_duration_seconds_bucket", provider="", le="1.0") == 0
    assert value(m, "immich_smart_search_probe_duration_seconds_bucket", provider="", le="2.5") == n
    assert value(m, "immich_smart_search_probe_duration_seconds_bucket", provider="", le="+Inf") == n
    assert value(m, "immich_gpu_exporter_source_up", source="probe") == 1
    requests = fake.api_requests(SEARCH)
    assert {r.method for r in requests} == {"POST"} and all(r.headers["x-api-key"] == KEY for r in requests)
    queries = fake.smart_queries
    assert len(set(queries)) == len(queries) >= 3  # never the same text twice: the cache never answers
    assert all(q.startswith("a photo of a dog on a beach ") for q in queries)
    assert KEY not in text and KEY.encode() not in page and KEY not in log


@pytest.mark.integration
def test_probe_is_off_by_default_and_sends_nothing(tmp_path):
    keyf = key_file(tmp_path, ADMIN, "admin.key")
    with fake_immich() as fake:
        args = [*OFF[:-1], f"--immich.url={fake.url}", f"--immich.api-key-file={keyf}"]
        with Exporter(args, log_path=tmp_path / "e.log") as exp:
            wait_for(lambda: value(parse(exp.metrics()), "immich_gpu_exporter_source_up", source="immich") == 1,
                     20, what="the Immich source up")
            text = exp.metrics()
        assert fake.api_requests("/api/queues")  # the exporter did talk to this server
        assert fake.api_requests(SEARCH) == []
    assert "immich_smart_search_probe" not in text and 'source="probe"' not in text


@pytest.mark.integration
@pytest.mark.parametrize("setup, key, result, logged", [
    (lambda f: f.features_off.add("smartSearch"), KEY, "disabled", "HTTP 400: Smart Search is not enabled"),
    (lambda f: None, "not-a-key", "unauthorized", "HTTP 401: the probe key was refused; it needs asset.read"),
    (lambda f: f.keys.update({KEY: Key(admin=False, permissions=frozenset({"album.read"}))}), KEY,
     "unauthorized", "HTTP 403: the probe key was refused; it needs asset.read"),
    (lambda f: f.status.update({SEARCH: 500}), KEY, "error", "Smart Search probe of http://127.0.0.1:"),
], ids=["disabled", "401", "403", "500"])
def test_probe_failures_are_counted_by_result(tmp_path, setup, key, result, logged):
    with fake_immich() as fake:
        setup(fake)
        with Exporter(probe_args(fake, tmp_path, key=key), log_path=tmp_path / "e.log") as exp:
            wait_for(lambda: probes(exp, result) >= 2, 20, what=f"probes counted as {result}")
            text = exp.metrics()
            log = exp.logs()
    m = parse(text)
    assert value(m, "immich_smart_search_probes_total", result="ok") == 0
    assert value(m, "immich_gpu_exporter_source_up", source="probe") == (1 if result == "error" else 0)
    assert "immich_smart_search_probe_duration_seconds_count" not in text  # failures are not latencies
    assert log.count(logged) == 1, log  # once, not once per probe
    assert key not in log and key not in text


@pytest.mark.integration
def test_a_hung_search_is_a_timeout_and_never_blocks_the_scrape(tmp_path):
    with fake_immich() as fake:
        fake.delay[SEARCH] = 30.0
        with Exporter(probe_args(fake, tmp_path, interval=0.2, timeout=1.0), log_path=tmp_path / "e.log") as exp:
            wait_for(lambda: fake.api_requests(SEARCH), 10, what="a probe in flight")
            status, _, body = http_get(exp.url + "/metrics")
            # the scrape was answered while the probe still waited for the server
            assert status == 200 and not [r for r in fake.responses if r.path == SEARCH]
            assert b'immich_gpu_exporter_source_up{source="probe"}' in body
            wait_for(lambda: probes(exp, "timeout") >= 1, 15, what="a timeout counted")
            m = parse(exp.metrics())
            assert value(m, "immich_smart_search_probes_total", result="ok") == 0
            assert value(m, "immich_gpu_exporter_source_up", source="probe") == 1  # a timeout is no outage
            assert "Smart Search probe of" in exp.logs() and "timeout (no answer within 1s)" in exp.logs()


def test_config_refuses_a_probe_without_a_usable_key_of_its_own(tmp_path):
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    spaced = tmp_path / "spaced.key"
    spaced.write_text("two words\n")
    admin = key_file(tmp_path, ADMIN, "admin.key")
    cases = [(["--probe.interval=60"], "--probe.key-file is not"),
             (["--probe.interval=60", f"--probe.key-file={tmp_path / 'missing'}"], "cannot read"),
             (["--probe.interval=-1"], "probe.interval"),
             (["--probe.interval=60", "--probe.key-file=/dev/zero"], "cannot read"),
             (["--probe.interval=60", f"--probe.key-file={empty}"], "no usable key"),
             (["--probe.interval=60", f"--probe.key-file={spaced}"], "no usable key"),
             (["--probe.interval=60", f"--probe.key-file={admin}", f"--immich.api-key-file={admin}"],
              "holds the admin API key")]
    for args, needle in cases:
        r = run_cli([*args, "--dry-run"], timeout=30)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)
        assert ADMIN not in r.stderr and "two words" not in r.stderr
    ok = run_cli(["--probe.interval=60", f"--probe.key-file={key_file(tmp_path)}",
                  f"--immich.api-key-file={admin}", "--dry-run"], timeout=30)
    assert ok.returncode == 0, ok.stderr


def journal_says(provider: str) -> Hub:
    snap = Snapshot(1, MappingProxyType({"journal": SourceState(
        "journal", True, 1.0, 0.1, facts=MappingProxyType({"effective_provider": provider}))}), MappingProxyType({}))
    return Hub(lambda: snap)


def probe_source(fake: FakeImmich, tmp_path, hub: Hub, **cfg) -> ProbeSource:
    values = {"immich.url": fake.url, "probe.interval": 60, "probe.key-file": key_file(tmp_path), **cfg}
    return ProbeSource(configmod.load(values, None, {}), hub)


async def test_each_probe_is_labelled_with_the_provider_in_force_at_the_time(tmp_path):
    provider = {"now": "CPUExecutionProvider"}

    def snapshot():
        return journal_says(provider["now"])._get()

    with fake_immich() as fake:
        src = probe_source(fake, tmp_path, Hub(snapshot))
        try:
            await src.collect()
            provider["now"] = "CUDAExecutionProvider"
            await src.collect()
            r = await src.collect()
        finally:
            await src.close()
    got = {(s.name, s.labels): s.value for s in r.samples}
    count = "immich_smart_search_probe_duration_seconds_count"
    assert got[(count, (("provider", "CPUExecutionProvider"),))] == 1
    assert got[(count, (("provider", "CUDAExecutionProvider"),))] == 2
    cuda = [s for s in r.samples if s.name.endswith("_bucket") and ("provider", "CUDAExecutionProvider") in s.labels]
    assert len(cuda) == len(BOUNDS) + 1
    assert got[("immich_smart_search_probes_total", (("result", "ok"),))] == 3


async def test_a_key_file_gone_at_run_time_takes_the_source_down_and_a_loose_one_is_warned_once(tmp_path, caplog):
    with fake_immich() as fake:
        src = probe_source(fake, tmp_path, journal_says(""))
        path = src.config["probe.key-file"]
        try:
            (tmp_path / "probe.key").chmod(0o644)
            with caplog.at_level(logging.WARNING, "immich_gpu_exporter.probe"):
                await src.collect()
                await src.collect()
            assert [r.getMessage() for r in caplog.records].count(
                f"the probe key file {path} is readable by group or others (mode 644); chmod 600 it or use "
                "systemd LoadCredential=") == 1
            (tmp_path / "probe.key").unlink()
            with pytest.raises(SourceDown) as e:
                await src.collect()
            assert e.value.reason == "probe_key_file" and "no such file" in e.value.detail
        finally:
            await src.close()
    assert len(fake.api_requests(SEARCH)) == 2


def test_docs_list_the_buckets_and_results_the_probe_uses():
    import pathlib
    import re

    from immich_gpu_exporter.sources.probe import RESULTS

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "probe.md").read_text()
    listed = re.search(r"Its bucket boundaries, in seconds:\n\n`([^`]+)`", doc)
    assert listed and tuple(float(b) for b in listed.group(1).split(",")) == BOUNDS
    assert tuple(re.findall(r"^\| `(\w+)` \|", doc, re.M)[-len(RESULTS):]) == RESULTS
