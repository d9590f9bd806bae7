"""Soak: the real exporter under an hour of churn; memory, file descriptors and series must stay flat.

    sudo .venv/bin/python bench/soak.py [--duration 3600] [--churn 2] [--json OUT]

What churns, all through the real exporter subprocess and real peers:
- worker PIDs: real `sleep` processes in a cgroup named like the NixOS ML unit (when cgroup2 is
  writable; else plain children) are put on the gcc-built fake libnvidia-ml.so.1 and replaced one
  by one every `--churn` seconds, with `--gpu.pid-labels` on, so per-PID series come and go;
- journal traffic: every `--churn` seconds a burst of Immich ML lines (a worker boot with the new
  PID, model loads, provider lists, an ORT CUDA failure every tenth burst) is appended to a real
  journal file by systemd-journal-remote and followed by the journal source;
- API polling: the fake Immich (tests/support/fake_immich.py) drains a queue that keeps receiving
  jobs, polled with its telemetry every 0.5 s.

Measured every `--sample` seconds: the exporter's RSS and open fds (psutil) and the number of series
on /metrics. The verdict covers the last 75 % of the run (the last 45 of 60 minutes): RSS growth
from the median of the window's first five samples to the median of its last five below 5 %, fds
within 2 of the window's first sample, the series count at most 10 % above the window's first.
Exit status 1 when a bound is broken. tests/test_soak.py runs the same code for a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from tests.support.fake_immich import FakeImmich, Key, QueueSim  # noqa: E402
from tests.support.journal import Clock, entries, write_journal  # noqa: E402
from tests.support.nvml import Gpu, Scenario, build_fake_nvml, cgroup2_mount, env_for  # noqa: E402
from tests.support.proc import Exporter, http_get  # noqa: E402

KEY = "soak-key-7c1d2e3f4a5b"
ML_CGROUP = "system.slice/immich-machine-learning.service"
WORKERS = 3
RSS_GROWTH_MAX = 0.05
FDS_SLACK = 2
SERIES_SLACK = 0.10


@dataclasses.dataclass
class Sample:
    t: float
    rss: int
    fds: int
    series: int


@dataclasses.dataclass
class Verdict:
    duration_s: float
    samples: int
    rss_start: int
    rss_end: int
    rss_growth: float
    rss_max: int
    fds_start: int
    fds_min: int
    fds_max: int
    series_start: int
    series_max: int
    journal_entries_written: int
    pids_churned: int
    scrape_failures: int
    worker_boots_read: float = 0.0  # immich_ml_worker_boots_total at the end: the journal really flowed
    pid_series_seen: int = 0  # distinct pid labels seen on /metrics: the churn really reached the exposition

    @property
    def ok(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        out = []
        if self.rss_growth >= RSS_GROWTH_MAX:
            out.append(f"RSS grew {self.rss_growth:.1%} (bound {RSS_GROWTH_MAX:.0%})")
        if self.fds_max - self.fds_start > FDS_SLACK or self.fds_start - self.fds_min > FDS_SLACK:
            out.append(f"fds {self.fds_min}..{self.fds_max}, started at {self.fds_start} (bound +-{FDS_SLACK})")
        if self.series_max > self.series_start * (1 + SERIES_SLACK) + 5:
            out.append(f"series grew from {self.series_start} to {self.series_max}")
        if self.scrape_failures:
            out.append(f"{self.scrape_failures} scrapes failed")
        return out


class Workers:
    """Real processes standing in for ML workers; in the unit's cgroup when cgroup2 is writable."""

    def __init__(self, base: pathlib.Path) -> None:
        mount = cgroup2_mount()
        self.cgroup: pathlib.Path | None = None
        if mount is not None and os.access(mount, os.W_OK):
            self.cgroup = mount / f"soak-{os.getpid()}" / ML_CGROUP
            self.cgroup.mkdir(parents=True)
        self.procs: list[subprocess.Popen] = []

    def spawn(self) -> int:
        cg = self.cgroup

        def pre() -> None:
            if cg is not None:
                (cg / "cgroup.procs").write_text(str(os.getpid()))

        p = subprocess.Popen(["sleep", "7200"], preexec_fn=pre, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p.pid

    def replace_oldest(self) -> int:
        old = self.procs.pop(0)
        old.kill()
        old.wait()
        return self.spawn()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        if self.cgroup is not None:
            top = self.cgroup.parents[1]
            for d in (self.cgroup, self.cgroup.parent, top):
                for _ in range(50):
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.02)


def burst(n: int, pid: int) -> list[str]:
    stamp = time.strftime("[%m/%d/%y %H:%M:%S]")
    lines = [f"{stamp} INFO     Booting worker with pid: {pid}",
             f"{stamp} INFO     Loading visual model 'ViT-B-32__openai' to memory",
             f"{stamp} INFO     Setting execution providers to ['CUDAExecutionProvider', 'CPUExecutionProvider'], "
             "in descending order of preference"]
    if n % 10 == 9:
        lines.append("2026-07-30 12:35:10.754300111 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1094 "
                     "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. "
                     "Require cuDNN 9.* and CUDA 12.*.")
    return lines


def series_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


