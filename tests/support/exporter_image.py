"""The exporter's own image, built by the tests from deploy/docker/Dockerfile, and the compose
snippet deploy/docker/compose.yml turned into the equivalent `docker run` flags.

No registry is reachable here, so the Dockerfile's BASE is made from what the package registries
give: `debootstrap --variant=minbase --include=python3,python3-venv bookworm` (Debian's mirror),
imported with `docker import` (`base_image()`, once per test run). The Python dependencies come
from PyPI as wheels into deploy/docker/wheels of a copy of the build context, because the build
runs with `--network none` (`build_image()`). The Dockerfile itself is built as it is shipped.

There is no `docker compose` here (Debian 12 has only the old Python docker-compose 1.29), so
`run_args()` reads the snippet and maps each key to its `docker run` flag, refusing keys it does not
know: a change to the snippet must be reflected here. Two keys cannot run on this machine and are
replaced, and say so: `deploy` (the NVIDIA runtime) by a bind mount of the fake libnvidia-ml where
the runtime would inject the real one, and `ports` (no network) by reading /metrics from inside.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import Any, Mapping

import yaml

from tests.support.dockerd import Dockerd

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy/docker/Dockerfile"
COMPOSE = ROOT / "deploy/docker/compose.yml"
BASE_TAG = "igx-test/debian-base:bookworm"
IMAGE_TAG = "immich-gpu-exporter:local"
DEBOOTSTRAP_CACHE = pathlib.Path("/var/cache/igx-debootstrap")
MIRROR = "http://deb.debian.org/debian"


def base_image(d: Dockerd) -> str:
    root = d.dir / "rootfs"
    DEBOOTSTRAP_CACHE.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
                        f"--cache-dir={DEBOOTSTRAP_CACHE}", "bookworm", str(root), MIRROR],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"debootstrap failed: {(r.stderr or r.stdout).strip().splitlines()[-3:]}")
    # what an image does not need (apt's downloaded packages and lists, docs, locales): half the
    # size, and the storage driver here (vfs) copies the whole root for every layer
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                 "usr/share/locale", "usr/share/info"):
        for p in (root / junk).glob("*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    imp = subprocess.run([d_cli(), "-H", d.host, "import", "-", BASE_TAG], stdin=tar.stdout, capture_output=True,
                         text=True, timeout=600)
    tar.wait()
    if imp.returncode != 0:
        raise RuntimeError(f"docker import failed: {imp.stderr.strip()}")
    shutil.rmtree(root, ignore_errors=True)
    return BASE_TAG


def d_cli() -> str:
    from tests.support.dockerd import DOCKER_CLI

    return DOCKER_CLI


def build_image(d: Dockerd, base: str) -> str:
    ctx = pathlib.Path(tempfile.mkdtemp(prefix="ctx-exporter-", dir=d.dir))
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy2(ROOT / name, ctx / name)
    shutil.copytree(ROOT / "immich_gpu_exporter", ctx / "immich_gpu_exporter",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (ctx / "deploy/docker").mkdir(parents=True)
    shutil.copy2(DOCKERFILE, ctx / "deploy/docker/Dockerfile")
    wheels = ctx / "deploy/docker/wheels"
    wheels.mkdir()
    pip = [str(ROOT / ".venv/bin/python"), "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(wheels)]
    subprocess.run(pip + ["--no-deps", str(ctx)], check=True, capture_output=True, timeout=300)
    subprocess.run(pip + ["aiohttp", "prometheus-client", "nvidia-ml-py"], check=True, capture_output=True,
                   timeout=300)
    # BuildKit (built into dockerd 20.10): the classic builder starts a container, i.e. a full vfs
    # copy of the root, for every instruction; measured here 4 min 24 s against 21 s
    d.cli("build", "-q", "--network", "none", "--build-arg", f"BASE={base}", "-f",
          str(ctx / "deploy/docker/Dockerfile"), "-t", IMAGE_TAG, str(ctx), timeout=900,
          env={"DOCKER_BUILDKIT": "1"})
    shutil.rmtree(ctx, ignore_errors=True)
    return IMAGE_TAG


def compose_service(name: str = "immich-gpu-exporter") -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"][name]


def _env_subst(value: str, env: Mapping[str, str]) -> str:
    # only the ${VAR:-default} form the snippet uses
    import re

    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), value)


def run_args(service: Mapping[str, Any], *, socket: str, state_dir: str, secrets: Mapping[str, str],
             env: Mapping[str, str], nvml_lib: str | None, extra_env: Mapping[str, str] = ()) -> list[str]:
    """`docker run` flags equivalent to the compose service (see the module docstring)."""
    args: list[str] = ["--network", "none"]
    for key, value in service.items():
        if key == "container_name":
            args += ["--name", value]
        elif key == "image":
            continue  # the last argument
        elif key == "restart":
            args += ["--restart", value]
        elif key == "user":
            args += ["--user", str(value)]
        elif key == "group_add":
            args += [a for g in value for a in ("--group-add", _env_subst(str(g), env))]
        elif key == "pid":
            args += ["--pid", value]
        elif key == "cgroup":
            args += ["--cgroupns", value]
        elif key == "read_only":
            args += ["--read-only"] if value else []
        elif key == "cap_drop":
            args += [a for c in value for a in ("--cap-drop", c)]
        elif key == "security_opt":
            args += [a for o in value for a in ("--security-opt", o)]
        elif key == "environment":
            args += [a for k, v in value.items() for a in ("-e", f"{k}={v}")]
        elif key == "secrets":
            args += [a for s in value for a in ("-v", f"{secrets[s]}:/run/secrets/{s}:ro")]
        elif key == "volumes":
            for v in value:
                src, dest, *mode = v.split(":")
                if src == "/var/run/docker.sock":
                    src = socket  # the test dockerd's socket, at the path the snippet mounts it
                elif not src.startswith("/"):
                    src = state_dir  # the named volume
                args += ["-v", ":".join([src, dest, *mode])]
        elif key == "ports":
            continue  # no network here: /metrics is read from inside the container
        elif key == "deploy":
            devices = value["resources"]["reservations"]["devices"]
            assert devices[0]["driver"] == "nvidia" and "utility" in devices[0]["capabilities"]
            if nvml_lib is not None:  # where the NVIDIA runtime puts the host's library
                args += ["-v", f"{nvml_lib}:/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1:ro"]
        else:
            raise AssertionError(f"compose key {key!r} has no docker run equivalent in the tests")
    for k, v in dict(extra_env).items():
        args += ["-e", f"{k}={v}"]
    return args


def socket_gid(path: str) -> str:
    return str(os.stat(path).st_gid)
