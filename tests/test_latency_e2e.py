"""Smart Search and ML call latency end to end, before and after a CPU-to-CUDA switch, on one host and
on two (remote ML).

A scenario with known latencies: the fake Immich's two telemetry endpoints (API process and
microservices, the families and layout of the real v3.1.0 server: tests/support/immich_telemetry.py)
record calls whose durations the test draws from known distributions, first while the ML service runs
on the CPU (the real v3.1.0 fallback journal), then, after a restart, on CUDA (a SYNTHETIC healthy CUDA
start; the worker holds GPU memory in the fake NVML). Three real exporters, as in the remote-ML test: the
GPU host's (role ml), the server host's (role server, provider from the GPU host's exporter) and a
one-host exporter. A real Prometheus scrapes them; the dashboard's own panel queries must show the truth:
means within 10 %, quantiles within one of Immich's bucket boundaries, split by provider.
"""

from __future__ import annotations

import bisect
import random
import time
import uuid

import pytest

from immich_gpu_exporter.latency import IMMICH_BOUNDS
from tests.support import dashboard, journal as jr
from tests.support.exposition import parse, value
from tests.support.fake_immich import FakeImmich, Key
from tests.support.immich_telemetry import TelemetrySim
from tests.support.ml_journal import fallback_gpu_host, healthy_cuda_start, on_the_same_boot
from tests.support.nvml import CgroupTree, Gpu, env_for
from tests.support.prometheus import Prometheus
from tests.support.proc import Exporter, wait_for

pytestmark = pytest.mark.integration

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
ML_UNIT = "immich-machine-learning.service"
KEY = "latency-e2e-key-9d3e"
PHASE = 12.0  # seconds of calls under each provider
STEP = 0.1
WORKER_BYTES = 1200 * 2**20

# (worker, repository, method) -> provider -> (low, high) ms, uniform; the search query does not depend on
# the provider, the ML calls do (the guide's 2-5x and more)
LATENCY = {
    ("api", "machine_learning", "encode_text"): {CPU: (60.0, 140.0), CUDA: (8.0, 16.0)},
    ("api", "search", "search_smart"): {CPU: (4.0, 30.0), CUDA: (4.0, 30.0)},
    ("microservices", "machine_learning", "encode_image"): {CPU: (300.0, 900.0), CUDA: (30.0, 70.0)},
    ("microservices", "machine_learning", "detect_faces"): {CPU: (200.0, 700.0), CUDA: (20.0, 90.0)},
    ("microservices", "machine_learning", "ocr"): {CPU: (400.0, 1600.0), CUDA: (60.0, 200.0)},
}
CACHED_SHARE = 0.25  # searches whose text embedding the server had cached: no encode_text call


class Truth:
    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], list[float]] = {}  # (method, provider) -> ms
        self.searches: dict[str, int] = {}

    def add(self, method: str, provider: str, ms: float) -> None:
        self.seen.setdefault((method, provider), []).append(ms)

    def mean_s(self, method: str, provider: str) -> float:
        v = self.seen[(method, provider)]
        return sum(v) / len(v) / 1000.0

    def search_mean_s(self, provider: str) -> float:
        total = sum(self.seen[("search_smart", provider)]) + sum(self.seen.get(("encode_text", provider), []))
        return total / len(self.seen[("search_smart", provider)]) / 1000.0

    def quantile_bucket(self, method: str, provider: str, q: float) -> tuple[float, float]:
        """The bucket (lower, upper bound in seconds) that holds the true q-quantile."""
        v = sorted(self.seen[(method, provider)])
        x = v[min(len(v) - 1, int(q * len(v)))]
        i = bisect.bisect_left(IMMICH_BOUNDS, x)
        return (IMMICH_BOUNDS[i - 1] / 1000.0 if i else 0.0), IMMICH_BOUNDS[i] / 1000.0


