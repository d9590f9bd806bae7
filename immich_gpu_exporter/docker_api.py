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
`request()` is the low-level call other features build on (container states, logs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

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

    async def inspect(self, ids: Iterable[str]) -> dict[str, ContainerInfo]:
        """Facts of the given ids that the engine gave; never raises. Answers are cached for as
        long as the id is live (see `forget_except`); failures are retried after `retry`."""
        ids = set(ids)
        now = time.monotonic()
        todo = [i for i in ids if i not in self._known and now - self._misses.get(i, -math.inf) >= self.retry]
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
        return {i: self._known[i] for i in ids if i in self._known}

    async def names(self, ids: Iterable[str]) -> dict[str, str]:
        """Container id -> name for the ids the engine knows; never raises."""
        return {i: c.name for i, c in (await self.inspect(ids)).items()}

    def forget_except(self, live: Iterable[str]) -> None:
        keep = set(live)
        for d in (self._known, self._misses):
            for k in [k for k in d if k not in keep]:
                del d[k]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
