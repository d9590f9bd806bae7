"""A real Alertmanager (Debian's `prometheus-alertmanager`) on a loopback port, for end-to-end tests."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from typing import Any

from .proc import free_port, http_get, terminate, wait_for

BINARY = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"

CONFIG = """\
route:
  receiver: "null"
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: "null"
"""


class Alertmanager:
    def __init__(self, workdir: pathlib.Path) -> None:
        self.dir = pathlib.Path(workdir) / f"alertmanager-{free_port()}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Alertmanager":
        (self.dir / "am.yml").write_text(CONFIG)
        log = open(self.dir / "alertmanager.log", "wb")
        # --cluster.listen-address= turns off HA gossip, which would otherwise bind 0.0.0.0:9094
        self.proc = subprocess.Popen(
            [BINARY, f"--config.file={self.dir / 'am.yml'}", f"--storage.path={self.dir / 'data'}",
             f"--web.listen-address={self.address}", "--cluster.listen-address=", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def ready() -> bool:
            if self.proc.poll() is not None:  # type: ignore[union-attr]
                raise RuntimeError("alertmanager exited: " + (self.dir / "alertmanager.log").read_text())
            try:
                return http_get(self.url + "/-/ready", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(ready, 20, what="alertmanager ready")
        return self

    def alerts(self) -> list[dict[str, Any]]:
        status, _, body = http_get(self.url + "/api/v2/alerts")
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> None:
        terminate(self.proc)

    def __enter__(self) -> "Alertmanager":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
