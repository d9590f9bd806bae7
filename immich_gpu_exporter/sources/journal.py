"""Journal source (minimal: reports whether a journal is readable)."""

from __future__ import annotations

import asyncio
import shutil

from ..core import CollectResult, SourceDown
from .base import Source


class JournalSource(Source):
    name = "journal"

    async def collect(self) -> CollectResult:
        exe = shutil.which(self.config["journal.journalctl"])
        if exe is None:
            raise SourceDown("no_journalctl", "journalctl not found")
        args = [exe, "--quiet", "-n", "0"]
        if self.config["journal.directory"]:
            args.append(f"--directory={self.config['journal.directory']}")
        p = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                 stderr=asyncio.subprocess.PIPE)
        _, err = await p.communicate()
        if p.returncode != 0 or b"No journal files" in err:
            raise SourceDown("no_journal", (err.decode(errors="replace").strip() or "no journal").splitlines()[0])
        return CollectResult()
