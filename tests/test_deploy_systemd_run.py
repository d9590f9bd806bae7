"""The shipped unit under a real systemd (tests/support/nested_systemd.py): it starts as an
unprivileged dynamic user and serves /metrics with its hardening in force, and a probe run under
the very same hardening shows what that hardening allows (journal through systemd-journal, the
bus, /proc of other users, the state directory) and forbids (devices outside the allow list,
writable+executable memory, writes outside the state directory, capabilities).

Only the TEST copy differs from the shipped file: ExecStart= points at this checkout, and because
the test interpreter lives under /root/.pyenv, ProtectHome=tmpfs + BindReadOnlyPaths= expose just
that directory (the shipped unit keeps ProtectHome=yes; an installed exporter lives in /usr or /opt).
"""

from __future__ import annotations

import grp
import json
import os
import pathlib
import stat
import sys

import pytest

from tests.support.deploy import UNIT_PATH, render_test_unit
from tests.support.exposition import value
from tests.support.nested_systemd import nested_systemd  # noqa: F401  (registers the fixture)
from tests.support.proc import ROOT, free_port, http_get, wait_for

pytestmark = pytest.mark.integration

PYTHON = pathlib.Path(sys.executable)
PY_HOME = pathlib.Path(os.path.realpath(PYTHON)).parents[1]  # e.g. /root/.pyenv/versions/3.11.7
FUSE = (10, 229)  # a real character device that the unit's DeviceAllow= does not list


def copy_lines(extra_env: dict[str, str]) -> list[str]:
    lines = [f"Environment=PYTHONPATH={ROOT}", "Environment=PYTHONUNBUFFERED=1"]
    lines += [f"Environment={k}={v}" for k, v in extra_env.items()]
    if any(str(PY_HOME).startswith(h) for h in ("/root", "/home", "/run/user")):
        lines += ["ProtectHome=tmpfs", f"BindReadOnlyPaths={PY_HOME}"]
    return lines


def journal_group_as_on_a_host(ns) -> None:
    """Give the nested journal the group a host's systemd-tmpfiles gives it.

    On a booted host, tmpfiles.d/systemd.conf makes /run/log/journal and the per-machine directory
    setgid root:systemd-journal, so journald's files are group-readable by systemd-journal; that is
    what SupplementaryGroups=systemd-journal relies on. The nested systemd runs no tmpfiles, so the
    test applies the same two rules to the files that exist and the directories new ones go to.
    """
    gid = grp.getgrnam("systemd-journal").gr_gid
    wait_for(lambda: ns.journal_dir.exists() and any(ns.journal_dir.rglob("*.journal")), 10,
             what="journald's first journal file")
    for path in [ns.journal_dir, *ns.journal_dir.rglob("*")]:
        os.chown(path, 0, gid)
        if path.is_dir():
            path.chmod(0o2755)
        else:
            path.chmod(0o640)


def add_service_user(ns, name: str = "immich-gpu-exporter") -> int:
    """Create the unit's system user inside the namespace only (what systemd-sysusers does on a
    host with deploy/systemd/immich-gpu-exporter.sysusers): copies of /etc/passwd and /etc/group
    with one more entry, bind-mounted over the originals in the namespace's mount namespace."""
    taken = {int(line.split(":")[2]) for f in ("/etc/passwd", "/etc/group") for line in open(f) if line.count(":") >= 2}
    uid = next(u for u in range(999, 100, -1) if u not in taken)
    for f, entry in (("passwd", f"{name}:x:{uid}:{uid}:Immich GPU exporter:/:/usr/sbin/nologin\n"),
                     ("group", f"{name}:x:{uid}:\n")):
        copy = ns.base / f"etc-{f}"
        copy.write_text(pathlib.Path(f"/etc/{f}").read_text() + entry)
        copy.chmod(0o644)
        ns.run("mount", "--bind", str(copy), f"/etc/{f}", check=True)
    return uid


def journal_of(ns, unit: str) -> str:
    return ns.run("journalctl", "--no-pager", "-q", "-o", "cat", "-u", unit).stdout


