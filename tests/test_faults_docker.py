"""Fault injection, the Docker socket gone: a private real dockerd (tests/support/dockerd.py) stops
(its socket disappears) and comes back on the same socket, under a running exporter with every source:
the fake Immich, the fake NVML, a real systemd + journald + dbus in namespaces with the ML unit (the rig
of tests/test_faults.py), /proc. The docker source goes down with a reason within one interval, the other
sources keep updating (the journal exactly), /metrics keeps answering, and the docker source recovers by
itself with the containers there. A socket that never existed (no Docker on this host) stays "up, no
containers" (tests/test_docker_source.py).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.support import replay
from tests.support.dockerd import Dockerd, DockerdFailed, unavailable
from tests.support.exposition import parse, value
from tests.support.fake_immich import FakeImmich, Key
from tests.support.nested_systemd import NestedSystemd, nested_systemd  # noqa: F401  (registers the fixture)
from tests.support.proc import wait_for
from tests.test_faults import KEY, Rig  # the rig's exporter uses that API key

pytestmark = pytest.mark.integration

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


def test_docker_socket_gone_takes_down_only_the_docker_source_which_recovers_alone(own_dockerd, nested_systemd,
                                                                                   tmp_path):
    d = own_dockerd
    image = d.scratch_image(f"{replay.SERVER_IMAGE}:v3.1.0", {})
    d.cli("run", "-d", "--name", SERVER, "--network", "none", "--restart", "always",
          "--label", "com.docker.compose.service=immich-server", image, "sleep", "3600")
    with FakeImmich(keys={KEY: Key()}) as fake:
        rig = Rig(nested_systemd, tmp_path, fake, docker_socket=str(d.socket))
        ex = rig.exporter
        others = ("nvml", "systemd", "journal", "immich", "processes")

        def last_success() -> dict[str, float]:
            m = parse(ex.metrics())
            return {s: value(m, "immich_gpu_exporter_source_last_success_timestamp_seconds", source=s) or 0.0
                    for s in others}

        try:
            running = lambda: value(parse(ex.metrics()), "immich_container_state",  # noqa: E731
                                    container=SERVER, state="running") == 1
            wait_for(running, DEADLINE, what="the server container seen running")
            wait_for(lambda: all(rig.up(s) == 1 for s in (*others, "docker")), DEADLINE, what="every source up")
            before = last_success()

            d.stop_daemon()  # the socket is gone
            assert not os.path.exists(d.socket)
            t0 = time.monotonic()
            wait_for(lambda: rig.up("docker") == 0, DEADLINE, what="docker down")
            print(f"docker source down {time.monotonic() - t0:.2f}s after dockerd stopped (interval {INTERVAL}s)")
            m = parse(ex.metrics())
            assert errors(m, "docker").get("socket_gone", 0) >= 1, errors(m, "docker")
            assert "immich_container_state" not in ex.metrics()  # nothing stale is shown
            # every other source keeps updating meanwhile, the journal exactly
            wait_for(lambda: all(last_success()[s] > before[s] for s in others), DEADLINE,
                     what="the other sources updating while docker is down")
            assert all(rig.up(s) == 1 for s in others)
            rig.print_lines(12, "docker-down")
            wait_for(lambda: rig.entries_counted() == rig.printed, DEADLINE, what="journal lines while docker is down")

            d.start()  # the same daemon on the same socket; the container restarts (--restart always)
            wait_for(lambda: rig.up("docker") == 1, DEADLINE * 2, what="docker back up")
            wait_for(running, DEADLINE * 2, what="the container seen again")
            assert all(rig.up(s) == 1 for s in others)
            assert rig.entries_counted() == rig.printed

            # dockerd hangs (SIGSTOP): its socket is there and accepts, nothing answers; the source is down
            # with a reason (never blocking the scrape), and back by itself when dockerd runs again
            errors_before = errors(parse(ex.metrics()), "docker")
            d.proc.send_signal(signal.SIGSTOP)
            try:
                wait_for(lambda: rig.up("docker") == 0, DEADLINE, what="docker down while dockerd hangs")
                new = {r for r, n in errors(parse(ex.metrics()), "docker").items() if n > errors_before.get(r, 0)}
                assert new, "no reason counted"
                print(f"reasons while dockerd hangs: {sorted(new)}")
                before = last_success()
                wait_for(lambda: all(last_success()[s] > before[s] for s in others), DEADLINE,
                         what="the other sources updating while dockerd hangs")
            finally:
                d.proc.send_signal(signal.SIGCONT)
            wait_for(lambda: rig.up("docker") == 1, DEADLINE * 2, what="docker back up after the hang")
            wait_for(running, DEADLINE, what="the container seen after the hang")
            assert ex.proc.poll() is None
        finally:
            ex.stop()
        assert "Traceback" not in ex.logs()
