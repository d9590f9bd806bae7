"""Remote ML: the ML host's verdict read from its exporter's /metrics, the serving URL inference, and
the provider in force on a server-role host (pure parts and the source against real aiohttp servers)."""

from __future__ import annotations

import asyncio
import pathlib

import pytest
from aiohttp import web

from immich_gpu_exporter import config as configmod, remote
from immich_gpu_exporter.core import Snapshot, SourceState
from immich_gpu_exporter.sources.base import Hub, provider_in_force
from immich_gpu_exporter.sources.remote import RemoteSource

GOLDEN = pathlib.Path(__file__).parent / "golden" / "snapshot.prom"


def test_parse_verdict_from_our_own_golden_exposition() -> None:
    v = remote.parse_verdict(GOLDEN.read_text())
    text = GOLDEN.read_text()
    eff = next(line for line in text.splitlines() if line.startswith("immich_ml_execution_provider{")
               and line.endswith(" 1.0"))
    assert v.effective is not None and f'provider="{v.effective}"' in eff
    assert v.journal_up is True
    assert v.cpu_fallback in (True, False)


@pytest.mark.parametrize("text,effective,preferred,fallback", [
    ('immich_ml_execution_provider{provider="CPUExecutionProvider"} 1.0\n'
     'immich_ml_execution_provider{provider="CUDAExecutionProvider"} 0.0\n'
     'immich_ml_preferred_execution_provider{provider="CUDAExecutionProvider"} 1.0\n'
     'immich_ml_cpu_fallback 1.0\n', "CPUExecutionProvider", "CUDAExecutionProvider", True),
    # OpenMetrics-style values and a HELP/TYPE preamble are fine; garbage lines are skipped
    ('# HELP immich_ml_cpu_fallback x\n# TYPE immich_ml_cpu_fallback gauge\nimmich_ml_cpu_fallback 0\n'
     'immich_ml_execution_provider{provider="CUDAExecutionProvider"} 1\nimmich_ml_execution_provider{provider=} 1\n'
     'immich_ml_execution_provider{provider="x" 1\n', "CUDAExecutionProvider", None, False),
    ("", None, None, None),
    ('immich_ml_execution_provider{provider="CUDA\\"Execution"} 1\nimmich_ml_cpu_fallback NaN\n', None, None, None),
])
def test_parse_verdict_table(text: str, effective, preferred, fallback) -> None:
    v = remote.parse_verdict(text)
    assert (v.effective, v.preferred, v.cpu_fallback) == (effective, preferred, fallback)


def test_serving_url_is_the_first_healthy_one() -> None:
    assert remote.serving_index([True, True]) == 0
    assert remote.serving_index([False, True, True]) == 1
    assert remote.serving_index([False, False]) is None
    assert remote.serving_index([]) is None


def test_pairing_and_labels_never_carry_credentials() -> None:
    assert remote.pair(["http://a:3003", "http://b:3003"], ["http://a:10283/metrics"]) == [
        ("http://a:3003", "http://a:10283/metrics"), ("http://b:3003", "http://a:10283/metrics")]
    assert remote.pair(["http://a:3003", "http://b:3003"], ["http://a:10283/metrics"] * 0 + ["x", "y"])[1] == \
        ("http://b:3003", "y")
    assert remote.pair(["u1", "u2", "u3"], ["e1", "e2"])[2] == ("u3", None)
    assert remote.host_label("https://scrape:s3cret@gpu.lan:10283/metrics?x=1") == "https://gpu.lan:10283"


def snapshot_with(**facts_by_source) -> Hub:
    states = {n: SourceState(n, True, facts=f) for n, f in facts_by_source.items()}
    return Hub(lambda: Snapshot(1, states, {}))


def test_provider_in_force_prefers_the_local_journal_then_the_remote_host() -> None:
    assert provider_in_force(snapshot_with(journal={"effective_provider": "CUDAExecutionProvider"},
                                           remote={"effective_provider": "CPUExecutionProvider"})) \
        == "CUDAExecutionProvider"
    # a server host's journal follows the server unit only: no provider there
    assert provider_in_force(snapshot_with(journal={"effective_provider": None},
                                           remote={"effective_provider": "CPUExecutionProvider"})) \
        == "CPUExecutionProvider"
    assert provider_in_force(snapshot_with()) is None


def test_role_changes_defaults_only() -> None:
    cfg = configmod.load({"deployment.role": "ml"}, None, {})
    assert cfg["collector.immich"] is False and cfg.origin("collector.immich") == "role"
    cfg = configmod.load({"deployment.role": "ml", "collector.immich": True}, None, {})
    assert cfg["collector.immich"] is True
    with pytest.raises(configmod.ConfigError, match="deployment.role"):
        configmod.load({"deployment.role": "gpu"}, None, {})


class FakeExporter:
    """An ML host's exporter on loopback, serving a scripted /metrics text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.status = 200

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(status=self.status, text=self.text, content_type="text/plain")


async def serve(exp: FakeExporter) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/metrics", exp.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/metrics"


CUDA_TEXT = ('immich_gpu_exporter_source_up{source="journal"} 1\n'
             'immich_ml_execution_provider{provider="CUDAExecutionProvider"} 1\n'
             'immich_ml_preferred_execution_provider{provider="CUDAExecutionProvider"} 1\nimmich_ml_cpu_fallback 0\n')
CPU_TEXT = CUDA_TEXT.replace('provider="CUDAExecutionProvider"} 1\nimmich_ml_pref',
                             'provider="CPUExecutionProvider"} 1\nimmich_ml_pref').replace("fallback 0", "fallback 1")


async def test_remote_source_follows_the_serving_host() -> None:
    a, b = FakeExporter(CUDA_TEXT), FakeExporter(CPU_TEXT)
    ra, ua = await serve(a)
    rb, ub = await serve(b)
    try:
        health: list[bool] = [True, True]
        cfg = configmod.load({"remote-ml.exporter-url": [ua, ub], "immich.ml-url": "http://gpu-a:3003",
                              "immich.ml-failover-url": ["http://gpu-b:3003"], "immich.timeout": 1}, None, {})
        src = RemoteSource(cfg, Hub(lambda: Snapshot(1, {"immich": SourceState(
            "immich", True, facts={"ml_url_health": tuple(health)})}, {})))
        r = await src.collect()
        assert r.facts["effective_provider"] == "CUDAExecutionProvider"
        assert r.facts["serving_ml_url"] == "http://gpu-a:3003"
        health[:] = [False, True]  # host A fails its health check: Immich moves to B
        r = await src.collect()
        assert r.facts["effective_provider"] == "CPUExecutionProvider" and r.facts["cpu_fallback"] is True
        b.status = 503  # B's exporter down: the provider is unknown, never a stale guess
        r = await src.collect()
        assert "effective_provider" not in r.facts and "exporter_unreachable" in r.errors
        ups = {dict(s.labels)["exporter"]: s.value for s in r.samples}
        assert ups == {remote.host_label(ua): 1.0, remote.host_label(ub): 0.0}
        await src.close()
    finally:
        await ra.cleanup()
        await rb.cleanup()
        await asyncio.sleep(0)
