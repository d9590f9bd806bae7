"""The Immich source against the fake server, as the Immich tests build it."""

from __future__ import annotations

import asyncio
from types import MappingProxyType

from immich_gpu_exporter import config as configmod
from immich_gpu_exporter.core import CollectResult, Snapshot, SourceState
from immich_gpu_exporter.metrics import check_sample
from immich_gpu_exporter.sources.base import Hub
from immich_gpu_exporter.sources.immich import ImmichSource
from tests.support.fake_immich import FakeImmich

KEY = "good-key"


class Provider:
    """The journal source's published facts, as the hub would show them."""

    def __init__(self, value: str | None = None) -> None:
        self.value = value

    def snapshot(self) -> Snapshot:
        journal = SourceState("journal", up=True, facts=MappingProxyType({"effective_provider": self.value}))
        return Snapshot(1, MappingProxyType({"journal": journal}), MappingProxyType({}))


def make_source(fake: FakeImmich, key: str | None = KEY, provider: Provider | None = None, clock=None,
                **cfg) -> ImmichSource:
    values = dict(immich_url=fake.url, immich_ml_url=fake.ml_url, immich_api_key=key, immich_interval=0.1,
                  immich_timeout=0.5)
    values.update(cfg)
    config = configmod.defaults().replace(**values)
    provider = provider or Provider()
    return ImmichSource(config, Hub(provider.snapshot), clock=clock)


def values(result: CollectResult, name: str) -> dict[tuple, float]:
    out = {}
    for s in result.samples:
        check_sample(s)
        if s.name == name:
            out[tuple(v for _, v in s.labels)] = s.value
    return out


async def collect(src: ImmichSource) -> CollectResult:
    return await asyncio.wait_for(src.collect(), src.timeout)
