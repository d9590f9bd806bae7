"""TLS and basic auth from --web.config.file (exporter-toolkit's format), checked by a real Prometheus."""

from __future__ import annotations

import asyncio
import base64
import pathlib
import shutil
import signal
import ssl
import subprocess
import urllib.error
import urllib.request

import bcrypt
import pytest

from immich_gpu_exporter import webconfig
from immich_gpu_exporter.config import ConfigError
from tests.support import prometheus
from tests.support.prometheus import Prometheus
from tests.support.proc import Exporter, run_cli, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "web-config.example.yml"
EXAMPLE_USER, EXAMPLE_PASSWORD = "prometheus", "change-me"  # what the shipped example's comment says
ONLY_IMMICH = ["--no-collector.nvml", "--no-collector.systemd", "--no-collector.journal",
               "--immich.url=http://127.0.0.1:9", "--immich.ml-url=http://127.0.0.1:9", "--immich.interval=1"]


def make_cert(d: pathlib.Path, name: str = "exporter") -> tuple[pathlib.Path, pathlib.Path]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return crt, key


@pytest.fixture
def webdir(tmp_path: pathlib.Path) -> pathlib.Path:
    d = tmp_path / "web"
    d.mkdir()
    make_cert(d)
    shutil.copy(EXAMPLE, d / "web-config.yml")  # the shipped example, unchanged
    return d


def get(url: str, cafile: pathlib.Path, auth: tuple[str, str] | None = None) -> int:
    ctx = ssl.create_default_context(cafile=str(cafile))
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class TlsExporter(Exporter):
    """Ready once /-/ready answers over https with the example's credentials."""

    def __init__(self, webdir: pathlib.Path, args: list[str], log_path: pathlib.Path) -> None:
        super().__init__([*args, f"--web.config.file={webdir / 'web-config.yml'}"], log_path=log_path)
        self.cafile = webdir / "exporter.crt"

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"exporter exited with {self.proc.returncode}: {self.logs()}")
        try:
            return get(f"https://{self.address}/-/ready", self.cafile, (EXAMPLE_USER, EXAMPLE_PASSWORD)) == 200
        except OSError:
            return False


@pytest.mark.skipif(not prometheus.available(), reason="prometheus is not installed")
def test_real_prometheus_scrapes_through_tls_and_basic_auth_with_the_shipped_example(webdir, tmp_path):
    exporter = TlsExporter(webdir, ONLY_IMMICH, tmp_path / "exporter.log").start()
    try:
        tls = {"scheme": "https", "tls_config": {"ca_file": str(webdir / "exporter.crt")}}
        jobs = {"right": {**tls, "basic_auth": {"username": EXAMPLE_USER, "password": EXAMPLE_PASSWORD}},
                "wrong": {**tls, "basic_auth": {"username": EXAMPLE_USER, "password": "not-the-password"}},
                "plain": {}}
        with Prometheus(tmp_path, {job: [exporter.address] for job in jobs}, job_settings=jobs) as prom:
            prom.wait_for_query('up{job="right"} == 1', lambda r: len(r) == 1)
            prom.wait_for_query('up{job="wrong"} == 0', lambda r: len(r) == 1)
            prom.wait_for_query('up{job="plain"} == 0', lambda r: len(r) == 1)
            scraped = prom.query('immich_gpu_exporter_source_up{job="right",source="immich"}')
            targets = {t["labels"]["job"]: t for t in prom.api("targets")["activeTargets"]}
    finally:
        exporter.stop()
    assert len(scraped) == 1
    assert "401" in targets["wrong"]["lastError"]
    assert targets["right"]["lastError"] == ""
    assert "not-the-password" not in exporter.logs() and EXAMPLE_PASSWORD not in exporter.logs()


def test_without_credentials_every_path_answers_401(webdir, tmp_path):
    cafile = webdir / "exporter.crt"
    with TlsExporter(webdir, ONLY_IMMICH, tmp_path / "exporter.log") as exporter:
        for path in ("/metrics", "/", "/-/healthy", "/-/ready"):
            assert get(f"https://{exporter.address}{path}", cafile) == 401
            assert get(f"https://{exporter.address}{path}", cafile, (EXAMPLE_USER, "wrong")) == 401
            assert get(f"https://{exporter.address}{path}", cafile, ("nobody", EXAMPLE_PASSWORD)) == 401


