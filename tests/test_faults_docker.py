"""Fault injection, the Docker socket gone: a private real dockerd (tests/support/dockerd.py) stops
(its socket disappears) and comes back on the same socket, under a running exporter that also polls the
fake Immich. The docker source goes down with a reason within one interval, the immich source keeps
updating, /metrics keeps answering, and the docker source recovers by itself with the containers there.
A socket that never existed (no Docker on this host) stays "up, no containers" (tests/test_docker_source.py).
"""

from __future__ import annotations

import os
import time

import pytest

from tests.support import replay
from tests.support.dockerd import Dockerd, DockerdFailed, unavailable
from tests.support.exposition import parse, value
from tests.support.fake_immich import FakeImmich, Key
from tests.support.proc import Exporter, wait_for

pytestmark = pytest.mark.integration

KEY = "faults-docker-key-5e6f"
INTERVAL = 0.5
DEADLINE = 20.0  # for slow machines; never a speed assertion
SERVER = "immich_server"


@pytest.fixture
def own_dockerd():
    """A dockerd of this test's own: stopping it must not disturb the session's shared one."""
    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    d = Dockerd()
    try:
        d.start()
    except DockerdFailed as e:
        d.stop()
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(f"dockerd cannot start here: {e}")
    try:
        yield d
    finally:
        d.stop()


def errors(m: dict, source: str) -> dict[str, float]:
    return {dict(lb)["reason"]: v for (n, lb), v in m.items()
            if n == "immich_gpu_exporter_source_errors_total" and dict(lb).get("source") == source}


def test_docker_socket_gone_takes_down_only_the_docker_source_which_recovers_alone(own_dockerd, tmp_path):
    d = own_dockerd
    image = d.scratch_image(f"{replay.SERVER_IMAGE}:v3.1.0", {})
    d.cli("run", "-d", "--name", SERVER, "--network", "none", "--restart", "always",
          "--label", "com.docker.compose.service=immich-server", image, "sleep", "3600")
    with FakeImmich(keys={KEY: Key()}) as fake:
        ex = Exporter(["--no-collector.nvml", "--no-collector.systemd", "--no-collector.journal",
                       "--no-collector.processes", f"--docker.socket={d.socket}", f"--docker.interval={INTERVAL}",
                       f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}", f"--immich.interval={INTERVAL}",
                       "--immich.timeout=1", f"--collection.interval={INTERVAL}", f"--state.directory={tmp_path / 's'}"],
                      env={"IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY}, log_path=tmp_path / "exporter.log")
        with ex:
            running = lambda: value(parse(ex.metrics()), "immich_container_state",  # noqa: E731
                                    container=SERVER, state="running") == 1
            wait_for(running, DEADLINE, what="the server container seen running")
            m = parse(ex.metrics())
            assert value(m, "immich_gpu_exporter_source_up", source="docker") == 1
            before = value(m, "immich_gpu_exporter_source_last_success_timestamp_seconds", source="immich")

            d.stop_daemon()  # the socket is gone
            assert not os.path.exists(d.socket)
            t0 = time.monotonic()
            wait_for(lambda: value(parse(ex.metrics()), "immich_gpu_exporter_source_up", source="docker") == 0,
                     DEADLINE, what="docker down")
            print(f"docker source down {time.monotonic() - t0:.2f}s after dockerd stopped (interval {INTERVAL}s)")
            m = parse(ex.metrics())
            assert errors(m, "docker").get("socket_gone", 0) >= 1, errors(m, "docker")
            assert "immich_container_state" not in ex.metrics()  # nothing stale is shown
            wait_for(lambda: value(parse(ex.metrics()), "immich_gpu_exporter_source_last_success_timestamp_seconds",
                                   source="immich") > before, DEADLINE, what="immich still updating")

            d.start()  # the same daemon on the same socket; the container restarts (--restart always)
            wait_for(lambda: value(parse(ex.metrics()), "immich_gpu_exporter_source_up", source="docker") == 1,
                     DEADLINE * 2, what="docker back up")
            wait_for(running, DEADLINE * 2, what="the container seen again")
            assert ex.proc.poll() is None
        assert "Traceback" not in ex.logs()
