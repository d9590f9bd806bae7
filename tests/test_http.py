"""The real daemon over HTTP: endpoints, content negotiation, hung sources, clean shutdown."""

from __future__ import annotations

import gzip
import signal
import socket
import threading
import time

from tests.support.exposition import parse, value
from tests.support.journal import fixture, write_journal
from tests.support.proc import Exporter, free_port, http_get, run_cli, wait_for

ALL_OFF_BUT_IMMICH = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.journal"]


class BlackHole:
    """A TCP server that accepts connections and never answers: a hung Immich."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_once_without_gpu_systemd_or_immich_reports_every_source_down(tmp_path):
    port = free_port()  # nothing listens there
    r = run_cli(["--once", f"--immich.url=http://127.0.0.1:{port}", f"--immich.ml-url=http://127.0.0.1:{port}",
                 f"--state.directory={tmp_path}"])
    assert r.returncode == 0, r.stderr
    parsed = parse(r.stdout)
    for source in ("nvml", "systemd", "journal", "immich"):
        assert value(parsed, "immich_gpu_exporter_source_up", source=source) == 0, source
    assert value(parsed, "immich_gpu_exporter_build_info") == 1
    assert value(parsed, "immich_gpu_exporter_source_errors_total", source="nvml", reason="library_not_found") == 1
    assert value(parsed, "immich_gpu_exporter_source_errors_total", source="systemd", reason="no_bus") == 1


def test_endpoints_and_content_negotiation():
    port = free_port()
    with Exporter([*ALL_OFF_BUT_IMMICH, f"--immich.url=http://127.0.0.1:{port}"]) as ex:
        status, headers, body = http_get(ex.url + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert b"immich_gpu_exporter_source_up" in body
        status, headers, zbody = http_get(ex.url + "/metrics", {"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") == "gzip"
        assert b"immich_gpu_exporter_source_up" in gzip.decompress(zbody)
        status, headers, _ = http_get(ex.url + "/metrics", {"Accept-Encoding": "gzip;q=0"})
        assert "Content-Encoding" not in headers
        status, headers, om = http_get(ex.url + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
        assert headers["Content-Type"].startswith("application/openmetrics-text") and om.endswith(b"# EOF\n")
        assert http_get(ex.url + "/-/healthy")[0] == 200
        assert http_get(ex.url + "/-/ready")[0] == 200
        status, headers, page = http_get(ex.url + "/")
        assert status == 200 and b"immich-gpu-exporter" in page and b"immich" in page and b"down" in page
        assert http_get(ex.url + "/nope")[0] == 404


def test_hung_immich_never_blocks_the_scrape():
    hole = BlackHole()
    try:
        args = [*ALL_OFF_BUT_IMMICH, f"--immich.url=http://127.0.0.1:{hole.port}",
                f"--immich.ml-url=http://127.0.0.1:{hole.port}", "--immich.timeout=1",
                "--immich.interval=0.2"]
        with Exporter(args) as ex:
            def timed_out_twice():
                return (value(ex.metrics(), "immich_gpu_exporter_source_errors_total", source="immich",
                              reason="timeout") or 0) >= 2
            wait_for(timed_out_twice, 15, what="two timeouts of the hung source")
            # the source is hung right now, yet every scrape answers from the cache
            for _ in range(20):
                status, _, body = http_get(ex.url + "/metrics", timeout=2)
                assert status == 200 and b'immich_gpu_exporter_source_up{source="immich"} 0.0' in body
    finally:
        hole.close()


def test_sigterm_during_a_scrape_exits_0_without_waiting_for_the_scrapers(tmp_path):
    # every source enabled; the journal source follows a real journal file with a live journalctl
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    write_journal(journal_dir / "system.journal", fixture("cuda_ok.export"))
    port = free_port()
    ex = Exporter([f"--immich.url=http://127.0.0.1:{port}", f"--journal.directory={journal_dir}",
                   f"--state.directory={tmp_path / 'state'}"], log_path=tmp_path / "exporter.log").start()
    wait_for(lambda: value(ex.metrics(), "immich_gpu_exporter_source_up", source="journal") == 1, 10,
             what="journal source up")
    stop = threading.Event()

    def scrape_loop():
        while not stop.is_set():
            try:
                http_get(ex.url + "/metrics", timeout=2)
            except OSError:
                pass

    t = threading.Thread(target=scrape_loop)
    t.start()
    # plus a scrape caught half-way: request line sent, headers not finished
    half = socket.create_connection(("127.0.0.1", ex.port))
    half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    time.sleep(0.3)
    ex.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    # A hang guard, not a speed bound: shutdown is bounded by the exporter's own deadlines (sources
    # 1.5 s, open connections 0.5 s) where aiohttp alone would wait 60 s for the half-open scrape.
    rc = ex.proc.wait(timeout=30)  # type: ignore[union-attr]
    stop.set()
    t.join()
    half.close()
    assert rc == 0
    ex.stop()  # closes the log file
    log = ex.logs()
    assert "shutting down" in log and "did not stop within" not in log, log[-2000:]
    assert (tmp_path / "state").exists() and any((tmp_path / "state").iterdir()), "journal state saved at shutdown"


def test_sigint_exits_0():
    port = free_port()
    ex = Exporter([*ALL_OFF_BUT_IMMICH, f"--immich.url=http://127.0.0.1:{port}"]).start()
    assert ex.stop(signal.SIGINT) == 0


def test_port_in_use_is_one_clear_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli([f"--web.listen-address=127.0.0.1:{port}", *ALL_OFF_BUT_IMMICH], timeout=20)
    assert r.returncode == 1
    assert "cannot listen on" in r.stderr and "Traceback" not in r.stderr


def test_journald_friendly_logging_has_priority_prefix_and_no_timestamp():
    port = free_port()
    r = run_cli(["--once", "--no-collector.nvml", "--no-collector.systemd", "--no-collector.journal",
                 f"--immich.url=http://127.0.0.1:{port}"], env={"JOURNAL_STREAM": "8:1234"})
    lines = [line for line in r.stderr.splitlines() if line]
    assert lines and all(line.startswith("<") for line in lines), r.stderr
    assert any(line.startswith("<4>source immich is down") for line in lines)
