"""Reading the small files an operator points the exporter at (config, web config, API key, state).

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
