"""A real Prometheus (Debian package) scrapes the real daemon; samples are read back over its API."""

from __future__ import annotations

import gzip

from tests.support.prometheus import Prometheus
from tests.support.proc import Exporter, free_port, http_get


def test_real_prometheus_scrapes_the_daemon(tmp_path):
    closed = free_port()
    args = [f"--immich.url=http://127.0.0.1:{closed}", f"--immich.ml-url=http://127.0.0.1:{closed}",
            f"--state.directory={tmp_path}", "--collection.interval=1"]
    with Exporter(args) as ex, Prometheus(tmp_path / "prom", targets={"immich-gpu-exporter": [ex.address]}) as prom:
        prom.wait_for_samples('up{job="immich-gpu-exporter"} == 1')
        build = prom.query("immich_gpu_exporter_build_info")
        assert len(build) == 1 and build[0]["metric"]["version"]
        up = {r["metric"]["source"]: r["value"] for r in prom.query("immich_gpu_exporter_source_up")}
        assert set(up) == {"processes", "nvml", "systemd", "journal", "immich", "docker"}
        reasons = {(r["metric"]["source"], r["metric"]["reason"])
                   for r in prom.query("immich_gpu_exporter_source_errors_total")}
        assert ("nvml", "library_not_found") in reasons and ("systemd", "no_bus") in reasons
        health = prom.targets_health()
        assert health and all(t["health"] == "up" for t in health)
        # Prometheus asks for gzip; the exporter's cached gzip body is what it got
        status, headers, body = http_get(ex.url + "/metrics", {"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") == "gzip" and gzip.decompress(body).startswith(b"# HELP")
