#!/usr/bin/env python3
"""Derives, from Immich's own source, which queue each job of each release belongs to and the name its
telemetry counters carry, and writes tests/fixtures/immich-jobs/<version>.json plus the exporter's table
immich_gpu_exporter/job_queues.py.

A developer step (it needs a git mirror of Immich with its history, e.g. the one `fetch github:asah/immich`
gives), not a test step: the outputs are committed and tests/test_job_queues.py checks them.

    python scripts/derive_job_queues.py --git-dir /work/.mirror/asah+immich/repo [--lodash DIR]
    python scripts/derive_job_queues.py --from-fixtures     # only regenerate job_queues.py

Releases: the last patch of every minor from v1.106 up to v3.1.0 (and v3.1.0 itself). v1.106 is the
first release with the telemetry layout the exporter reads: the microservices worker's own metrics port,
8082 (IMMICH_MICROSERVICES_METRICS_PORT; v1.105 and older served one process's metrics on 8081), where
the job counters are. It is also the first with the ML service's composable `/predict` API and with the
duplicateDetection queue. The mirror has no tags: a release is its version-bump commit,
"Version vX.Y.Z" up to v1.112 and "chore: version vX.Y.Z" after, checked against server/package.json at
that commit; release candidates are left out.

For each release the script reads, with `git show <commit>:<path>` (never checking anything out):
- the JobName and QueueName enums (server/src/interfaces/job.interface.ts, later server/src/enum.ts): every
  line of their bodies must be a member or a comment, or it fails;
- each job's queue binding, in the form that release really uses: the `JOBS_TO_QUEUE` map
  (server/src/repositories/job.repository.ts, up to v1.119) or the `@OnJob({ name: JobName.X, queue:
  QueueName.Y })` decorators on the services (v1.120 on); test files (*.spec.ts) are not read. A job of
  the enum without a binding, or one bound to two queues, is an error: the script fails and names it;
- how the job counter is named, `immich.jobs.${...}.${status}` (the Prometheus exporter turns the dots
  into `_` and adds `_total`): `name.replaceAll('-', '_')` up to v1.135 (kebab values), lodash
  `snakeCase(job.name)` from v1.136 (PascalCase values). Any other expression is an error.

lodash's snakeCase is not re-implemented here: `immich_api.snake_case` (the exporter's) is used, and it
is checked against lodash's own output for every job and queue value of every release (plus a few harder
probes), kept in tests/fixtures/immich-jobs/lodash-snakecase.json. `--lodash DIR` (a lodash package
folder, e.g. after `npm install lodash`) re-captures that file by running lodash under node; without it
the committed capture is used, and a value it lacks is an error.

This is our own reading of their source: only the derived names are committed, never their code.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from immich_gpu_exporter.immich_api import snake_case  # noqa: E402  (the exporter's own, checked against lodash)

FIXTURES = ROOT / "tests" / "fixtures" / "immich-jobs"
LODASH_CAPTURE = FIXTURES / "lodash-snakecase.json"
MODULE = ROOT / "immich_gpu_exporter" / "job_queues.py"
OLDEST = (1, 106)
NEWEST = (3, 1, 0)

# Names that no release uses, to show that snake_case follows lodash beyond the names of today
# (acronyms, digits, separators).
PROBES = ("Asset3DModel", "AssetOCR", "HTTPServer", "IOError", "JobV2", "MLJob", "SidecarXMPWrite", "UPPER_CASE",
          "a1b2", "already_snake", "getHTTPResponseCode", "__x__", "Foo  Bar", "queue-v2-thing", "X")

_RELEASE = re.compile(r"^(?P<commit>[0-9a-f]{40}) (?:chore: version|Version) v(?P<v>\d+\.\d+\.\d+)$")
_ENUM = r"export enum {name}\s*\{{(?P<body>.*?)\n\}}"
_MEMBER = re.compile(r"^\s*(?P<key>\w+)\s*=\s*'(?P<value>[^']+)',?\s*(?://.*)?$")
_ON_JOB = re.compile(r"^[ \t]*@OnJob\(\{\s*name:\s*JobName\.(?P<job>\w+),"
                     r"\s*queue:\s*QueueName\.(?P<queue>\w+),?\s*\}\)", re.M)
_MAP_ENTRY = re.compile(r"\[JobName\.(?P<job>\w+)\]:\s*QueueName\.(?P<queue>\w+)")
_JOB_METRIC = re.compile(r"`immich\.jobs\.\$\{(?P<expr>[^`]*?)\}\.\$\{[^`]*\}`")
NOT_SPEC = ":(exclude)*.spec.ts"

# How each naming expression turns a JobName value into the counter's job part.
NAMINGS = {
    "replaceAll('-', '_')": lambda v: v.replace("-", "_"),
    "snakeCase": snake_case,
}


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True, text=True, check=True).stdout


def vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.lstrip("v").split("."))


def releases(git_dir: str) -> list[tuple[tuple[int, int, int], str]]:
    """(version, commit) of the last patch of each minor from OLDEST to NEWEST."""
    out = git(git_dir, "log", "--all", "--format=%H %s", "-E", r"--grep=^(chore: version|Version) v[0-9]")
    found: dict[tuple[int, int, int], str] = {}
    for line in out.splitlines():
        m = _RELEASE.match(line)
        if m:
            found.setdefault(vtuple(m["v"]), m["commit"])  # type: ignore[arg-type]
    last_of_minor: dict[tuple[int, int], tuple[tuple[int, int, int], str]] = {}
    for v, commit in sorted(found.items()):
        if OLDEST <= v[:2] and v <= NEWEST:
            last_of_minor[v[:2]] = (v, commit)
    picked = sorted(last_of_minor.values())
    for v, commit in picked:
        pkg = json.loads(git(git_dir, "show", f"{commit}:server/package.json"))
        if vtuple(pkg["version"]) != v:
            raise SystemExit(f"{commit[:10]}: bumps to v{'.'.join(map(str, v))}"
                             f" but server/package.json says {pkg['version']}")
    if not picked or picked[-1][0] != NEWEST:
        raise SystemExit(f"v{'.'.join(map(str, NEWEST))} not found in {git_dir}")
    return picked


def enum(git_dir: str, commit: str, name: str) -> tuple[str, dict[str, str]]:
    files = git(git_dir, "grep", "-l", "-E", f"export enum {name} ", commit, "--", "server/src", NOT_SPEC).split()
    if len(files) != 1:
        raise SystemExit(f"{commit[:10]}: enum {name} found in {len(files)} files: {files}")
    path = files[0].split(":", 1)[1]
    m = re.search(_ENUM.format(name=name), git(git_dir, "show", files[0]), re.S)
    if m is None:
        raise SystemExit(f"{commit[:10]}:{path}: enum {name} not parsed")
    members: dict[str, str] = {}
    for line in m["body"].splitlines():
        s = line.strip()
        if not s or s.startswith(("//", "/*", "*")):
            continue
        mm = _MEMBER.match(line)
        if mm is None:
            raise SystemExit(f"{commit[:10]}:{path}: enum {name}: line not understood: {s!r}")
        if mm["key"] in members:
            raise SystemExit(f"{commit[:10]}:{path}: enum {name}: {mm['key']} twice")
        members[mm["key"]] = mm["value"]
    if len(set(members.values())) != len(members):
        raise SystemExit(f"{commit[:10]}:{path}: enum {name}: two members with one value")
    return path, members


def bindings(git_dir: str, commit: str) -> tuple[list[str], dict[str, str]]:
    """The binding forms found, and JobName key -> QueueName key."""
    out: dict[str, str] = {}
    forms: list[str] = []
    files = git(git_dir, "grep", "-l", "-E", r"@OnJob\(|\[JobName\.\w+\]: *QueueName\.", commit, "--", "server/src",
                NOT_SPEC).split()
    # Whole files, not grep's lines: a decorator may span lines.
    text = "\n".join(git(git_dir, "show", f) for f in files)
    if len(re.findall(r"^[ \t]*@OnJob\(", text, re.M)) != len(_ON_JOB.findall(text)):
        raise SystemExit(f"{commit[:10]}: an @OnJob decorator not understood")
    for form, pattern in (("JOBS_TO_QUEUE", _MAP_ENTRY), ("@OnJob", _ON_JOB)):
        n = 0
        for m in pattern.finditer(text):
            n += 1
            prev = out.setdefault(m["job"], m["queue"])
            if prev != m["queue"]:
                raise SystemExit(f"{commit[:10]}: job {m['job']} bound to {prev} and {m['queue']}")
        if n:
            forms.append(form)
    return forms, out


def naming(git_dir: str, commit: str) -> tuple[str, str]:
    """The job counter's name as the source writes it, and which of NAMINGS it is."""
    text = git(git_dir, "grep", "-h", "-F", "immich.jobs.${", commit, "--", "server/src", NOT_SPEC)
    exprs = {m["expr"] for m in _JOB_METRIC.finditer(text)}
    kinds = set()
    for e in exprs:
        if re.fullmatch(r"(?:job\.)?name\.replaceAll\('-', '_'\)", e):
            kinds.add("replaceAll('-', '_')")
        elif re.fullmatch(r"snakeCase\((?:job\.)?name\)", e):
            kinds.add("snakeCase")
        else:
            raise SystemExit(f"{commit[:10]}: job counter named by an expression not understood: {e!r}")
    if len(kinds) != 1:
        raise SystemExit(f"{commit[:10]}: job counter naming not found or ambiguous: {sorted(exprs)}")
    return f"immich.jobs.${{{exprs.pop()}}}.${{status}}" if len(exprs) == 1 else sorted(exprs), kinds.pop()


