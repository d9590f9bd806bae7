"""The Docker Engine API client against a real aiohttp server on a unix socket, and the pure
rules that make a container an Immich component (compose service, image, name patterns)."""

from __future__ import annotations

import socket

import pytest
from aiohttp import web

from immich_gpu_exporter import docker_api as dk

ID = "3f1c9a5e2b7d4c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6"
ID2 = "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9"
PATTERNS = {"ml": ("immich-machine-learning.service", "immich_machine_learning"),
            "server": ("immich-server.service", "immich_server")}

# The shape of `docker inspect` for a container started by Immich's compose file (the fields we
# read; synthetic values in the real layout).
COMPOSE_ML = {
    "Id": ID, "Name": "/immich_machine_learning",
    "State": {"Status": "running", "Running": True, "Pid": 4242},
    "Config": {"Image": "ghcr.io/immich-app/immich-machine-learning:v3.1.0-cuda",
               "Labels": {"com.docker.compose.project": "immich", "com.docker.compose.service": "immich-machine-learning",
                          "com.docker.compose.version": "2.29.7"}},
}


@pytest.mark.parametrize("what,body,name,component", [
    ("compose service label", COMPOSE_ML, "immich_machine_learning", "ml"),
    ("renamed container, compose service still says server",
     {"Id": ID, "Name": "/photos-app-1", "Config": {"Image": "ghcr.io/immich-app/immich-server:release",
                                                   "Labels": {"com.docker.compose.service": "immich-server"}}},
     "photos-app-1", "server"),
    ("no compose: the image decides, any tag",
     {"Id": ID, "Name": "/ml", "Config": {"Image": "ghcr.io/immich-app/immich-machine-learning:release-openvino",
                                         "Labels": {}}}, "ml", "ml"),
    ("image pinned by digest",
     {"Id": ID, "Name": "/srv", "Config": {"Image": "ghcr.io/immich-app/immich-server@sha256:" + "ab" * 32}},
     "srv", "server"),
    ("another compose service: falls back to the name patterns",
     {"Id": ID, "Name": "/immich_server", "Config": {"Image": "example/immich-fork:1",
                                                    "Labels": {"com.docker.compose.service": "app"}}},
     "immich_server", "server"),
    ("a stranger", {"Id": ID, "Name": "/frigate", "Config": {"Image": "ghcr.io/blakeblackshear/frigate:stable"}},
     "frigate", "other"),
])
def test_container_component_from_compose_service_then_image_then_name(what, body, name, component):
    info = dk.parse_inspect(body)
    assert info is not None and info.name == name
    assert dk.container_component(PATTERNS, info.name, info) == component


def test_container_component_without_the_api_uses_the_name_patterns():
    assert dk.container_component(PATTERNS, "immich_machine_learning") == "ml"
    assert dk.container_component(PATTERNS, ID[:12]) == "other"
    assert dk.container_component(PATTERNS, "") == "other"


@pytest.mark.parametrize("image,repo", [
    ("ghcr.io/immich-app/immich-server:release", "ghcr.io/immich-app/immich-server"),
    ("registry.local:5000/immich-app/immich-server", "registry.local:5000/immich-app/immich-server"),
    ("registry.local:5000/immich-server:v3@sha256:00", "registry.local:5000/immich-server"),
    ("", ""),
])
def test_image_repository_strips_tag_and_digest_not_the_registry_port(image, repo):
    assert dk.image_repository(image) == repo


@pytest.mark.parametrize("body", [None, [], {"Id": ID}, {"Id": ID, "Name": "/"}, {"Name": "/x"}])
def test_parse_inspect_rejects_what_names_no_container(body):
    assert dk.parse_inspect(body) is None


def test_parse_inspect_tolerates_missing_config():
    info = dk.parse_inspect({"Id": ID, "Name": "/x", "Config": None, "State": "odd"})
    assert info == dk.ContainerInfo(ID, "x")


# --- over a real unix socket ----------------------------------------------------------------------

@pytest.fixture
async def docker_api(tmp_path):
    calls: list[str] = []

    async def inspect(request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        calls.append(cid)
        if cid == ID:
            return web.json_response(COMPOSE_ML)
        return web.json_response({"message": f"No such container: {cid}"}, status=404)

    app = web.Application()
    app.router.add_get("/containers/{id}/json", inspect)
    runner = web.AppRunner(app)
    await runner.setup()
    path = str(tmp_path / "docker.sock")
    site = web.UnixSite(runner, path)
    await site.start()
    yield path, calls
    await runner.cleanup()


async def test_inspect_resolves_and_caches_hits_and_misses(docker_api):
    path, calls = docker_api
    client = dk.DockerClient(path)
    try:
        got = await client.inspect([ID, ID2])
        assert list(got) == [ID] and got[ID].compose_service == "immich-machine-learning"
        assert got[ID].state == "running" and got[ID].image.endswith(":v3.1.0-cuda")
        assert await client.names([ID, ID2]) == {ID: "immich_machine_learning"}
        assert sorted(calls) == sorted([ID, ID2])  # once each: hits and misses cached
        client.forget_except([])
        assert await client.names([ID]) == {ID: "immich_machine_learning"}
        assert calls.count(ID) == 2  # forgotten ids are asked again
    finally:
        await client.close()


async def test_request_is_the_raw_call(docker_api):
    path, _ = docker_api
    client = dk.DockerClient(path)
    try:
        status, body = await client.request("GET", f"/containers/{ID2}/json")
        assert status == 404 and "No such container" in body["message"]
    finally:
        await client.close()


async def test_without_socket_nothing_resolves(tmp_path):
    client = dk.DockerClient(str(tmp_path / "absent.sock"))
    assert await client.inspect([ID]) == {}
    await client.close()


async def test_on_a_dead_socket_it_is_best_effort(tmp_path):
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # bound, never listening: connect is refused
    try:
        client = dk.DockerClient(str(path), timeout=0.5)
        assert await client.names([ID]) == {}
        await client.close()
    finally:
        s.close()
