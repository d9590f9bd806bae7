"""aiohttp app: /metrics (cached bytes), / (landing page), /-/healthy, /-/ready, and the listener.

Handlers only read what the daemon already rendered; nothing here collects or renders.

`Listener` accepts connections itself instead of aiohttp's TCPSite, because a metrics port reachable
from the network must survive slowloris: it keeps a table of connections capped below the
file-descriptor limit (accept() never fails with EMFILE), closes a connection whose request line and
headers have not arrived within HEADER_TIMEOUT, and when the table is full closes the oldest idle or
half-sent connection to admit the new one, so a scrape that arrives then is still served. A
connection in the middle of a request is never closed. accept() errors are logged once per kind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import html
import logging
import resource
import socket
import time
from typing import Any, Callable

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


DEMO_BANNER = ('<p class=demo>DEMO: every value here is a built-in replay (<code>immich-gpu-exporter demo</code>), '
               'not read from this host. Do not let a real Prometheus scrape it.</p>')


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
.up{{color:#080}}.down{{color:#b00}}.starting{{color:#888}}
.demo{{background:#b00;color:#fff;font-weight:bold;padding:.6em 1em}}</style></head>
<body>{DEMO_BANNER if snapshot.build.get("mode") == "demo" else ""}<h1>immich-gpu-exporter {html.escape(__version__)}</h1>
<p>Is Immich on the GPU? Per-process GPU use, unit states, the ONNX execution provider and job timings.</p>
<p><a href="metrics">Metrics</a> &middot; <a href="-/healthy">healthy</a> &middot; <a href="-/ready">ready</a></p>
<table><tr><th>source</th><th>status</th><th>last success</th><th>series</th><th>last error</th></tr>
{''.join(rows)}
</table>{_latency_html(snapshot)}</body></html>
"""


def _latency_html(snapshot) -> str:  # type: ignore[no-untyped-def]
    """What the latency panels can show, and what to enable when they cannot (docs/latency.md)."""
    from .check import latency_advice

    status = snapshot.facts("immich").get("latency")
    if not status:
        return ""
    items = []
    for worker in ("api", "microservices"):
        one = status.get(worker, {"status": "not_configured"})
        what = {"ok": "repository durations read", "no_repo": "telemetry without repository durations",
                "unreachable": "telemetry not readable", "not_configured": "telemetry URL not set"}.get(
                    one.get("status"), "?")
        advice = latency_advice(worker, one)
        items.append(f"<li>{html.escape(worker)}: {html.escape(what)}"
                     + (f" &mdash; {html.escape(advice)}" if advice else "") + "</li>")
    return "<h2>Latency (Smart Search, ML calls)</h2><ul>" + "".join(items) + "</ul>"


async def landing(request: web.Request) -> web.Response:
    snap = request.app[DAEMON_KEY].snapshot  # type: ignore[attr-defined]
    return web.Response(text=landing_html(snap), content_type="text/html")


log = logging.getLogger("immich_gpu_exporter.http")

HEADER_TIMEOUT = 10.0  # seconds from connect (or the end of the last request) to a complete request head
KEEPALIVE_TIMEOUT = 75.0  # an idle keep-alive connection (Prometheus scrapes at least every few minutes)
MAX_CONNECTIONS = 256  # a metrics endpoint has a handful of scrapers; more is an attack or a leak
FD_RESERVE = 64  # descriptors kept free for journalctl pipes, D-Bus, NVML, the Immich client, state files


def connection_cap(max_connections: int = MAX_CONNECTIONS) -> int:
    """How many client connections to hold at once: below RLIMIT_NOFILE, so accept() cannot hit EMFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(4, min(max_connections, soft - FD_RESERVE))


@dataclasses.dataclass(eq=False)
class Connection:
    sock: socket.socket
    peer: Any
    opened: float
    transport: Any = None  # set once connected (after the TLS handshake, if any)
    task: "asyncio.Task[Any] | None" = None  # the (TLS) set-up, until connected
    pending_since: float | None = None  # waiting for a request head since then
    busy: int = 0  # requests being handled
    last_active: float = 0.0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        else:
            if self.task is not None:
                self.task.cancel()
            try:
                self.sock.close()
            except OSError:
                pass


class _Tracked(asyncio.Protocol):
    """Forwards to aiohttp's protocol and tells the Listener when a request head is awaited."""

    def __init__(self, inner: asyncio.Protocol, conn: Connection, listener: "Listener") -> None:
        self.inner, self.conn, self.listener = inner, conn, listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.transport = transport
        self.conn.task = None
        self.conn.pending_since = self.conn.last_active = time.monotonic()
        self.listener.by_transport[transport] = self.conn
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        c = self.conn
        c.last_active = time.monotonic()
        if not c.busy and c.pending_since is None:
            c.pending_since = c.last_active
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.forget(self.conn)
        self.inner.connection_lost(exc)