@contextlib.contextmanager
def rig(work: pathlib.Path, duration: float) -> Iterator[tuple[Exporter, Workers, Scenario, pathlib.Path]]:
    lib = build_fake_nvml(work / "nvml")
    scenario = Scenario(work / "scenario", gpus=[Gpu()])
    workers = Workers(work)
    journal_dir = work / "journal"
    journal_dir.mkdir()
    (work / "state").mkdir()
    now = time.monotonic()
    arrivals = [now + 2 + i * 0.4 for i in range(int((duration + 120) / 0.4))]
    sim = QueueSim("smartSearch", concurrency=2, job_seconds=0.7, arrivals=arrivals)
    try:
        for _ in range(WORKERS):
            workers.spawn()
        write_scenario(scenario, workers.pids)
        write_journal(journal_dir / "system.journal", entries(burst(0, workers.pids[-1]), pid=workers.pids[-1]))
        with FakeImmich(queues=[sim], keys={KEY: Key()}) as fake:
            args = [f"--journal.directory={journal_dir}", f"--state.directory={work / 'state'}",
                    f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}",
                    f"--immich.telemetry-url={fake.telemetry_url}", "--immich.interval=0.5",
                    "--nvml.interval=0.5", "--collection.interval=0.5", "--gpu.pid-labels",
                    "--no-collector.systemd", f"--docker.socket={work / 'no-docker.sock'}",
                    "--journal.fallback-grace=5", "--log.level=info"]
            env = env_for(lib, scenario) | {"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY}
            with Exporter(args, env=env, log_path=work / "exporter.log") as exporter:
                yield exporter, workers, scenario, journal_dir
    finally:
        workers.close()


def write_scenario(scenario: Scenario, pids: list[int]) -> None:
    scenario.lines.clear()
    for i, pid in enumerate(pids):
        scenario.compute(pid, (512 + i) * 2**20).sample(pid, 0.1, 40 + i)
    scenario.write()


def soak(duration: float, churn: float, sample_every: float, work: pathlib.Path,
         progress: bool = False) -> tuple[Verdict, list[Sample]]:
    samples: list[Sample] = []
    written = churned = failures = 0
    pids_seen: set[str] = set()
    last_boots = 0.0
    with rig(work, duration) as (exporter, workers, scenario, journal_dir):
        proc = psutil.Process(exporter.proc.pid)  # type: ignore[union-attr]
        clock = Clock(int(time.time() * 1e6))
        t0 = time.monotonic()
        next_churn = next_sample = t0
        n = 0
        while (now := time.monotonic()) - t0 < duration:
            if exporter.proc.poll() is not None:  # type: ignore[union-attr]
                raise RuntimeError(f"exporter died: {exporter.logs()[-2000:]}")
            if now >= next_churn:
                n += 1
                pid = workers.replace_oldest()
                churned += 1
                write_scenario(scenario, workers.pids)
                written += write_journal(journal_dir / "system.journal",
                                         entries(burst(n, pid), pid=pid, clock=clock))
                next_churn += churn
            if now >= next_sample:
                try:
                    status, _, body = http_get(exporter.url + "/metrics", timeout=5)
                    text = body.decode()
                    series = series_count(text) if status == 200 else 0
                    pids_seen.update(re.findall(r'pid="(\d+)"', text))
                    boots = re.search(r"^immich_ml_worker_boots_total (\S+)$", text, re.M)
                    if boots:
                        last_boots = float(boots.group(1))
                    failures += status != 200
                except OSError:
                    series, failures = 0, failures + 1
                mem = proc.memory_info().rss
                samples.append(Sample(now - t0, mem, proc.num_fds(), series))
                if progress:
                    print(f"{now - t0:7.0f}s rss={mem / 2**20:6.1f} MiB fds={samples[-1].fds} series={series}",
                          flush=True)
                next_sample += sample_every
            time.sleep(max(0.0, min(next_churn, next_sample) - time.monotonic()))
    v = verdict(samples, duration, written, churned, failures)
    v.worker_boots_read, v.pid_series_seen = last_boots, len(pids_seen)
    return v, samples


def verdict(samples: list[Sample], duration: float, written: int, churned: int, failures: int) -> Verdict:
    window = [s for s in samples if s.t >= duration * 0.25]
    if len(window) < 10:
        raise ValueError("too few samples in the window")
    head, tail = window[:5], window[-5:]
    rss_start = int(statistics.median(s.rss for s in head))
    rss_end = int(statistics.median(s.rss for s in tail))
    return Verdict(
        duration_s=duration, samples=len(window), rss_start=rss_start, rss_end=rss_end,
        rss_growth=(rss_end - rss_start) / rss_start, rss_max=max(s.rss for s in window),
        fds_start=window[0].fds, fds_min=min(s.fds for s in window), fds_max=max(s.fds for s in window),
        series_start=window[0].series, series_max=max(s.series for s in window),
        journal_entries_written=written, pids_churned=churned, scrape_failures=failures)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--churn", type=float, default=2.0, help="seconds between worker replacements and bursts")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between measurements")
    ap.add_argument("--json", type=pathlib.Path, help="write the verdict and samples here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        v, samples = soak(args.duration, args.churn, args.sample, pathlib.Path(tmp), progress=True)
    if args.json:
        args.json.write_text(json.dumps({"verdict": dataclasses.asdict(v),
                                         "samples": [dataclasses.asdict(s) for s in samples]}, indent=1))
    print(json.dumps(dataclasses.asdict(v), indent=1))
    for f in v.failures():
        print("FAIL:", f)
    print("verdict:", "flat" if v.ok else "NOT flat")
    return 0 if v.ok else 1


if __name__ == "__main__":
    sys.exit(main())
