"""Reading the small files an operator points the exporter at (config, web config, API keys, state).

Any path a user can configure may be a FIFO (open() blocks until a writer comes), a character
device such as /dev/zero (read() never ends) or a huge file. `read_small()` opens without
blocking, refuses anything but a regular file and reads at most `limit` bytes, so none of these
can hang the daemon or eat its memory.
"""

from __future__ import annotations

import os
import stat


class FileProblem(OSError):
    """The file is not something we read; str() is one line, safe to print."""


def read_small(path: str, limit: int) -> bytes:
    """The whole content of the regular file `path`, at most `limit` bytes, never blocking.

    Raises FileNotFoundError / PermissionError / IsADirectoryError (with strerror) or
    FileProblem for a non-regular or too large file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "is a directory", path)
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem(f"not a regular file ({describe_mode(st.st_mode)})")
        if st.st_size > limit:
            raise FileProblem(f"larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # grew while we read it
            raise FileProblem(f"larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


API_KEY_LIMIT = 4096  # bytes; an Immich API key is 43


def read_key_file(path: str) -> tuple[str, int]:
    """The API key held in the file `path` ('' when it holds only whitespace) and the file's
    permission bits, read like any other file here (read_small). Raises what read_small raises.
    Shared by the admin key (--immich.api-key-file) and the probe's key (--probe.key-file)."""
    key = read_small(path, API_KEY_LIMIT).decode("utf-8", "replace").strip()
    return key, stat.S_IMODE(os.stat(path).st_mode)


def header_safe(key: str) -> bool:
    """True if the key can travel in an HTTP header as it is: printable ASCII, no spaces."""
    return all(0x21 <= ord(c) <= 0x7E for c in key)


def loosely_readable(mode: int) -> bool:
    """Group or others may read a file with these permission bits (a key file should be 0600)."""
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))


def describe_mode(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def problem_text(e: OSError) -> str:
    """One line for an error of read_small()."""
    if isinstance(e, FileProblem):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    return e.strerror or str(e)


def set_aside(path: str) -> str:
    """Rename an unusable state file to `<path>.bad` (kept for a post-mortem); returns what happened,
    for the one warning line."""
    aside = f"{path}.bad"
    try:
        os.replace(path, aside)
        return f"moved to {aside}"
    except OSError as e:
        return f"could not move it aside: {e.strerror or e}"
