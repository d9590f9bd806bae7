"""Docker probes for `immich-gpu-exporter check`: does the ML container fit the GPU of this host?

Three questions, each answered by a `Finding` (ok True / False, or None where it cannot be told):

* `flavour_fits()`: the ML image's flavour against the accelerators present (`-cuda` needs an
  NVIDIA GPU, `-openvino` an Intel /dev/dri, `-rocm` /dev/kfd; the CPU image on a GPU host wastes it).
* `access_fits()`: the ML container was given that accelerator (compose's device reservation, the
  nvidia runtime, CDI, or the device nodes).
* `logged_provider()`: the execution provider the container's own log shows since its last start,
  read once through the same parser and state as the exporter (`mllog`).

`probe()` runs all three against a socket on its own; `check` (check.py, `check_docker_ml`) applies
the same pure functions to what its one cycle of the docker source saw. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

from . import docker_api as dapi
from .mllog import MLState, Parser


@dataclasses.dataclass(frozen=True)
class Finding:
    check: str  # ml_flavour, ml_gpu_access, ml_provider, docker
    ok: bool | None
    detail: str


@dataclasses.dataclass(frozen=True)
class Accelerators:
    nvidia: bool = False
    dri: bool = False
    kfd: bool = False

    @classmethod
    def on_this_host(cls, dev: str = "/dev") -> "Accelerators":
        return cls(os.path.exists(f"{dev}/nvidiactl") or os.path.exists(f"{dev}/nvidia0"),
                   os.path.isdir(f"{dev}/dri"), os.path.exists(f"{dev}/kfd"))


@dataclasses.dataclass(frozen=True)
class ContainerLike:
    """The three fields the probes read, from a ContainerView or from immich_container_info labels."""

    name: str
    image: str
    gpu_access: str


_NEEDS = {"cuda": "nvidia", "openvino": "dri", "rocm": "kfd"}
_ACCESS = {"cuda": ("device_request", "nvidia_runtime", "cdi", "nvidia_devices"), "openvino": ("dri",),
           "rocm": ("kfd",)}


def flavour_fits(view: dapi.ContainerView | ContainerLike, acc: Accelerators) -> Finding:
    f = dapi.flavour(view.image)
    if f == "none":
        if acc.nvidia or acc.dri or acc.kfd:
            return Finding("ml_flavour", False, f"{view.name} runs the CPU image {view.image} on a host with "
                           "an accelerator: add -cuda, -openvino or -rocm to the image tag (hwaccel.ml.yml)")
        return Finding("ml_flavour", True, f"{view.name}: CPU image, no accelerator on this host")
    need = _NEEDS.get(f)
    if need is None:
        return Finding("ml_flavour", None, f"{view.name}: flavour {f} is not checked here (armnn, rknn)")
    if getattr(acc, need):
        return Finding("ml_flavour", True, f"{view.name}: -{f} image and a matching device on this host")
    return Finding("ml_flavour", False, f"{view.name}: -{f} image but no {need} device on this host")


def access_fits(view: dapi.ContainerView | ContainerLike) -> Finding:
    f = dapi.flavour(view.image)
    wanted = _ACCESS.get(f)
    if wanted is None:
        return Finding("ml_gpu_access", None if f != "none" else True, f"{view.name}: gpu_access={view.gpu_access}")
    given = set(view.gpu_access.split("+"))
    if given & set(wanted):
        return Finding("ml_gpu_access", True, f"{view.name}: -{f} image with gpu_access={view.gpu_access}")
    return Finding("ml_gpu_access", False, f"{view.name}: -{f} image but gpu_access={view.gpu_access}: extend the "
                   f"service from hwaccel.ml.yml ({f}) so the container gets the device")


def verdict_of(name: str, preferred: str | None, effective: str | None, fallback: bool) -> Finding:
    if effective is None:
        return Finding("ml_provider", None, f"{name}: no execution provider in the log since the last start "
                       "(no model loaded yet)")
    if fallback:
        return Finding("ml_provider", False, f"{name}: prefers {preferred} but runs on {effective} (CPU fallback)")
    return Finding("ml_provider", True, f"{name}: runs on {effective}")


def verdict_finding(name: str, ml: MLState) -> Finding:
    return verdict_of(name, ml.preferred, ml.effective, ml.cpu_fallback)


async def logged_provider(api: dapi.DockerClient, view: dapi.ContainerView) -> Finding:
    parser, ml = Parser(), MLState()
    since = int((view.started_at or 0) * 1e9)
    async for stream, ns, line in api.logs(view.id, since, follow=False, tty=view.tty):
        for ev in parser.feed(dapi.journal_entry(view.name, stream, ns, line.decode("utf-8", "replace"))):
            ml.apply(ev)
    for ev in parser.flush():
        ml.apply(ev)
    return verdict_finding(view.name, ml)


async def probe(socket: str, matcher: dapi.Matcher | None = None,
                acc: Accelerators | None = None) -> list[Finding]:
    """All Docker findings for this host; never raises for an unreachable daemon."""
    matcher = matcher or dapi.Matcher()
    acc = acc or Accelerators.on_this_host()
    api = dapi.DockerClient(socket)
    out: list[Finding] = []
    try:
        views = []
        for c in await api.containers():
            comp = matcher.component(str((c.get("Labels") or {}).get(dapi.SERVICE_LABEL) or ""), str(c.get("Image") or ""))
            if comp == "ml":
                views.append(dapi.container_view(await api.inspect_json(str(c["Id"]))))
        if not views:
            return [Finding("docker", None, "no Immich ML container found")]
        for v in views:
            out += [flavour_fits(v, acc), access_fits(v)]
            if v.log_driver in ("journald", "none"):
                out.append(Finding("ml_provider", None, f"{v.name} logs to {v.log_driver}: see the journal check"))
            else:
                out.append(await logged_provider(api, v))
    except dapi.DockerUnavailable as e:
        out.append(Finding("docker", None if e.reason == "no_socket" else False, e.detail))
    finally:
        await api.close()
    return out


def summary(findings: Iterable[Finding]) -> bool:
    """True when nothing is wrong (unknowns are not failures)."""
    return all(f.ok is not False for f in findings)
