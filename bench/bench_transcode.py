"""Cost of reading the server's transcoding lines in the journal source (python side, no pipe).

    PYTHONPATH=. python bench/bench_transcode.py [ENTRIES] [RUNS]

Entries as `journalctl -o json` prints them (coloured Nest lines arrive as byte arrays), half from
the server unit (Nest lines: 1 in 5 a transcoding line from tests/fixtures/transcode, the others
ordinary server lines), half ML lines. Peer, in the same run: the same `JournalSource.apply_lines`
with the transcode hook replaced by a no-op (what the source did before). Reported: entries/s,
medians of RUNS.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from immich_gpu_exporter import config as configmod  # noqa: E402
from immich_gpu_exporter.sources.base import Hub  # noqa: E402
from immich_gpu_exporter.sources.journal import JournalSource  # noqa: E402

FIX = ROOT / "tests" / "fixtures" / "transcode" / "nest-11.1.28-console.json"
OTHER = ("\x1b[32m[Nest] 7  - \x1b[39m07/30/2026, 12:40:00 PM \x1b[32m    LOG\x1b[39m \x1b[33m[Microservices:"
         "JobService]\x1b[39m \x1b[32mJob AssetGenerateThumbnails finished\x1b[39m")
ML = "[07/30/26 12:35:12] INFO     Initialized request thread pool with 16 threads."


def json_lines(n: int) -> list[str]:
    video = [x["line"] for x in json.loads(FIX.read_text())["nvenc_fails_every_video"]]
    out = []
    for i in range(n):
        if i % 2:
            out.append(json.dumps({"MESSAGE": ML, "_SYSTEMD_UNIT": "immich-machine-learning.service", "_PID": "4242",
                                   "PRIORITY": "6", "__REALTIME_TIMESTAMP": str(1785415200000000 + i),
                                   "__CURSOR": f"c{i}"}))
        else:
            line = video[(i // 2) % len(video)] if (i // 2) % 5 == 0 else OTHER
            out.append(json.dumps({"MESSAGE": list(line.encode()), "_SYSTEMD_UNIT": "immich-server.service",
                                   "_PID": "7", "PRIORITY": "6", "__REALTIME_TIMESTAMP": str(1785415200000000 + i),
                                   "__CURSOR": f"c{i}"}))
    return out


def rate(lines: list[str], hook: bool) -> float:
    src = JournalSource(configmod.defaults(), Hub(lambda: None))
    if not hook:
        src._server_line = lambda entry: None  # type: ignore[method-assign]
    t0 = time.perf_counter()
    for k in range(0, len(lines), 2000):
        src.apply_lines(lines[k:k + 2000])
    src.flush()
    dt = time.perf_counter() - t0
    if hook:
        assert src.transcode.starts > 0
    return len(lines) / dt


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    lines = json_lines(n)
    without, with_ = [], []
    for _ in range(runs):  # interleaved, so load changes hit both alike
        without.append(rate(lines, False))
        with_.append(rate(lines, True))
    a, b = statistics.median(without), statistics.median(with_)
    print(f"entries: {n} (half server, 1 in 10 a transcoding line), {runs} runs, median")
    print(f"apply_lines without the transcode hook (peer): {a:9.0f} entries/s  {[round(x) for x in without]}")
    print(f"apply_lines with the transcode hook:           {b:9.0f} entries/s  {[round(x) for x in with_]}")
    print(f"with / without: {b / a:.0%}")


if __name__ == "__main__":
    main()
