"""Attribution and NVML against inputs as real hosts produce them.

The /proc/<pid>/cgroup texts are the shapes published in bug reports and documentation of
each platform (CentOS 7 / Ubuntu 18.04 cgroup v1 with many controllers, Ubuntu 20.04 hybrid,
Debian 12 / Fedora / NixOS unified, Docker with both drivers, Docker in Proxmox LXC, Podman
rootful, rootless and Quadlet, containerd/k3s/kind, CRI-O), with made-up ids. The NVML cases run
the real exporter against the gcc-built fake libnvidia-ml.so.1 returning what real drivers
return: N/A memory and unsupported per-process utilisation on MIG, PIDs from another PID
namespace, out-of-range utilisation samples, and the size race of nvmlDeviceGetProcessUtilization.
"""

from __future__ import annotations

import os
import uuid

import pytest

from immich_gpu_exporter import attribution as attr
from tests.support import exposition as ex
from tests.support.nvml import CgroupTree, Scenario, build_fake_nvml, env_for
from tests.support.proc import run_cli

CID = "9b0e7c3a1f52d4e68a7b9c0d1e2f3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b"
POD = "8d3f2a6e-1b4c-4d7e-9f0a-2b3c4d5e6f70"
POD_ = POD.replace("-", "_")

CENTOS7 = """11:cpuset:/
10:hugetlb:/
9:pids:{p}
8:perf_event:/
7:devices:{p}
6:freezer:/
5:memory:{p}
4:cpuacct,cpu:{p}
3:net_prio,net_cls:/
2:blkio:{p}
1:name=systemd:{p}
"""
UBUNTU1804 = """12:rdma:/
11:pids:{p}
10:cpuset:/
9:devices:{p}
8:net_cls,net_prio:/
7:freezer:/
6:hugetlb:/
5:memory:{p}
4:perf_event:/
3:blkio:{p}
2:cpu,cpuacct:{p}
1:name=systemd:{p}
0::{v2}
"""
UBUNTU2004 = """13:misc:/
12:rdma:/
11:blkio:{p}
10:perf_event:/
9:cpuset:/
8:devices:{p}
7:freezer:/
6:net_cls,net_prio:/
5:memory:{p}
4:cpu,cpuacct:{p}
3:hugetlb:/
2:pids:{p}
1:name=systemd:{p}
0::{v2}
"""
ML = "immich-machine-learning.service"

