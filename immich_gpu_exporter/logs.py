"""Logging to stderr, one line per event; journald-friendly under systemd.

Under systemd (JOURNAL_STREAM is set) lines carry no timestamp of their own and start with
the sd-daemon priority prefix (<3> error, <4> warning, <6> info, <7> debug), which journald
turns into the entry's PRIORITY.

Also owns redaction: secrets registered with `add_secret()` (the API key, passwords in URLs) are
replaced by `<secret>` in every log line and in every text `redact()` is applied to (error details
on the landing page), wherever a library may have copied them into a message.
"""

from __future__ import annotations

import logging
import os
import sys

_secrets: set[str] = set()


def add_secret(value: str | None) -> None:
    if value and len(value) >= 3:  # a one-letter "password" would redact every such letter
        _secrets.add(value)


def redact(text: str) -> str:
    from .config import redact_url

    text = redact_url(text)
    for s in sorted(_secrets, key=len, reverse=True):
        if s in text:
            text = text.replace(s, "<secret>")
    return text


class _Redacting(logging.Formatter):
    """Formats with `inner`, then redacts the whole line, traceback included."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record).replace("\n", " | ")
        return f"<{_PRIORITY.get(record.levelno, 6)}>{msg}"


def setup(level: str = "info", stream=None) -> None:  # type: ignore[no-untyped-def]
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_Redacting(_JournalFormatter("%(message)s")))
    else:
        handler.setFormatter(_Redacting(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                                          "%Y-%m-%dT%H:%M:%S")))
    root = logging.getLogger("immich_gpu_exporter")
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    root.propagate = False
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiohttp logs a malformed request with a 10-line traceback, once per request: one line instead,
    # and at most one a second (an attacker may send thousands)
    server = logging.getLogger("aiohttp.server")
    server.handlers[:] = [handler]
    server.propagate = False
    server.filters[:] = [_OneLinePerSecond()]
    for name in ("asyncio", "aiohttp.web"):
        other = logging.getLogger(name)
        other.handlers[:] = [handler]
        other.propagate = False
        other.filters[:] = [_OneLinePerSecond()]


class _OneLinePerSecond(logging.Filter):
    """A library's error as one line without traceback; at most one a second, the rest counted."""

    def __init__(self) -> None:
        super().__init__()
        self._last = 0.0
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        import time

        now = time.monotonic()
        if now - self._last < 1.0:
            self._suppressed += 1
            return False
        self._last = now
        msg = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            msg += f": {type(exc).__name__}: {_one_line(str(exc))}"
        if self._suppressed:
            msg += f" ({self._suppressed} similar lines suppressed)"
            self._suppressed = 0
        record.msg, record.args, record.exc_info, record.exc_text = "http: " + msg, None, None, None
        return True


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


_loop_errors_logged: set[str] = set()


def loop_exception_handler(loop, context) -> None:  # type: ignore[no-untyped-def]
    """asyncio's unhandled errors (accept() failures, dropped transports): one line per kind, once."""
    exc = context.get("exception")
    kind = f"{context.get('message', '')}|{type(exc).__name__ if exc else ''}"
    if kind in _loop_errors_logged:
        return
    _loop_errors_logged.add(kind)
    detail = f": {type(exc).__name__}: {_one_line(str(exc))}" if exc else ""
    logging.getLogger("immich_gpu_exporter").warning("%s%s (logged once)", context.get("message", "error"), detail)
