"""systemd source: the watched units' states, restarts and configured tuning, over D-Bus.

Owns the system-bus connection (pystemd / sd-bus), the change subscription, the reconnect
logic and reading unit PIDs from the cgroup filesystem. The mapping from properties to
samples lives in `units.py`.

Threading. sd-bus objects are not thread-safe, so every pystemd call (open, match, Subscribe,
GetAll, process, close) runs on the one thread of `BlockingWorker("systemd")`; `_Bus` is only
ever touched there. The event loop never reads the bus: it watches a *dup* of the bus socket
with `loop.add_reader`. When the dup turns readable, the loop removes the reader and queues a
drain job (`sd_bus_process` until idle) on the worker; when the job is done the loop re-arms
the reader and, if a watched unit's PropertiesChanged (or the manager's Reloading) arrived,
calls `self.wake()`, so the daemon collects again at once: a state change reaches /metrics
well within a second. Why a dup: sd-bus closes its own fd by itself when the connection drops
(inside `sd_bus_process`); the dup keeps the number registered with the selector valid until
the loop unregisters and closes it, so a closed or reused fd never sits in the selector.
Why drain after every collect too: replies to our calls are read by sd-bus together with any
signals that were already on the socket; those are queued inside sd-bus and no longer make
the fd readable, so the worker dispatches them before it returns.

Lifecycle. Connecting subscribes (`Manager.Subscribe()`; without it systemd sends no unit
signals) and matches PropertiesChanged on each watched unit's object path. The local
`Disconnected` signal, a connection errno on a call, or systemd leaving the bus marks the
connection dead: the loop tears it down and reconnects with exponential backoff (0.2 s to
10 s), waking itself for each attempt, so a restarted dbus-daemon is picked up without
restarting the exporter. No bus at all -> SourceDown("no_bus"); a bus without systemd on it
-> SourceDown("no_systemd"). Polling every `systemd.interval` stays as a safety net for
anything a signal could miss.

Unit PIDs are host PIDs read from `<cgroup root><ControlGroup>/**/cgroup.procs`. The cgroup
root is `systemd.cgroup-root` if set; otherwise, per unit, the first of (the cgroup2 mount,
the `name=systemd` v1 mount) under which the unit's control group exists: on a unified host
that is /sys/fs/cgroup, on a hybrid host /sys/fs/cgroup/unified (systemd mirrors its tree in
both hierarchies there), on a legacy v1 host /sys/fs/cgroup/systemd.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from typing import Any, Callable, Sequence

from ..core import CollectResult, SourceDown
from ..units import UnitReading, decode, normalize_unit_name, unit_facts, unit_object_path, unit_samples, \
    unit_type_interface
from .base import BlockingWorker, Source

log = logging.getLogger("immich_gpu_exporter.systemd")

SYSTEMD = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER_IFACE = b"org.freedesktop.systemd1.Manager"
UNIT_IFACE = b"org.freedesktop.systemd1.Unit"
PROPERTIES_IFACE = b"org.freedesktop.DBus.Properties"
BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0

# errnos with which sd-bus reports that the connection itself is gone (not that a call failed)
# (not ENOENT: systemd's NoSuchUnit maps to it too)
_CONNECTION_ERRNOS = {errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN}
# D-Bus error names meaning "systemd is not on this bus"
_NO_SYSTEMD = (b"org.freedesktop.DBus.Error.ServiceUnknown", b"org.freedesktop.DBus.Error.NameHasNoOwner")


class BusLost(Exception):
    """The bus connection is gone; the loop must tear it down and reconnect."""


def _errno(e: BaseException) -> int:
    return abs(int(getattr(e, "errno", 0) or 0))


def _is_no_systemd(e: BaseException) -> bool:
    name = type(e).__name__
    return name in ("DBusServiceUnknownError", "DBusNameHasNoOwnerError") or \
        getattr(e, "err_name", b"") in _NO_SYSTEMD


def cgroup_roots_from_mountinfo(text: str) -> list[str]:
    """Candidate cgroupfs roots from /proc/self/mountinfo: the cgroup2 mount, then name=systemd."""
    v2: list[str] = []
    v1: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        fstype, options = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
        point = fields[4].encode().decode("unicode_escape")  # mountinfo escapes space etc. as \040
        if fstype == "cgroup2":
            v2.append(point)
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            v1.append(point)
    return v2[:1] + v1[:1]


def cgroup_pids(roots: Sequence[str], control_group: str) -> tuple[int, ...]:
    """Host PIDs in a control group and its descendants, under the first root where it exists."""
    if not control_group:
        return ()
    for root in roots:
        top = os.path.join(root, control_group.lstrip("/"))
        if not os.path.isdir(top):
            continue
        pids: set[int] = set()
        for directory, _, _ in os.walk(top):
            try:
                with open(os.path.join(directory, "cgroup.procs")) as f:
                    pids.update(int(p) for p in f.read().split())
            except (OSError, ValueError):
                pass  # the group vanished while we walked it
        return tuple(sorted(pids))
    return ()


def dbuslib() -> Any:
    """pystemd's sd-bus binding (`pystemd.dbuslib`), without running `pystemd/__init__.py`.

    The package's __init__ imports its unit/manager helpers and with them lxml (for D-Bus
    introspection), ~4.5 MiB of resident memory this source never uses: it calls sd-bus methods
    directly. The binding needs only its siblings dbusexc and utils, which load as usual. Where
    pystemd is already imported (by a test, say) that module is used as it is."""
    import importlib
    import sys

    loaded = sys.modules.get("pystemd.dbuslib")
    if loaded is not None:
        return loaded
    if "pystemd" in sys.modules:
        return importlib.import_module("pystemd.dbuslib")
    import importlib.util
    import types

    spec = importlib.util.find_spec("pystemd")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pystemd is not installed")
    bare = types.ModuleType("pystemd")
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = spec
    sys.modules["pystemd"] = bare
    try:
        return importlib.import_module("pystemd.dbuslib")
    finally:
        # a later `import pystemd` runs the real __init__, which finds the binding already loaded
        del sys.modules["pystemd"]


class _Bus:
    """One sd-bus connection with its matches. Worker thread only (see the module docstring)."""

    def __init__(self, units: Sequence[str]) -> None:
        DBus = dbuslib().DBus

        self.dead = False
        self.changed = False
        self.resubscribe = False
        self._closed = False
        self._callbacks: list[Callable[..., Any]] = []  # pystemd keeps no reference to match callbacks
        self.bus = DBus()
        try:
            self.bus.open()
        except Exception as e:
            self._closed = True  # open() failed: nothing to close (sd_bus_open leaves no bus behind)
            raise SourceDown("no_bus", f"cannot connect to the system bus: {e}") from None
        try:
            self._match(None, b"/org/freedesktop/DBus/Local", b"org.freedesktop.DBus.Local", b"Disconnected",
                        self._on_disconnected)
            self._match(b"org.freedesktop.DBus", b"/org/freedesktop/DBus", b"org.freedesktop.DBus",
                        b"NameOwnerChanged", self._on_owner_changed)
            self._match(SYSTEMD, MANAGER_PATH, MANAGER_IFACE, b"Reloading", self._on_changed)
            for name in units:
                self._match(SYSTEMD, unit_object_path(name).encode(), PROPERTIES_IFACE, b"PropertiesChanged",
                            self._on_changed)
            self._subscribe()
            self.fd = self.bus.get_fd()
        except BaseException:
            self.close()
            raise

    # -- signal callbacks (run inside bus.process(), on the worker thread) ----------------------
    def _match(self, sender: bytes | None, path: bytes, iface: bytes, member: bytes,
               fn: Callable[[Any], None]) -> None:
        def callback(msg: Any, error: Any = None, userdata: Any = None) -> None:
            try:
                fn(msg)
            except Exception:  # an exception must not unwind through sd-bus's C stack
                log.debug("systemd signal callback failed", exc_info=True)

        self._callbacks.append(callback)
        self.bus.match_signal(sender, path, iface, member, callback)

    def _on_changed(self, msg: Any) -> None:
        self.changed = True

    def _on_disconnected(self, msg: Any) -> None:
        self.dead = True

    def _on_owner_changed(self, msg: Any) -> None:
        msg.process_reply(False)
        if msg.body and msg.body[0] == SYSTEMD:
            # systemd re-executed or re-registered: our Subscribe() died with its old connection
            self.resubscribe = True
            self.changed = True

    # -- calls -----------------------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed or self.dead:
            raise BusLost("connection closed")
        try:
            return fn(*args)
        except Exception as e:
            if _errno(e) in _CONNECTION_ERRNOS:
                self.dead = True
                raise BusLost(str(e)) from None
            if _is_no_systemd(e):
                self.dead = True
                raise SourceDown("no_systemd", f"systemd is not on the system bus: {e}") from None
            raise

    def _subscribe(self) -> None:
        self.resubscribe = False
        self._call(self.bus.call_method, SYSTEMD, MANAGER_PATH, MANAGER_IFACE, b"Subscribe", [])

    def get_all(self, path: str, iface: str | bytes) -> dict[str, Any]:
        apply_signature = dbuslib().apply_signature

        iface_b = iface.encode() if isinstance(iface, str) else iface
        reply = self._call(self.bus.call_method, SYSTEMD, path.encode(), PROPERTIES_IFACE, b"GetAll",
                           apply_signature(b"s", [iface_b]))
        return decode(reply.body)

    def drain(self) -> bool:
        """Dispatch every queued message; True if a watched unit may have changed."""
        if self._closed or self.dead:
            return False
        try:
            while True:
                msg = self.bus.process()
                if msg.is_empty():
                    break
        except Exception as e:
            if _errno(e) in _CONNECTION_ERRNOS:
                self.dead = True
            else:
                raise
        changed, self.changed = self.changed, False
        return changed

    def read(self, units: Sequence[str], roots: Sequence[str]) -> tuple[list[UnitReading], list[str]]:
        if self.resubscribe:
            self._subscribe()
        readings: list[UnitReading] = []
        errors: list[str] = []
        for name in units:
            path = unit_object_path(name)
            try:
                unit = self.get_all(path, UNIT_IFACE)
                typed: dict[str, Any] = {}
                iface = unit_type_interface(name)
                if iface and unit.get("LoadState") not in ("not-found", None):
                    typed = self.get_all(path, iface)
            except (BusLost, SourceDown):
                raise
            except Exception as e:  # one unit's answer must not hide the others
                log.debug("reading %s failed: %s", name, e)
                errors.append("unit_read")
                continue
            cg = str(typed.get("ControlGroup") or "")
            readings.append(UnitReading(name, unit, typed, cgroup_pids(roots, cg)))
        self.drain()  # signals that arrived with our replies: dispatch them now (see module doc)
        return readings, errors

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.bus.close()  # pystemd's close() unrefs: it must run exactly once


class SystemdSource(Source):
    name = "systemd"

    def __init__(self, config, hub):  # type: ignore[no-untyped-def]
        super().__init__(config, hub)
        self._worker = BlockingWorker("systemd")
        self._units = list(dict.fromkeys(normalize_unit_name(u) for u in config["systemd.unit"]))
        root = config["systemd.cgroup-root"]
        self._roots: list[str] | None = [root] if root else None
        self._bus: _Bus | None = None
        self._watch_fd: int | None = None  # our dup of the bus socket, registered with the loop
        self._armed = False
        self._backoff = BACKOFF_MIN
        self._retry_at = 0.0
        self._down: SourceDown | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def interval(self) -> float:
        return float(self.config["systemd.interval"])

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    # -- event-loop side of the bus ----------------------------------------------------------------
    def _arm(self) -> None:
        if self._loop is not None and self._watch_fd is not None and not self._armed:
            self._loop.add_reader(self._watch_fd, self._on_readable)
            self._armed = True

    def _disarm(self) -> None:
        if self._loop is not None and self._watch_fd is not None and self._armed:
            self._loop.remove_reader(self._watch_fd)
        self._armed = False

    def _on_readable(self) -> None:
        self._disarm()  # level-triggered: stay quiet until the worker has drained the socket
        bus, loop = self._bus, self._loop
        if bus is None or loop is None:
            return
        try:
            fut = self._worker.submit_nowait(bus.drain)
        except RuntimeError:  # worker shut down
            return
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._drained, bus, f))

    def _drained(self, bus: _Bus, fut: Any) -> None:
        if bus is not self._bus:
            return  # a connection we already replaced
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None or bus.dead:
            log.info("systemd: lost the system bus%s", f" ({exc})" if exc else "")
            self._teardown()
            self.wake()  # report the source down now and start reconnecting
            return
        self._arm()
        if fut.result():
            self.wake()

    def _teardown(self) -> None:
        self._disarm()
        if self._watch_fd is not None:
            os.close(self._watch_fd)
            self._watch_fd = None
        bus, self._bus = self._bus, None
        if bus is not None:
            try:
                self._worker.submit_nowait(bus.close)  # after any job still using it (one thread)
            except RuntimeError:
                pass

    def _retry_later(self, down: SourceDown) -> SourceDown:
        self._down = down
        self._retry_at = time.monotonic() + self._backoff
        if self._loop is not None:
            self._loop.call_later(self._backoff, self.wake)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        return down

    async def _connect(self) -> None:
        if self._down is not None and time.monotonic() < self._retry_at:
            raise SourceDown(self._down.reason, self._down.detail)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        try:
            bus = await self._worker.call(self._open)
        except SourceDown as e:
            if e.reason == "timeout":
                raise
            raise self._retry_later(e) from None
        except BusLost as e:
            raise self._retry_later(SourceDown("no_bus", f"lost the system bus while connecting: {e}")) from None
        self._bus, self._watch_fd = bus, os.dup(bus.fd)
        self._arm()
        if self._down is not None:
            log.info("systemd: connected to the system bus again")
        self._down, self._backoff = None, BACKOFF_MIN

    def _open(self) -> _Bus:
        try:
            dbuslib()
        except ImportError:
            raise SourceDown("no_pystemd", "pystemd is not installed") from None
        if self._roots is None:
            try:
                with open("/proc/self/mountinfo") as f:
                    self._roots = cgroup_roots_from_mountinfo(f.read())
            except OSError:
                self._roots = []
        return _Bus(self._units)

    async def collect(self) -> CollectResult:
        if self._bus is None:
            await self._connect()
        bus = self._bus
        assert bus is not None
        try:
            readings, errors = await self._worker.call(bus.read, self._units, self._roots or [])
        except BusLost as e:
            self._teardown()
            raise self._retry_later(SourceDown("no_bus", f"lost the system bus: {e}")) from None
        except SourceDown as e:
            if e.reason != "timeout":  # no_systemd: systemd left the bus
                self._teardown()
                raise self._retry_later(e) from None
            raise
        if bus.dead:  # the drain at the end of the read saw the disconnect
            self._teardown()
            self._retry_later(SourceDown("no_bus", "lost the system bus"))
            self.wake()
        samples = tuple(s for r in readings for s in unit_samples(r))
        return CollectResult(samples, unit_facts(readings), tuple(errors))

    async def close(self) -> None:
        self._teardown()
        fut = None
        try:
            fut = self._worker.submit_nowait(lambda: None)  # runs after the queued close()
        except RuntimeError:
            pass
        if fut is not None:
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), 1.0)
            except Exception:
                pass
        self._worker.shutdown()
