"""Remote machine learning end to end: the ML service on a GPU host, the Immich server on another.

Three real exporters on one workload, scraped by one real Prometheus that evaluates the shipped rules
(only `for:` shortened):
- the GPU host's (`--deployment.role=ml`): the ML journal (a real journal file) and NVML (the fake
  library; the ML worker is a real process in a real cgroup named like the ML unit);
- the server host's (`--deployment.role=server`): the Immich API and telemetry (the fake Immich), with
  the provider in force read from the GPU host's exporter (`--remote-ml.exporter-url`);
- a one-host exporter (`role all`) reading the same journal, NVML and API, for comparison.
The two-host targets share the target label immich="home" (docs/remote-ml.md); the one-host target has
none (its installation is its instance).

The ML journal: first a CPU fallback (the captured real journal of Immich v3.1.0 without a driver,
tests/fixtures/real-ml), then, after `systemctl stop`,
a SYNTHETIC healthy CUDA start (no healthy CUDA capture can be made without a GPU; its lines follow the
real captures' layout), with the fake NVML showing the worker's GPU memory from then on.
"""

from __future__ import annotations

import pathlib
import time
import uuid

import pytest

from tests.support import dashboard, journal as jr
from tests.support.ml_journal import fallback_gpu_host, healthy_cuda_start, on_the_same_boot
from tests.support.exposition import parse, value
from tests.support.fake_immich import FakeImmich, Key, QueueSim
from tests.support.nvml import CgroupTree, Gpu, env_for
from tests.support.prometheus import Prometheus, shortened_rules
from tests.support.proc import Exporter, wait_for

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
KEY = "remote-ml-key-41c7"
ML_UNIT = "immich-machine-learning.service"
PHASE = 15.0  # seconds of each segment (CPU fallback, then CUDA)
RESTART = 3.0  # seconds the ML service is away while it is switched to CUDA: no ML job starts meanwhile
JOB_SECONDS = {CPU: 0.5, CUDA: 0.125}
WORKER_BYTES = 1200 * 2**20



def spj(prom: Prometheus, job: str, window: str) -> dict[str, float]:
    """The documented seconds per job (README), by provider, for one scrape job."""
    q = (f'sum by (provider) (increase(immich_queue_active_job_seconds_total{{job="{job}",queue="smartSearch"}}[{window}]))'
         f' / sum by (provider) (increase(immich_queue_jobs_processed_total{{job="{job}",queue="smartSearch"}}[{window}]))')
    return {r["metric"].get("provider", ""): r["value"] for r in prom.query(q)}


