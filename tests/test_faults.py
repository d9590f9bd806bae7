"""Fault injection with real components: one exporter with all four sources, faults one at a time.

Peers: a real systemd + journald + dbus-daemon in namespaces (tests/support/nested_systemd.py) running
a fake ML unit that prints the lines we hand it (so they reach the real journald as the unit's
stdout), the gcc-built fake libnvidia-ml.so.1 scripted through its scenario file, and the fake
Immich API on loopback. For each fault: the affected source goes down with a reason within one
interval (plus a deadline for slow machines, never a speed assertion), the other sources keep
updating, /metrics keeps answering, the source recovers by itself, and the journal counters stay
exact (every line the unit printed is counted exactly once).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from tests.support.exposition import parse, value
from tests.support.fake_immich import FakeImmich, Key, QueueSim
from tests.support.nested_systemd import NestedSystemd, nested_systemd  # noqa: F401  (registers the fixture)
from tests.support.nvml import Gpu, Scenario, build_fake_nvml, env_for
from tests.support.proc import Exporter, wait_for

pytestmark = pytest.mark.integration

ML_UNIT = "immich-machine-learning.service"
KEY = "faults-key-0a1b2c3d4e"
INTERVAL = 0.5
DEADLINE = 15.0  # for slow machines; a fault must show within one interval in practice

# The ML unit: prints every line appended to a spool file, one journal entry per line.
PRINTER = r'''
import sys, time
path = sys.argv[1]
pos = 0
print("Starting gunicorn 23.0.0", flush=True)
while True:
    with open(path) as f:
        f.seek(pos)
        data = f.read()
    if data.endswith("\n"):
        pos += len(data)
        for line in data.splitlines():
            print(line, flush=True)
    time.sleep(0.05)
'''


class Rig:
    def __init__(self, ns: NestedSystemd, tmp: pathlib.Path, fake: FakeImmich, extra_args: list[str] = (),
                 docker_socket: str | None = None) -> None:
        self.ns, self.tmp, self.fake = ns, tmp, fake
        self.spool = ns.base / "ml-spool.txt"
        self.spool.write_text("")
        self.printed = 1  # "Starting gunicorn"
        script = ns.base / "printer.py"
        script.write_text(PRINTER)
        ns.add_unit(ML_UNIT, f"[Service]\nExecStart=/usr/bin/python3 -u {script} {self.spool}\n")
        ns.start_unit(ML_UNIT)
        self.lib = build_fake_nvml(tmp / "nvml")
        self.scenario = Scenario(tmp / "scenario", gpus=[Gpu()])
        self.scenario.compute(os.getpid(), 256 << 20).write()
        args = [f"--systemd.unit={ML_UNIT}", f"--systemd.cgroup-root={ns.cgroup}", f"--journal.unit={ML_UNIT}",
                f"--journal.directory={ns.journal_dir}", f"--state.directory={tmp / 'state'}",
                f"--immich.url={fake.url}", f"--immich.ml-url={fake.ml_url}", "--immich.timeout=1",
                f"--collection.interval={INTERVAL}", f"--nvml.interval={INTERVAL}", f"--systemd.interval={INTERVAL}",
                f"--immich.interval={INTERVAL}", f"--docker.socket={docker_socket or tmp / 'docker.sock'}",
                f"--docker.interval={INTERVAL}", "--log.level=info",
                *extra_args]
        env = env_for(self.lib, self.scenario) | {"DBUS_SYSTEM_BUS_ADDRESS": ns.bus_address,
                                                   "IMMICH_GPU_EXPORTER_IMMICH_API_KEY": KEY}
        self.exporter = Exporter(args, env=env, log_path=tmp / "exporter.log").start(timeout=30)

    def print_lines(self, n: int, tag: str) -> None:
        with self.spool.open("a") as f:
            for i in range(n):
                f.write(f"[07/30/26 12:00:00] INFO     fault-suite {tag} line {i}\n")
        self.printed += n

    def metrics(self) -> dict:
        return parse(self.exporter.metrics())

    def up(self, source: str) -> float | None:
        return value(self.metrics(), "immich_gpu_exporter_source_up", source=source)

    def last_success(self) -> dict[str, float]:
        m = self.metrics()
        return {s: value(m, "immich_gpu_exporter_source_last_success_timestamp_seconds", source=s) or 0.0
                for s in ("nvml", "systemd", "journal", "immich")}

    def entries_counted(self) -> float:
        m = self.metrics()
        return sum(v for (name, labels), v in m.items()
                   if name == "immich_ml_log_entries_total" and ("unit", ML_UNIT) in labels)

    def check_fault(self, affected: str, reason_prefix: str, inject, repair) -> None:
        """Inject; the affected source goes down with a reason, the others keep updating; repair; back up."""
        before = self.last_success()
        errors_before = self._errors(affected)
        inject()
        wait_for(lambda: self.up(affected) == 0, DEADLINE, what=f"{affected} down")
        after_errors = self._errors(affected)
        new = {r for r, n in after_errors.items() if n > errors_before.get(r, 0)}
        assert any(r.startswith(reason_prefix) for r in new), (affected, new)
        # the others keep updating while it is down, and /metrics answers throughout
        others = [s for s in before if s != affected]
        wait_for(lambda: all(self.last_success()[s] > before[s] for s in others), DEADLINE,
                 what=f"others updating while {affected} is down")
        repair()
        wait_for(lambda: self.up(affected) == 1, DEADLINE * 2, what=f"{affected} back")
        assert self.exporter.proc.poll() is None

    def _errors(self, source: str) -> dict[str, float]:
        return {dict(labels)["reason"]: v for (name, labels), v in self.metrics().items()
                if name == "immich_gpu_exporter_source_errors_total" and dict(labels).get("source") == source}


def test_each_fault_takes_down_only_its_source_which_recovers_alone(nested_systemd: NestedSystemd, tmp_path):
    sim = QueueSim("smartSearch", concurrency=1, job_seconds=0.5,
                   arrivals=[time.monotonic() + i for i in range(600)])
    with FakeImmich(queues=[sim], keys={KEY: Key()}) as fake:
        rig = Rig(nested_systemd, tmp_path, fake)
        ex = rig.exporter
        try:
            wait_for(lambda: all(rig.up(s) == 1 for s in ("nvml", "systemd", "journal", "immich")), DEADLINE,
                     what="every source up")
            rig.print_lines(20, "baseline")
            wait_for(lambda: rig.entries_counted() == rig.printed, DEADLINE, what="baseline lines counted")

            # Immich: down (5xx), slow (beyond the timeout), garbage; each recovers without a restart
            for path, fault, reason in (("/api/server/ping", "status", "http_5xx"),
                                        ("/api/server/ping", "delay", "timeout"),
                                        ("/api/server/ping", "garbage", "")):
                def inject(path=path, fault=fault):
                    with fake.lock:
                        if fault == "status":
                            fake.status[path] = 503
                        elif fault == "delay":
                            fake.delay[path] = 5.0
                        else:
                            fake.huge[path] = 20 << 20
                def repair(path=path):
                    with fake.lock:
                        fake.status.pop(path, None)
                        fake.delay.pop(path, None)
                        fake.huge.pop(path, None)
                rig.check_fault("immich", reason, inject, repair)

            # NVML: the GPU is lost, then comes back
            def gpu_lost():
                rig.scenario.fail("nvmlDeviceGetHandleByIndex_v2", "gpu_is_lost").write()
            def gpu_back():
                rig.scenario.clear_fails().write()
            rig.check_fault("nvml", "", gpu_lost, gpu_back)

            # the system bus: dbus-daemon stopped, then started again
            def bus_down():
                rig.ns.run("systemctl", "stop", "dbus.socket", "dbus.service", check=True)
            def bus_up():
                rig.ns.run("systemctl", "start", "dbus.socket", "dbus.service", check=True)
            rig.check_fault("systemd", "no_bus", bus_down, bus_up)

            # journalctl killed, lines printed while it is gone: counted once each, nothing lost
            journalctl = [p for p in psutil.Process(ex.proc.pid).children() if p.name() == "journalctl"]
            assert journalctl
            rig.print_lines(10, "before-kill")
            wait_for(lambda: rig.entries_counted() == rig.printed, DEADLINE, what="lines before the kill")
            for p in journalctl:
                p.send_signal(signal.SIGKILL)
            rig.print_lines(15, "while-dead")
            wait_for(lambda: rig.entries_counted() == rig.printed, DEADLINE, what="lines after the kill")

            # the journal rotated under the reader: still exact
            rig.ns.run("journalctl", "--rotate", check=True)
            rig.print_lines(12, "after-rotate")
            wait_for(lambda: rig.entries_counted() == rig.printed, DEADLINE, what="lines after rotation")
            time.sleep(1.0)
            assert rig.entries_counted() == rig.printed  # and not counted twice
            assert all(rig.up(s) == 1 for s in ("nvml", "systemd", "journal", "immich"))
        finally:
            ex.stop()
    assert "Traceback" not in ex.logs()


def same_args(ex: Exporter) -> list[str]:
    """The stopped exporter's arguments, for a restart (the new one gets its own listen port)."""
    return [a for a in ex.args if not a.startswith("--web.listen-address=")]


