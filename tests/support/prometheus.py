"""A real Prometheus (Debian's `prometheus` 2.42) on a loopback port, for end-to-end tests.

    with Prometheus(tmp_path, targets={"immich-gpu": [exporter.address]},
                    rule_files=[rules_yml], alertmanager_url="127.0.0.1:9093") as prom:
        prom.wait_for_samples("up{job='immich-gpu'} == 1")
        prom.query("sum(rate(...[1m]))")          # -> list of {"metric": {...}, "value": float}
        prom.alerts()                              # -> active alerts (/api/v1/alerts)

Scrape and rule-evaluation intervals default to 1 s. A fresh Prometheus makes the first scraped
sample queryable only after about 5 s (measured in research/feasibility-nvml-prometheus.md), so
wait with `wait_for_*`, never with sleeps. The process is bounded: started on a free port, stopped
(SIGTERM, then SIGKILL) on exit, its data directory lives under the given temporary directory.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import time
import urllib.parse
from typing import Any, Callable, Mapping, Sequence

from .proc import free_port, http_get, terminate, wait_for

BINARY = shutil.which("prometheus") or "/usr/bin/prometheus"


def available() -> bool:
    return shutil.which("prometheus") is not None


class PromQLError(RuntimeError):
    pass


class Prometheus:
    def __init__(self, workdir: pathlib.Path, targets: Mapping[str, Sequence[str]] | Sequence[str],
                 *, scrape_interval: str = "1s", evaluation_interval: str = "1s",
                 rule_files: Sequence[pathlib.Path | str] = (), alertmanager_url: str | None = None,
                 metrics_path: str = "/metrics", extra_args: Sequence[str] = (),
                 target_labels: Mapping[str, Mapping[str, str]] | None = None,
                 job_settings: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.dir = pathlib.Path(workdir) / f"prometheus-{free_port()}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        if not isinstance(targets, Mapping):
            targets = {"immich-gpu-exporter": list(targets)}
        self.targets = {job: list(t) for job, t in targets.items()}
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.rule_files = [str(pathlib.Path(r).resolve()) for r in rule_files]
        self.alertmanager_url = alertmanager_url
        self.metrics_path = metrics_path
        self.extra_args = list(extra_args)
        self.job_settings = dict(job_settings or {})  # per job: scheme, tls_config, basic_auth...
        self.target_labels = {job: dict(v) for job, v in (target_labels or {}).items()}  # job -> static labels
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "prometheus.log"

    # -- config and lifecycle ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.evaluation_interval},
            "scrape_configs": [
                {"job_name": job, "metrics_path": self.metrics_path,
                 "static_configs": [{"targets": t, **({"labels": self.target_labels[job]}
                                                      if job in self.target_labels else {})}],
                 **self.job_settings.get(job, {})}
                for job, t in self.targets.items()
            ],
        }
        if self.rule_files:
            cfg["rule_files"] = self.rule_files
        if self.alertmanager_url:
            am = self.alertmanager_url.split("://", 1)[-1]
            cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [am]}]}]}
        return cfg

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> "Prometheus":
        config_path = self.dir / "prometheus.yml"
        config_path.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [BINARY, f"--config.file={config_path}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._ready, timeout, 0.1, what=f"prometheus ready on {self.url}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.logs()}")
        try:
            return http_get(self.url + "/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        terminate(self.proc)
        self.proc = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP API ------------------------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        status, _, body = http_get(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""), timeout=10)
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            raise PromQLError(f"{path} {params}: HTTP {status}: {doc.get('error', body[:200])}")
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query -> [{"metric": {...}, "value": float}] (a scalar comes back as one row)."""
        data = self.api("query", query=expr, time=at)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": float(data["result"][1])}]
        if data["resultType"] != "vector":
            raise PromQLError(f"{expr}: expected a vector, got {data['resultType']}")
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        return [{"metric": r["metric"], "values": [(float(t), float(v)) for t, v in r["values"]]}
                for r in data["result"]]

    def wait_for_query(self, expr: str, pred: Callable[[list[dict[str, Any]]], bool] = bool,
                       timeout: float = 30) -> list[dict[str, Any]]:
        """Poll an instant query until `pred(result)` holds; returns that result."""
        last: list[list[dict[str, Any]]] = [[]]

        def check() -> bool:
            last[0] = self.query(expr)
            return pred(last[0])

        try:
            wait_for(check, timeout, 0.5, what=f"PromQL {expr!r}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last result: {last[0]}; prometheus log: {self.logs()[-2000:]}") from None
        return last[0]

    def wait_for_samples(self, expr: str = "up == 1", timeout: float = 30) -> list[dict[str, Any]]:
        return self.wait_for_query(expr, bool, timeout)

    def targets_health(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        return self.api("rules")["groups"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]

    def wait_for_alert(self, name: str, state: str = "firing", timeout: float = 30) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = [a for a in self.alerts() if a["labels"].get("alertname") == name and a["state"] == state]
            return bool(found)

        wait_for(check, timeout, 0.5, what=f"alert {name} {state}")
        return found[0]

    def now(self) -> float:
        return time.time()


SHIPPED_RULES = pathlib.Path(__file__).resolve().parents[2] / "deploy/prometheus/immich-gpu-exporter.rules.yml"


def shortened_rules(tmp_path: pathlib.Path) -> pathlib.Path:
    """The shipped rules with every `for:` at 1s: the only change, so the expressions are the real ones."""
    import yaml

    spec = yaml.safe_load(SHIPPED_RULES.read_text())
    for group in spec["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    out = tmp_path / "rules-fast.yml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out
