#!/usr/bin/env python3
"""Derives, from Immich's own source, which queue each job of each release belongs to, and writes
tests/fixtures/immich-jobs/<version>.json plus the exporter's table immich_gpu_exporter/job_queues.py.

A developer step (it needs a git mirror of Immich, e.g. the one `fetch github:asah/immich` gives), not a
test step: the outputs are committed and tests/test_job_queues.py checks them.

    python scripts/derive_job_queues.py --git-dir /work/.mirror/asah+immich/repo
    python scripts/derive_job_queues.py --from-fixtures     # only regenerate job_queues.py

Releases: the last patch of every minor from v1.113 (the oldest server whose API the exporter speaks
as it is: /api/server/* came in v1.113) up to v3.1.0, found by their "chore: version vX.Y.Z" commits
(the mirror has no tags). For each, the JobName and QueueName enums (server/src/enum.ts, or
server/src/interfaces/job.interface.ts before it) and the job -> queue bindings: the JOBS_TO_QUEUE map
(server/src/repositories/job.repository.ts, up to v1.119) or the `@OnJob({ name: JobName.X, queue:
QueueName.Y })` decorators on the services (v1.120 on). A job of the enum without a binding is an
error: the script fails and names it. Telemetry names are lodash's snakeCase of the job's value,
as Immich writes them (`immich_jobs_<snake>_<status>_total`).

This is our own reading of their source: only the derived names are committed, never their code.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "immich-jobs"
MODULE = ROOT / "immich_gpu_exporter" / "job_queues.py"
OLDEST = (1, 113)

_ENUM = r"export enum {name}\s*\{{(?P<body>.*?)\n\}}"
_MEMBER = re.compile(r"^\s*(?P<key>\w+)\s*=\s*'(?P<value>[^']+)'", re.M)
_ON_JOB = re.compile(r"@OnJob\(\{\s*name:\s*JobName\.(?P<job>\w+),\s*queue:\s*QueueName\.(?P<queue>\w+)\s*\}\)")
_MAP_ENTRY = re.compile(r"\[JobName\.(?P<job>\w+)\]:\s*QueueName\.(?P<queue>\w+)")


def snake_case(name: str) -> str:
    """lodash's snakeCase for the identifiers Immich uses (ASCII words, camel/Pascal case, kebab)."""
    words = re.findall(r"[A-Z]{2,}(?=[A-Z][a-z]+|\d|\b|_|-)|[A-Z]?[a-z]+|[A-Z]+|\d+", name)
    return "_".join(w.lower() for w in words)


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True, text=True, check=True).stdout


def releases(git_dir: str) -> list[tuple[tuple[int, int, int], str]]:
    out = git(git_dir, "log", "--all", "--format=%H %s", "--grep=^chore: version v")
    found: dict[tuple[int, int, int], str] = {}
    for line in out.splitlines():
        m = re.match(r"^(\w{40}) chore: version v(\d+)\.(\d+)\.(\d+)$", line)
        if m:
            found.setdefault((int(m[2]), int(m[3]), int(m[4])), m[1])
    last_of_minor: dict[tuple[int, int], tuple[tuple[int, int, int], str]] = {}
    for v, commit in sorted(found.items()):
        if v[:2] >= OLDEST:
            last_of_minor[v[:2]] = (v, commit)
    return sorted(last_of_minor.values())


def enum(git_dir: str, commit: str, name: str) -> dict[str, str]:
    files = git(git_dir, "grep", "-l", f"export enum {name} ", commit, "--", "server/src").split()
    if len(files) != 1:
        raise SystemExit(f"{commit[:10]}: enum {name} found in {len(files)} files: {files}")
    text = git(git_dir, "show", files[0])
    m = re.search(_ENUM.format(name=name), text, re.S)
    if m is None:
        raise SystemExit(f"{files[0]}: enum {name} not parsed")
    return {k: v for k, v in _MEMBER.findall(m.group("body"))}


def bindings(git_dir: str, commit: str) -> dict[str, str]:
    """JobName key -> QueueName key."""
    out: dict[str, str] = {}
    text = git(git_dir, "grep", "-h", "-E", r"@OnJob\(|\[JobName\.\w+\]: *QueueName\.", commit, "--", "server/src")
    for pattern in (_ON_JOB, _MAP_ENTRY):
        for m in pattern.finditer(text):
            prev = out.setdefault(m["job"], m["queue"])
            if prev != m["queue"]:
                raise SystemExit(f"{commit[:10]}: job {m['job']} bound to {prev} and {m['queue']}")
    return out


def derive(git_dir: str, version: tuple[int, int, int], commit: str) -> dict:
    jobs, queues = enum(git_dir, commit, "JobName"), enum(git_dir, commit, "QueueName")
    bound = bindings(git_dir, commit)
    missing = sorted(set(jobs) - set(bound))
    if missing:
        raise SystemExit(f"v{'.'.join(map(str, version))}: jobs without a queue binding: {', '.join(missing)}")
    rows = [{"job": jobs[k], "telemetry": snake_case(jobs[k]), "queue": queues[bound[k]]} for k in jobs]
    return {"version": "v" + ".".join(map(str, version)), "commit": commit,
            "jobs": sorted(rows, key=lambda r: r["job"])}


def write_module(fixtures: list[dict]) -> None:
    table: dict[str, str] = {}
    seen_in: dict[str, list[str]] = {}
    for fx in fixtures:
        for row in fx["jobs"]:
            prev = table.setdefault(row["telemetry"], row["queue"])
            if prev != row["queue"]:
                raise SystemExit(f"{row['telemetry']}: queue {prev} in one version, {row['queue']} in {fx['version']}")
            seen_in.setdefault(row["telemetry"], []).append(fx["version"])
    versions = [fx["version"] for fx in fixtures]
    lines = ['"""GENERATED by scripts/derive_job_queues.py from tests/fixtures/immich-jobs/*.json: do not edit.',
             "",
             f"Telemetry job name (lodash snakeCase of Immich's JobName value) -> its queue, for every job of the",
             f"releases {versions[0]} ... {versions[-1]} ({len(versions)} releases, the last patch of each minor),",
             'derived from Immich\'s source. Kebab-case names (before v1.136) and PascalCase ones (after) are both here."""',
             "", "from __future__ import annotations", "", "from typing import Mapping", "",
             f"RELEASES = {tuple(versions)!r}", "", "JOB_QUEUES: Mapping[str, str] = {"]
    for name in sorted(table):
        lines.append(f"    {name!r}: {table[name]!r},")
    lines.append("}")
    MODULE.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--git-dir", help="a git mirror of immich-app/immich (with its history)")
    p.add_argument("--from-fixtures", action="store_true", help="only regenerate job_queues.py from the fixtures")
    a = p.parse_args()
    if not a.from_fixtures:
        if not a.git_dir:
            p.error("--git-dir is required (or --from-fixtures)")
        FIXTURES.mkdir(parents=True, exist_ok=True)
        for version, commit in releases(a.git_dir):
            fx = derive(a.git_dir, version, commit)
            (FIXTURES / f"{fx['version']}.json").write_text(json.dumps(fx, indent=1) + "\n")
            print(f"{fx['version']}: {len(fx['jobs'])} jobs", file=sys.stderr)
    fixtures = sorted((json.loads(f.read_text()) for f in FIXTURES.glob("v*.json")),
                      key=lambda fx: tuple(int(x) for x in fx["version"][1:].split(".")))
    write_module(fixtures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