def journal_entries(ns: NestedSystemd) -> list[dict]:
    """Every entry of the namespace's journal, all units, in journal order (cursor, unit, message)."""
    out = subprocess.run(["journalctl", f"--directory={ns.journal_dir}", "-o", "json", "--no-pager", "--quiet",
                          "--output-fields=MESSAGE,_SYSTEMD_UNIT"], capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def rotate_and_vacuum(ns: NestedSystemd, last_read: str | None) -> tuple[int, list[str]]:
    """Rotate the journal and vacuum every archived file: entries logged before the rotation are deleted.
    Returns the truth about the loss, from the journal itself: how many entries (of all units) after the
    last entry the exporter read (`last_read`, its message; None: it is gone already) were deleted, and
    their messages."""
    ns.run("journalctl", "--rotate", check=True)
    time.sleep(1.5)
    before = journal_entries(ns)  # after the rotation: anything logged from here on is in the active file
    ns.run("journalctl", "--vacuum-time=1s", check=True)
    after = {e["__CURSOR"] for e in journal_entries(ns)}
    at = -1
    if last_read is not None:
        (at,) = [i for i, e in enumerate(before) if e.get("MESSAGE") == last_read]
        assert before[at]["__CURSOR"] not in after  # the cursor's entry itself is gone
    deleted = [e for e in before[at + 1:] if e["__CURSOR"] not in after]
    return len(deleted), [e.get("MESSAGE") for e in deleted]


def lost(m: dict) -> tuple[float | None, float | None]:
    return (value(m, "immich_gpu_exporter_journal_gaps_total"),
            value(m, "immich_gpu_exporter_journal_entries_lost_total"))


def test_journal_vacuumed_while_the_exporter_is_stopped_is_the_one_counted_loss(nested_systemd: NestedSystemd,
                                                                                   tmp_path):
    """Stopped exporter; the unit logs K lines; the journal is rotated and vacuumed (those K lines are
    deleted unread); the exporter starts again from its saved cursor: the loss is counted, one gap and the
    deleted entries by journald's sequence numbers (the K lines, plus any other unit's entry deleted in the
    same range: the journal numbers all units together). Restarted again before any new line, it counts the
    same gap never twice; vacuumed again meanwhile, only the entries deleted since. Lines logged after are
    counted once each; nothing before is counted twice; a restart with nothing vacuumed counts nothing."""
    sim = QueueSim("smartSearch", concurrency=1, job_seconds=0.5, arrivals=[time.monotonic()])

    def restart(n: int) -> Exporter:
        rig.exporter = Exporter(same_args(ex), env=ex.env, log_path=tmp_path / f"exporter-{n}.log").start(timeout=30)
        return rig.exporter

    with FakeImmich(queues=[sim], keys={KEY: Key()}) as fake:
        rig = Rig(nested_systemd, tmp_path, fake)
        ex = rig.exporter
        try:
            wait_for(lambda: rig.up("journal") == 1, DEADLINE, what="journal up")
            rig.print_lines(20, "before-stop")
            wait_for(lambda: rig.entries_counted() == rig.printed, DEADLINE, what="lines before the stop")
            counted_before = rig.entries_counted()
            assert lost(rig.metrics()) == (0, 0)
        finally:
            assert ex.stop() == 0  # SIGTERM: the cursor and the counters are saved
        k = 7
        rig.print_lines(k, "vacuumed-unread")
        time.sleep(0.5)  # journald has written them
        deleted, messages = rotate_and_vacuum(rig.ns, "[07/30/26 12:00:00] INFO     fault-suite before-stop line 19")
        assert len([m for m in messages if m and "vacuumed-unread" in m]) == k, messages  # all K really deleted
        gone = rig.ns.run("journalctl", "-u", ML_UNIT, "--no-pager", "-o", "cat", check=True).stdout
        assert "vacuumed-unread" not in gone and "before-stop" not in gone, gone
        print(f"first vacuum: {deleted} journal entries deleted after the cursor, {k} of them the ML unit's")

        second = restart(2)
        try:
            wait_for(lambda: lost(rig.metrics()) == (1, deleted), DEADLINE, what=f"the gap counted ({deleted})")
            assert "the entry of the saved cursor is gone" in second.logs()
            assert rig.entries_counted() == counted_before
            assert value(rig.metrics(), "immich_gpu_exporter_source_up", source="journal") == 1
        finally:
            assert second.stop() == 0
        third = restart(3)  # the cursor is still the vanished one: its gap is not counted again
        try:
            wait_for(lambda: rig.up("journal") == 1, DEADLINE, what="journal up")
            time.sleep(1.0)
            assert lost(rig.metrics()) == (1, deleted)
        finally:
            assert third.stop() == 0
        k2 = 5
        rig.print_lines(k2, "vacuumed-again")
        time.sleep(0.5)
        deleted2, messages = rotate_and_vacuum(rig.ns, None)
        assert len([m for m in messages if m and "vacuumed-again" in m]) == k2, messages
        print(f"second vacuum: {deleted2} journal entries deleted, {k2} of them the ML unit's")
        rig.print_lines(9, "after-vacuum")
        time.sleep(0.5)
        fourth = restart(4)
        try:
            wait_for(lambda: rig.entries_counted() == rig.printed - k - k2, DEADLINE,
                     what=f"lines after the vacuum (counted {rig.entries_counted()}, printed {rig.printed})")
            time.sleep(1.0)
            m = rig.metrics()
            assert rig.entries_counted() == counted_before + 9 == rig.printed - k - k2  # N-K read, none twice
            assert lost(m) == (2, deleted + deleted2)  # each loss counted once
            assert value(m, "immich_gpu_exporter_source_up", source="journal") == 1
        finally:
            assert fourth.stop() == 0
        fifth = restart(5)  # nothing vacuumed: the counters continue, nothing is counted again
        try:
            rig.print_lines(3, "fifth")
            wait_for(lambda: rig.entries_counted() == rig.printed - k - k2, DEADLINE, what="lines of the fifth run")
            time.sleep(1.0)
            assert rig.entries_counted() == counted_before + 9 + 3
            assert lost(rig.metrics()) == (2, deleted + deleted2)
        finally:
            fifth.stop()
        for n in range(2, 6):
            assert "Traceback" not in (tmp_path / f"exporter-{n}.log").read_text()


def test_journal_vacuumed_while_journalctl_is_down_under_a_running_exporter(nested_systemd: NestedSystemd, tmp_path):
    """The exporter keeps running; its journalctl is killed and cannot start again for a while (a wrapper
    refuses while a flag file exists); meanwhile the unit logs K lines and the journal is rotated and
    vacuumed. When journalctl runs again the loss is counted (one gap, the deleted entries) and the lines
    after it are read exactly once; the source recovers by itself."""
    block = tmp_path / "journalctl-blocked"
    wrapper = tmp_path / "journalctl"
    wrapper.write_text(f'#!/bin/sh\nif [ -e {block} ]; then echo "held back by the test" >&2; exit 1; fi\n'
                       f'exec {shutil.which("journalctl")} "$@"\n')
    wrapper.chmod(0o755)
    with FakeImmich(keys={KEY: Key()}) as fake:
        rig = Rig(nested_systemd, tmp_path, fake, extra_args=[f"--journal.journalctl={wrapper}"])
        ex = rig.exporter
        try:
            wait_for(lambda: rig.up("journal") == 1, DEADLINE, what="journal up")
            rig.print_lines(10, "before-kill")
            wait_for(lambda: rig.entries_counted() == rig.printed, DEADLINE, what="lines before the kill")
            assert lost(rig.metrics()) == (0, 0)
            block.touch()
            journalctl = [p for p in psutil.Process(ex.proc.pid).children() if p.name() == "journalctl"]
            assert journalctl
            for p in journalctl:
                p.send_signal(signal.SIGKILL)
            k = 6
            rig.print_lines(k, "vacuumed-unread")
            time.sleep(0.5)
            deleted, messages = rotate_and_vacuum(rig.ns, "[07/30/26 12:00:00] INFO     fault-suite before-kill line 9")
            assert len([m for m in messages if m and "vacuumed-unread" in m]) == k, messages
            print(f"deleted after the cursor: {deleted} journal entries, {k} of them the ML unit's")
            rig.print_lines(8, "after-vacuum")
            block.unlink()
            wait_for(lambda: rig.entries_counted() == rig.printed - k, DEADLINE * 2,
                     what=f"lines after the vacuum (counted {rig.entries_counted()}, printed {rig.printed})")
            time.sleep(1.0)
            m = rig.metrics()
            assert rig.entries_counted() == rig.printed - k
            assert lost(m) == (1, deleted)
            assert value(m, "immich_gpu_exporter_source_up", source="journal") == 1
            # journalctl killed again, nothing vacuumed: no new gap, nothing twice
            journalctl = [p for p in psutil.Process(ex.proc.pid).children() if p.name() == "journalctl"]
            for p in journalctl:
                p.send_signal(signal.SIGKILL)
            rig.print_lines(4, "after-second-kill")
            wait_for(lambda: rig.entries_counted() == rig.printed - k, DEADLINE, what="lines after the second kill")
            time.sleep(1.0)
            assert rig.entries_counted() == rig.printed - k
            assert lost(rig.metrics()) == (1, deleted)
        finally:
            ex.stop()
        assert "Traceback" not in ex.logs()


def test_rotation_alone_is_no_gap(nested_systemd: NestedSystemd, tmp_path):
    """The cursor's entry moved into an archived file, still there: a restart resumes exactly, no gap."""
    with FakeImmich(keys={KEY: Key()}) as fake:
        rig = Rig(nested_systemd, tmp_path, fake)
        ex = rig.exporter
        try:
            rig.print_lines(5, "before-rotate")
            wait_for(lambda: rig.entries_counted() == rig.printed, DEADLINE, what="lines before the rotation")
        finally:
            ex.stop()
        rig.ns.run("journalctl", "--rotate", check=True)
        rig.print_lines(4, "after-rotate")
        again = Exporter(same_args(ex), env=ex.env, log_path=tmp_path / "exporter-2.log").start(timeout=30)
        rig.exporter = again
        try:
            wait_for(lambda: rig.entries_counted() == rig.printed, DEADLINE, what="lines after the rotation")
            time.sleep(1.0)
            assert rig.entries_counted() == rig.printed  # none twice
            assert lost(rig.metrics()) == (0, 0)
        finally:
            again.stop()
