"""The daemon's scheduling contract: timeouts, failures and hangs of one source never block
the others or the cached exposition; state changes publish new rendered bytes."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from immich_gpu_exporter.config import defaults
from immich_gpu_exporter.core import CollectResult, SourceDown, sample
from immich_gpu_exporter.daemon import Daemon
from immich_gpu_exporter.sources.base import BlockingWorker, Source
from tests.support.exposition import value


class Scripted(Source):
    """A source whose behaviour per cycle is scripted by the test (a double of a source, not of I/O)."""

    def __init__(self, name: str, steps, timeout: float = 0.3, interval: float = 0.05) -> None:
        super().__init__(defaults(), None)  # type: ignore[arg-type]
        self.name = name  # type: ignore[misc]
        self.steps = list(steps)
        self.calls = 0
        self._timeout = timeout
        self._interval = interval

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def interval(self) -> float:
        return self._interval

    async def collect(self) -> CollectResult:
        self.calls += 1
        step = self.steps[min(self.calls, len(self.steps)) - 1]
        if isinstance(step, Exception):
            raise step
        if step == "hang":
            await asyncio.sleep(3600)
        return CollectResult((sample("immich_ml_cpu_fallback", step),))


async def settled(d: Daemon):
    """The rendered bytes once the renderer caught up with the snapshot."""
    for _ in range(200):
        r = d.rendered
        if r.version == d.snapshot.version:
            return r
        await asyncio.sleep(0.01)
    raise AssertionError("renderer never caught up")


async def test_hung_source_is_marked_down_and_others_keep_publishing():
    hung = Scripted("journal", ["hang"], timeout=0.2)
    ok = Scripted("nvml", [1])
    d = Daemon([hung, ok])
    await d.start()
    try:
        for _ in range(100):
            await asyncio.sleep(0.05)
            st = d.snapshot.sources
            if st["journal"].cycles >= 2 and st["nvml"].cycles >= 5:
                break
        text = (await settled(d)).text.decode()
        assert value(text, "immich_gpu_exporter_source_up", source="journal") == 0
        assert value(text, "immich_gpu_exporter_source_up", source="nvml") == 1
        assert value(text, "immich_gpu_exporter_source_errors_total", source="journal", reason="timeout") >= 2
        assert ok.calls >= 5  # the hung one did not hold the other back
    finally:
        await d.stop()


async def test_crash_and_sourcedown_are_counted_by_reason_and_logged_once(caplog):
    src = Scripted("immich", [SourceDown("unauthorized", "HTTP 401"), SourceDown("unauthorized", "HTTP 401"),
                              RuntimeError("boom"), 1])
    d = Daemon([src])
    with caplog.at_level(logging.INFO, logger="immich_gpu_exporter"):
        for _ in range(4):
            await d.collect_source(src)
    st = d.snapshot.sources["immich"]
    assert st.up and dict(st.errors) == {"unauthorized": 2, "error": 1}
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("down (unauthorized)" in m for m in msgs) == 1  # not once per cycle
    assert sum("down (error)" in m for m in msgs) == 1
    assert sum("up again" in m for m in msgs) == 1


async def test_down_source_drops_its_series_but_keeps_last_success():
    src = Scripted("nvml", [1, SourceDown("gpu_lost", "GPU is lost")])
    d = Daemon([src])
    await d.collect_source(src)
    first = d.snapshot.sources["nvml"].last_success
    assert value(d.rendered.text.decode(), "immich_ml_cpu_fallback") == 1
    await d.collect_source(src)
    text = d.rendered.text.decode()
    assert value(text, "immich_ml_cpu_fallback") is None
    assert value(text, "immich_gpu_exporter_source_last_success_timestamp_seconds", source="nvml") == first


async def test_wake_triggers_an_early_collection():
    src = Scripted("journal", [0, 1, 1], interval=3600)
    d = Daemon([src])
    await d.start()
    try:
        for _ in range(40):
            await asyncio.sleep(0.01)
            if src.calls == 1:
                break
        src.wake()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if src.calls >= 2:
                break
        assert src.calls == 2
        for _ in range(100):
            await asyncio.sleep(0.01)
            if value(d.rendered.text.decode(), "immich_ml_cpu_fallback") == 1:
                break
        assert value(d.rendered.text.decode(), "immich_ml_cpu_fallback") == 1
    finally:
        await d.stop()


async def test_rendered_bytes_are_reused_until_the_snapshot_changes():
    src = Scripted("journal", [1], interval=3600)
    d = Daemon([src])
    await d.start()
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if d.ready and d._rendered is not None and d._rendered.version == d.snapshot.version:
                break
        a, b = d.rendered, d.rendered
        assert a is b and a.version == d.snapshot.version
    finally:
        await d.stop()


async def test_blocking_worker_refuses_calls_while_a_call_hangs():
    w = BlockingWorker("test")
    release = threading.Event()
    first = asyncio.ensure_future(w.call(release.wait, 10))
    await asyncio.sleep(0.05)
    with pytest.raises(SourceDown) as e:
        await w.call(lambda: 1)
    assert e.value.reason == "timeout"
    release.set()
    assert await first is True
    assert await w.call(lambda: 42) == 42
    thread_names = set()
    for _ in range(3):
        thread_names.add(await w.call(lambda: threading.current_thread().name))
    assert len(thread_names) == 1  # always the same dedicated thread
    w.shutdown()


async def test_run_once_collects_every_source_once():
    a, b = Scripted("nvml", [SourceDown("library_not_found")]), Scripted("journal", [0])
    d = Daemon([a, b])
    snap = await d.run_once()
    assert a.calls == 1 and b.calls == 1
    assert not snap.sources["nvml"].up and snap.sources["journal"].up
    assert d.ready


async def test_run_once_collects_a_source_after_those_whose_facts_it_reads():
    """--once: the NVML source sees the processes source's facts of the same pass, which sees systemd's."""
    seen: dict[str, dict] = {}

    class Reader(Source):
        def __init__(self, name: str, after: tuple[str, ...], reads: str) -> None:
            super().__init__(defaults(), None)  # type: ignore[arg-type]
            self.name, self.after, self.reads = name, after, reads  # type: ignore[misc]

        async def collect(self) -> CollectResult:
            await asyncio.sleep(0.01)  # a real cycle yields to the loop; concurrency would show here
            seen[self.name] = dict(self.hub.facts(self.reads)) if self.reads else {}
            return CollectResult((), {"from": self.name})

    d = Daemon()
    for s in (Reader("nvml", ("processes",), "processes"), Reader("processes", ("systemd",), "systemd"),
              Reader("systemd", (), "")):
        s.hub = d.hub
        d.add(s)
    await d.run_once()
    assert seen == {"systemd": {}, "processes": {"from": "systemd"}, "nvml": {"from": "processes"}}