def test_changed_web_config_is_picked_up_without_restart_and_on_sighup(webdir, tmp_path):
    cafile = webdir / "exporter.crt"
    conf = webdir / "web-config.yml"
    with TlsExporter(webdir, ONLY_IMMICH, tmp_path / "exporter.log") as exporter:
        new_hash = bcrypt.hashpw(b"rotated-password", bcrypt.gensalt(4)).decode()
        conf.write_text(conf.read_text().replace(conf.read_text().split("prometheus: ")[1].strip(), new_hash))
        wait_for(lambda: get(f"https://{exporter.address}/metrics", cafile, (EXAMPLE_USER, "rotated-password")) == 200,
                 timeout=15, what="the rotated password accepted")
        assert get(f"https://{exporter.address}/metrics", cafile, (EXAMPLE_USER, EXAMPLE_PASSWORD)) == 401
        # a broken version is refused and the last good one stays in force
        conf.write_text("tls_server_config: [\n")
        exporter.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the previous web config" in exporter.logs(), timeout=10)
        assert get(f"https://{exporter.address}/metrics", cafile, (EXAMPLE_USER, "rotated-password")) == 200
        # SIGHUP re-reads it: basic auth removed, TLS kept
        conf.write_text("tls_server_config:\n  cert_file: exporter.crt\n  key_file: exporter.key\n")
        exporter.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: get(f"https://{exporter.address}/metrics", cafile) == 200, timeout=10,
                 what="basic auth off after SIGHUP")
        assert exporter.proc.poll() is None


BAD_WEB_CONFIGS = [
    ("http_server_config:\n  http2: false\n", "unsupported key 'http_server_config'"),
    ("tls_server_config:\n  cert_file: exporter.crt\n  key_file: exporter.key\n  cipher_suites: []\n",
     "unsupported key tls_server_config.cipher_suites"),
    ("tls_server_config:\n  cert_file: exporter.crt\n  key_file: missing.key\n", "key_file"),
    ("tls_server_config:\n  cert_file: exporter.crt\n  key_file: exporter.crt\n", "cannot load cert_file"),
    ("tls_server_config:\n  cert_file: exporter.crt\n  key_file: exporter.key\n  min_version: TLS14\n",
     "unknown tls_server_config.min_version"),
    ("tls_server_config:\n  cert_file: exporter.crt\n  key_file: exporter.key\n"
     "  client_auth_type: RequireAndVerifyClientCert\n", "needs client_ca_file"),
    ("basic_auth_users:\n  prometheus: plain-text-password\n", "expected a bcrypt hash"),
    ("tls_server_config: [\n", "not valid YAML"),
    ("- a list\n", "expected a mapping"),
]


@pytest.mark.parametrize("text,fragment", BAD_WEB_CONFIGS, ids=[b[1][:30] for b in BAD_WEB_CONFIGS])
def test_invalid_web_config_is_one_line_and_exit_2(webdir, text, fragment):
    conf = webdir / "bad.yml"
    conf.write_text(text)
    for mode in ("--dry-run", None):  # the check at start-up of the daemon and in --dry-run
        args = [*ONLY_IMMICH, f"--web.config.file={conf}", "--web.listen-address=127.0.0.1:0"]
        r = run_cli(args + ([mode] if mode else []), timeout=30)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], r.stderr
        assert "plain-text-password" not in r.stderr


def test_unreadable_key_file_is_one_line_and_exit_2(webdir):
    (webdir / "exporter.key").chmod(0)
    conf = webdir / "web-config.yml"
    import os
    if os.geteuid() == 0:  # root reads anything: make the key a FIFO instead, which must not hang either
        (webdir / "exporter.key").unlink()
        os.mkfifo(webdir / "exporter.key")
    r = run_cli([*ONLY_IMMICH, f"--web.config.file={conf}", "--dry-run"], timeout=30)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "key_file" in r.stderr, r.stderr


async def test_bcrypt_runs_once_per_credential_off_the_event_loop(webdir):
    watcher = webconfig.WebConfigWatcher(str(webdir / "web-config.yml"))
    auth = webconfig.BasicAuth(watcher)
    try:
        def header(user: str, password: str) -> str:
            return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

        results = await asyncio.gather(*(auth.allowed(header(EXAMPLE_USER, "wrong")) for _ in range(20)))
        assert results == [False] * 20
        ticks = 0

        async def ticker() -> None:  # the loop keeps running while bcrypt works in its thread
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        t = asyncio.create_task(ticker())
        assert await auth.allowed(header(EXAMPLE_USER, EXAMPLE_PASSWORD)) is True
        t.cancel()
        assert ticks > 0
        for _ in range(20):
            assert await auth.allowed(header(EXAMPLE_USER, EXAMPLE_PASSWORD)) is True
            assert await auth.allowed(header(EXAMPLE_USER, "wrong")) is False
        assert await auth.allowed(header("ghost", "x")) is False
        assert await auth.allowed("Basic !!!") is False and await auth.allowed("Bearer x") is False
        # 20 concurrent identical wrong attempts may each miss the cache once before the first answer;
        # after that every repeat is served from the cache
        checks = auth.checks
        for _ in range(50):
            await auth.allowed(header(EXAMPLE_USER, "wrong"))
            await auth.allowed(header(EXAMPLE_USER, EXAMPLE_PASSWORD))
        assert auth.checks == checks
    finally:
        auth.close()


def test_loading_the_example_gives_tls_and_one_user(webdir):
    cfg = webconfig.load(str(webdir / "web-config.yml"))
    assert cfg.tls is not None and set(cfg.users) == {EXAMPLE_USER}
    assert bcrypt.checkpw(EXAMPLE_PASSWORD.encode(), cfg.users[EXAMPLE_USER])
    with pytest.raises(ConfigError):
        webconfig.load(str(webdir / "nope.yml"))