_ACCEPT_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPERM,
                     errno.EPROTO, errno.ENETDOWN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}


class Listener:
    """Owns the listening sockets and the table of client connections (see the module docstring)."""

    def __init__(self, protocol_factory: Callable[[], asyncio.Protocol], ssl_context: Callable[[], Any] = lambda: None,
                 cap: int | None = None, header_timeout: float = HEADER_TIMEOUT) -> None:
        self.protocol_factory = protocol_factory
        self.ssl_context = ssl_context
        self.cap = cap or connection_cap()
        self.header_timeout = header_timeout
        self.conns: dict[Connection, None] = {}  # insertion order = age
        self.by_transport: dict[Any, Connection] = {}
        self.sockets: list[socket.socket] = []
        self.evicted = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._accept_errors_logged: set[int] = set()

    # -- listening -----------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        seen = set()
        try:
            for family, type_, proto, _, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                sock = socket.socket(family, type_, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if len(infos) > 1 else 0)
                sock.bind(addr)
                sock.listen(128)
                sock.setblocking(False)
        except OSError:
            self.close_sockets()
            raise
        for sock in self.sockets:
            self._tasks.append(asyncio.create_task(self._accept_loop(sock), name="http-accept"))
        self._tasks.append(asyncio.create_task(self._sweep(), name="http-sweep"))
        return [s.getsockname()[:2] for s in self.sockets]

    def close_sockets(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets.clear()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.close_sockets()
        for c in list(self.conns):
            if c.transport is None:
                c.close()

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while len(self.conns) >= self.cap and not self.evict_one():
                await asyncio.sleep(0.05)  # every connection is busy: let the kernel backlog hold new ones
            try:
                sock, peer = await loop.sock_accept(lsock)
            except OSError as e:
                self._accept_failed(e)
                self.evict_one()
                await asyncio.sleep(0.1)
                continue
            self._admit(sock, peer)

    def _accept_failed(self, e: OSError) -> None:
        code = e.errno or 0
        if code not in self._accept_errors_logged:
            self._accept_errors_logged.add(code)
            log.warning("http: accept() failed: %s; retrying (each kind of accept error is logged once)",
                        e.strerror or e)

    def _admit(self, sock: socket.socket, peer: Any) -> None:
        now = time.monotonic()
        conn = Connection(sock, peer, now, pending_since=now, last_active=now)
        self.conns[conn] = None
        ctx = self.ssl_context()
        loop = asyncio.get_running_loop()
        kw: dict[str, Any] = {"ssl": ctx, "ssl_handshake_timeout": self.header_timeout} if ctx is not None else {}
        conn.task = asyncio.create_task(loop.connect_accepted_socket(
            lambda: _Tracked(self.protocol_factory(), conn, self), sock, **kw))
        conn.task.add_done_callback(lambda t, c=conn: self._connected(t, c))

    def _connected(self, task: "asyncio.Task[Any]", conn: Connection) -> None:
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.debug("http: connection from %s failed to set up: %s", conn.peer, task.exception())
            self.forget(conn)
            try:
                conn.sock.close()
            except OSError:
                pass

    def forget(self, conn: Connection) -> None:
        self.conns.pop(conn, None)
        if conn.transport is not None:
            self.by_transport.pop(conn.transport, None)

    # -- the table -----------------------------------------------------------------------------
    def evict_one(self) -> bool:
        """Close the oldest connection that is idle or still sending its request head."""
        victim = None
        for c in self.conns:  # oldest first
            if not c.busy:
                victim = c
                break
        if victim is None:
            return False
        self.evicted += 1
        self.forget(victim)
        victim.close()
        return True

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.header_timeout / 4))
            deadline = time.monotonic() - self.header_timeout
            for c in [c for c in self.conns if not c.busy and c.pending_since is not None
                      and c.pending_since < deadline]:
                self.forget(c)
                c.close()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        conn = self.by_transport.get(request.transport)
        if conn is None:
            return await handler(request)
        conn.busy += 1
        conn.pending_since = None
        try:
            return await handler(request)
        finally:
            conn.busy -= 1
            conn.pending_since = None
            conn.last_active = time.monotonic()


def auth_middleware(auth: Any) -> Any:
    """Basic auth on every path (as exporter-toolkit does), when the web config names users."""

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if not auth.watcher.current.auth:
            return await handler(request)
        ok = await auth.allowed(request.headers.get("Authorization"))
        if ok:
            return await handler(request)
        if ok is None:
            return web.Response(status=503, text="too many authentication attempts at once\n",
                                headers={"Retry-After": "1"})
        return web.Response(status=401, text="Unauthorized\n",
                            headers={"WWW-Authenticate": 'Basic realm="immich-gpu-exporter", charset="UTF-8"'})

    return check


def make_app(daemon: object, middlewares: tuple[Any, ...] = ()) -> web.Application:
    app = web.Application(middlewares=middlewares)
    app[DAEMON_KEY] = daemon
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", landing)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    return app
