"""Renders docs/before-after.png from the demo scenario, run through the real code in-process.

    pip install -e '.[docs]'
    python docs/make_picture.py            # writes docs/before-after.png

The numbers are not drawn by hand: the demo daemon (`immich_gpu_exporter.demo`) runs one
CPU-then-CUDA loop on a manual clock, its journal lines go through the journal parser, its queue
answers through the Immich API decoding and timing code, its NVML readings through attribution.
The bars are what the dashboard's "Seconds per job by queue and provider" panel computes from
those counters; the reference bands are the guide's expected ranges (grafana/build_dashboard.py).
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from immich_gpu_exporter import config, demo  # noqa: E402

OUT = ROOT / "docs" / "before-after.png"
QUEUES = ("smartSearch", "faceDetection", "ocr")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# The guide's "Expected Performance Improvements" (also the dashboard's reference text): CPU value,
# CUDA range, in seconds per job. It gives no figure for OCR.
GUIDE = {"smartSearch": (2.0, (0.4, 1.0)), "faceDetection": (1.5, (0.3, 0.8))}


async def _measure() -> dict[str, Any]:
    clock = demo.ManualClock()
    daemon = demo.build_daemon(config.defaults(), clock, strict_samples=True)
    for s in daemon.sources:
        await s.start()
    timeline: list[tuple[float, dict[str, float], str]] = []
    try:
        while clock.t <= demo.PERIOD - demo.INTERVAL:
            for s in daemon.sources:
                await daemon.collect_source(s)
            snap = daemon.snapshot
            mem = dict(snap.facts("nvml").get("component_gpu_memory") or {})
            timeline.append((clock.t, mem, snap.facts("journal").get("effective_provider") or ""))
            clock.advance(demo.INTERVAL)
        totals: dict[tuple[str, str, str], float] = {}
        for s in snap.sources["immich"].samples:
            if s.name in ("immich_queue_active_job_seconds_total", "immich_queue_jobs_processed_total"):
                lab = dict(s.labels)
                totals[(s.name, lab["queue"], lab["provider"])] = s.value
    finally:
        await daemon.close_sources()
    per_job = {}
    for q in QUEUES:
        for p in (CPU, CUDA):
            jobs = totals.get(("immich_queue_jobs_processed_total", q, p), 0.0)
            if jobs:
                per_job[(q, p)] = totals[("immich_queue_active_job_seconds_total", q, p)] / jobs
    return {"per_job": per_job, "timeline": timeline}


def measure() -> dict[str, Any]:
    """Seconds per job by (queue, provider) and a (time, GPU memory by component, provider) timeline."""
    return asyncio.run(_measure())


def draw(data: dict[str, Any], out: pathlib.Path = OUT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    orange, green, band = "#e8772e", "#3a9d4f", "#9fd3a9"
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6.0), gridspec_kw={"width_ratios": [1.15, 1]})
    fig.suptitle("Immich machine learning before / after: CPU fallback vs CUDA", fontsize=15, fontweight="bold")
    fig.text(0.5, 0.915, "immich-gpu-exporter demo data, measured by the exporter's own parsing and timing code "
             "(what the Grafana dashboard shows)", ha="center", fontsize=9.5, color="#555")

    # --- left: seconds per job, CPU vs CUDA, with the guide's expected ranges --------------------
    per_job = data["per_job"]
    h = 0.36
    for i, q in enumerate(QUEUES):
        y = len(QUEUES) - 1 - i
        cpu, cuda = per_job.get((q, CPU)), per_job.get((q, CUDA))
        if q in GUIDE:
            cpu_ref, (lo, hi) = GUIDE[q]
            left.add_patch(Rectangle((lo, y - h - 0.02), hi - lo, h + 0.04, color=band, alpha=0.55, zorder=0))
            left.plot([cpu_ref, cpu_ref], [y + 0.01, y + h + 0.03], color="#333", ls="--", lw=1.3, zorder=3)
        for value, dy, color in ((cpu, h / 2, orange), (cuda, -h / 2, green)):
            if value is None:
                continue
            left.barh(y + dy, value, height=h * 0.9, color=color, zorder=2)
            left.text(value + 0.04, y + dy, f"{value:.2f} s", va="center", fontsize=9.5)
        if cpu and cuda:
            left.text(max(cpu, 2.2) + 0.45, y, f"{cpu / cuda:.1f}x\nfaster", va="center", ha="center",
                      fontsize=11, fontweight="bold", color=green)
    left.set_yticks(range(len(QUEUES)), [q if q in GUIDE else f"{q}\n(no guide figure)" for q in reversed(QUEUES)],
                    fontsize=10.5)
    left.set_xlabel("seconds per job (job-seconds / jobs finished)")
    left.set_xlim(0, 3.3)
    left.set_ylim(-0.6, len(QUEUES) - 0.4)
    left.set_title("Seconds per job by queue and execution provider", fontsize=11.5)
    left.grid(axis="x", alpha=0.3)
    left.legend(handles=[Patch(color=orange, label="CPU (fallback) measured"), Patch(color=green, label="CUDA measured"),
                         Patch(color=band, alpha=0.55, label="guide: CUDA expected range"),
                         plt.Line2D([], [], color="#333", ls="--", label="guide: CPU seconds per job")],
                loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=9, frameon=False)

    # --- right: GPU memory by component over the loop ------------------------------------------
    t = [x[0] for x in data["timeline"]]
    gib = 1024 ** 3
    comps = (("ml", "Immich ML (immich-machine-learning)", green), ("server", "Immich server (NVENC ffmpeg)", "#4a78c2"),
             ("other", "other GPU users (Xorg, frigate)", "#b0b0b0"))
    right.stackplot(t, *[[x[1].get(c, 0) / gib for x in data["timeline"]] for c, _, _ in comps],
                    labels=[label for _, label, _ in comps], colors=[c for _, _, c in comps], alpha=0.85)
    right.axvspan(0, demo.CUDA_AT, color=orange, alpha=0.10, zorder=0)
    right.axvspan(demo.CUDA_AT, demo.PERIOD, color=green, alpha=0.08, zorder=0)
    top = 2.4
    right.text(demo.CUDA_AT / 2, top * 0.93, "CUDA preferred, cuDNN missing:\nONNX Runtime runs on the CPU\n"
               "(immich_ml_cpu_fallback = 1)", ha="center", va="top", fontsize=8.5, color="#a04a10")
    right.text((demo.CUDA_AT + demo.PERIOD) / 2, top * 0.93, "fixed, ML unit restarted:\nCUDA, ~1.2 GB held by the "
               "ML worker\n(immich_ml_cpu_fallback = 0)", ha="center", va="top", fontsize=8.5, color="#1f6b31")
    for x, what in ((14.0, "worker\nOOM-killed"), (70.0, "idle\nshutdown")):
        right.axvline(x, color="#666", ls=":", lw=1)
        right.text(x + 0.8, top * 0.62, what, fontsize=8, color="#444")
    right.set_xlim(0, demo.PERIOD)
    right.set_ylim(0, top)
    right.set_xlabel("scenario time (s); the demo compresses a backlog run into tens of seconds")
    right.set_ylabel("GPU memory (GiB)")
    right.set_title("GPU memory by Immich component (NVML, attributed by cgroup)", fontsize=11.5)
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=9, frameon=False)
    right.grid(alpha=0.3)

    fig.tight_layout(rect=(0, 0, 1, 0.91))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    data = measure()
    draw(data)
    for (q, p), v in sorted(data["per_job"].items()):
        print(f"{q:14} {p:22} {v:.2f} s/job")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
