"""The project's one client of the Docker Engine API (Podman's compat API answers the same).

Owns the unix-socket connection to the engine and what a container *is* for Immich: its name,
image and compose labels (`ContainerInfo`, from `GET /containers/<id>/json`) and the Immich
component that follows from them (`container_component()`, pure): the compose service label
`com.docker.compose.service` (`immich-server`, `immich-machine-learning` in Immich's compose
file), else the image repository (`ghcr.io/immich-app/immich-server`,
`.../immich-machine-learning`, any tag), else the configured name patterns. Without an
answering API (no Docker, no permission on the socket) a container keeps its short id and
only the name patterns can place it.

`DockerClient` is best effort and never raises out of its public calls: an unreachable socket
is remembered for `retry` seconds so a collection cycle does not pay a failed connect each time.
`request()` is the low-level call other features build on. The docker source's calls (`get()`,
`stream()`, `containers()`, `inspect_json()`, `events()`, `logs()`) raise `DockerUnavailable`
with a short reason instead: that source reports itself down with it.

The pure reading of container logs and facts (table-tested): `demux()` splits the multiplexed
stdout/stderr stream of a non-TTY container's logs into frames; `split_timestamp()` reads the
RFC 3339 nanosecond stamp that `timestamps=1` puts before each line; `LogPosition` decides which
lines of a re-read log were already applied (the logs API has no cursor: the last timestamp, with
nanoseconds, and how many lines carried exactly that timestamp); `flavour()` names the hardware
flavour of an Immich image tag; `gpu_access()` says how a container was given a GPU;
`container_view()` keeps the few fields of an inspect answer the docker source uses (never the
environment: it holds database passwords).
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import json
import logging
import math
import os
import re
import struct
import time
from typing import Any, AsyncIterator, Iterable, Mapping, Sequence

from .attribution import OTHER, component_of

log = logging.getLogger("immich_gpu_exporter.docker")

COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
# Immich's own compose file (docker/docker-compose.yml) names its services and images so.
IMMICH_SERVICES = {"immich-server": "server", "immich-machine-learning": "ml"}
IMMICH_IMAGES = {"ghcr.io/immich-app/immich-server": "server", "ghcr.io/immich-app/immich-machine-learning": "ml"}


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerInfo:
    """What the engine says about one container; empty strings when it does not say."""

    id: str
    name: str  # without the leading "/"
    image: str = ""  # Config.Image as the user wrote it (ghcr.io/immich-app/immich-server:release)
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    state: str = ""  # State.Status: running, exited, restarting, ...

    @property
    def compose_service(self) -> str:
        return self.labels.get(COMPOSE_SERVICE_LABEL, "")


def parse_inspect(body: Any) -> ContainerInfo | None:
    """`GET /containers/<id>/json` -> ContainerInfo (pure); None when it names no container."""
    if not isinstance(body, dict):
        return None
    name = body.get("Name")
    cid = body.get("Id")
    if not isinstance(name, str) or not name.strip("/") or not isinstance(cid, str):
        return None
    cfg = body.get("Config") if isinstance(body.get("Config"), dict) else {}
    labels = cfg.get("Labels") if isinstance(cfg.get("Labels"), dict) else {}
    state = body.get("State") if isinstance(body.get("State"), dict) else {}
    image = cfg.get("Image")
    return ContainerInfo(cid, name.lstrip("/"), image if isinstance(image, str) else "",
                         {str(k): str(v) for k, v in labels.items()},
                         state.get("Status") if isinstance(state.get("Status"), str) else "")


def image_repository(image: str) -> str:
    """ghcr.io/immich-app/immich-server:v3.1.0@sha256:... -> ghcr.io/immich-app/immich-server.
    A colon after the last slash is a tag; one before it belongs to a registry port."""
    repo = image.split("@", 1)[0]
    slash = repo.rfind("/")
    colon = repo.rfind(":")
    return repo[:colon] if colon > slash else repo


def container_component(patterns: Mapping[str, Sequence[str]], name: str, info: ContainerInfo | None = None) -> str:
    """The Immich component of a container (pure): compose service, image, then name patterns."""
    if info is not None:
        by_service = IMMICH_SERVICES.get(info.compose_service)
        if by_service is not None:
            return by_service
        by_image = IMMICH_IMAGES.get(image_repository(info.image))
        if by_image is not None:
            return by_image
    return component_of(patterns, container=name) if name else OTHER


# --- the multiplexed log stream ------------------------------------------------------------------

STREAMS = {0: "stdin", 1: "stdout", 2: "stderr"}
_HEADER = struct.Struct(">BxxxL")


def demux(buf: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Frames of Docker's stdcopy format: 8-byte header (stream, 3 zero bytes, big-endian
    length) then the payload. Returns the complete frames and the unconsumed rest."""
    frames: list[tuple[str, bytes]] = []
    pos = 0
    while len(buf) - pos >= 8:
        stream, size = _HEADER.unpack_from(buf, pos)
        if len(buf) - pos - 8 < size:
            break
        frames.append((STREAMS.get(stream, "stdout"), buf[pos + 8:pos + 8 + size]))
        pos += 8 + size
    return frames, buf[pos:]


