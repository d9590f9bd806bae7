"""Hostile and mistaken input against the real exporter process: secrets stay secret (issue 14)."""

from __future__ import annotations

from tests.support import exposition
from tests.support.proc import Exporter, free_port, http_get, wait_for

ONLY_IMMICH = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.journal"]


def test_password_in_immich_url_never_reaches_log_page_or_metrics(tmp_path):
    url = f"http://alice:hunter22@127.0.0.1:{free_port()}"  # nothing listens: the source goes down
    with Exporter([*ONLY_IMMICH, f"--immich.url={url}", f"--immich.ml-url={url}", "--immich.interval=0.2",
                   "--immich.timeout=0.5", "--log.level=debug"],
                  env={"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": "key-0123456789"},
                  log_path=tmp_path / "exporter.log") as exporter:
        wait_for(lambda: "unreachable" in http_get(exporter.url + "/")[2].decode(), timeout=15,
                 what="the immich source's error on the landing page")
        page = http_get(exporter.url + "/")[2].decode()
        metrics = exporter.metrics()
    logs = exporter.logs()
    assert exposition.value(metrics, "immich_gpu_exporter_source_up", source="immich") is not None
    for text in (page, metrics, logs):
        assert "hunter22" not in text and "key-0123456789" not in text
    assert "alice:&lt;secret&gt;@127.0.0.1" in page  # the user stays readable, the password does not
