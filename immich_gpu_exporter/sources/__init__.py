"""The sources, by name. Each module holds one source; imports are lazy so a missing optional
library (pystemd, say) only takes its own source down."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from .base import Hub, Source

SOURCES = {
    "processes": ("immich_gpu_exporter.sources.processes", "ProcessesSource"),
    "nvml": ("immich_gpu_exporter.sources.nvml", "NvmlSource"),
    "systemd": ("immich_gpu_exporter.sources.systemd", "SystemdSource"),
    "journal": ("immich_gpu_exporter.sources.journal", "JournalSource"),
    "immich": ("immich_gpu_exporter.sources.immich", "ImmichSource"),
    "docker": ("immich_gpu_exporter.sources.docker", "DockerSource"),
    "remote": ("immich_gpu_exporter.sources.remote", "RemoteSource"),
    "probe": ("immich_gpu_exporter.sources.probe", "ProbeSource"),
}


def create(name: str, config: "Config", hub: "Hub") -> "Source":
    module, cls = SOURCES[name]
    return getattr(importlib.import_module(module), cls)(config, hub)


def enabled(config: "Config") -> list[str]:
    # The remote source exists only where there is a remote ML host to ask (role server); the probe only
    # when its interval is set (docs/probe.md: it is a synthetic load, never on by default).
    out = []
    for n in SOURCES:
        if n == "probe":
            on = bool(config["probe.interval"])
        else:
            on = config[f"collector.{n}"] and (n != "remote" or bool(config["remote-ml.exporter-url"]))
        if on:
            out.append(n)
    return out
