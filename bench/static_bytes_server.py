"""The floor for serving cached bytes: an aiohttp app that answers every GET /metrics with the same
bytes (and their gzip, when asked), read once from a file, for bench_scrape.py.

It is what our /metrics would cost with no daemon, no snapshot and no renderer behind it: the
HTTP stack alone (aiohttp, as ours), serving the same body.

    python bench/static_bytes_server.py HOST:PORT FILE
"""

from __future__ import annotations

import gzip
import sys

from aiohttp import web


def main() -> None:
    addr, path = sys.argv[1], sys.argv[2]
    body = open(path, "rb").read()
    body_gzip = gzip.compress(body, compresslevel=6, mtime=0)
    content_type = "text/plain; version=0.0.4; charset=utf-8"

    async def metrics(request: web.Request) -> web.Response:
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=body_gzip, headers={"Content-Type": content_type, "Content-Encoding": "gzip"})
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    host, _, port = addr.rpartition(":")
    web.run_app(app, host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
