"""The shipped systemd unit: it loads without a single warning, scores at most 2.5 in
`systemd-analyze security`, its command line and example files are accepted by the exporter,
and it names no group or device rule that would break a start on an ordinary host.

Starting it under a real systemd is in test_deploy_systemd_run.py."""

from __future__ import annotations

import grp
import subprocess
import sys

import pytest

from tests.support.deploy import (SHIPPED_EXEC, TEST_EXEC, UNIT_PATH, clean_env, directives, exec_argv,
                                  expand_specifiers, exposure, have_systemd_analyze, read_env_file,
                                  render_test_unit, systemd_analyze)
from tests.support.proc import ROOT

UNIT_TEXT = UNIT_PATH.read_text()
needs_analyze = pytest.mark.skipif(not have_systemd_analyze(), reason="systemd-analyze not installed")


def write_test_unit(tmp_path, text: str, name: str = "immich-gpu-exporter.service"):
    p = tmp_path / name
    p.write_text(text)
    return p


def dry_run(args, env=None) -> subprocess.CompletedProcess[str]:
    e = clean_env()
    e["PYTHONPATH"] = str(ROOT)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "immich_gpu_exporter", *args, "--dry-run"],
                          capture_output=True, text=True, env=e, cwd=ROOT, timeout=60)


@needs_analyze
def test_verify_reports_nothing_for_the_unit(tmp_path):
    path = write_test_unit(tmp_path, render_test_unit(UNIT_TEXT))
    r = systemd_analyze("verify", str(path))
    # verify exits 0 on unknown keys and unparsable values and only warns: stderr is the verdict
    assert (r.returncode, r.stderr) == (0, ""), r.stderr


@needs_analyze
def test_verify_harness_sees_a_typo(tmp_path):
    """Guards the check above: the same call on a unit with a misspelt key must complain."""
    path = write_test_unit(tmp_path, render_test_unit(UNIT_TEXT).replace("ProtectSystem=", "ProtectSytem="))
    r = systemd_analyze("verify", str(path))
    assert "Unknown key 'ProtectSytem'" in r.stderr


@needs_analyze
def test_security_exposure_is_at_most_2_5(tmp_path):
    path = write_test_unit(tmp_path, render_test_unit(UNIT_TEXT))
    r = systemd_analyze("security", "--offline=yes", "--threshold=25", "--no-pager", str(path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert exposure(r.stdout) <= 2.5


@needs_analyze
def test_security_threshold_fails_a_weakened_unit(tmp_path):
    """The threshold gate is live: dropping the user and capability hardening must fail it."""
    weak = "\n".join(line for line in render_test_unit(UNIT_TEXT).splitlines()
                     if not line.startswith(("User=", "Group=", "CapabilityBoundingSet=", "SystemCallFilter=",
                                             "ProtectSystem=", "PrivateTmp=", "ProtectHome=")))
    path = write_test_unit(tmp_path, weak)
    r = systemd_analyze("security", "--offline=yes", "--threshold=25", "--no-pager", str(path))
    assert r.returncode != 0 and exposure(r.stdout) > 2.5


def test_shipped_unit_runs_the_installed_binary_not_a_test_path():
    argv = exec_argv(UNIT_TEXT)
    assert argv[0] == SHIPPED_EXEC
    assert TEST_EXEC not in UNIT_TEXT and "/work/" not in UNIT_TEXT


def test_exec_start_flags_are_accepted_by_the_exporter(tmp_path):
    argv = expand_specifiers(exec_argv(UNIT_TEXT), str(tmp_path / "credentials"))
    r = dry_run(argv[1:], {"STATE_DIRECTORY": str(tmp_path / "state")})
    assert r.returncode == 0, r.stderr
    assert f"immich.api-key-file = '{tmp_path}/credentials/immich-api-key'  # flag" in r.stdout


def test_the_credential_the_flag_reads_is_the_one_the_unit_loads():
    d = directives(UNIT_TEXT)
    (cred,) = d["LoadCredential"]
    name = cred.split(":", 1)[0]
    assert f"--immich.api-key-file=%d/{name}" in d["ExecStart"][0]


def test_example_environment_file_is_accepted():
    env = read_env_file(ROOT / "deploy" / "systemd" / "immich-gpu-exporter.env.example")
    assert env and all(k.startswith("IMMICH_GPU_EXPORTER_") for k in env)
    r = dry_run([], env)
    assert r.returncode == 0, r.stderr
    assert "web.listen-address = '127.0.0.1:10283'  # env" in r.stdout


def test_example_toml_file_is_accepted():
    r = dry_run(["--config", str(ROOT / "deploy" / "systemd" / "immich-gpu-exporter.toml.example")])
    assert r.returncode == 0, r.stderr
    assert "immich.ml-url = 'http://localhost:3003'  # file" in r.stdout


def test_unit_names_only_groups_that_every_systemd_host_has():
    groups = " ".join(directives(UNIT_TEXT).get("SupplementaryGroups", [])).split()
    assert groups == ["systemd-journal"]
    for g in groups:
        grp.getgrnam(g)  # raises KeyError: the start would fail with 216/GROUP


def test_devices_are_closed_except_nvidia_and_proc_stays_visible():
    d = directives(UNIT_TEXT)
    assert d["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0]: v.split()[1] for v in d["DeviceAllow"]}
    assert allowed == {"char-nvidia*": "rw", "/dev/nvidiactl": "rw", "/dev/nvidia-uvm": "rw"}
    # PrivateDevices=yes would drop /dev/nvidia*; ProtectProc=invisible would hide immich's PIDs
    assert "PrivateDevices" not in d
    assert d["ProtectProc"] == ["default"] and d["ProcSubset"] == ["all"]
    assert d["User"] == ["immich-gpu-exporter"] and "DynamicUser" not in d and d["NoNewPrivileges"] == ["yes"] and d["CapabilityBoundingSet"] == [""]
    assert d["MemoryDenyWriteExecute"] == ["yes"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