def derive(git_dir: str, version: tuple[int, int, int], commit: str) -> dict:
    name = "v" + ".".join(map(str, version))
    job_file, jobs = enum(git_dir, commit, "JobName")
    queue_file, queues = enum(git_dir, commit, "QueueName")
    forms, bound = bindings(git_dir, commit)
    missing = sorted(set(jobs) - set(bound))
    if missing:
        raise SystemExit(f"{name}: jobs without a queue binding: {', '.join(missing)}")
    unknown = sorted({q for j, q in bound.items() if j in jobs and q not in queues})
    if unknown:
        raise SystemExit(f"{name}: jobs bound to a queue the QueueName enum lacks: {', '.join(unknown)}")
    counter, how = naming(git_dir, commit)
    rows = [{"job": jobs[k], "telemetry": NAMINGS[how](jobs[k]), "queue": queues[bound[k]]} for k in jobs]
    bad = [r["telemetry"] for r in rows if not re.fullmatch(r"[a-z][a-z0-9_]*", r["telemetry"])]
    if bad:
        raise SystemExit(f"{name}: telemetry names that are no Prometheus name part: {bad}")
    if len({r["telemetry"] for r in rows}) != len(rows):
        raise SystemExit(f"{name}: two jobs with one telemetry name")
    return {"version": name, "commit": commit, "enums": sorted({job_file, queue_file}), "bindings": forms,
            "counter": counter, "naming": how, "queues": sorted(queues.values()),
            "jobs": sorted(rows, key=lambda r: r["job"])}


