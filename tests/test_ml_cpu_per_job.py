"""CPU seconds per ML job by provider: the documented PromQL, evaluated by Prometheus' own engine
(`promtool test rules`), returns the truth of a scenario.

The scenario (synthetic, with known truth): 40 minutes polled every 15 s; the ML service runs on
the CPU for 20 minutes, then on CUDA. Each poll the ML queues finish 6 jobs (smartSearch 3,
faceDetection 2, ocr 1); the ML processes spend 3.0 CPU seconds per job on the CPU and 0.4 on CUDA.
Mid-way through the CUDA phase the worker idles out and a new one boots (its CPU counts from its
start, the old one's stays counted). The counters come from the exporter's own code: the
processes source's `publish()` (immich_ml_cpu_seconds_total) and `timings.QueueTimings`
(immich_queue_jobs_processed_total), each fed the provider the journal source would report.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import pytest
import yaml

from immich_gpu_exporter import attribution as attr
from immich_gpu_exporter import config as configmod
from immich_gpu_exporter.immich_api import QueueStats
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.processes import ProcessesReading, ProcessesSource
from immich_gpu_exporter.timings import METHOD_BACKLOG, Observation, QueueTimings
from tests.support.proc import ROOT

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: apt-get install prometheus")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
STEP = 15.0
STEPS = 160  # 40 minutes
SWITCH = 80  # the step at which the journal reports CUDA
JOBS = {"smartSearch": 3, "faceDetection": 2, "ocr": 1}
CPU_PER_JOB = {CPU: 3.0, CUDA: 0.4}
ML_CGROUP = "0::/system.slice/immich-machine-learning.service\n"
BOOT = 1000.0  # the host booted this long before the scenario


def documented_expr() -> str:
    text = (ROOT / "docs" / "immich.md").read_text()
    section = text.split("## CPU seconds per ML job by provider (PromQL)", 1)[1]
    return re.search(r"```promql\n(.*?)```", section, re.S).group(1).strip()


def provider_at(step: int) -> str:
    return CPU if step < SWITCH else CUDA


def scenario_series() -> dict[str, list[float | None]]:
    """Series text -> value per step, as the exporter would expose them at each poll."""
    src = ProcessesSource(configmod.defaults(), Hub(lambda: None))
    timings = QueueTimings(METHOD_BACKLOG, max_gap=60.0)
    backlog = {q: 10_000 for q in JOBS}
    workers = [(4001, 0.0)]  # (pid, start seconds since the scenario began)
    cpu = 50.0  # the first worker had already spent this before the exporter's first poll
    out: dict[str, list[float | None]] = {}
    for step in range(STEPS + 1):
        t = step * STEP
        if step > 0:
            cpu += sum(JOBS.values()) * CPU_PER_JOB[provider_at(step - 1)]
        if step == 121:  # the worker idled out right after the last poll's reading; a new one booted
            workers = [(4002, t - 5.0)]
            cpu = sum(JOBS.values()) * CPU_PER_JOB[CUDA]  # all of the new worker's CPU is this interval's
        pid, start = workers[0]
        info = attr.ProcessInfo(pid, int((start + BOOT) * attr.CLK_TCK), "gunicorn", attr.locate(ML_CGROUP),
                                None, 0, cpu, 100 << 20)
        result = src.publish(ProcessesReading({pid: info}, {}, {}, t + BOOT), provider_at(step))
        timings.observe(Observation(t, {q: QueueStats(q, waiting=backlog[q] - 2, active=2) for q in JOBS},
                                    None, provider_at(step)))
        for q, n in JOBS.items():
            backlog[q] -= n
        values: dict[str, float] = {}
        for s in result.samples:
            if s.name == "immich_ml_cpu_seconds_total":
                values[f'immich_ml_cpu_seconds_total{{provider="{dict(s.labels)["provider"]}"}}'] = s.value
        for q, rep in timings.report().items():
            for provider, v in rep.processed.items():
                values[f'immich_queue_jobs_processed_total{{queue="{q}",provider="{provider}"}}'] = v
        for k, v in values.items():
            out.setdefault(k, [None] * step).append(v)
        for k in out:
            if len(out[k]) < step + 1:
                out[k].append(None)
    return out


def promtool_file(tmp_path, expr: str, checks: list[tuple[str, str, dict[str, float]]]) -> str:
    """A promtool unit test of the scenario's series. promtool compares values exactly and NaN never
    equals NaN, so the documented expression E is checked as round(E, 0.001) where it is a number
    (the ratio of two extrapolated increases is exact only to the last bits) and as a count of its
    NaN results (0/0: a window without jobs) where it is NaN."""
    rounded = f"round(({expr}), 0.001)"
    tests = []
    for at, _, want in checks:
        numbers = {p: v for p, v in want.items() if not math.isnan(v)}
        nans = {p: 1.0 for p, v in want.items() if math.isnan(v)}
        tests.append({"expr": f"{rounded} == {rounded}", "eval_time": at,
                      "exp_samples": [{"labels": f'{{provider="{p}"}}', "value": v} for p, v in numbers.items()]})
        tests.append({"expr": f"count by (provider) (({expr}) != ({expr}))", "eval_time": at,
                      "exp_samples": [{"labels": f'{{provider="{p}"}}', "value": v} for p, v in nans.items()]})
    series = [{"series": k, "values": " ".join("_" if v is None else repr(float(v)) for v in vals)}
              for k, vals in sorted(scenario_series().items())]
    doc = {"rule_files": [], "evaluation_interval": f"{STEP:g}s",
           "tests": [{"interval": f"{STEP:g}s", "input_series": series, "promql_expr_test": tests}]}
    path = tmp_path / "ml_cpu_per_job_test.yml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def promtool(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "test", "rules", path], capture_output=True, text=True, timeout=60)


CHECKS = [
    # (eval time, what, expected {provider: CPU seconds per job})
    ("20m", "the CPU phase alone", {CPU: 3.0}),
    # CPU's counters are flat in this window: 0/0, NaN (a gap on a dashboard, not a zero)
    ("40m", "the CUDA phase, the worker restart inside the window", {CPU: float("nan"), CUDA: 0.4}),
]


def test_documented_query_returns_cpu_seconds_per_job_by_provider(tmp_path):
    expr = documented_expr().replace("[1h]", "[10m]")
    r = promtool(promtool_file(tmp_path, expr, CHECKS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_over_both_phases_each_provider_keeps_its_own_ratio(tmp_path):
    expr = documented_expr().replace("[1h]", "[40m]")
    r = promtool(promtool_file(tmp_path, expr, [("40m", "both phases", {CPU: 3.0, CUDA: 0.4})]))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_check_can_fail(tmp_path):
    """A wrong truth must fail: the harness is not a rubber stamp."""
    expr = documented_expr().replace("[1h]", "[10m]")
    r = promtool(promtool_file(tmp_path, expr, [("40m", "wrong", {CPU: float("nan"), CUDA: 3.0})]))
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr


def test_scenario_counts_every_job_and_all_cpu_after_the_baseline():
    series = scenario_series()
    jobs = sum(v[-1] for k, v in series.items() if k.startswith("immich_queue_jobs_processed_total"))
    assert jobs == STEPS * sum(JOBS.values())
    assert series[f'immich_ml_cpu_seconds_total{{provider="{CPU}"}}'][-1] == pytest.approx(SWITCH * 6 * 3.0)
    assert series[f'immich_ml_cpu_seconds_total{{provider="{CUDA}"}}'][-1] == pytest.approx((STEPS - SWITCH) * 6 * 0.4)
