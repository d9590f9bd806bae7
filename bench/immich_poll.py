"""Cost of one immich poll cycle, against the fake Immich on loopback.

Peer: one bare aiohttp GET of /api/queues with the key (the least any queue poller must do),
measured in the same run. Ours: a full ImmichSource.collect() (ping + ML ping + version, then
features + queues + telemetry, decoding, timing update, samples).

    PYTHONPATH=$PWD python bench/immich_poll.py [cycles]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import aiohttp

from tests.support.fake_immich import FakeImmich, QueueSim
from tests.support.immich_source import make_source


async def main(n: int) -> None:
    t0 = time.monotonic()
    sims = [QueueSim(q, concurrency=2, arrivals=[t0] * 100000, job_seconds=0.01)
            for q in ("smartSearch", "faceDetection", "ocr", "thumbnailGeneration")]
    with FakeImmich(queues=sims) as fake:
        src = make_source(fake, immich_telemetry_url=fake.telemetry_url)
        ours, peer = [], []
        async with aiohttp.ClientSession() as s:
            for _ in range(n):
                a = time.perf_counter()
                async with s.get(fake.url + "/api/queues", headers={"x-api-key": "good-key"}) as r:
                    await r.json()
                peer.append(time.perf_counter() - a)
                a = time.perf_counter()
                await src.collect()
                ours.append(time.perf_counter() - a)
        await src.close()
    for name, xs in (("peer: one aiohttp GET /api/queues", peer), ("ours: ImmichSource.collect()", ours)):
        xs.sort()
        print(f"{name:40s} p50 {statistics.median(xs) * 1000:6.2f} ms  p90 {xs[int(len(xs) * 0.9)] * 1000:6.2f} ms")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