def dump_fixture(fx: dict) -> str:
    """Stable JSON, one job a line (diffs between releases read well)."""
    head = {k: v for k, v in fx.items() if k != "jobs"}
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + ['  "jobs": [']
    lines += [f"    {json.dumps(r)}{',' if i < len(fx['jobs']) - 1 else ''}" for i, r in enumerate(fx["jobs"])]
    return "\n".join(lines + ["  ]", "}"]) + "\n"


def capture_lodash(lodash_dir: str, names: list[str]) -> dict:
    script = ("const l = require(process.argv[1]); const names = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "const out = {}; for (const n of names) out[n] = l.snakeCase(n);"
              "process.stdout.write(JSON.stringify({lodash: l.VERSION, snakeCase: out}));")
    r = subprocess.run(["node", "-e", script, str(pathlib.Path(lodash_dir).resolve())], input=json.dumps(names),
                       capture_output=True, text=True, check=True)
    got = json.loads(r.stdout)
    return {"lodash": got["lodash"], "snakeCase": dict(sorted(got["snakeCase"].items()))}


def check_snake_case(fixtures: list[dict], lodash_dir: str | None) -> None:
    names = sorted({r["job"] for fx in fixtures for r in fx["jobs"]} | {q for fx in fixtures for q in fx["queues"]}
                   | set(PROBES))
    if lodash_dir:
        LODASH_CAPTURE.write_text(json.dumps(capture_lodash(lodash_dir, names), indent=1) + "\n")
    captured = json.loads(LODASH_CAPTURE.read_text())["snakeCase"]
    lacking = [n for n in names if n not in captured]
    if lacking:
        raise SystemExit(f"no lodash capture for {lacking}: run again with --lodash DIR")
    wrong = [f"{n!r}: lodash {captured[n]!r}, snake_case {snake_case(n)!r}"
             for n in names if snake_case(n) != captured[n]]
    if wrong:
        raise SystemExit("immich_api.snake_case differs from lodash:\n  " + "\n  ".join(wrong))


