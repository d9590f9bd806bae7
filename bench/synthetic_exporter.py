"""The real daemon and HTTP stack with one synthetic source of N series (for bench_scrape.py)."""

from __future__ import annotations

import asyncio
import sys

from immich_gpu_exporter import cli
from immich_gpu_exporter.config import defaults
from immich_gpu_exporter.core import CollectResult, sample
from immich_gpu_exporter.daemon import Daemon
from immich_gpu_exporter.sources.base import Source

STATES = ("waiting", "active", "delayed", "failed", "paused")


class Synthetic(Source):
    name = "immich"

    def __init__(self, n: int) -> None:
        super().__init__(defaults(), None)  # type: ignore[arg-type]
        self.n = n
        self.tick = 0

    @property
    def interval(self) -> float:
        return 1.0

    async def collect(self) -> CollectResult:
        # the values change every cycle, so the renderer really re-renders once per second
        self.tick += 1
        out = [sample("immich_queue_jobs", (i * 7 + self.tick) % 100, queue=f"queue{i // len(STATES)}",
                      state=STATES[i % len(STATES)]) for i in range(self.n)]
        return CollectResult(tuple(out))


def main() -> None:
    addr, n = sys.argv[1], int(sys.argv[2])
    cfg = defaults().replace(web_listen_address=addr)
    asyncio.run(cli.serve_async(cfg, Daemon([Synthetic(n)])))


if __name__ == "__main__":
    main()