CASES = [
    # (what, text, unit, container id, runtime, pod)
    ("CentOS 7 v1 unit", CENTOS7.format(p=f"/system.slice/{ML}"), ML, "", "", ""),
    ("CentOS 7 v1 docker, systemd driver", CENTOS7.format(p=f"/system.slice/docker-{CID}.scope"),
     "", CID, "docker", ""),
    ("CentOS 7 v1 docker, cgroupfs driver", CENTOS7.format(p=f"/docker/{CID}"), "", CID, "docker", ""),
    ("Ubuntu 18.04 hybrid unit", UBUNTU1804.format(p=f"/system.slice/{ML}", v2=f"/system.slice/{ML}"),
     ML, "", "", ""),
    ("Ubuntu 20.04 hybrid docker cgroupfs, v2 line shows containerd",
     UBUNTU2004.format(p=f"/docker/{CID}", v2="/system.slice/containerd.service"), "", CID, "docker", ""),
    ("Debian 12 docker systemd driver", f"0::/system.slice/docker-{CID}.scope\n", "", CID, "docker", ""),
    ("Fedora podman rootful", f"0::/machine.slice/libpod-{CID}.scope/container\n", "", CID, "libpod", ""),
    ("podman rootless", f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n",
     "", CID, "libpod", ""),
    ("podman rootless in a pod", "0::/user.slice/user-1000.slice/user@1000.service/user.slice/"
     f"user-libpod_pod_{'c' * 64}.slice/libpod-{CID}.scope/container\n", "", CID, "libpod", ""),
    # Quadlet runs podman with --cgroups=split: the container is a child of the service unit.
    ("podman Quadlet system unit", f"0::/system.slice/{ML}/libpod-payload-{CID}\n", ML, CID, "libpod", ""),
    ("podman Quadlet user unit (the user manager is not the container's unit)",
     f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/{ML}/libpod-payload-{CID}\n",
     "", CID, "libpod", ""),
    ("NixOS system-immich.slice", f"0::/system.slice/system-immich.slice/{ML}\n", ML, "", "", ""),
    ("template unit with escaped slice", "0::/system.slice/system-immich\\x2dml.slice/immich-ml@1.service\n",
     "immich-ml@1.service", "", "", ""),
    ("escaped instance name", "0::/system.slice/system-immich.slice/immich-ml@gpu\\x2d0.service\n",
     "immich-ml@gpu\\x2d0.service", "", "", ""),
    ("init.scope", "0::/init.scope\n", "init.scope", "", "", ""),
    ("session scope", "0::/user.slice/user-1000.slice/session-4.scope\n", "session-4.scope", "", "", ""),
    ("private cgroup namespace, own cgroup", "0::/\n", "", "", "", ""),
    ("private cgroup namespace, another container", f"0::/../docker-{CID}.scope\n", "", CID, "docker", ""),
    ("Proxmox LXC with docker inside (seen from the host)",
     f"0::/lxc/105/ns/system.slice/docker-{CID}.scope\n", "", CID, "docker", ""),
    ("Proxmox LXC with docker cgroupfs inside", f"0::/lxc/105/ns/docker/{CID}\n", "", CID, "docker", ""),
    ("Proxmox LXC immich unit (seen from the host)", "0::/lxc/105/ns/system.slice/immich-ml.service\n",
     "immich-ml.service", "", "", ""),
    ("k8s systemd driver containerd", "0::/kubepods.slice/kubepods-besteffort.slice/"
     f"kubepods-besteffort-pod{POD_}.slice/cri-containerd-{CID}.scope\n", "", CID, "cri-containerd", POD),
    ("kind node (kubelet.slice prefix)", "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{POD_}.slice/cri-containerd-{CID}.scope\n", "", CID, "cri-containerd", POD),
    # runc's "slice:prefix:id" used literally as a directory by a cgroupfs runtime (v1 hosts).
    ("containerd slice:prefix:id literal", f"11:perf_event:/kubepods-besteffort-pod{POD_}.slice:cri-containerd:{CID}\n"
     f"5:pids:/system.slice/containerd.service/kubepods-besteffort-pod{POD_}.slice:cri-containerd:{CID}\n"
     "1:name=systemd:/system.slice/containerd.service\n", "", CID, "cri-containerd", POD),
    ("k3s cgroupfs burstable", f"0::/kubepods/burstable/pod{POD}/{CID}\n", "", CID, "kubepods", POD),
    ("k3s cgroupfs guaranteed", f"0::/kubepods/pod{POD}/{CID}\n", "", CID, "kubepods", POD),
    ("CRI-O cgroupfs", f"0::/kubepods/burstable/pod{POD}/crio-{CID}\n", "", CID, "crio", POD),
    ("CRI-O conmon under a cgroupfs pod is not the container", f"0::/kubepods/burstable/pod{POD}/crio-conmon-{CID}\n",
     "", "", "kubepods", POD),
    # v2: " (deleted)" is appended when the cgroup was removed while a process still lingers.
    ("removed cgroup", f"0::/system.slice/docker-{CID}.scope (deleted)\n", "", CID, "docker", ""),
    ("removed unit cgroup", f"0::/system.slice/system-immich.slice/{ML} (deleted)\n", ML, "", "", ""),
]


@pytest.mark.parametrize("what,text,unit,cid,runtime,pod", CASES, ids=[c[0] for c in CASES])
def test_real_cgroup_texts_give_unit_container_and_pod(what, text, unit, cid, runtime, pod):
    p = attr.locate(text)
    assert (p.unit, p.container_id, p.runtime, p.pod_uid) == (unit, cid, runtime, pod)


@pytest.mark.parametrize("text,owner", [
    (f"0::/system.slice/{ML}/libpod-payload-{CID}\n", f"/system.slice/{ML}/libpod-payload-{CID}"),
    (f"0::/system.slice/docker-{CID}.scope (deleted)\n", f"/system.slice/docker-{CID}.scope"),
    (f"0::/kubepods/burstable/pod{POD}/crio-{CID}\n", f"/kubepods/burstable/pod{POD}/crio-{CID}"),
])
def test_owner_cgroup_of_real_containers(text, owner):
    assert attr.locate(text).owner_cgroup == owner


PATTERNS = {"ml": (ML, "immich_machine_learning"), "server": ("immich-server.service", "immich_server")}


@pytest.mark.parametrize("text,names,component", [
    (CENTOS7.format(p=f"/system.slice/{ML}"), {}, "ml"),
    (f"0::/system.slice/{ML}/libpod-payload-{CID}\n", {}, "ml"),  # Quadlet: matched by its unit
    (f"0::/system.slice/docker-{CID}.scope\n", {CID: "immich_machine_learning"}, "ml"),
    (f"0::/system.slice/docker-{CID}.scope\n", {}, "other"),  # no name: the short id matches nothing
    ("0::/system.slice/system-immich.slice/immich-server.service\n", {}, "server"),
    ("0::/\n", {}, "other"),
])
def test_component_of_real_placements(text, names, component):
    who = attr.identity(attr.locate(text), PATTERNS, names)
    assert who.component == component
    if f"docker-{CID}" in text and not names:
        assert who.container == CID[:12]


# --- NVML with real driver behaviour ----------------------------------------------------------------

