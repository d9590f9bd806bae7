"""The private dockerd fixture itself: it runs containers from FROM-scratch images without a
network, and their processes sit in real container cgroups that attribution recognises."""

from __future__ import annotations

import pytest

from immich_gpu_exporter import attribution as attr


@pytest.fixture(scope="module")
def busybox_image(dockerd):  # type: ignore[no-untyped-def]
    return dockerd.scratch_image("igx-test/busybox:1", {})


def test_container_runs_without_network_and_logs_both_streams(dockerd, busybox_image):
    dockerd.cli("run", "--name", "fixture-logs", "--network", "none", busybox_image,
                "sh", "-c", "echo out; echo err >&2; ip link 2>/dev/null | grep -c '^[0-9]' || true")
    r = dockerd.cli("logs", "fixture-logs")
    assert r.stdout.split("\n")[0] == "out"
    assert r.stdout.split("\n")[1] == "1"  # only the loopback interface
    assert r.stderr.strip() == "err"
    info = dockerd.inspect("fixture-logs")
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert info["State"]["ExitCode"] == 0
    dockerd.cli("rm", "fixture-logs")


def test_container_process_is_attributed_to_its_container_by_its_real_cgroup(dockerd, busybox_image):
    dockerd.cli("run", "-d", "--name", "fixture-cgroup", "--network", "none", busybox_image, "sleep", "300")
    try:
        info = dockerd.inspect("fixture-cgroup")
        with open(f"/proc/{info['State']['Pid']}/cgroup") as f:
            where = attr.locate(f.read())
        assert where.container_id == info["Id"]
        assert where.runtime == "docker"
        assert where.owner_cgroup.endswith(info["Id"])
    finally:
        dockerd.cli("rm", "-f", "fixture-cgroup")