def looks_multiplexed(first: bytes) -> bool:
    """A TTY container's log is raw text; a multiplexed one starts with a stream byte 0-2 and
    three zero bytes (no text line starts so)."""
    return len(first) >= 8 and first[0] in (0, 1, 2) and first[1:4] == b"\0\0\0"


# --- timestamps ----------------------------------------------------------------------------------

_TS = re.compile(rb"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) ")


def split_timestamp(line: bytes) -> tuple[int, bytes] | None:
    """(unix nanoseconds, rest of the line) of a `timestamps=1` log line, None if it has no stamp."""
    m = _TS.match(line)
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(x) for x in m.groups()[:6])
    frac = (m.group(7) or b"").ljust(9, b"0")
    secs = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))
    tz = m.group(8)
    if tz != b"Z":
        sign = 1 if tz[:1] == b"+" else -1
        secs -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return secs * 1_000_000_000 + int(frac), line[m.end():]


def since_param(ns: int) -> str:
    """The logs API's `since` with nanoseconds ("seconds.nanoseconds"); inclusive: a line stamped
    exactly `ns` is returned again."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


@dataclasses.dataclass(slots=True)
class LogPosition:
    """How far a container's log was applied: the last line's timestamp (ns) and how many lines
    carried exactly that timestamp. Re-reading with `since=ts` (inclusive) returns those lines
    again; `accept()` skips them, so nothing is applied twice and nothing after them is lost.

    If fewer than `at_ts` lines come back at `ts` (the first line is already later), the lines
    already read are gone from the log: it was rotated past them while nobody read it, and lines
    between may be gone too. That is the one loss the logs API allows; `gap` records it once.
    """

    ts: int = 0
    at_ts: int = 0
    _skip: int = 0  # lines at `ts` still to skip in the current read
    _checking: bool = False  # the current read has not yet passed `ts`
    gap: bool = False

    def begin(self) -> None:
        """A new read (since=ts) starts."""
        self._skip = self.at_ts
        self._checking = self.ts > 0 and self.at_ts > 0

    def accept(self, ns: int) -> bool:
        """True if the line stamped `ns` is new (and advance), False if it was applied already."""
        if self._checking:
            if ns == self.ts and self._skip > 0:
                self._skip -= 1
                return False
            if ns < self.ts:
                return False  # the daemon's since filter is inclusive, never earlier; be safe
            self._checking = False
            if self._skip > 0:
                self.gap = True
                self._skip = 0
        if ns == self.ts:
            self.at_ts += 1
        elif ns > self.ts:
            self.ts, self.at_ts = ns, 1
        # a line stamped earlier than the last one (clock step inside the container host) is new
        # all the same; the position keeps the later stamp
        return True

    def end_of_read(self) -> None:
        """The read ended (container stopped, stream closed) without passing `ts`: if it did not
        even return the lines already read, they were rotated away."""
        if self._checking and self._skip > 0 and self._skip == self.at_ts:
            self.gap = True
        self._checking = False
        self._skip = 0

    def dump(self) -> dict[str, int]:
        return {"ts": self.ts, "at_ts": self.at_ts}

    @classmethod
    def load(cls, d: Mapping[str, Any]) -> "LogPosition":
        return cls(int(d.get("ts") or 0), int(d.get("at_ts") or 0))


# --- what an Immich container is -----------------------------------------------------------------

FLAVOURS = ("cuda", "openvino", "rocm", "armnn", "rknn")


def image_tag(image: str) -> str:
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[colon + 1:] if colon > slash else ""


def flavour(image: str) -> str:
    """Hardware flavour of an Immich ML image from its tag suffix (`release-cuda`,
    `v2.0.1-openvino`, `pr-123-rocm`, `v1.130.3-armnn`), "none" for the CPU image."""
    tag = image_tag(image)
    for f in FLAVOURS:
        if tag == f or tag.endswith("-" + f):
            return f
    return "none"


def gpu_access(host_config: Mapping[str, Any]) -> str:
    """How a container was given accelerators, as a bounded '+'-joined list of: device_request
    (`--gpus` / compose `deploy.resources.reservations.devices` with the gpu capability),
    nvidia_runtime (`runtime: nvidia`), cdi (CDI device names like nvidia.com/gpu=all),
    dri (/dev/dri for OpenVINO/VAAPI), kfd (/dev/kfd for ROCm); "none" if nothing."""
    kinds: set[str] = set()
    for req in host_config.get("DeviceRequests") or ():
        caps = {c for group in (req.get("Capabilities") or ()) for c in (group or ())}
        if req.get("Driver") == "cdi":
            kinds.add("cdi")
        elif "gpu" in caps or req.get("Driver") == "nvidia":
            kinds.add("device_request")
    if (host_config.get("Runtime") or "") == "nvidia":
        kinds.add("nvidia_runtime")
    for dev in host_config.get("Devices") or ():
        path = str(dev.get("PathOnHost") or "")
        if "=" in path and "/" in path.split("=", 1)[0]:
            kinds.add("cdi")  # vendor/class=name
        elif path.startswith("/dev/dri"):
            kinds.add("dri")
        elif path == "/dev/kfd":
            kinds.add("kfd")
        elif path.startswith("/dev/nvidia"):
            kinds.add("nvidia_devices")  # /dev/nvidia* passed by hand
    return "+".join(sorted(kinds)) or "none"


SERVICE_LABEL = COMPOSE_SERVICE_LABEL


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerView:
    """The fields of a container the exporter uses; nothing else of the inspect answer is kept."""

    id: str
    name: str
    service: str
    image: str
    state: str  # created, running, paused, restarting, removing, exited, dead
    health: str  # starting, healthy, unhealthy, "" without a health check
    restarts: int
    exit_code: int  # of the last run (0 while it has not exited)
    started_at: float | None  # unix seconds
    pid: int  # the container's init process as the host sees it, 0 when not running
    log_driver: str
    tty: bool
    gpu_access: str


_ISO = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


def parse_time(s: str) -> float | None:
    """Docker's RFC 3339 times; the zero time 0001-01-01T00:00:00Z (never started) is None."""
    m = _ISO.match(s or "")
    if m is None:
        return None
    y, mo, d, h, mi, sec = (int(x) for x in m.groups()[:6])
    if y < 1971:
        return None
    t = calendar.timegm((y, mo, d, h, mi, sec, 0, 0, 0)) + float("0." + (m.group(7) or "0"))
    tz = m.group(8)
    if tz != "Z":
        t -= (1 if tz[0] == "+" else -1) * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return t


