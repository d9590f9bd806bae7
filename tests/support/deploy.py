"""Helpers for the deployment tests: read the shipped unit, render test copies, run
systemd-analyze without leaving anything on the host, and split an ExecStart= line the way
systemd does (enough of it for our unit)."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from typing import Iterator, Mapping, Sequence

from .proc import ROOT

UNIT_PATH = ROOT / "deploy" / "systemd" / "immich-gpu-exporter.service"
SHIPPED_EXEC = "/usr/local/bin/immich-gpu-exporter"
# The console script of the interpreter running the tests (the venv's), so that ExecStart=
# exists on this machine, which `systemd-analyze verify` checks.
TEST_EXEC = str(pathlib.Path(sys.executable).with_name("immich-gpu-exporter"))
UNITS_LOAD = pathlib.Path("/run/systemd/systemd-units-load")


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Unit file text -> {section: [(key, value), ...]} in file order (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[(.+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), [])
            continue
        assert current is not None, f"directive outside a section: {raw!r}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def directives(text: str, section: str = "Service") -> dict[str, list[str]]:
    """{key: [values...]} of one section, the way systemd accumulates list settings."""
    out: dict[str, list[str]] = {}
    for k, v in parse_unit(text).get(section, []):
        out.setdefault(k, []).append(v)
    return out


def render_test_unit(text: str, exec_path: str = TEST_EXEC, extra_service: Sequence[str] = ()) -> str:
    """The shipped unit with ExecStart= pointing at `exec_path`, plus extra [Service] lines."""
    assert text.count(f"ExecStart={SHIPPED_EXEC}") == 1
    out = text.replace(f"ExecStart={SHIPPED_EXEC}", f"ExecStart={exec_path}")
    if extra_service:
        out = out.replace("[Install]", "\n".join(extra_service) + "\n\n[Install]")
    return out


def exec_argv(text: str) -> list[str]:
    """ExecStart= split like systemd splits it (no specifiers beyond what our unit uses)."""
    (line,) = directives(text)["ExecStart"]
    return shlex.split(line.lstrip("-@:+!"))


def expand_specifiers(argv: Sequence[str], credentials_dir: str) -> list[str]:
    return [a.replace("%d", credentials_dir).replace("%%", "%") for a in argv]


def read_env_file(path: pathlib.Path) -> dict[str, str]:
    """KEY=VALUE lines of an EnvironmentFile= (comments and blanks skipped)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        k, _, v = line.partition("=")
        env[k.strip()] = v.strip().strip('"')
    return env


def systemd_analyze(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze and remove the empty /run/systemd/systemd-units-load it may create."""
    existed = UNITS_LOAD.exists()
    dir_existed = UNITS_LOAD.parent.exists()
    try:
        return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=timeout)
    finally:
        if not existed and UNITS_LOAD.exists():
            UNITS_LOAD.unlink()
        if not dir_existed and UNITS_LOAD.parent.exists():
            try:
                UNITS_LOAD.parent.rmdir()  # we created it; rmdir refuses if anything else is there
            except OSError:
                pass


def have_systemd_analyze() -> bool:
    return shutil.which("systemd-analyze") is not None


def exposure(security_stdout: str) -> float:
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", security_stdout)
    assert m, security_stdout[-500:]
    return float(m.group(1))


def env_items(env: Mapping[str, str]) -> Iterator[str]:
    for k, v in env.items():
        yield f"{k}={v}"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IMMICH_GPU_EXPORTER_")}
