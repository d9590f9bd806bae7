"""PID -> unit / container / pod / component from real-looking /proc/<pid>/cgroup texts, /proc
stat and limits parsing. Docker's side is tests/test_docker_api.py."""

from __future__ import annotations

import math
import os
import pathlib

import pytest

from immich_gpu_exporter import attribution as attr

ID = "3f1c9a5e2b7d4c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6"
ID2 = "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9"
POD = "5e0b6d1c-8f2a-4b3c-9d4e-1a2b3c4d5e6f"

V1_CONTROLLERS = """12:hugetlb:{p}
11:freezer:{p}
10:net_cls,net_prio:{p}
9:perf_event:{p}
8:cpuset:{p}
7:memory:{p}
6:devices:{p}
5:blkio:{p}
4:pids:{p}
3:cpu,cpuacct:{p}
2:rdma:/
1:name=systemd:{p}
"""


def v1(path: str) -> str:
    return V1_CONTROLLERS.format(p=path)


def hybrid(v1_path: str, v2_path: str) -> str:
    return v1(v1_path) + f"0::{v2_path}\n"


CASES = [
    # (what, /proc/<pid>/cgroup, unit, container id, runtime, pod)
    ("v2 NixOS ML unit", "0::/system.slice/system-immich.slice/immich-machine-learning.service\n",
     "immich-machine-learning.service", "", "", ""),
    ("v2 server unit", "0::/system.slice/system-immich.slice/immich-server.service\n",
     "immich-server.service", "", "", ""),
    ("v2 process in a unit's subtree (delegated child cgroup)",
     "0::/system.slice/system-immich.slice/immich-machine-learning.service/worker/gunicorn\n",
     "immich-machine-learning.service", "", "", ""),
    ("v1 unit (name=systemd and controllers)", v1("/system.slice/immich-machine-learning.service"),
     "immich-machine-learning.service", "", "", ""),
    ("v1 unit, controllers not co-mounted by systemd",
     "4:memory:/\n3:cpu,cpuacct:/\n1:name=systemd:/system.slice/immich-server.service\n",
     "immich-server.service", "", "", ""),
    ("hybrid unit", hybrid("/system.slice/system-immich.slice/immich-machine-learning.service",
                           "/system.slice/system-immich.slice/immich-machine-learning.service"),
     "immich-machine-learning.service", "", "", ""),
    ("v2 docker, systemd driver", f"0::/system.slice/docker-{ID}.scope\n", "", ID, "docker", ""),
    ("v2 docker, cgroupfs driver", f"0::/docker/{ID}\n", "", ID, "docker", ""),
    ("v1 docker, cgroupfs driver", v1(f"/docker/{ID}"), "", ID, "docker", ""),
    ("v1 docker, systemd driver", v1(f"/system.slice/docker-{ID}.scope"), "", ID, "docker", ""),
    # Docker on v1 on a hybrid host: the v2 line still shows the runtime's service.
    ("hybrid docker, cgroupfs driver", hybrid(f"/docker/{ID}", "/system.slice/containerd.service"),
     "", ID, "docker", ""),
    ("v2 docker rootless", f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{ID}.scope\n",
     "", ID, "docker", ""),
    ("v2 docker, private cgroupns seen from another namespace", f"0::/../../system.slice/docker-{ID}.scope\n",
     "", ID, "docker", ""),
    ("v2 systemd-in-container init.scope under a docker scope",
     f"0::/system.slice/docker-{ID}.scope/init.scope\n", "", ID, "docker", ""),
    ("v2 kubernetes, systemd driver, containerd",
     f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice/"
     f"cri-containerd-{ID}.scope\n", "", ID, "cri-containerd", POD),
    ("v2 kubernetes, guaranteed QoS, CRI-O",
     f"0::/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-{ID}.scope\n", "", ID, "crio", POD),
    ("v1 kubernetes, cgroupfs driver", v1(f"/kubepods/burstable/pod{POD}/{ID}"), "", ID, "kubepods", POD),
    ("v2 kubernetes, cgroupfs driver, besteffort", f"0::/kubepods/besteffort/pod{POD}/{ID}\n",
     "", ID, "kubepods", POD),
    ("v2 podman rootful", f"0::/machine.slice/libpod-{ID}.scope/container\n", "", ID, "libpod", ""),
    ("v2 podman conmon is not the container", f"0::/machine.slice/libpod-conmon-{ID}.scope\n", "", "", "", ""),
    ("v1 podman cgroupfs", v1(f"/libpod_parent/libpod-{ID}"), "", ID, "libpod", ""),
    ("v2 user session", "0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope", "", "", ""),
    ("v2 user manager's unit: the manager owns it",
     "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1234.scope\n",
     "user@1000.service", "", "", ""),
    ("v2 root cgroup (no systemd)", "0::/\n", "", "", "", ""),
    ("hybrid host without systemd (this CI)", "9:name=systemd:/\n4:memory:/process_api/914d3182b14b\n0::/\n",
     "", "", "", ""),
    ("empty (kernel thread or unreadable)", "", "", "", "", ""),
]