def container_view(inspect: Mapping[str, Any]) -> ContainerView:
    state = inspect.get("State") or {}
    config = inspect.get("Config") or {}
    host = inspect.get("HostConfig") or {}
    labels = config.get("Labels") or {}
    health = (state.get("Health") or {}).get("Status") or ""
    return ContainerView(
        id=str(inspect.get("Id") or ""),
        name=str(inspect.get("Name") or "").lstrip("/"),
        service=str(labels.get(SERVICE_LABEL) or ""),
        image=str(config.get("Image") or inspect.get("Image") or ""),
        state=str(state.get("Status") or "unknown"),
        health=health if health in ("starting", "healthy", "unhealthy") else "",
        restarts=int(inspect.get("RestartCount") or 0),
        exit_code=int(state.get("ExitCode") or 0),
        started_at=parse_time(str(state.get("StartedAt") or "")),
        pid=int(state.get("Pid") or 0),
        log_driver=str((host.get("LogConfig") or {}).get("Type") or ""),
        tty=bool(config.get("Tty")),
        gpu_access=gpu_access(host),
    )


@dataclasses.dataclass(frozen=True)
class Matcher:
    """Which containers are Immich's, and which component each is: by compose service label or by
    image repository (configurable); first match wins, ML before server."""

    ml_services: tuple[str, ...] = ("immich-machine-learning",)
    server_services: tuple[str, ...] = ("immich-server",)
    ml_images: tuple[str, ...] = ("ghcr.io/immich-app/immich-machine-learning",)
    server_images: tuple[str, ...] = ("ghcr.io/immich-app/immich-server",)

    def component(self, service: str, image: str) -> str | None:
        repo = image_repository(image)
        if service in self.ml_services or repo in self.ml_images:
            return "ml"
        if service in self.server_services or repo in self.server_images:
            return "server"
        return None


