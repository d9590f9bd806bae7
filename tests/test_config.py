"""Config precedence (flags > env > TOML > defaults) and every error path (one line, exit 2)."""

from __future__ import annotations

import os
import pathlib

import pytest

from immich_gpu_exporter import cli, config, reference
from tests.support.proc import run_cli


def load(argv, env=None):
    return cli.parse(argv, environ=env or {})[2]


def test_defaults_listen_on_loopback_outside_exhausted_range():
    cfg = load([])
    host, port = cli.split_listen(cfg["web.listen-address"])
    assert host == "127.0.0.1"
    assert not 9100 <= port <= 9999 and port not in (2283, 3003, 8081, 8082)
    assert cfg["collector.nvml"] and cfg["collector.systemd"] and cfg["collector.journal"] and cfg["collector.immich"]
    assert "immich-machine-learning.service" in cfg["systemd.unit"]


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[immich]\nurl = "http://file:2283"\ninterval = 7\n[log]\nlevel = "debug"\n[systemd]\nunit = ["a.service"]\n')
    env = {"IMMICH_GPU_EXPORTER_IMMICH_URL": "http://env:2283", "IMMICH_GPU_EXPORTER_LOG_LEVEL": "warning"}
    cfg = load(["--config", str(f), "--immich.url=http://flag:2283"], env)
    assert cfg["immich.url"] == "http://flag:2283" and cfg.origin("immich.url") == "flag"
    assert cfg["log.level"] == "warning" and cfg.origin("log.level") == "env"
    assert cfg["immich.interval"] == 7.0 and cfg.origin("immich.interval") == "file"
    assert cfg["systemd.unit"] == ("a.service",)
    assert cfg["immich.ml-url"] == "http://localhost:3003" and cfg.origin("immich.ml-url") == "default"


