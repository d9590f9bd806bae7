"""The pure reading of Docker Engine API answers: log framing, timestamps, resume positions, image
flavours, GPU access, and what of an inspect answer is kept (never the environment)."""

from __future__ import annotations

import struct

import pytest

from immich_gpu_exporter import docker_api as d


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def test_demux_splits_frames_and_keeps_an_incomplete_one_for_later():
    buf = frame(1, b"2026-01-01T00:00:00.000000001Z out\n") + frame(2, b"err\n") + frame(1, b"partial")[:10]
    frames, rest = d.demux(buf)
    assert frames == [("stdout", b"2026-01-01T00:00:00.000000001Z out\n"), ("stderr", b"err\n")]
    assert rest == frame(1, b"partial")[:10]
    frames, rest = d.demux(rest + frame(1, b"partial")[10:])
    assert frames == [("stdout", b"partial")] and rest == b""


@pytest.mark.parametrize("first, mux", [
    (frame(1, b"x"), True), (frame(2, b"x"), True),
    (b"2026-01-01T00:00:00.1Z [12/04/26 18:15:50] INFO", False), (b"\x1b[2m[12/04", False), (b"short", False),
])
def test_a_tty_stream_is_told_from_a_multiplexed_one(first, mux):
    assert d.looks_multiplexed(first) is mux


@pytest.mark.parametrize("line, ns, rest", [
    (b"2026-12-04T18:15:50.440398701Z hi", 1796408150_440398701, b"hi"),
    (b"2026-12-04T18:15:50.4Z hi", 1796408150_400000000, b"hi"),  # trailing zeros trimmed (RFC3339Nano)
    (b"2026-12-04T18:15:50Z  two spaces", 1796408150_000000000, b" two spaces"),
    (b"2026-12-04T19:15:50.000000001+01:00 tz", 1796408150_000000001, b"tz"),
])
def test_timestamps_keep_their_nanoseconds(line, ns, rest):
    assert d.split_timestamp(line) == (ns, rest)


def test_a_line_without_a_timestamp_is_not_taken_for_one():
    assert d.split_timestamp(b"[12/04/26 18:15:50] INFO     Starting gunicorn") is None


def test_since_has_nanoseconds_with_leading_zeros():
    assert d.since_param(1796408150_000000042) == "1796408150.000000042"


def read(pos: d.LogPosition, stamps: list[int]) -> list[int]:
    pos.begin()
    out = [ns for ns in stamps if pos.accept(ns)]
    pos.end_of_read()
    return out


def test_resume_skips_exactly_the_lines_already_read_at_the_last_timestamp():
    pos = d.LogPosition()
    assert read(pos, [10, 20, 20]) == [10, 20, 20]
    assert (pos.ts, pos.at_ts) == (20, 2)
    # since=20 is inclusive: the two lines at 20 come back, then a third one at 20 and a later one
    assert read(pos, [20, 20, 20, 30]) == [20, 30]
    assert (pos.ts, pos.at_ts, pos.gap) == (30, 1, False)


def test_lines_rotated_away_before_they_were_read_are_a_gap():
    pos = d.LogPosition(20, 2)
    assert read(pos, [40, 50]) == [40, 50]
    assert pos.gap


def test_a_log_cut_inside_the_lines_already_read_is_a_gap_too():
    pos = d.LogPosition(20, 2)
    assert read(pos, [20, 40]) == [40]
    assert pos.gap


def test_an_empty_re_read_of_a_rotated_log_is_a_gap_but_an_idle_one_is_not():
    rotated = d.LogPosition(20, 2)
    assert read(rotated, []) == [] and rotated.gap
    idle = d.LogPosition(20, 2)
    assert read(idle, [20, 20]) == [] and not idle.gap


def test_a_fresh_position_reads_everything():
    pos = d.LogPosition()
    assert read(pos, [5, 5, 7]) == [5, 5, 7] and not pos.gap


def test_position_round_trips_through_json_shape():
    pos = d.LogPosition(1796408150_440398701, 3)
    assert d.LogPosition.load(pos.dump()) == pos


@pytest.mark.parametrize("image, flavour", [
    ("ghcr.io/immich-app/immich-machine-learning:release-cuda", "cuda"),
    ("ghcr.io/immich-app/immich-machine-learning:v2.0.1-openvino", "openvino"),
    ("ghcr.io/immich-app/immich-machine-learning:v1.130.3-rocm@sha256:" + "a" * 64, "rocm"),
    ("ghcr.io/immich-app/immich-machine-learning:release-armnn", "armnn"),
    ("ghcr.io/immich-app/immich-machine-learning:v1.122.0-rknn", "rknn"),
    ("ghcr.io/immich-app/immich-machine-learning:release", "none"),
    ("ghcr.io/immich-app/immich-machine-learning", "none"),
    ("registry.local:5000/immich-machine-learning:cuda", "cuda"),
    ("registry.local:5000/immich-machine-learning", "none"),  # the port is no tag
])
def test_image_flavour_comes_from_the_tag_suffix(image, flavour):
    assert d.flavour(image) == flavour


