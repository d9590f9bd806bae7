"""`immich-gpu-exporter demo` (placeholder until the dashboard issue lands)."""

import sys


def run_demo(cfg) -> int:  # type: ignore[no-untyped-def]
    print("immich-gpu-exporter: demo is not implemented yet", file=sys.stderr)
    return 2