ONLY_NVML = ["--no-collector.systemd", "--no-collector.journal", "--no-collector.immich",
             "--docker.socket", "/nonexistent/docker.sock"]


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory):
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml-rw"))


@pytest.fixture
def scenario(tmp_path):
    return Scenario(tmp_path / "scenario.txt")


def once(lib, scen, *args):
    scen.write()
    r = run_cli(["--once", *ONLY_NVML, *args], env=env_for(lib, scen))
    assert r.returncode == 0, r.stderr
    return ex.parse(r.stdout)


def test_mig_like_device_memory_na_and_no_process_utilisation(fake_lib, scenario):
    """MIG: usedGpuMemory N/A, per-process utilisation NotSupported by both calls, and the
    device's own utilisation NotSupported: counts stay, no false zeros, nothing counted as error."""
    scenario.compute(os.getpid(), None).compute(os.getppid(), None)
    for fn in ("nvmlDeviceGetProcessUtilization", "nvmlDeviceGetProcessesUtilizationInfo",
               "nvmlDeviceGetUtilizationRates"):
        scenario.fail(fn, "not_supported")
    m = once(fake_lib, scenario)
    assert ex.value(m, "immich_gpu_exporter_source_up", source="nvml") == 1
    assert not any(v for k, v in ex.series(m, "immich_gpu_exporter_source_errors_total").items()
                   if dict(k).get("source") == "nvml")
    assert ex.value(m, "immich_gpu_processes", component="other") == 2
    assert ex.series(m, "immich_gpu_process_memory_used_bytes") == {}
    assert ex.series(m, "immich_gpu_process_sm_utilization_ratio") == {}
    assert ex.series(m, "immich_gpu_utilization_ratio") == {}
    assert ex.value(m, "immich_gpu_memory_used_bytes", gpu="0") == scenario.gpus[0].used


def test_pid_of_another_pid_namespace_is_other_and_still_counted(fake_lib, scenario):
    """NVML reports host PIDs; one the exporter cannot see in its /proc is `other`, not an error."""
    with open("/proc/sys/kernel/pid_max") as f:
        unseen = int(f.read()) + 17  # no process can have it here
    scenario.compute(unseen, 1000).sample(unseen, 0.2, 40)
    m = once(fake_lib, scenario, "--gpu.pid-labels")
    assert ex.value(m, "immich_gpu_processes", component="other", unit="", container="") == 1
    assert ex.value(m, "immich_gpu_process_memory_used_bytes", component="other") == 1000
    assert ex.value(m, "immich_gpu_pid_memory_used_bytes", pid=str(unseen), comm="") == 1000
    assert ex.value(m, "immich_gpu_exporter_source_up", source="nvml") == 1


def test_out_of_range_utilisation_samples_are_ignored(fake_lib, scenario):
    scenario.compute(os.getpid(), 10).sample(os.getpid(), 0.5, 4000, 12)
    m = once(fake_lib, scenario)
    sm = ex.value(m, "immich_gpu_process_sm_utilization_ratio", component="other")
    assert sm is not None and 0 <= sm <= 1
    scenario.sample(os.getpid(), 0.2, 35, 12)  # a valid newer sample of the same process is used
    m = once(fake_lib, scenario)
    assert ex.value(m, "immich_gpu_process_sm_utilization_ratio", component="other") == pytest.approx(0.35)


def test_size_race_of_process_utilisation_is_no_samples_not_an_error(fake_lib, scenario):
    """A process that starts between pynvml's size query and its read makes the second call
    return INSUFFICIENT_SIZE: the cycle has no new samples, the series stay."""
    scenario.compute(os.getpid(), 10).sample(os.getpid(), 0.2, 50).fail("nvmlDeviceGetProcessUtilization", 7)
    m = once(fake_lib, scenario)
    assert ex.value(m, "immich_gpu_process_sm_utilization_ratio", component="other") == 0
    errors = ex.series(m, "immich_gpu_exporter_source_errors_total")
    assert not any(dict(k).get("reason") == "insufficient_size" and v for k, v in errors.items())


def test_quadlet_container_in_a_real_cgroup_is_attributed_to_its_unit(fake_lib, scenario):
    """A real process in <unit>.service/libpod-payload-<id> (podman --cgroups=split, Quadlet)."""
    with CgroupTree(f"qa-rw-{uuid.uuid4().hex[:8]}") as tree:
        pid = tree.spawn(f"system.slice/{ML}/libpod-payload-{CID}")
        scenario.compute(pid, 2 * 2**30).sample(pid, 0.2, 61)
        m = once(fake_lib, scenario)
    lab = {"component": "ml", "unit": ML, "container": CID[:12]}
    assert ex.value(m, "immich_gpu_process_memory_used_bytes", **lab) == 2 * 2**30
    assert ex.value(m, "immich_gpu_process_sm_utilization_ratio", **lab) == pytest.approx(0.61)
    assert ex.value(m, "immich_process_nice", **lab) is not None
