"""Logging to stderr, one line per event; journald-friendly under systemd.

Under systemd (JOURNAL_STREAM is set) lines carry no timestamp of their own and start with
the sd-daemon priority prefix (<3> error, <4> warning, <6> info, <7> debug), which journald
turns into the entry's PRIORITY.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record).replace("\n", " | ")
        return f"<{_PRIORITY.get(record.levelno, 6)}>{msg}"


def setup(level: str = "info", stream=None) -> None:  # type: ignore[no-untyped-def]
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger("immich_gpu_exporter")
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    root.propagate = False
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