@pytest.mark.parametrize("image, repo", [
    ("ghcr.io/immich-app/immich-server:release", "ghcr.io/immich-app/immich-server"),
    ("registry.local:5000/x/immich-server", "registry.local:5000/x/immich-server"),
    ("immich-server@sha256:" + "b" * 64, "immich-server"),
])
def test_image_repository_drops_tag_and_digest(image, repo):
    assert d.image_repository(image) == repo


@pytest.mark.parametrize("host_config, access", [
    ({}, "none"),
    ({"DeviceRequests": [{"Driver": "", "Count": -1, "Capabilities": [["gpu"]]}]}, "device_request"),
    ({"DeviceRequests": [{"Driver": "nvidia", "Count": 1, "Capabilities": [["compute", "utility"]]}]},
     "device_request"),
    ({"DeviceRequests": [{"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=all"]}]}, "cdi"),
    ({"Runtime": "nvidia"}, "nvidia_runtime"),
    ({"Runtime": "runc", "Devices": [{"PathOnHost": "/dev/dri", "PathInContainer": "/dev/dri"}]}, "dri"),
    ({"Devices": [{"PathOnHost": "/dev/kfd"}, {"PathOnHost": "/dev/dri/renderD128"}]}, "dri+kfd"),
    ({"Devices": [{"PathOnHost": "nvidia.com/gpu=0"}]}, "cdi"),
    ({"Devices": [{"PathOnHost": "/dev/nvidia0"}, {"PathOnHost": "/dev/nvidiactl"}], "Runtime": "nvidia",
      "DeviceRequests": None}, "nvidia_devices+nvidia_runtime"),
])
def test_gpu_access_names_how_the_container_got_its_accelerator(host_config, access):
    assert d.gpu_access(host_config) == access


INSPECT = {
    "Id": "c" * 64, "Name": "/immich_machine_learning", "RestartCount": 3, "Image": "sha256:" + "d" * 64,
    "State": {"Status": "running", "Pid": 4242, "StartedAt": "2026-12-04T18:15:50.440398701Z",
              "Health": {"Status": "healthy", "Log": [{"Output": "secret output"}]}},
    "Config": {"Image": "ghcr.io/immich-app/immich-machine-learning:release-cuda", "Tty": False,
               "Env": ["DB_PASSWORD=hunter2", "MACHINE_LEARNING_DEVICE_IDS=0"],
               "Labels": {"com.docker.compose.service": "immich-machine-learning",
                          "com.docker.compose.project": "immich"}},
    "HostConfig": {"LogConfig": {"Type": "json-file"}, "Runtime": "runc",
                   "DeviceRequests": [{"Capabilities": [["gpu"]], "Count": -1}]},
}


def test_container_view_keeps_the_used_fields_and_never_the_environment():
    v = d.container_view(INSPECT)
    assert v == d.ContainerView(
        id="c" * 64, name="immich_machine_learning", service="immich-machine-learning",
        image="ghcr.io/immich-app/immich-machine-learning:release-cuda", state="running", health="healthy",
        restarts=3, exit_code=0, started_at=1796408150.440398701, pid=4242, log_driver="json-file", tty=False,
        gpu_access="device_request")
    assert "hunter2" not in repr(v) and "secret" not in repr(v)


def test_a_never_started_container_has_no_start_time():
    assert d.parse_time("0001-01-01T00:00:00Z") is None


@pytest.mark.parametrize("service, image, component", [
    ("immich-machine-learning", "whatever:1", "ml"),
    ("immich-server", "whatever:1", "server"),
    ("", "ghcr.io/immich-app/immich-machine-learning:release-cuda", "ml"),
    ("", "ghcr.io/immich-app/immich-server:v2.0.1", "server"),
    ("redis", "docker.io/valkey/valkey:8", None),
    ("ml", "ghcr.io/immich-app/immich-server:release", "server"),
])
def test_containers_are_immich_by_compose_service_or_image(service, image, component):
    assert d.Matcher().component(service, image) == component


def test_a_container_line_becomes_an_entry_like_dockers_journald_driver_writes():
    assert d.journal_entry("immich_machine_learning", "stderr", 1796408150_440398701, "x") == {
        "MESSAGE": "x", "CONTAINER_NAME": "immich_machine_learning", "PRIORITY": "3",
        "__REALTIME_TIMESTAMP": "1796408150440398"}