def test_config_file_from_environment(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[web]\nlisten-address = "[::1]:12345"\n')
    cfg = load([], {"IMMICH_GPU_EXPORTER_CONFIG": str(f)})
    assert cfg["web.listen-address"] == "[::1]:12345"
    assert cli.split_listen(cfg["web.listen-address"]) == ("::1", 12345)


def test_repeatable_flags_and_comma_lists():
    cfg = load(["--systemd.unit=a.service", "--systemd.unit", "b.service,c.service"])
    assert cfg["systemd.unit"] == ("a.service", "b.service", "c.service")
    cfg = load([], {"IMMICH_GPU_EXPORTER_SYSTEMD_UNIT": "x.service, y.service"})
    assert cfg["systemd.unit"] == ("x.service", "y.service")


def test_collector_flags_in_node_exporter_style():
    cfg = load(["--no-collector.nvml", "--collector.journal"], {"IMMICH_GPU_EXPORTER_COLLECTOR_JOURNAL": "false"})
    assert cfg["collector.nvml"] is False
    assert cfg["collector.journal"] is True  # flag beats env


def test_config_is_frozen():
    cfg = load([])
    with pytest.raises(AttributeError):
        cfg.x = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        cfg["web.listen-address"] = "x"  # type: ignore[index]
    assert cfg.web.listen_address == cfg["web.listen-address"]
    assert cfg.immich.ml_url == "http://localhost:3003"


def test_secret_is_not_in_repr_or_errors():
    cfg = load([], {"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": "s3cr3t-key"})
    assert cfg["immich.api-key"] == "s3cr3t-key"
    assert "s3cr3t" not in repr(cfg)
    r = run_cli(["--dry-run"], env={"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": "s3cr3t-key"})
    assert r.returncode == 0 and "s3cr3t" not in r.stdout + r.stderr
    assert "immich.api-key = '<set>'" in r.stdout


def test_api_key_is_not_accepted_as_a_flag():
    r = run_cli(["--immich.api-key=abc"])
    assert r.returncode == 2 and "abc" not in r.stderr


BAD = [
    # (argv, env, toml, expected fragment)
    (["--web.listen-address=127.0.0.1:70000"], {}, None, "web.listen-address: port out of range"),
    (["--web.listen-address=nohostport"], {}, None, "web.listen-address: expected HOST:PORT"),
    (["--web.listen-address=[zz::]:80"], {}, None, "web.listen-address: invalid IPv6"),
    (["--immich.interval=-1"], {}, None, "immich.interval: must be a positive number"),
    (["--immich.interval=abc"], {}, None, "immich.interval: expected a number"),
    (["--immich.url=localhost:2283"], {}, None, "immich.url: expected an http(s):// URL"),
    (["--log.level=loud"], {}, None, "log.level: expected one of"),
    (["--no-such-flag"], {}, None, "unrecognized arguments: --no-such-flag"),
    ([], {"IMMICH_GPU_EXPORTER_NOPE": "1"}, None, "unknown variable IMMICH_GPU_EXPORTER_NOPE"),
    ([], {"IMMICH_GPU_EXPORTER_COLLECTOR_NVML": "maybe"}, None, "collector.nvml: expected a boolean"),
    ([], {}, '[web]\nlisten-address = 10283\n', "web.listen-address: expected a string"),
    ([], {}, '[web]\nlisten_address = "x:1"\n', "unknown key 'web.listen_address'"),
    ([], {}, 'interval = 5\n', "unknown key 'interval'"),
    ([], {}, '[systemd]\nunit = [1, 2]\n', "systemd.unit: expected a list of strings"),
    ([], {}, '[collector]\nnvml = "perhaps"\n', "collector.nvml: expected a boolean"),
    ([], {}, '[journal]\nbackfill-entries = 0\n', "journal.backfill-entries: expected a positive integer"),
    ([], {}, '[web\n', "is not valid TOML"),
    # hostile or mistaken input that used to end in a traceback (issue 14)
    (["--web.listen-address=" + "a" * 64 + ":10283"], {}, None, "web.listen-address: invalid host"),
    ([], {}, '[web]\nlisten-address = "ho\\u0000st:1"\n', "web.listen-address: invalid host"),
    ([], {}, '[immich]\ninterval = 1' + "0" * 400 + '\n', "immich.interval: must be at most"),
    ([], {}, '[immich]\ninterval = inf\n', "immich.interval: must be at most"),
    ([], {}, '[journal]\nbackfill-entries = 1' + "0" * 400 + '\n', "journal.backfill-entries: must be at most"),
    (["--immich.timeout=1e400"], {}, None, "immich.timeout: must be at most"),
    ([], {}, '[immich]\nurl = ' + "[" * 3000 + "]" * 3000 + '\n', "nested too deeply"),
    (["--immich.url=http://alice:hunter22@exa mple"], {}, None, "immich.url: invalid host in URL"),
    (["--immich.url=http://alice:hunter22@host:99999"], {}, None, "immich.url: invalid URL"),
]


@pytest.mark.parametrize("argv,env,toml,fragment", BAD, ids=[b[3][:40] for b in BAD])
def test_invalid_value_is_one_line_and_exit_2(tmp_path, argv, env, toml, fragment):
    if toml is not None:
        f = tmp_path / "bad.toml"
        f.write_text(toml)
        argv = [*argv, "--config", str(f)]
    r = run_cli([*argv, "--once"], env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert fragment in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_non_utf8_config_file_is_one_line(tmp_path):
    f = tmp_path / "latin1.toml"
    f.write_bytes(b'[immich]\nurl = "http://h\xf6st"\n')
    r = run_cli(["--config", str(f), "--once"])
    assert r.returncode == 2 and "not valid UTF-8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "huge"])
def test_config_file_that_is_no_regular_file_or_too_big_is_refused_without_hanging(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "config.fifo"
        os.mkfifo(path)  # open() would block until a writer came
        expected = "not a regular file (a FIFO)"
    elif kind == "dev_zero":
        path = pathlib.Path("/dev/zero")  # read() would never end
        expected = "not a regular file (a character device)"
    else:
        path = tmp_path / "huge.toml"
        path.write_bytes(b"#" * (2 << 20))
        expected = "larger than"
    r = run_cli(["--config", str(path), "--once"], timeout=20)
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_password_in_immich_url_is_accepted_and_redacted_in_dry_run():
    r = run_cli(["--immich.url=http://alice:hunter22@immich.example:2283", "--dry-run"])
    assert r.returncode == 0, r.stderr
    assert "hunter22" not in r.stdout + r.stderr
    assert "immich.url = 'http://alice:<secret>@immich.example:2283'" in r.stdout


def test_password_in_an_invalid_url_is_not_echoed_in_the_error():
    r = run_cli(["--immich.url=http://alice:hunter22@host:99999", "--dry-run"])
    assert r.returncode == 2 and "hunter22" not in r.stderr and "<secret>" in r.stderr


def test_missing_and_unreadable_config_files(tmp_path):
    r = run_cli(["--config", str(tmp_path / "nope.toml"), "--once"])
    assert r.returncode == 2 and r.stderr.strip().endswith("no such file")
    r = run_cli(["--config", str(tmp_path), "--once"])
    assert r.returncode == 2 and "is a directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unreadable_config_file_permission_denied():
    # A write-only sysctl file: even root gets a real EACCES when reading it.
    r = run_cli(["--config", "/proc/sys/vm/compact_memory", "--once"])
    assert r.returncode == 2, r.stderr
    assert "permission denied" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_every_option_has_help_and_a_documented_env_name():
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert doc == reference.configuration_markdown(), "run: python -m immich_gpu_exporter.reference"
    for o in config.OPTIONS:
        assert o.help and f"`{o.env}`" in doc
