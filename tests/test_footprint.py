"""What the daemon keeps out of memory (figures: BENCHMARKS.md, "Resident memory").

Seen from outside, in the shared objects the running exporter has mapped (/proc/<pid>/maps): the
TLS stack only where a URL needs it, and pystemd's sd-bus binding without lxml. (client_python,
pure Python, is checked in tests/test_exposition.py.)
"""

from __future__ import annotations

import pathlib

from tests.support.proc import Exporter, wait_for


def mapped(e: Exporter) -> str:
    assert e.proc is not None
    return pathlib.Path(f"/proc/{e.proc.pid}/maps").read_text()


def test_without_an_https_url_no_tls_and_no_lxml_are_loaded(tmp_path):
    with Exporter([f"--state.directory={tmp_path}"]) as e:
        wait_for(lambda: "dbuslib" in mapped(e), 10, what="the systemd source loaded pystemd's binding")
        maps = mapped(e)
        assert "_ssl." not in maps and "libssl" not in maps
        assert "lxml" not in maps
        assert "immich_gpu_exporter_source_up" in e.metrics()


def test_an_https_immich_url_keeps_tls(tmp_path):
    with Exporter([f"--state.directory={tmp_path}", "--immich.url=https://127.0.0.1:9"]) as e:
        assert "_ssl." in mapped(e)
        # the Immich source is down for the right reason (nothing listens), not for lack of TLS
        wait_for(lambda: 'reason="unreachable",source="immich"' in e.metrics(), 10, what="immich unreachable")