@pytest.mark.parametrize("what,text,unit,cid,runtime,pod", CASES, ids=[c[0] for c in CASES])
def test_locate_finds_unit_container_and_pod(what, text, unit, cid, runtime, pod):
    p = attr.locate(text)
    assert (p.unit, p.container_id, p.runtime, p.pod_uid) == (unit, cid, runtime, pod)


def test_locate_reports_the_hierarchy_that_decided():
    p = attr.locate(hybrid(f"/docker/{ID}", "/system.slice/containerd.service"))
    assert p.hierarchy == "name=systemd" and p.cgroup == f"/docker/{ID}"
    p = attr.locate(hybrid("/system.slice/a.service", "/system.slice/a.service"))
    assert p.hierarchy == ""


PATTERNS = {"ml": ("immich-machine-learning.service", "immich_machine_learning"),
            "server": ("immich-server.service", "immich_server", "immich-*-server")}


@pytest.mark.parametrize("unit,container,component", [
    ("immich-machine-learning.service", "", "ml"),
    ("immich-server.service", "", "server"),
    ("", "immich_machine_learning", "ml"),
    ("", "immich_server", "server"),
    ("", "immich-prod-server", "server"),  # a glob
    ("", "immich_postgres", "other"),
    ("session-3.scope", "", "other"),
    ("", "", "other"),
    ("", "IMMICH_SERVER", "other"),  # globs are case-sensitive, like unit names
])
def test_component_of_matches_unit_and_container_globs(unit, container, component):
    assert attr.component_of(PATTERNS, unit, container) == component


def test_identity_uses_resolved_name_else_short_id():
    p = attr.locate(f"0::/system.slice/docker-{ID}.scope\n")
    assert attr.identity(p, PATTERNS, {ID: "immich_machine_learning"}) == attr.Identity(
        "ml", "", "immich_machine_learning")
    assert attr.identity(p, PATTERNS, {}) == attr.Identity("other", "", ID[:12])


STAT = ("4242 (python3 -m (x)) S 4200 4242 4242 0 -1 4194560 30918 0 0 0 1234 567 0 0 30 10 3 0 "
        "987654 2251526144 51200 18446744073709551615 1 1 0 0 0 0 0 16781312 16386 0 0 0 17 1 0 0 0 0 0\n")


def test_parse_stat_handles_parentheses_in_comm():
    s = attr.parse_stat(STAT)
    assert s == attr.Stat("python3 -m (x)", 987654, 10, 1234 + 567, 51200)


def test_parse_stat_of_this_process_is_consistent():
    s = attr.parse_stat(pathlib.Path(f"/proc/{os.getpid()}/stat").read_text())
    assert s.nice == os.getpriority(os.PRIO_PROCESS, 0)
    assert s.rss_pages > 0


LIMITS = """Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max locked memory         {soft:<20} {hard:<20} bytes
Max address space         unlimited            unlimited            bytes
"""


def test_parse_memlock_bytes_and_unlimited():
    assert attr.parse_memlock(LIMITS.format(soft="8388608", hard="unlimited")) == 8388608
    assert attr.parse_memlock(LIMITS.format(soft="unlimited", hard="unlimited")) == math.inf
    with pytest.raises(ValueError):
        attr.parse_memlock("Limit Soft Hard\n")


