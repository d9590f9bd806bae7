"""`immich-gpu-exporter check` (placeholder until its issue lands)."""

import sys


def run_check(cfg) -> int:  # type: ignore[no-untyped-def]
    print("immich-gpu-exporter: check is not implemented yet", file=sys.stderr)
    return 2