def test_two_hosts_give_the_one_host_numbers_and_alerts(tmp_path: pathlib.Path) -> None:
    lib, journal_dir, jfile, scen = fallback_gpu_host(tmp_path)

    # Jobs begin once all three exporters run and know the provider: every job-seconds series then
    # starts at 0 before the work (as on a host that has run for a while), so increase() needs no
    # extrapolation at a series' birth and the comparison is about the exporters, not PromQL's edges.
    t0 = time.monotonic() + 10.0
    switch = t0 + PHASE  # the ML service is back, on CUDA
    arrivals = [t0 + i * 0.1 for i in range(int(2 * PHASE / 0.1))]  # a backlog through both segments
    smart = QueueSim("smartSearch", concurrency=2, arrivals=[t0] * 80 + arrivals, job_seconds=JOB_SECONDS,
                     provider_at=lambda t: CPU if t < switch else CUDA, pause=(switch - RESTART, switch))
    fake = FakeImmich(queues=[smart], keys={KEY: Key()})
    driver = tmp_path / "proc-driver-nvidia-version"  # the fake NVML's host has the NVIDIA driver loaded
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04\n")
    common = ["--collection.interval=0.2", "--nvml.interval=0.2", "--immich.interval=0.2", "--immich.timeout=1",
              "--journal.fallback-grace=1", "--no-collector.systemd", f"--journal.nvidia-driver-path={driver}"]
    ml_env = env_for(lib, scen)
    with CgroupTree(f"igx-remote-{uuid.uuid4().hex[:8]}") as cg, fake:
        arbiter = cg.spawn(f"system.slice/{ML_UNIT}")
        worker = cg.spawn(f"system.slice/{ML_UNIT}")
        gpu_host = Exporter([*common, "--deployment.role=ml", f"--journal.directory={journal_dir}",
                             f"--state.directory={tmp_path / 'state-ml'}"], env=ml_env,
                            log_path=tmp_path / "ml.log")
        with gpu_host:
            server_host = Exporter([*common, "--deployment.role=server", "--no-collector.nvml", "--no-collector.journal",
                                    f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}",
                                    f"--immich.telemetry-url={fake.telemetry_url}",
                                    f"--remote-ml.exporter-url={gpu_host.url}/metrics"],
                                   env={"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY}, log_path=tmp_path / "server.log")
            one_host = Exporter([*common, f"--journal.directory={journal_dir}", f"--state.directory={tmp_path / 's1'}",
                                 f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}",
                                 f"--immich.telemetry-url={fake.telemetry_url}"],
                                env={"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY, **ml_env}, log_path=tmp_path / "one.log")
            with server_host, one_host, Prometheus(
                    tmp_path, {"two-host": [gpu_host.address, server_host.address], "one-host": [one_host.address]},
                    rule_files=[shortened_rules(tmp_path)], target_labels={"two-host": {"immich": "home"}}) as prom:
                # -- CPU segment: the fallback, seen from the GPU host's log ---------------------------------
                wait_for(lambda: value(parse(gpu_host.metrics()), "immich_ml_cpu_fallback") == 1, 20,
                         what="the GPU host's verdict: CPU fallback")
                wait_for(lambda: value(parse(server_host.metrics()), "immich_queue_active_job_seconds_total",
                                       queue="smartSearch", provider=CPU) == 0, 10,
                         what="the server host labelling smartSearch with the GPU host's CPU verdict")
                assert time.monotonic() < t0, "the exporters took too long to start; the workload already began"
                m = parse(server_host.metrics())
                assert value(m, "immich_remote_ml_exporter_up", exporter=gpu_host.url) == 1
                assert value(m, "immich_gpu_exporter_build_info", role="server") == 1
                assert value(parse(gpu_host.metrics()), "immich_gpu_exporter_build_info", role="ml") == 1
                alerts = {}

                def firing(name: str, **labels: str) -> bool:
                    for a in prom.alerts():
                        if a["labels"].get("alertname") == name and a["state"] == "firing" \
                                and all(a["labels"].get(k) == v for k, v in labels.items()):
                            alerts[(name, tuple(sorted(labels.items())))] = a
                            return True
                    return False

                time.sleep(max(0.0, t0 + 2 - time.monotonic()))  # the CPU segment's work has begun
                for name, labels in [("ImmichMLCPUFallback", {"condition": "log", "job": "two-host"}),
                                     ("ImmichMLCPUFallback", {"condition": "no_gpu_memory", "immich": "home"}),
                                     ("ImmichMLGPUIdleWithBacklog", {"immich": "home"}),
                                     ("ImmichMLCPUFallback", {"condition": "no_gpu_memory"}),  # one host too
                                     ]:
                    wait_for(lambda: firing(name, **labels), max(5.0, switch - time.monotonic() - 1),
                             what=f"{name} {labels} during the CPU segment")
                # the backlog is on the server host only, the GPU facts on the GPU host only: the installation
                # label joined them
                assert "instance" not in alerts[("ImmichMLGPUIdleWithBacklog", (("immich", "home"),))]["labels"]

                # -- CUDA segment (SYNTHETIC journal lines; the worker holds GPU memory) ----------------------
                # the fix is applied while the ML service is away (RESTART s before `switch`): the journal shows
                # the old master stopping and the new start, as it would after `systemctl restart`
                time.sleep(max(0.0, switch - RESTART + 0.5 - time.monotonic()))
                scen.compute(worker, WORKER_BYTES)
                scen.sample(worker, 0.1, sm=55)
                scen.gpus = [Gpu(used=WORKER_BYTES + 300 * 2**20, util=60)]
                scen.write()
                jr.write_journal(jfile, on_the_same_boot(healthy_cuda_start(arbiter, worker), journal_dir))
                wait_for(lambda: value(parse(server_host.metrics()), "immich_queue_active_job_seconds_total",
                                       queue="smartSearch", provider=CUDA) is not None, 10,
                         what="job-seconds under CUDA on the server host (provider from the GPU host)")
                wait_for(lambda: not firing("ImmichMLCPUFallback", condition="no_gpu_memory", immich="home"), 20,
                         what="the no-GPU-memory alert resolved once the worker holds GPU memory")
                time.sleep(max(0.0, smart.last_end + 1.5 - time.monotonic()))  # the backlog drained (known schedule)
                time.sleep(1.5)  # a last scrape of every exporter

                two, one = spj(prom, "two-host", "5m"), spj(prom, "one-host", "5m")
                # the dashboard's own panel, with the variables a user picks: Installation "home" for the
                # two hosts, the one-host exporter's instance for the other
                (panel,) = [e for t, _, e in dashboard.queries(dashboard.load())
                            if t == "Seconds per job by queue and provider"]
                panel = panel.replace('immich=~".*"', "IMMICH").replace('instance=~".*"', "INSTANCE")
                board_two = {r["metric"]["provider"]: r["value"] for r in prom.query(
                    panel.replace("IMMICH", 'immich=~"home"').replace("INSTANCE", 'instance=~".*"'))
                    if r["metric"].get("queue") == "smartSearch"}
                board_one = {r["metric"]["provider"]: r["value"] for r in prom.query(
                    panel.replace("IMMICH", 'immich=~".*"').replace("INSTANCE", f'instance=~"{one_host.address}"'))
                    if r["metric"].get("queue") == "smartSearch"}
                for provider in (CPU, CUDA):
                    truth = smart.truth(provider)
                    assert abs(two[provider] - truth) <= 0.10 * truth, (provider, two, one, truth)
                    assert abs(one[provider] - truth) <= 0.10 * truth, (provider, two, one, truth)
                    assert abs(two[provider] - one[provider]) <= 0.05 * truth, (provider, two, one)
                    assert abs(board_two[provider] - board_one[provider]) <= 0.05 * truth, (board_two, board_one)
                    assert abs(board_two[provider] - truth) <= 0.10 * truth, (provider, board_two, truth)
