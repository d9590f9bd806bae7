"""Demo mode in-process, on a manual scenario clock: the real Daemon running the four demo sources,
stepped at the cadence the daemon uses at speed 1 (one collection per source every INTERVAL)."""

from __future__ import annotations

import re

import pytest

from immich_gpu_exporter import config, demo
from immich_gpu_exporter.metrics import METRICS, definition, render, self_health_samples
from tests.support import demo as used
from tests.support.exposition import parse, series, value
from tests.support.proc import run_cli

ML = "immich-machine-learning.service"


class Run:
    """The demo daemon on a manual clock; `to(t)` collects every source at each step up to t."""

    def __init__(self, cfg: config.Config | None = None) -> None:
        self.clock = demo.ManualClock()
        self.daemon = demo.build_daemon(cfg or config.defaults(), self.clock, strict_samples=True)
        self.started = False
        self.history: list[tuple[float, dict]] = []

    async def to(self, t: float) -> dict:
        if not self.started:
            for s in self.daemon.sources:
                await s.start()
            self.started = True
            await self._round()
        while self.clock.t + demo.INTERVAL <= t + 1e-9:
            self.clock.advance(demo.INTERVAL)
            await self._round()
        return self.history[-1][1]

    async def _round(self) -> None:
        for s in self.daemon.sources:
            state = await self.daemon.collect_source(s)
            assert state.up, (s.name, state.last_error)
        self.history.append((self.clock.t, self.exposed()))

    def exposed(self) -> dict:
        """What /metrics would show now, as {(name, labels): value} (the exposition itself is
        checked by test_demo_dashboard.py; here the samples are read straight from the snapshot)."""
        snap = self.daemon.snapshot
        samples = [s for st in snap.sources.values() for s in st.samples] + list(self_health_samples(snap))
        return {(s.name, frozenset(s.labels)): s.value for s in samples}

    async def close(self) -> None:
        await self.daemon.close_sources()


@pytest.fixture
async def run():
    r = Run()
    yield r
    await r.close()


def names(parsed: dict) -> set[str]:
    # counters come back from the parser without _total in the family but with it in the sample name
    return {n for n, _ in parsed}


async def test_every_metric_of_the_dashboard_and_the_rules_has_samples_within_20_seconds(run):
    needed = used.used_metrics()
    assert len(needed) > 20 and all(definition(n) is not None for n in needed)
    await run.to(20.0)
    exposed = parse(render(run.daemon.snapshot, False).text.decode())  # the real exposition
    missing = needed - names(exposed)
    assert not missing, f"no samples after 20 s of demo: {sorted(missing)}"


async def test_the_demo_is_labelled_in_the_exposition_and_on_the_status_page_and_the_daemon_is_not(run):
    from immich_gpu_exporter.cli import make_daemon
    from immich_gpu_exporter.http import landing_html

    await run.to(1.0)
    for openmetrics in (False, True):
        rendered = render(run.daemon.snapshot, openmetrics)
        text = (rendered.openmetrics if openmetrics else rendered.text).decode()
        [(labels, v)] = [(dict(lb), v) for (n, lb), v in parse(text).items() if n == "immich_gpu_exporter_build_info"]
        assert labels["mode"] == "demo" and v == 1
    page = landing_html(run.daemon.snapshot)
    assert "<p class=demo>DEMO: every value here is a built-in replay" in page
    assert page.index("class=demo") < page.index("<h1>")  # the first thing on the page

    live = make_daemon(config.load({f"collector.{n}": False for n in ("nvml", "systemd", "journal", "immich")},
                                   None, {}))
    [(labels, _)] = [(dict(lb), v) for (n, lb), v in parse(live.rendered.text.decode()).items()
                     if n == "immich_gpu_exporter_build_info"]
    assert labels["mode"] == "live"
    assert "DEMO" not in landing_html(live.snapshot)


async def test_sources_carry_the_daemons_names_and_follow_the_collector_switches():
    r = Run()
    assert [s.name for s in r.daemon.sources] == ["systemd", "processes", "nvml", "journal", "immich"]
    await r.close()
    cfg = config.load({"collector.nvml": False}, None, {})
    r = Run(cfg)
    assert [s.name for s in r.daemon.sources] == ["systemd", "processes", "journal", "immich"]
    m = await r.to(5.0)  # the processes' tuning does not depend on NVML
    assert value(m, "immich_process_nice", component="ml", unit=ML) == 0
    assert not series(m, "immich_gpu_processes")
    await r.close()


async def test_cpu_phase_shows_the_fallback_and_no_ml_gpu_memory(run):
    m = await run.to(20.0)
    assert value(m, "immich_ml_cpu_fallback") == 1
    assert value(m, "immich_ml_execution_provider", provider="CPUExecutionProvider") == 1
    assert value(m, "immich_ml_preferred_execution_provider", provider="CUDAExecutionProvider") == 1
    assert value(m, "immich_ml_provider_errors_total", provider="CUDAExecutionProvider", kind="create_failed") > 0
    assert value(m, "immich_ml_worker_exits_total", reason="oom_kill") == 1
    mem = series(m, "immich_gpu_process_memory_used_bytes")
    assert not [lab for lab in mem if ("component", "ml") in lab]
    assert {dict(lab)["component"] for lab in mem} == {"server", "other"}  # NVENC ffmpeg, Xorg, a container
    assert {dict(lab)["container"] for lab in mem} >= {"frigate"}
    # the unit file says Nice=-10 and LimitMEMLOCK=infinity; the running processes predate it
    assert value(m, "immich_unit_nice", unit=ML) == -10
    assert value(m, "immich_process_nice", component="ml", unit=ML) == 0
    assert value(m, "immich_unit_memlock_limit_bytes", unit=ML) == float("inf")
    assert value(m, "immich_process_memlock_limit_bytes", component="ml", unit=ML) == 8 * 2**20


