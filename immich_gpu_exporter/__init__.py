"""immich-gpu-exporter: proves whether Immich really runs on the GPU, as Prometheus metrics."""

__version__ = "0.1.0"