class DockerUnavailable(Exception):
    """The API cannot be reached or refused; `reason` is a short bounded label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class DockerClient:
    """Container facts over the engine API on a unix socket; cached per container id."""

    def __init__(self, socket_path: str, timeout: float = 1.0, retry: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.retry = retry
        self._known: dict[str, ContainerInfo] = {}
        self._misses: dict[str, float] = {}  # id -> monotonic time of the failed lookup
        self._session: Any = None

    def _client(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """One API call: (HTTP status, decoded JSON body or None). Raises aiohttp/OS errors;
        the callers decide what a failure means for them."""
        async with self._client().request(method, f"http://docker{path}", **kwargs) as r:
            body = await r.json(content_type=None) if r.status != 204 else None
            return r.status, body

    async def _inspect_one(self, container_id: str) -> ContainerInfo | None:
        status, body = await self.request("GET", f"/containers/{container_id}/json")
        return parse_inspect(body) if status == 200 else None

    def pending(self, ids: Iterable[str]) -> list[str]:
        """The ids `inspect()` would ask the engine about now (neither known nor recently missed)."""
        now = time.monotonic()
        return [i for i in set(ids) if i not in self._known and now - self._misses.get(i, -math.inf) >= self.retry]

    def cached(self, ids: Iterable[str]) -> dict[str, ContainerInfo]:
        """What the engine already said about these ids; no I/O."""
        return {i: self._known[i] for i in ids if i in self._known}

    async def inspect(self, ids: Iterable[str]) -> dict[str, ContainerInfo]:
        """Facts of the given ids that the engine gave; never raises. Answers are cached for as
        long as the id is live (see `forget_except`); failures are retried after `retry`."""
        ids = set(ids)
        now = time.monotonic()
        todo = self.pending(ids)
        if todo and os.path.exists(self.socket_path):
            results = await asyncio.gather(*(self._inspect_one(i) for i in todo), return_exceptions=True)
            for cid, res in zip(todo, results):
                if isinstance(res, ContainerInfo):
                    self._known[cid] = res
                    self._misses.pop(cid, None)
                else:
                    if isinstance(res, BaseException):
                        log.debug("docker inspect %s: %s", cid[:12], res)
                    self._misses[cid] = now
        else:
            for cid in todo:
                self._misses[cid] = now
        return self.cached(ids)

    async def names(self, ids: Iterable[str]) -> dict[str, str]:
        """Container id -> name for the ids the engine knows; never raises."""
        return {i: c.name for i, c in (await self.inspect(ids)).items()}

    def forget_except(self, live: Iterable[str]) -> None:
        keep = set(live)
        for d in (self._known, self._misses):
            for k in [k for k in d if k not in keep]:
                del d[k]

    # -- the docker source's calls: raise DockerUnavailable -----------------------------------------
    async def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        import aiohttp

        try:
            async with self._client().get(f"http://docker{path}", params=params,
                                          timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                if r.status == 404:
                    raise DockerUnavailable("not_found", f"{path}: 404")
                if r.status in (401, 403):
                    raise DockerUnavailable("permission_denied", f"{path}: HTTP {r.status}")
                if r.status != 200:
                    raise DockerUnavailable("http_error", f"{path}: HTTP {r.status}")
                return await r.json(content_type=None)
        except FileNotFoundError:
            raise DockerUnavailable("no_socket", f"no Docker API socket at {self.socket_path}") from None
        except PermissionError:
            raise DockerUnavailable("permission_denied", f"{self.socket_path}: permission denied") from None
        except aiohttp.ClientConnectorError as e:
            reason = "permission_denied" if isinstance(e.os_error, PermissionError) else "no_socket"
            raise DockerUnavailable(reason, f"cannot connect to {self.socket_path}: {e.os_error}") from None
        except asyncio.TimeoutError:  # a hung dockerd: its socket accepts, nothing answers
            raise DockerUnavailable("timeout", f"{path}: no answer within {self.timeout:g}s") from None
        except (aiohttp.ClientError, ValueError) as e:
            raise DockerUnavailable("http_error", f"{path}: {type(e).__name__}: {e}") from None

    async def stream(self, path: str, params: Mapping[str, str] | None = None) -> AsyncIterator[bytes]:
        """Raw chunks of a long-lived answer (events, followed logs) until the daemon ends it."""
        import aiohttp

        try:
            async with self._client().get(f"http://docker{path}", params=params,
                                          timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout,
                                                                        sock_connect=self.timeout)) as r:
                if r.status != 200:
                    raise DockerUnavailable("not_found" if r.status == 404 else "http_error",
                                            f"{path}: HTTP {r.status}")
                async for chunk in r.content.iter_any():
                    yield chunk
        except (FileNotFoundError, aiohttp.ClientConnectorError) as e:
            raise DockerUnavailable("no_socket", f"cannot connect to {self.socket_path}: {e}") from None
        except asyncio.TimeoutError:
            raise DockerUnavailable("timeout", f"{path}: no answer within {self.timeout:g}s") from None
        except aiohttp.ClientError as e:
            raise DockerUnavailable("http_error", f"{path}: {type(e).__name__}: {e}") from None

    async def containers(self) -> list[dict[str, Any]]:
        return await self.get("/containers/json", {"all": "1"})

    async def inspect_json(self, container_id: str) -> dict[str, Any]:
        return await self.get(f"/containers/{container_id}/json")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Container events as they happen (one JSON object per line)."""
        rest = b""
        filters = json.dumps({"type": ["container"]})
        async for chunk in self.stream("/events", {"filters": filters}):
            buf = rest + chunk
            *lines, rest = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue

    async def logs(self, container_id: str, since_ns: int, follow: bool,
                   tty: bool | None = None) -> AsyncIterator[tuple[str, int, bytes]]:
        """(stream, unix ns, line without its newline) of a container's log from `since_ns`
        (inclusive), stdout and stderr, timestamps on. The multiplexed framing of non-TTY
        containers is undone; a TTY container's raw stream is reported as stdout."""
        params = {"stdout": "1", "stderr": "1", "timestamps": "1", "follow": "1" if follow else "0"}
        if since_ns > 0:
            params["since"] = since_param(since_ns)
        raw = b""
        partial: dict[str, bytes] = {}
        mux: bool | None = None if tty is None else not tty
        async for chunk in self.stream(f"/containers/{container_id}/logs", params):
            raw += chunk
            if mux is None:
                if len(raw) < 8:
                    continue
                mux = looks_multiplexed(raw)
            if mux:
                frames, raw = demux(raw)
            else:
                frames, raw = [("stdout", raw)], b""
            for stream, payload in frames:
                data = partial.pop(stream, b"") + payload
                *lines, tail = data.split(b"\n")
                if tail:
                    partial[stream] = tail
                for line in lines:
                    yield _line(stream, line)
        if raw and not mux:
            partial["stdout"] = partial.get("stdout", b"") + raw
        for stream, tail in partial.items():
            if tail:
                yield _line(stream, tail)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _line(stream: str, line: bytes) -> tuple[str, int, bytes]:
    if line.endswith(b"\r"):
        line = line[:-1]
    stamped = split_timestamp(line)
    if stamped is None:
        return stream, 0, line
    return stream, stamped[0], stamped[1]


def journal_entry(container: str, stream: str, ns: int, text: str) -> dict[str, Any]:
    """A container log line in the shape `journalctl -o json` gives an entry of Docker's journald
    log driver (CONTAINER_NAME, PRIORITY 6 for stdout and 3 for stderr, microsecond realtime), so
    the ML log parser reads both the same way."""
    return {"MESSAGE": text, "CONTAINER_NAME": container, "PRIORITY": "3" if stream == "stderr" else "6",
            "__REALTIME_TIMESTAMP": str(ns // 1000)}

