"""A fake Immich machine-learning service with KNOWN latencies, for running the real Immich server
against it (tests/fixtures/real-server/v3.1.0/README.md).

It answers what Immich v3.1.0's MachineLearningRepository sends (server/src/repositories/
machine-learning.repository.ts): `GET /ping` and `POST /predict`, a multipart form with `entries` (the
JSON request: clip textual/visual, facial-recognition, ocr) and `text` or `image`. Answers have the
shapes the server decodes: a CLIP embedding as a JSON string of `--dim` floats, faces with a bounding
box, a score and an embedding, OCR boxes and texts. Each call waits a fixed delay per task before
answering, so the server's repository durations can be checked against known values; every call is
logged as one JSON line (task, delay, start, end).

    python -m tests.support.fake_ml --port 3003 --log calls.jsonl --delay text=0.04 --delay image=0.12
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time

from aiohttp import web

DEFAULT_DELAYS = {"text": 0.040, "image": 0.120, "faces": 0.080, "ocr": 0.060}


def embedding(seed: str, dim: int) -> str:
    rng = random.Random(seed)
    v = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return json.dumps([round(x / norm, 6) for x in v])


def task_of(entries: dict) -> str:
    if "facial-recognition" in entries:
        return "faces"
    if "ocr" in entries:
        return "ocr"
    clip = entries.get("clip", {})
    return "text" if "textual" in clip else "image"


def make_app(delays: dict[str, float], dim: int, log_path: str | None) -> web.Application:
    calls = 0

    async def ping(_: web.Request) -> web.Response:
        return web.Response(text="pong")

    async def predict(request: web.Request) -> web.Response:
        nonlocal calls
        start = time.time()
        form = await request.post()
        entries = json.loads(form["entries"])  # type: ignore[arg-type]
        task = task_of(entries)
        calls += 1
        await asyncio.sleep(delays[task])
        size = {"imageHeight": 480, "imageWidth": 640}
        if task == "text":
            body: dict = {"clip": embedding(str(form.get("text")), dim)}
        elif task == "image":
            body = {"clip": embedding(f"image{calls}", dim), **size}
        elif task == "faces":
            body = {"facial-recognition": [{"boundingBox": {"x1": 100, "y1": 80, "x2": 220, "y2": 230},
                                            "embedding": embedding(f"face{calls}", 512), "score": 0.92}], **size}
        else:
            body = {"ocr": {"text": ["immich"], "box": [10, 10, 120, 10, 120, 40, 10, 40], "boxScore": [0.9],
                            "textScore": [0.95]}, **size}
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps({"task": task, "delay_s": delays[task], "start": start, "end": time.time()}) + "\n")
        return web.json_response(body)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/ping", ping)
    app.router.add_post("/predict", predict)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3003)
    p.add_argument("--dim", type=int, default=512, help="CLIP embedding size (512 for ViT-B-32__openai)")
    p.add_argument("--log", default=None, help="file to append one JSON line per call to")
    p.add_argument("--delay", action="append", default=[], help="TASK=SECONDS (text, image, faces, ocr)")
    a = p.parse_args()
    delays = dict(DEFAULT_DELAYS)
    for d in a.delay:
        k, _, v = d.partition("=")
        delays[k] = float(v)
    web.run_app(make_app(delays, a.dim, a.log), host=a.host, port=a.port, print=None)


if __name__ == "__main__":
    main()
