"""aiohttp app: /metrics (cached bytes), / (landing page), /-/healthy, /-/ready.

Handlers only read what the daemon already rendered; nothing here collects or renders.
"""

from __future__ import annotations

import html
import time

from aiohttp import web

from . import __version__, logs
from .metrics import CONTENT_TYPE_OPENMETRICS, CONTENT_TYPE_TEXT

DAEMON_KEY: web.AppKey = web.AppKey("daemon", object)


def _accepts_gzip(request: web.Request) -> bool:
    for part in request.headers.get("Accept-Encoding", "").split(","):
        token, *params = [p.strip() for p in part.split(";")]
        if token.lower() not in ("gzip", "*"):
            continue
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        return q > 0
    return False


def _wants_openmetrics(request: web.Request) -> bool:
    return "application/openmetrics-text" in request.headers.get("Accept", "")


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    r = daemon.rendered  # type: ignore[attr-defined]
    if _wants_openmetrics(request):
        daemon.openmetrics_wanted = True  # type: ignore[attr-defined]
        return web.Response(body=r.openmetrics, headers={"Content-Type": CONTENT_TYPE_OPENMETRICS})
    if _accepts_gzip(request):
        return web.Response(body=r.text_gzip, headers={"Content-Type": CONTENT_TYPE_TEXT,
                                                       "Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
    return web.Response(body=r.text, headers={"Content-Type": CONTENT_TYPE_TEXT, "Vary": "Accept-Encoding"})


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="OK\n")


async def ready(request: web.Request) -> web.Response:
    if request.app[DAEMON_KEY].ready:  # type: ignore[attr-defined]
        return web.Response(text="ready\n")
    return web.Response(status=503, text="first collection cycle not done yet\n")


def landing_html(snapshot) -> str:  # type: ignore[no-untyped-def]
    now = time.time()
    rows = []
    for name, st in sorted(snapshot.sources.items()):
        age = f"{now - st.last_success:.1f}s ago" if st.last_success else "never"
        status = "up" if st.up else ("down" if st.cycles else "starting")
        err = logs.redact(f"{st.last_reason}: {st.last_error}") if st.last_error else ""
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td class={status}>{status}</td>"
            f"<td>{html.escape(age)}</td><td>{len(st.samples)}</td><td>{html.escape(err)}</td></tr>"
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>immich-gpu-exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:left}}
.up{{color:#080}}.down{{color:#b00}}.starting{{color:#888}}</style></head>
<body><h1>immich-gpu-exporter {html.escape(__version__)}</h1>
<p>Is Immich on the GPU? Per-process GPU use, unit states, the ONNX execution provider and job timings.</p>
<p><a href="metrics">Metrics</a> &middot; <a href="-/healthy">healthy</a> &middot; <a href="-/ready">ready</a></p>
<table><tr><th>source</th><th>status</th><th>last success</th><th>series</th><th>last error</th></tr>
{''.join(rows)}
</table></body></html>
"""


async def landing(request: web.Request) -> web.Response:
    snap = request.app[DAEMON_KEY].snapshot  # type: ignore[attr-defined]
    return web.Response(text=landing_html(snap), content_type="text/html")


def make_app(daemon: object) -> web.Application:
    app = web.Application()
    app[DAEMON_KEY] = daemon
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", landing)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    return app