MOUNTINFO = """23 1 0:21 / / rw,relatime - overlay overlay rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
50 23 0:38 /sub /mnt/bind rw,relatime - cgroup2 cgroup2 rw
"""


def test_cgroup_mounts_maps_hierarchies_to_mount_points():
    assert attr.cgroup_mounts(MOUNTINFO) == {"cpu,cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
                                             "name=systemd": "/sys/fs/cgroup/systemd",
                                             "": "/sys/fs/cgroup/unified"}


def test_process_table_caches_per_pid_and_start_time(tmp_path):
    """A live PID is read once; a PID reused by a new process (new start time) is read afresh;
    evict_except forgets the dead."""
    root = tmp_path / "proc"
    d = root / "4242"
    d.mkdir(parents=True)
    (d / "stat").write_text(STAT)
    (d / "cgroup").write_text("0::/system.slice/system-immich.slice/immich-machine-learning.service\n")
    (d / "limits").write_text(LIMITS.format(soft="unlimited", hard="unlimited"))
    t = attr.ProcessTable(str(root))
    a = t.lookup(4242)
    assert a is not None and a.placement.unit == "immich-machine-learning.service" and a.memlock == math.inf
    (d / "cgroup").write_text("0::/system.slice/other.service\n")  # ignored while the process is the same
    b = t.lookup(4242)
    assert b is not None and b.placement.unit == "immich-machine-learning.service" and t.reads == 1
    (d / "stat").write_text(STAT.replace(" 987654 ", " 999999 "))  # PID reused
    c = t.lookup(4242)
    assert c is not None and c.placement.unit == "other.service" and t.reads == 2
    assert t.lookup(5555) is None
    t.evict_except([])
    assert len(t) == 0


@pytest.mark.parametrize("text,owner", [
    ("0::/system.slice/system-immich.slice/immich-machine-learning.service/worker/gunicorn\n",
     "/system.slice/system-immich.slice/immich-machine-learning.service"),
    (f"0::/system.slice/docker-{ID}.scope/init.scope\n", f"/system.slice/docker-{ID}.scope"),
    (v1(f"/docker/{ID}"), f"/docker/{ID}"),
    ("0::/\n", ""),
])
def test_owner_cgroup_is_the_top_of_the_unit_or_container_subtree(text, owner):
    assert attr.locate(text).owner_cgroup == owner


def test_process_table_agrees_with_psutil_on_live_processes():
    """psutil as an independent oracle for the /proc reads behind the tuning metrics."""
    import resource
    import subprocess
    import time

    import psutil

    from tests.support.proc import wait_for

    from immich_gpu_exporter.attribution import ProcessTable

    child = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: (os.nice(7), resource.setrlimit(
        resource.RLIMIT_MEMLOCK, (1 << 20, resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]))))
    try:
        wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_SLEEPING, 5, what="sleep running")
        time.sleep(0.2)  # let the freshly exec'd process fault its pages in, so its RSS is stable
        table = ProcessTable()
        for pid in (os.getpid(), child.pid):
            info = table.lookup(pid)
            p = psutil.Process(pid)
            assert info is not None and info.comm == p.name()
            assert info.nice == p.nice()
            soft = p.rlimit(psutil.RLIMIT_MEMLOCK)[0]
            assert info.memlock == (math.inf if soft == psutil.RLIM_INFINITY else soft)
            # /proc/<pid>/stat and statm (psutil's source) read the kernel's RSS counters at different
            # moments and through different paths; each thread caches up to 64 page faults before it
            # syncs them (TASK_RSS_EVENTS_THRESH), so they agree to a few dozen pages, not to the byte
            slack = max(0.1 * p.memory_info().rss, 80 * os.sysconf("SC_PAGE_SIZE") * p.num_threads())
            assert abs(info.rss_bytes - p.memory_info().rss) <= slack
            assert abs(info.cpu_seconds - sum(p.cpu_times()[:2])) < 0.5
        assert table.lookup(child.pid).nice == 7 and table.lookup(child.pid).memlock == 1 << 20
    finally:
        child.kill()
        child.wait()