def union(fixtures: list[dict]) -> dict[str, str]:
    """Telemetry name -> queue over all releases; a name whose queue changed between releases is an error
    (none has, v1.106-v3.1.0: the table could not say which release a counter came from)."""
    table: dict[str, tuple[str, str]] = {}
    for fx in fixtures:
        for row in fx["jobs"]:
            prev = table.setdefault(row["telemetry"], (row["queue"], fx["version"]))
            if prev[0] != row["queue"]:
                raise SystemExit(f"{row['telemetry']}: queue {prev[0]} in {prev[1]}, {row['queue']} in {fx['version']}")
    return {k: v[0] for k, v in sorted(table.items())}


def module_text(fixtures: list[dict]) -> str:
    table = union(fixtures)
    versions = [fx["version"] for fx in fixtures]
    namings: dict[str, list[str]] = {}
    for fx in fixtures:
        namings.setdefault(fx["naming"], []).append(fx["version"])
    lines = ['"""GENERATED by scripts/derive_job_queues.py from tests/fixtures/immich-jobs/v*.json: do not edit.',
             "",
             "Telemetry job name (the `<job>` of `immich_jobs_<job>_<status>_total`) -> its queue, for every job of",
             f"the releases {versions[0]} ... {versions[-1]} ({len(versions)} releases, the last patch of each minor),",
             "derived from Immich's source. How each release names the counter:",
             *[f"  {how}: {vs[0]} ... {vs[-1]}" for how, vs in namings.items()],
             'No name has changed queue between releases (the script refuses a table where one has)."""',
             "", "from __future__ import annotations", "", "from typing import Mapping", "",
             "RELEASES = ("]
    lines += textwrap.wrap(" ".join(f"{v!r}," for v in versions), 110, initial_indent="    ", subsequent_indent="    ")
    lines += [")", "", "# Every QueueName value of those releases.", "QUEUES = frozenset({"]
    queues = sorted({q for fx in fixtures for q in fx["queues"]})
    lines += textwrap.wrap(" ".join(f"{q!r}," for q in queues), 110, initial_indent="    ", subsequent_indent="    ")
    lines += ["})", "", "JOB_QUEUES: Mapping[str, str] = {"]
    lines += [f"    {name!r}: {queue!r}," for name, queue in table.items()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def load_fixtures() -> list[dict]:
    return sorted((json.loads(f.read_text()) for f in FIXTURES.glob("v*.json")), key=lambda fx: vtuple(fx["version"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--git-dir", help="a git mirror of immich-app/immich (with its history)")
    p.add_argument("--lodash", help="a lodash package folder: re-capture lodash's snakeCase of every name with node")
    p.add_argument("--from-fixtures", action="store_true", help="only regenerate job_queues.py from the fixtures")
    a = p.parse_args()
    if not a.from_fixtures:
        if not a.git_dir:
            p.error("--git-dir is required (or --from-fixtures)")
        derived = []
        for version, commit in releases(a.git_dir):
            fx = derive(a.git_dir, version, commit)
            derived.append(fx)
            print(f"{fx['version']}: {len(fx['jobs'])} jobs, {len(fx['queues'])} queues, {'+'.join(fx['bindings'])},"
                  f" {fx['counter']}", file=sys.stderr)
        check_snake_case(derived, a.lodash)
        union(derived)
        FIXTURES.mkdir(parents=True, exist_ok=True)
        for old in FIXTURES.glob("v*.json"):
            old.unlink()
        for fx in derived:
            (FIXTURES / f"{fx['version']}.json").write_text(dump_fixture(fx))
    MODULE.write_text(module_text(load_fixtures()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
