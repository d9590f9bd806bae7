"""scripts/install.sh as the Quick start runs it: it installs, starts the exporter and returns.

Here (no systemd as PID 1) it starts the exporter detached and says where the log is; run again,
it upgrades in place and replaces that process. Under a real systemd it takes the unit's path
and refuses exporter flags (those go in the unit's environment file). The install goes to a
temporary prefix; the timeouts only guard against a hang.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

from tests.support.nested_systemd import nested_systemd  # noqa: F401  (registers the fixture)
from tests.support.proc import ROOT, free_port, http_get, wait_for

INSTALL = ROOT / "scripts" / "install.sh"


def _alive(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_install_returns_with_the_exporter_running_detached_and_says_where_its_log_is(tmp_path):
    port = free_port()
    paths = {"PREFIX": tmp_path / "prefix", "BINDIR": tmp_path / "bin", "LOG": tmp_path / "exporter.log",
             "PIDFILE": tmp_path / "exporter.pid"}
    # no IMMICH_GPU_EXPORTER_* of the test run (the exporter refuses unknown ones), no PYTHONPATH: the
    # installed package must run, not this checkout
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMMICH_GPU_EXPORTER_") and k != "PYTHONPATH"}
    env.update({k: str(v) for k, v in paths.items()})
    args = ["bash", str(INSTALL), "--detached", f"--web.listen-address=127.0.0.1:{port}",
            f"--state.directory={tmp_path / 'state'}", "--no-collector.systemd", "--no-collector.immich"]
    pids = []
    try:
        for _ in range(2):  # the second run is an upgrade in place: it replaces the running exporter
            r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, r.stderr
            pid = int(paths["PIDFILE"].read_text())
            pids.append(pid)
            assert f"started immich-gpu-exporter in the background (PID {pid}" in r.stderr
            assert f"log: {paths['LOG']}" in r.stderr
            assert http_get(f"http://127.0.0.1:{port}/-/healthy")[0] == 200
            assert os.getsid(pid) == pid  # its own session: closing the terminal does not stop it
        assert not _alive(pids[0]) and _alive(pids[1])
        assert (paths["BINDIR"] / "immich-gpu-exporter").resolve() == paths["PREFIX"] / "bin" / "immich-gpu-exporter"
        assert paths["LOG"].read_text().count(" listening on ") == 2
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 15)
        wait_for(lambda: not any(_alive(p) for p in pids), 10, what="exporter stopped")


def test_under_systemd_install_takes_the_unit_path_and_refuses_exporter_flags(nested_systemd):
    # inside the nested systemd's namespaces /run/systemd/system exists, as on a booted host; the flag
    # check comes before anything is installed
    r = nested_systemd.run("bash", str(INSTALL), "--web.listen-address=0.0.0.0:10283")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        "install.sh: the systemd unit takes its settings from /etc/immich-gpu-exporter/immich-gpu-exporter.env, "
        "not from flags (--web.listen-address=0.0.0.0:10283); or run with --foreground"]
