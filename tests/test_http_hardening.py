"""The HTTP listener under attack: slowloris beyond the fd limit, malformed requests, SIGHUP (issue 14)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import socket
import time

import pytest
from aiohttp import web

from immich_gpu_exporter.http import Listener
from tests.support.proc import Exporter, http_get, wait_for

ONLY_IMMICH = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.journal",
               "--immich.url=http://127.0.0.1:9", "--immich.ml-url=http://127.0.0.1:9", "--immich.interval=1"]
FD_LIMIT = 160  # the exporter's soft RLIMIT_NOFILE in these tests; attackers open more connections


@contextlib.contextmanager
def soft_fd_limit(n: int):
    """Children started inside inherit a soft RLIMIT_NOFILE of n; this process gets its own back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def half_open(port: int, n: int) -> list[socket.socket]:
    """n connections that each send the start of a request head and never finish it."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        out.append(s)
    time.sleep(0.2)
    for s in out:
        with contextlib.suppress(OSError):
            s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    return out


def test_scrape_is_served_while_more_half_open_connections_than_fds_are_held(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * FD_LIMIT:
        pytest.skip(f"needs a hard fd limit of at least {4 * FD_LIMIT}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * FD_LIMIT), hard))
    with soft_fd_limit(FD_LIMIT):
        exporter = Exporter(ONLY_IMMICH, log_path=tmp_path / "exporter.log")
        exporter.start()
    attackers: list[socket.socket] = []
    try:
        for _ in range(3):  # waves of slowloris: each wave more than the whole fd table
            attackers += half_open(exporter.port, FD_LIMIT + 40)
            for s in attackers:  # keep trickling, as slowloris does
                with contextlib.suppress(OSError):
                    s.send(b"X-a: b\r\n")
            status, _, body = http_get(exporter.url + "/metrics", timeout=10)
            assert status == 200 and b"immich_gpu_exporter_source_up" in body
        assert exporter.proc.poll() is None
    finally:
        for s in attackers:
            s.close()
        exporter.stop()
    logs = exporter.logs()
    assert "Traceback" not in logs
    assert len(logs.splitlines()) < 20, logs[-3000:]


def test_malformed_requests_log_one_line_without_traceback(tmp_path):
    with Exporter(ONLY_IMMICH, log_path=tmp_path / "exporter.log") as exporter:
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", exporter.port)) as s:
                s.sendall(b"GET / HTTP/1.1\r\nthis is no header\r\n\r\n")
                s.settimeout(5)
                assert b" 400 " in s.recv(100)
        assert http_get(exporter.url + "/-/healthy")[0] == 200
    lines = [ln for ln in exporter.logs().splitlines() if "http:" in ln]
    assert "Traceback" not in exporter.logs()
    assert 1 <= len(lines) <= 3, lines  # rate limited to one a second, the rest counted
    assert "Bad" in lines[0] or "Invalid" in lines[0]


def test_sighup_does_not_end_the_daemon(tmp_path):
    with Exporter(ONLY_IMMICH, log_path=tmp_path / "exporter.log") as exporter:
        exporter.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert exporter.proc.poll() is None
        assert http_get(exporter.url + "/-/healthy")[0] == 200
        wait_for(lambda: "SIGHUP" in exporter.logs(), timeout=5)


async def ok_runner() -> web.AppRunner:
    """An aiohttp app answering GET / with "ok", set up for a Listener to serve."""
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    return runner


async def test_half_sent_request_head_is_closed_after_the_header_timeout():
    runner = await ok_runner()
    listener = Listener(runner.server, cap=8, header_timeout=0.5)
    (host, port), *_ = await listener.start("127.0.0.1", 0)
    try:
        slow_r, slow_w = await asyncio.open_connection(host, port)
        slow_w.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        assert await asyncio.wait_for(slow_r.read(), 10) == b""  # closed by the listener
        waited = time.monotonic() - t0
        fast_r, fast_w = await asyncio.open_connection(host, port)
        fast_w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(fast_r.read(), 10)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
        assert waited >= 0.5
        fast_w.close()
        slow_w.close()
    finally:
        await listener.close()
        await runner.cleanup()


async def test_full_table_evicts_the_oldest_idle_connection_never_a_busy_one():
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    listener_box: list[Listener] = []

    @web.middleware
    async def track(request, handler):  # type: ignore[no-untyped-def]
        return await listener_box[0].middleware(request, handler)

    app = web.Application(middlewares=[track])
    app.router.add_get("/slow", slow)
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listener = Listener(runner.server, cap=3, header_timeout=30)
    listener_box.append(listener)
    (host, port), *_ = await listener.start("127.0.0.1", 0)
    try:
        busy_r, busy_w = await asyncio.open_connection(host, port)
        busy_w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.2)
        idle = [await asyncio.open_connection(host, port) for _ in range(4)]
        for _, w in idle:
            w.write(b"GET / HTTP/1.1\r\nHo")
        await asyncio.sleep(0.2)
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(r.read(), 10)).endswith(b"ok")
        assert listener.evicted >= 3
        release.set()
        head = await asyncio.wait_for(busy_r.readuntil(b"slow"), 10)
        assert head.startswith(b"HTTP/1.1 200")  # the busy connection survived every eviction
        for _, iw in idle:
            iw.close()
        busy_w.close()
        w.close()
    finally:
        await listener.close()
        await runner.cleanup()


async def test_stalled_tls_handshakes_are_bounded_and_a_tls_scrape_is_still_served(tmp_path):
    """TLS on (the web config): a client that connects and never finishes the handshake is in the
    connection table from accept on, so it is closed after the header timeout and evicted first when the
    table is full; a real TLS client is served meanwhile."""
    import ssl

    from tests.test_web_config import make_cert

    cert, key = make_cert(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    runner = await ok_runner()
    listener = Listener(runner.server, ssl_context=lambda: server_ctx, cap=4, header_timeout=0.5)
    (host, port), *_ = await listener.start("127.0.0.1", 0)
    try:
        # one client stalls before the handshake, one stalls inside it (a partial ClientHello)
        silent_r, silent_w = await asyncio.open_connection(host, port)
        partial_r, partial_w = await asyncio.open_connection(host, port)
        partial_w.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        t0 = time.monotonic()
        assert await asyncio.wait_for(silent_r.read(), 10) == b""
        assert await asyncio.wait_for(partial_r.read(), 10) == b""
        assert time.monotonic() - t0 >= 0.4  # closed by the timeout, not at once
        # more stalled handshakes than the table holds: the oldest are evicted, a real scrape gets in
        stalled = [await asyncio.open_connection(host, port) for _ in range(8)]
        await asyncio.sleep(0.1)
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=client_ctx,
                                                              server_hostname="127.0.0.1"), 10)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(r.read(), 10)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
        assert listener.evicted >= 4
        assert len(listener.conns) <= 4
        for _, sw in stalled:
            sw.close()
        for wr in (silent_w, partial_w, w):
            wr.close()
    finally:
        await listener.close()
        await runner.cleanup()