def test_unit_serves_metrics_unprivileged_with_hardening(nested_systemd):
    ns = nested_systemd
    uid = add_service_user(ns)
    journal_group_as_on_a_host(ns)
    port = free_port()
    text = render_test_unit(UNIT_PATH.read_text(), exec_path=str(PYTHON.with_name("immich-gpu-exporter")),
                            extra_service=copy_lines({
                                "IMMICH_GPU_EXPORTER_WEB_LISTEN_ADDRESS": f"127.0.0.1:{port}",
                                "IMMICH_GPU_EXPORTER_IMMICH_URL": "http://127.0.0.1:9",
                                "IMMICH_GPU_EXPORTER_SYSTEMD_UNIT": "dbus.service",
                            }))
    ns.add_unit("immich-gpu-exporter.service", text)
    ns.start_unit("immich-gpu-exporter.service")

    def ready() -> bool:
        return http_get(f"http://127.0.0.1:{port}/-/ready", timeout=1)[0] == 200

    try:
        wait_for(ready, 30, what="exporter ready inside the nested systemd")
    except TimeoutError:
        pytest.fail(ns.status("immich-gpu-exporter.service") + journal_of(ns, "immich-gpu-exporter.service"))
    status, _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    metrics = body.decode()
    # the bus (pystemd over the nested system bus) and the journal (through systemd-journal)
    # are reachable for the unprivileged service: both sources up once collected
    def source_up(name: str) -> bool:
        m = http_get(f"http://127.0.0.1:{port}/metrics")[2].decode()
        return value(m, "immich_gpu_exporter_source_up", source=name) == 1
    try:
        wait_for(lambda: source_up("systemd") and source_up("journal"), 30, what="systemd and journal sources up")
    except TimeoutError:
        m = http_get(f"http://127.0.0.1:{port}/metrics")[2].decode()
        pytest.fail("\n".join(line for line in m.splitlines() if "source" in line and not line.startswith("#"))
                    + journal_of(ns, "immich-gpu-exporter.service"))
    assert "immich_gpu_exporter_build_info" in metrics

    assert ns.unit_property("immich-gpu-exporter.service", "ActiveState") == "active"
    # every process of the unit (the exporter and the journalctl it follows the journal with)
    pids = ns.unit_host_pids("immich-gpu-exporter.service")
    assert pids
    for pid in pids:
        st = pathlib.Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in st.splitlines())
        assert int(fields["Uid"].split()[0]) == uid and int(fields["Gid"].split()[0]) == uid
        assert grp.getgrnam("systemd-journal").gr_gid in {int(g) for g in fields["Groups"].split()}
        assert fields["NoNewPrivs"].strip() == "1" and int(fields["CapEff"], 16) == 0
        assert fields["Seccomp"].strip() == "2"
    for prop, want in {"DevicePolicy": "closed", "MemoryDenyWriteExecute": "yes", "ProtectSystem": "strict",
                       "User": "immich-gpu-exporter", "PrivateTmp": "yes"}.items():
        assert ns.unit_property("immich-gpu-exporter.service", prop) == want, prop


def test_hardening_allows_what_the_exporter_needs_and_nothing_else(nested_systemd):
    ns = nested_systemd
    uid = add_service_user(ns)
    # Something another user (root) wrote to the journal, for the probe to read via its group.
    ns.add_unit("igx-marker.service", "[Service]\nType=oneshot\nExecStart=/bin/echo IGX-MARKER-7f3a\n")
    ns.start_unit("igx-marker.service")
    journal_group_as_on_a_host(ns)
    # A world-readable node of a device the unit does not allow: only the device cgroup stops it.
    fake = ns.state / "run" / "igx-fuse"
    os.mknod(fake, 0o666 | stat.S_IFCHR, os.makedev(*FUSE))
    fake.chmod(0o666)

    probe = f"{PYTHON} {ROOT}/tests/support/deploy_probe.py igx-marker.service /run/igx-fuse"
    text = render_test_unit(UNIT_PATH.read_text(), exec_path=str(PYTHON.with_name("immich-gpu-exporter")),
                            extra_service=copy_lines({}))
    text = text.replace("Type=exec", "Type=oneshot").replace("Restart=on-failure", "Restart=no")
    text = "\n".join(f"ExecStart={probe}" if line.startswith("ExecStart=") else line for line in text.splitlines())
    ns.add_unit("igx-probe.service", text)
    try:
        ns.start_unit("igx-probe.service")
    finally:
        fake.unlink()  # a world-readable fuse node must not outlive the test
    out = journal_of(ns, "igx-probe.service")
    lines = [line for line in out.splitlines() if line.startswith("PROBE ")]
    assert lines, ns.status("igx-probe.service") + out
    r = json.loads(lines[-1][len("PROBE "):])

    assert r["uid"] == uid and grp.getgrnam("systemd-journal").gr_gid in r["groups"]
    assert r["no_new_privs"] == "1" and int(r["cap_eff"], 16) == 0 and r["seccomp"] == "2"
    # needed and allowed
    assert "IGX-MARKER-7f3a" in r["journal"].splitlines()
    assert r["bus"] == "active"
    assert r["read_pid1_cgroup"] == "ok" and r["read_pid1_limits"] == "ok"
    assert r["state_directory"] == "/var/lib/immich-gpu-exporter" and r["write_state"] == "ok"
    assert r["open_dev_null"] == "ok"
    assert r["ctypes_call"] == "ok" and r["import_aiohttp"] == "ok"
    assert r["nvml"] == "library_not_found"  # no driver here: a clean error, not a crash
    # the credential is optional: without /etc/credstore/immich-api-key the unit still starts
    assert r["credentials_directory"].endswith("/igx-probe.service")
    # forbidden
    assert r["open_fake_device"] == "EPERM"
    assert r["mmap_write_exec"] == "EPERM"
    assert r["write_usr"] == "EROFS"
