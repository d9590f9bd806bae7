"""The sources, by name. Each module holds one source; imports are lazy so a missing optional
library (pystemd, say) only takes its own source down."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from .base import Hub, Source

SOURCES = {
    "nvml": ("immich_gpu_exporter.sources.nvml", "NvmlSource"),
    "systemd": ("immich_gpu_exporter.sources.systemd", "SystemdSource"),
    "journal": ("immich_gpu_exporter.sources.journal", "JournalSource"),
    "immich": ("immich_gpu_exporter.sources.immich", "ImmichSource"),
    "remote": ("immich_gpu_exporter.sources.remote", "RemoteSource"),
}


def create(name: str, config: "Config", hub: "Hub") -> "Source":
    module, cls = SOURCES[name]
    return getattr(importlib.import_module(module), cls)(config, hub)


def enabled(config: "Config") -> list[str]:
    # The remote source exists only where there is a remote ML host to ask (role server).
    return [n for n in SOURCES if config[f"collector.{n}"] and (n != "remote" or config["remote-ml.exporter-url"])]
