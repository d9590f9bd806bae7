"""Docker source: Immich's containers as components, and the ML verdict from a container's log.

Owns the I/O around `docker_api` (the one Docker client) and `mllog`:

* Discovery: Immich's containers by compose service label or image (`docker.*-service`,
  `docker.*-image`), refreshed on every container event of the events stream and by a poll
  (`docker.interval`) as a safety net for a missed event or a broken stream. Each refresh lists and
  inspects; `docker_api.container_view()` keeps the few fields used (never the environment).
  collect() only renders what the last refresh saw: the scrape never waits on the daemon.
* The ML log: every ML container whose log driver the API can read (json-file, local, and other
  drivers through Docker's dual-logging cache; journald-logging containers are left to the
  journal source, as before) is followed over the logs API with timestamps. Each line is handed,
  shaped like an entry of Docker's journald driver (`docker_api.journal_entry`), to the same
  `mllog.Parser` and `mllog.MLState` the journal source uses, so the provider rules are one.
* Persistence: the parser, the state and each container's `LogPosition` (last timestamp with
  nanoseconds, and how many lines carried it) are written together, atomically, to
  `<state dir>/docker-state.json`, at most every PERSIST_EVERY seconds and at shutdown. A restart
  re-reads each log from that timestamp and skips what was applied: nothing is counted twice and
  nothing still in the log is lost. Lines rotated away meanwhile are counted in
  immich_container_log_gaps_total. A container first seen without a saved position is read from
  its last start (like the journal's backfill from the last `Starting gunicorn`); one created
  while the exporter runs (`docker compose up -d` recreating it with a new id) from its beginning.

No socket at `docker.socket` means "no Docker on this host": the source stays up and reports no
containers (a systemd-only host must not raise ImmichGPUExporterSourceDown). A socket that
refuses (permission denied) or fails takes the source down with the reason, and so does a socket
that disappears after dockerd answered on it (`socket_gone`: dockerd stopped); it comes back up by
itself when dockerd answers again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from .. import docker_api as dapi
from ..core import CollectResult, Sample, SourceDown, sample
from ..mllog import MLState, Parser
from .base import Source
from .journal import state_directory, write_atomic

log = logging.getLogger("immich_gpu_exporter.docker")

STATE_FILE = "docker-state.json"
STATE_VERSION = 1
PERSIST_EVERY = 2.0
FLUSH_AFTER = 0.15  # seconds of quiet after which a pending Rich record is complete
BACKOFF_MAX = 30.0
STATES = ("created", "running", "paused", "restarting", "removing", "exited", "dead")
HEALTH = ("starting", "healthy", "unhealthy")
UNREADABLE_DRIVERS = frozenset({"journald", "none"})  # journald: the journal source reads it
MAX_CONTAINERS = 32  # cardinality bound: Immich has a handful


class DockerSource(Source):
    name = "docker"

    def __init__(self, config: Any, hub: Any) -> None:
        super().__init__(config, hub)
        self.api = dapi.DockerClient(config["docker.socket"], float(config["collection.timeout"]))
        self.matcher = dapi.Matcher(tuple(config["docker.ml-service"]), tuple(config["docker.server-service"]),
                                    tuple(config["docker.ml-image"]), tuple(config["docker.server-image"]))
        self.follow_logs = bool(config["docker.follow-logs"])
        self.parser = Parser()
        self.ml = MLState(float(config["journal.fallback-grace"]))
        self.views: dict[str, dapi.ContainerView] = {}
        self.components: dict[str, str] = {}  # container id -> ml / server
        self.positions: dict[str, dapi.LogPosition] = {}
        self.gaps: dict[str, int] = {}  # container name -> rotated-away gaps
        self.lines_read = 0
        self.present = False  # the socket exists
        self._answered = False  # dockerd answered on the socket since the exporter started
        self._down: SourceDown | None = None
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._refresh_wanted = asyncio.Event()
        self._refreshed = asyncio.Event()  # set after each refresh: followers re-check their container
        self._refresh_lock = asyncio.Lock()
        self._follow_mode = False
        self._loaded = False
        self._saved_positions: dict[str, dapi.LogPosition] = {}
        self._state_path: str | None = None
        self._state_dir = state_directory(config["state.directory"])
        self._dirty = False
        self._last_persist = 0.0
        self._flush_handle: asyncio.TimerHandle | None = None

    @property
    def interval(self) -> float:
        return float(self.config["docker.interval"])

    # -- persistence ---------------------------------------------------------------------------------
    def _load_state(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = os.path.join(self._state_dir, STATE_FILE)
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            self.parser.load(data.get("parser") or {})
            self.ml.load(data.get("ml") or {})
            self._saved_positions = {k: dapi.LogPosition.load(v) for k, v in (data.get("positions") or {}).items()}
            self.gaps = {str(k): int(v) for k, v in (data.get("gaps") or {}).items()}
            log.info("docker: resuming the container logs after the saved positions (%s)", path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("docker: ignoring unreadable state file %s: %s", path, e)
            self.parser, self.ml = Parser(), MLState(self.ml.grace)
            self._saved_positions, self.gaps = {}, {}

    def _open_state_dir(self) -> None:
        try:
            os.makedirs(self._state_dir, exist_ok=True)
            probe = os.path.join(self._state_dir, ".docker-probe")
            with open(probe, "w"):
                pass
            os.unlink(probe)
            self._state_path = os.path.join(self._state_dir, STATE_FILE)
        except OSError as e:
            log.warning("docker: state directory %s is not writable (%s); a restart will re-read the ML "
                        "container's log from its last start", self._state_dir, e.strerror or e)
            self._state_path = None

    def serialise(self) -> str:
        positions = {cid: p.dump() for cid, p in self.positions.items()}
        for cid, p in self._saved_positions.items():  # not seen again yet: keep, a later refresh may
            positions.setdefault(cid, p.dump())
        return json.dumps({"version": STATE_VERSION, "positions": positions, "parser": self.parser.dump(),
                           "ml": self.ml.dump(), "gaps": self.gaps, "saved_at": time.time()},
                          separators=(",", ":"))

    async def _persist(self, force: bool = False) -> None:
        if self._state_path is None or not self._dirty:
            return
        if not force and time.monotonic() - self._last_persist < PERSIST_EVERY:
            return
        data = self.serialise()  # on the loop: positions and state agree at this instant
        self._dirty = False
        self._last_persist = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(None, write_atomic, self._state_path, data)
        except OSError as e:
            self._dirty = True
            log.warning("docker: cannot write %s: %s", self._state_path, e)

    # -- discovery -----------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """List and inspect Immich's containers; raises DockerUnavailable."""
        async with self._refresh_lock:
            if not os.path.exists(self.api.socket_path):
                was_there = self._answered
                self.present = False
                self.views, self.components = {}, {}
                if was_there:
                    # dockerd answered here before: its socket vanishing is dockerd stopping, a fault, not
                    # "no Docker on this host" (that is only a socket never seen since the exporter started)
                    raise dapi.DockerUnavailable("socket_gone", f"the Docker API socket {self.api.socket_path} "
                                                 "is gone (dockerd stopped?); it answered before")
                return
            self.present = True
            listed = await self.api.containers()
            self._answered = True
            wanted: dict[str, str] = {}
            for c in listed:
                labels = c.get("Labels") or {}
                comp = self.matcher.component(str(labels.get(dapi.SERVICE_LABEL) or ""), str(c.get("Image") or ""))
                if comp is not None and len(wanted) < MAX_CONTAINERS:
                    wanted[str(c.get("Id"))] = comp
            views: dict[str, dapi.ContainerView] = {}
            for cid in wanted:
                try:
                    views[cid] = dapi.container_view(await self.api.inspect_json(cid))
                except dapi.DockerUnavailable as e:
                    if e.reason != "not_found":  # removed between list and inspect: simply gone
                        raise
            self.views = views
            self.components = {cid: wanted[cid] for cid in views}
        self._refreshed.set()
        self._refreshed = asyncio.Event()
        if self._follow_mode and self.follow_logs:
            self._sync_followers()

    def ml_containers(self) -> list[dapi.ContainerView]:
        return [v for cid, v in self.views.items()
                if self.components.get(cid) == "ml" and v.log_driver not in UNREADABLE_DRIVERS]

    # -- log lines -> the ML state ---------------------------------------------------------------------
    def position_for(self, view: dapi.ContainerView) -> dapi.LogPosition:
        """The saved position, else (first sight, no state) the container's last start; a container
        created while we run starts at 0 (see _sync_followers)."""
        pos = self.positions.get(view.id)
        if pos is None:
            pos = self._saved_positions.pop(view.id, None)
            if pos is None:
                start = int((view.started_at or 0) * 1e9) if not self._seen_running else 0
                pos = dapi.LogPosition(start, 0)
            self.positions[view.id] = pos
        return pos

    _seen_running = False  # set after the first refresh in follow mode: later containers are new

    def apply_line(self, view: dapi.ContainerView, pos: dapi.LogPosition, stream: str, ns: int, line: bytes) -> bool:
        if not pos.accept(ns):
            return False
        entry = dapi.journal_entry(view.name, stream, ns, line.decode("utf-8", "replace"))
        apply = self.ml.apply
        for ev in self.parser.feed(entry):
            apply(ev)
        self.lines_read += 1
        return True

    def _note_gap(self, view: dapi.ContainerView, pos: dapi.LogPosition) -> None:
        if pos.gap:
            pos.gap = False
            self.gaps[view.name] = self.gaps.get(view.name, 0) + 1
            log.warning("docker: lines of %s were rotated out of its log before they were read", view.name)

    async def read_log(self, view: dapi.ContainerView, follow: bool) -> int:
        """One pass over a container's log from its position; returns the lines applied."""
        pos = self.position_for(view)
        pos.begin()
        n = 0
        try:
            async for stream, ns, line in self.api.logs(view.id, pos.ts, follow, view.tty):
                if self.apply_line(view, pos, stream, ns, line):
                    n += 1
                    if follow:
                        self._on_lines()
                self._note_gap(view, pos)
        finally:
            pos.end_of_read()
            self._note_gap(view, pos)
        return n

    def flush(self) -> bool:
        self._flush_handle = None
        events = self.parser.flush()
        for ev in events:
            self.ml.apply(ev)
        return bool(events)

    def _on_lines(self) -> None:
        self._dirty = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_AFTER, self._flush_and_wake)
        self.wake()

    def _flush_and_wake(self) -> None:
        if self.flush():
            self._dirty = True
        self.wake()

    # -- background tasks --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._follow_mode = self._wake is not None
        self._load_state()
        if not self._follow_mode:
            return
        self._open_state_dir()
        self._tasks = [asyncio.create_task(self._poll(), name="docker-poll"),
                       asyncio.create_task(self._events(), name="docker-events")]

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
                self._down = None
            except dapi.DockerUnavailable as e:
                self._down = SourceDown(e.reason, e.detail)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever it was, the poll must go on (or the source
                # would stay up showing the last containers forever)
                if self._down is None or self._down.reason != "error":
                    log.warning("docker: refreshing failed (%s: %s)", type(e).__name__, e)
                self._down = SourceDown("error", f"{type(e).__name__}: {e}")
            self._seen_running = True
            self.wake()
            try:
                await asyncio.wait_for(self._refresh_wanted.wait(), self.interval)
                await asyncio.sleep(0.05)  # coalesce the burst of events of one `compose up`
            except asyncio.TimeoutError:
                pass
            self._refresh_wanted.clear()

    async def _events(self) -> None:
        backoff = 1.0
        while True:
            try:
                if os.path.exists(self.api.socket_path):
                    async for _ in self.api.events():
                        self._refresh_wanted.set()
                        backoff = 1.0
            except asyncio.CancelledError:
                raise
            except dapi.DockerUnavailable as e:
                log.debug("docker: events stream: %s", e.detail)
            except Exception as e:  # a broken stream: the poll still refreshes meanwhile
                log.debug("docker: events stream failed: %s", e)
            self._refresh_wanted.set()  # events may have been missed while the stream was down
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _sync_followers(self) -> None:
        live = {v.id: v for v in self.ml_containers()}
        for cid in [c for c in self._followers if c not in live]:
            self._followers.pop(cid).cancel()
        for cid in [c for c in self.positions if c not in self.views]:
            del self.positions[cid]  # removed (recreated under a new id): its log is gone with it
            self._dirty = True
        for cid, view in live.items():
            t = self._followers.get(cid)
            if t is None or t.done():
                if cid not in self.positions and cid not in self._saved_positions and self._seen_running:
                    self.positions[cid] = dapi.LogPosition(0, 0)  # new since we run: all of it is unread
                self._followers[cid] = asyncio.create_task(self._follow(cid), name=f"docker-logs-{cid[:12]}")

    async def _follow(self, cid: str) -> None:
        backoff = 1.0
        while True:
            view = self.views.get(cid)
            if view is None:
                return
            refreshed = self._refreshed
            try:
                n = await self.read_log(view, follow=view.state in ("running", "restarting", "paused"))
                if n:
                    self._on_lines()
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except dapi.DockerUnavailable as e:
                log.debug("docker: logs of %s: %s", view.name, e.detail)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            # the stream ended (stopped container, daemon restart): wait for news of the container
            try:
                await asyncio.wait_for(refreshed.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    # -- collect -----------------------------------------------------------------------------------------
    async def collect(self) -> CollectResult:
        if not self._follow_mode:
            await self._read_once()
        elif self._down is not None:
            raise self._down
        following = bool(self.ml_containers()) and self.follow_logs
        samples = self.container_samples()
        facts: dict[str, Any] = {
            "present": self.present,
            "containers": {cid: v.name for cid, v in self.views.items()},
            "components": {v.name: self.components[cid] for cid, v in self.views.items()},
            "init_pids": {v.name: v.pid for v in self.views.values() if v.pid > 0},
            "ml_logs": following,
        }
        if following:
            nvml = self.hub.facts("nvml")
            mem = (nvml.get("component_gpu_memory") or {}).get("ml") if nvml else None
            self.ml.observe_gpu(time.time(), float(mem or 0) if nvml else None)
            samples.extend(self.ml.samples())
            facts.update(self.ml.facts())
        if self._follow_mode:
            await self._persist()
        return CollectResult(tuple(samples), facts)

    async def _read_once(self) -> None:
        """--once: one refresh and one pass over each ML log from its saved position (or last start);
        the state file is not written, so it can run beside a daemon."""
        self._load_state()
        try:
            await self.refresh()
        except dapi.DockerUnavailable as e:
            raise SourceDown(e.reason, e.detail) from None
        if self.follow_logs:
            for view in self.ml_containers():
                try:
                    await self.read_log(view, follow=False)
                except dapi.DockerUnavailable as e:
                    raise SourceDown(e.reason, e.detail) from None
        self.flush()

    def container_samples(self) -> list[Sample]:
        out: list[Sample] = []
        for cid, v in sorted(self.views.items(), key=lambda kv: kv[1].name):
            c = v.name
            out.append(sample("immich_container_info", 1, container=c, component=self.components.get(cid, ""),
                              service=v.service, image=v.image, flavour=dapi.flavour(v.image),
                              gpu_access=v.gpu_access, log_driver=v.log_driver))
            out.extend(sample("immich_container_state", v.state == s, container=c, state=s) for s in STATES)
            if v.health:
                out.extend(sample("immich_container_health", v.health == h, container=c, health=h) for h in HEALTH)
            out.append(sample("immich_container_restarts_total", v.restarts, container=c))
            out.append(sample("immich_container_exit_code", v.exit_code, container=c))
            if v.started_at is not None:
                out.append(sample("immich_container_start_timestamp_seconds", v.started_at, container=c))
        for v in self.ml_containers():
            out.append(sample("immich_container_log_gaps_total", self.gaps.get(v.name, 0), container=v.name))
        return out

    async def close(self) -> None:
        for t in list(self._followers.values()) + self._tasks:
            t.cancel()
        await asyncio.gather(*self._followers.values(), *self._tasks, return_exceptions=True)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._follow_mode and self._state_path is not None:
            # Pending Rich records stay pending: their continuation lines may still come after a restart.
            try:
                write_atomic(self._state_path, self.serialise())
            except OSError as e:
                log.warning("docker: cannot write %s: %s", self._state_path, e)
        await self.api.close()
