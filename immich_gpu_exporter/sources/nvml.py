"""NVML source (minimal: reports the library state; full collection comes with the GPU issue)."""

from __future__ import annotations

from ..core import CollectResult, SourceDown
from .base import BlockingWorker, Source


class NvmlSource(Source):
    name = "nvml"

    def __init__(self, config, hub):  # type: ignore[no-untyped-def]
        super().__init__(config, hub)
        self._worker = BlockingWorker("nvml")
        self._inited = False

    @property
    def interval(self) -> float:
        return float(self.config["nvml.interval"])

    def _init(self) -> None:
        import pynvml

        if self._inited:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            raise SourceDown("library_not_found", "libnvidia-ml.so.1 not found (no NVIDIA driver?)") from None
        except pynvml.NVMLError as e:
            raise SourceDown("init_failed", f"nvmlInit failed: {e}") from None
        self._inited = True

    async def collect(self) -> CollectResult:
        await self._worker.call(self._init)
        return CollectResult()

    async def close(self) -> None:
        self._worker.shutdown()