def run_phase(sim: TelemetrySim, truth: Truth, provider: str, rng: random.Random, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for (worker, repo, method), by in LATENCY.items():
            if method == "encode_text" and rng.random() < CACHED_SHARE:
                continue
            ms = rng.uniform(*by[provider])
            sim.record(worker, repo, method, ms)
            truth.add(method, provider, ms)
        time.sleep(STEP)


def docs_smart_search_expr() -> str:
    """The first PromQL block of docs/latency.md's PromQL section, verbatim."""
    import re

    text = (dashboard.ROOT / "docs" / "latency.md").read_text().split("## PromQL", 1)[1]
    return re.search(r"```promql\n(.*?)```", text, re.S).group(1).strip()


def board_query(title: str, ref: str = "A", **pick: str) -> str:
    (expr,) = [e for t, r, e in dashboard.queries(dashboard.load(), range_="5m", rate="5m") if t == title and r == ref]
    if "immich" in pick:
        expr = expr.replace('immich=~".*"', f'immich=~"{pick["immich"]}"')
    if "instance" in pick:
        expr = expr.replace('instance=~".*"', f'instance=~"{pick["instance"]}"')
    return expr


def test_dashboard_latency_panels_show_the_truth_by_provider_on_one_and_two_hosts(tmp_path) -> None:
    rng = random.Random(20261205)
    lib, journal_dir, jfile, scen = fallback_gpu_host(tmp_path)
    sim, truth = TelemetrySim(), Truth()
    fake = FakeImmich(keys={KEY: Key()}, latency=sim)
    driver = tmp_path / "proc-driver-nvidia-version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04\n")
    common = ["--collection.interval=0.2", "--nvml.interval=0.2", "--immich.interval=0.2", "--immich.timeout=1",
              "--journal.fallback-grace=1", "--no-collector.systemd", f"--journal.nvidia-driver-path={driver}"]
    server_args = [f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}",
                   f"--immich.telemetry-url={fake.telemetry_url}", f"--immich.api-telemetry-url={fake.api_telemetry_url}"]
    ml_env = env_for(lib, scen)
    with CgroupTree(f"igx-latency-{uuid.uuid4().hex[:8]}") as cg, fake:
        arbiter = cg.spawn(f"system.slice/{ML_UNIT}")
        worker = cg.spawn(f"system.slice/{ML_UNIT}")
        # the API process has served requests before the exporters start (repo durations on, no search yet)
        sim.record("api", "system_metadata", "get", 0.3)
        sim.record("microservices", "system_metadata", "get", 0.3)
        gpu_host = Exporter([*common, "--deployment.role=ml", f"--journal.directory={journal_dir}",
                             f"--state.directory={tmp_path / 'state-ml'}"], env=ml_env, log_path=tmp_path / "ml.log")
        with gpu_host:
            server_host = Exporter([*common, "--deployment.role=server", "--no-collector.nvml",
                                    "--no-collector.journal", *server_args,
                                    f"--remote-ml.exporter-url={gpu_host.url}/metrics"],
                                   env={"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY}, log_path=tmp_path / "server.log")
            one_host = Exporter([*common, f"--journal.directory={journal_dir}", f"--state.directory={tmp_path / 's1'}",
                                 *server_args], env={"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY, **ml_env},
                                log_path=tmp_path / "one.log")
            with server_host, one_host, Prometheus(
                    tmp_path, {"two-host": [gpu_host.address, server_host.address], "one-host": [one_host.address]},
                    target_labels={"two-host": {"immich": "home"}}) as prom:
                for exp in (server_host, one_host):
                    wait_for(lambda: value(parse(exp.metrics()), "immich_ml_call_duration_seconds_count",
                                           call="encode_text", provider=CPU) == 0, 20,
                             what="latency series at 0 under the CPU verdict")
                prom.wait_for_samples('immich_smart_search_query_duration_seconds_count{provider="%s"}' % CPU)
                time.sleep(1.0)  # Prometheus has the zero samples of both targets

                # -- CPU segment ------------------------------------------------------------------------
                run_phase(sim, truth, CPU, rng, PHASE)
                time.sleep(1.0)  # every exporter polled the last CPU calls under CPU
                # -- the switch: the ML service restarts on CUDA (no call meanwhile) --------------------
                scen.compute(worker, WORKER_BYTES)
                scen.sample(worker, 0.1, sm=55)
                scen.gpus = [Gpu(used=WORKER_BYTES + 300 * 2**20, util=60)]
                scen.write()
                jr.write_journal(jfile, on_the_same_boot(healthy_cuda_start(arbiter, worker), journal_dir))
                for exp in (server_host, one_host):
                    wait_for(lambda: value(parse(exp.metrics()), "immich_ml_call_duration_seconds_count",
                                           call="encode_text", provider=CUDA) == 0, 20,
                             what="latency series at 0 under the CUDA verdict")
                time.sleep(1.0)
                # -- CUDA segment -----------------------------------------------------------------------
                run_phase(sim, truth, CUDA, rng, PHASE)
                time.sleep(2.0)  # a last poll and scrape of everything

                searches = {}
                for job, pick in (("two-host", {"immich": "home"}), ("one-host", {"instance": one_host.address})):
                    got = {r["metric"].get("provider"): r["value"]
                           for r in prom.query(board_query("Smart Search mean response time by provider", **pick))}
                    searches[job] = got
                    calls = {(r["metric"]["call"], r["metric"].get("provider", "")): r["value"]
                             for r in prom.query(board_query("ML call mean duration by call and provider", **pick))}
                    for provider in (CPU, CUDA):
                        want = truth.search_mean_s(provider)
                        assert got[provider] == pytest.approx(want, rel=0.10), (job, provider, got, want)
                        for method in ("encode_text", "encode_image", "detect_faces", "ocr"):
                            want = truth.mean_s(method, provider)
                            assert calls[(method, provider)] == pytest.approx(want, rel=0.10), (job, method, provider)
                        # quantiles: the dashboard's p95 lands in the bucket of the true p95 (or a neighbour
                        # boundary: Prometheus interpolates linearly inside a bucket)
                        for title, ref, method, q in [
                                ("Smart Search p50 / p95: text encoding and database query", "B", "encode_text", 0.95),
                                ("Smart Search p50 / p95: text encoding and database query", "C", "search_smart", 0.5),
                                ("Smart Search p50 / p95: text encoding and database query", "D", "search_smart", 0.95)]:
                            rows = {r["metric"].get("provider"): r["value"] for r in prom.query(board_query(title, ref, **pick))}
                            low, high = truth.quantile_bucket(method, provider, q)
                            assert low <= rows[provider] <= high, (job, method, q, provider, rows, low, high)
                        p95 = {(r["metric"]["call"], r["metric"].get("provider", "")): r["value"]
                               for r in prom.query(board_query("ML call p95 by call and provider", **pick))}
                        for method in ("encode_image", "detect_faces", "ocr"):
                            low, high = truth.quantile_bucket(method, provider, 0.95)
                            assert low <= p95[(method, provider)] <= high, (job, method, provider, p95)
                    # CPU vs CUDA: what the panels are for
                    assert got[CPU] > 3 * got[CUDA], got
                # the documented PromQL (docs/latency.md), for the one-host exporter
                docs = {r["metric"].get("provider", ""): r["value"] for r in prom.query(
                    docs_smart_search_expr().replace("[1h]", "[5m]").replace(
                        "_sum[", '_sum{job="one-host"}[').replace("_count[", '_count{job="one-host"}[').replace(
                        '{call="encode_text"}', '{call="encode_text",job="one-host"}'))}
                for provider in (CPU, CUDA):
                    assert docs[provider] == pytest.approx(truth.search_mean_s(provider), rel=0.10), docs
                print("Smart Search mean by provider:", searches, "truth:",
                      {p: round(truth.search_mean_s(p), 4) for p in (CPU, CUDA)})
