"""The opt-in Smart Search probe (docs/probe.md), against a fake Immich search endpoint on loopback with
a known latency, through the real exporter process."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import MappingProxyType

import pytest
from aiohttp import web

from immich_gpu_exporter import config as configmod
from immich_gpu_exporter.core import SourceState, Snapshot
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.probe import BOUNDS, ProbeSource
from tests.support.exposition import parse, value
from tests.support.proc import Exporter, free_port, http_get, run_cli, wait_for

KEY = "probe-key-3f9a1c77"
OFF = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.journal", "--no-collector.docker",
       "--no-collector.processes", "--no-collector.immich"]


class FakeSearch:
    """POST /api/search/smart answering after `delay` seconds with `status` (Immich's error shape)."""

    def __init__(self, delay: float = 0.2, status: int = 200, message: str = "") -> None:
        self.delay, self.status, self.message = delay, status, message
        self.requests: list[dict] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"path": request.path, "key": request.headers.get("x-api-key"), "body": body})
        await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.json_response({"message": self.message, "error": "Bad Request", "statusCode": self.status},
                                     status=self.status)
        return web.json_response({"albums": {"total": 0, "count": 0, "items": [], "facets": []},
                                  "assets": {"total": 0, "count": 0, "items": [], "facets": [], "nextPage": None}})

    def __enter__(self) -> "FakeSearch":
        app = web.Application()
        app.router.add_post("/api/search/smart", self._handle)

        async def start() -> None:
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(start(), self._loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)


def key_file(tmp_path) -> str:
    p = tmp_path / "probe.key"
    p.write_text(KEY + "\n")
    p.chmod(0o600)
    return str(p)


def probe_args(fake: FakeSearch, tmp_path, interval: float = 0.3, timeout: float = 2.0) -> list[str]:
    return [*OFF, f"--immich.url={fake.url}", f"--probe.interval={interval}", f"--probe.timeout={timeout}",
            f"--probe.key-file={key_file(tmp_path)}"]


@pytest.mark.integration
def test_probe_measures_a_known_latency_with_fresh_queries_and_keeps_the_key_secret(tmp_path):
    with FakeSearch(delay=0.2) as fake, Exporter(probe_args(fake, tmp_path), log_path=tmp_path / "e.log") as exp:
        wait_for(lambda: (value(parse(exp.metrics()), "immich_smart_search_probes_total", result="ok") or 0) >= 3,
                 20, what="three probes")
        text = exp.metrics()
        m = parse(text)
        n = value(m, "immich_smart_search_probe_duration_seconds_count", provider="")
        total = value(m, "immich_smart_search_probe_duration_seconds_sum", provider="")
        assert n >= 3 and 0.2 <= total / n < 0.2 + 0.3, (n, total)
        assert value(m, "immich_smart_search_probe_duration_seconds_bucket", provider="", le="0.1") == 0
        assert value(m, "immich_smart_search_probe_duration_seconds_bucket", provider="", le="1.0") == n
        assert value(m, "immich_gpu_exporter_source_up", source="probe") == 1
        queries = [r["body"]["query"] for r in fake.requests]
        assert len(set(queries)) == len(queries) >= 3  # never the same text twice: the cache never answers
        assert all(q.startswith("a photo of a dog on a beach ") for q in queries)
        assert all(r["key"] == KEY and r["body"]["size"] == 1 for r in fake.requests)
        _, _, page = http_get(exp.url + "/")
        assert KEY not in text and KEY.encode() not in page and KEY not in exp.logs()


@pytest.mark.integration
def test_probe_is_off_by_default_and_sends_nothing(tmp_path):
    with FakeSearch() as fake, Exporter([*OFF, f"--immich.url={fake.url}"], log_path=tmp_path / "e.log") as exp:
        time.sleep(1.0)
        text = exp.metrics()
    assert fake.requests == []
    assert "immich_smart_search_probe" not in text and 'source="probe"' not in text


@pytest.mark.integration
@pytest.mark.parametrize("status, message, result", [
    (400, "Smart search is not enabled", "disabled"), (401, "Invalid API key", "unauthorized"),
    (403, "Missing required permission: asset.read", "unauthorized"), (500, "boom", "error")])
def test_probe_failures_are_counted_by_result(tmp_path, status, message, result):
    with FakeSearch(delay=0.0, status=status, message=message) as fake, \
            Exporter(probe_args(fake, tmp_path), log_path=tmp_path / "e.log") as exp:
        wait_for(lambda: (value(parse(exp.metrics()), "immich_smart_search_probes_total", result=result) or 0) >= 2,
                 20, what=f"probes counted as {result}")
        m = parse(exp.metrics())
        assert value(m, "immich_smart_search_probes_total", result="ok") == 0
        assert value(m, "immich_gpu_exporter_source_up", source="probe") == (0 if result != "error" else 1)
        assert "immich_smart_search_probe_duration_seconds_count" not in exp.metrics()
        want = {"disabled": "Smart Search is not enabled on the server", "unauthorized": "it needs asset.read",
                "error": f"Smart Search probe of http://127.0.0.1:{fake.port}/api/search/smart: error"}[result]
        assert exp.logs().count(want) == 1, exp.logs()


@pytest.mark.integration
def test_a_hung_search_is_a_timeout_and_never_blocks_the_scrape(tmp_path):
    with FakeSearch(delay=30.0) as fake, \
            Exporter(probe_args(fake, tmp_path, interval=0.2, timeout=1.0), log_path=tmp_path / "e.log") as exp:
        wait_for(lambda: len(fake.requests) >= 1, 10, what="a probe in flight")
        t0 = time.monotonic()
        exp.metrics()  # answered from the cache while the probe waits
        assert time.monotonic() - t0 < 1.0
        wait_for(lambda: (value(parse(exp.metrics()), "immich_smart_search_probes_total", result="timeout") or 0) >= 1,
                 15, what="a timeout counted")


def test_config_refuses_a_probe_without_a_usable_key(tmp_path):
    cases = [(["--probe.interval=60"], "--probe.key-file is not"),
             (["--probe.interval=60", f"--probe.key-file={tmp_path / 'missing'}"], "cannot read"),
             (["--probe.interval=-1"], "probe.interval"),
             (["--probe.interval=60", "--probe.key-file=/dev/zero"], "cannot read")]
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    cases.append((["--probe.interval=60", f"--probe.key-file={empty}"], "no usable key"))
    for args, needle in cases:
        r = run_cli([*args, "--dry-run"], timeout=30)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)


async def test_the_probe_is_labelled_with_the_provider_in_force(tmp_path):
    snap = Snapshot(1, MappingProxyType({"journal": SourceState(
        "journal", True, 1.0, 0.1, facts=MappingProxyType({"effective_provider": "CUDAExecutionProvider"}))}),
        MappingProxyType({}))
    with FakeSearch(delay=0.05) as fake:
        cfg = configmod.load({"immich.url": fake.url, "probe.interval": 60, "probe.key-file": key_file(tmp_path)},
                             None, {})
        src = ProbeSource(cfg, Hub(lambda: snap))
        try:
            r = await src.collect()
        finally:
            await src.close()
    got = {(s.name, s.labels): s.value for s in r.samples}
    labels = (("provider", "CUDAExecutionProvider"),)
    assert got[("immich_smart_search_probe_duration_seconds_count", labels)] == 1
    assert len([k for k in got if k[0].endswith("_bucket")]) == len(BOUNDS) + 1
    assert json.dumps(fake.requests[0]["body"]).count("a photo of a dog") == 1