async def test_cuda_phase_holds_gpu_memory_and_applies_the_tuning(run):
    m = await run.to(demo.CUDA_AT + 8.0)
    assert value(m, "immich_ml_cpu_fallback") == 0
    assert value(m, "immich_ml_execution_provider", provider="CUDAExecutionProvider") == 1
    assert 1.0e9 < value(m, "immich_gpu_process_memory_used_bytes", component="ml", unit=ML) < 1.5e9
    assert 0.4 <= value(m, "immich_gpu_process_sm_utilization_ratio", component="ml", unit=ML) <= 0.7
    assert value(m, "immich_process_nice", component="ml", unit=ML) == -10
    assert value(m, "immich_process_memlock_limit_bytes", component="ml", unit=ML) == float("inf")
    assert value(m, "immich_gpu_process_encoder_utilization_ratio", component="server",
                 unit="immich-server.service") > 0


def seconds_per_job(m: dict, queue: str, provider: str) -> float:
    return value(m, "immich_queue_active_job_seconds_total", queue=queue, provider=provider) / \
        value(m, "immich_queue_jobs_processed_total", queue=queue, provider=provider)


async def test_seconds_per_job_come_out_of_the_timing_code_near_the_scenarios_job_times(run):
    m = await run.to(demo.PERIOD - 1.0)
    for queue in ("smartSearch", "faceDetection", "ocr"):
        spec = demo.QUEUES[queue]
        cpu, cuda = seconds_per_job(m, queue, "CPUExecutionProvider"), seconds_per_job(m, queue, "CUDAExecutionProvider")
        # poll-granular integration errs by at most a poll interval at each end of a run
        assert cpu == pytest.approx(spec.cpu_seconds, rel=0.15), queue
        assert cuda == pytest.approx(spec.cuda_seconds, rel=0.25), queue
        assert cpu > 2 * cuda
    assert value(m, "immich_queue_processed_method_info", method="telemetry") == 1
    # the second view of the same: the ML processes' CPU per ML job falls on CUDA
    cpu_per_job = {p: value(m, "immich_ml_cpu_seconds_total", provider=p) / sum(
        value(m, "immich_queue_jobs_processed_total", queue=q, provider=p) for q in ("smartSearch", "faceDetection", "ocr"))
        for p in ("CPUExecutionProvider", "CUDAExecutionProvider")}
    assert cpu_per_job["CPUExecutionProvider"] > 2 * cpu_per_job["CUDAExecutionProvider"] > 0, cpu_per_job
    runs = series(m, "immich_queue_last_run_duration_seconds")
    assert {dict(lab)["queue"] for lab in runs} >= {"smartSearch", "thumbnailGeneration"}


async def test_the_scenario_loops_and_counters_never_go_back(run):
    await run.to(demo.PERIOD + 20.0)
    m = run.history[-1][1]
    assert value(m, "immich_ml_cpu_fallback") == 1  # the second loop's CPU phase
    assert value(m, "immich_unit_restarts_total", unit=ML) == 1
    assert value(m, "immich_ml_worker_exits_total", reason="inactivity") == 1
    # every counter only grows across the loop, immich_process_cpu_seconds_total too: the CPU time of
    # the workers that exit is carried forward
    counters = [n for n, d in METRICS.items() if d.type == "counter"]
    last: dict = {}
    for t, parsed in run.history:
        for (n, lab), v in parsed.items():
            if n in counters:
                assert v >= last.get((n, lab), 0.0), (t, n, dict(lab))
                last[(n, lab)] = v


async def test_journal_lines_are_real_format_and_all_recognised(run):
    await run.to(demo.PERIOD + 2.0)
    lines = [e["MESSAGE"] for e in demo.JournalScript(run.clock).entries(-1.0, demo.PERIOD)]
    assert any(re.match(r"\[\d\d/\d\d/\d\d \d\d:\d\d:\d\d\] INFO     Setting execution providers to$", x) for x in lines)
    assert any("[W:onnxruntime:Default, onnxruntime_pybind_state.cc:1094" in x for x in lines)
    text = " ".join(x.strip() for x in lines)  # Rich wraps long messages at 80 columns
    assert "was sent SIGKILL! Perhaps out of memory?" in text
    m = run.history[-1][1]
    assert not series(m, "immich_gpu_exporter_journal_unrecognized_total")


def test_demo_speed_is_validated():
    r = run_cli(["demo", "--demo.speed=0"], timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "demo.speed" in r.stderr


def test_the_readme_picture_is_drawn_from_measured_demo_numbers():
    import importlib.util

    from tests.support.dashboard import ROOT

    spec = importlib.util.spec_from_file_location("make_picture", ROOT / "docs" / "make_picture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = mod.measure()  # the numbers only; drawing needs matplotlib (the docs extra)
    for q in mod.QUEUES:
        assert data["per_job"][(q, mod.CPU)] > 2 * data["per_job"][(q, mod.CUDA)]
    ml = [mem.get("ml", 0) for t, mem, _ in data["timeline"]]
    cuda_from = next(i for i, (_, _, p) in enumerate(data["timeline"]) if p == mod.CUDA)
    assert max(ml[:cuda_from]) == 0 < max(ml[cuda_from:])
