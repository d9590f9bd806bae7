"""`--help` as a first-time user reads it: the commands in the usage line, each default said once,
and `demo --help` describing the demo with only the flags that apply to it (golden file)."""

from __future__ import annotations

import os
import pathlib
import re

from immich_gpu_exporter import config as configmod
from tests.support.proc import run_cli

GOLDEN = pathlib.Path(__file__).parent / "golden" / "help-demo.txt"
WIDTH = {"COLUMNS": "100"}  # argparse wraps at the terminal width


def help_text(*command: str) -> str:
    r = run_cli([*command, "--help"], env=WIDTH)
    assert r.returncode == 0, r.stderr
    return r.stdout


def option_helps(text: str) -> dict[str, str]:
    """Flag -> its help text, unwrapped."""
    out: dict[str, str] = {}
    flag = None
    for line in text.split("\n\n", 2)[2].splitlines():
        m = re.match(r"  (-[-\w.]+)(?:,? [^ ].*?)?(?:  +(.*))?$", line)
        if m:
            flag = m.group(1)
            out[flag] = m.group(2) or ""
        elif flag and line.startswith(" " * 20):
            out[flag] = (out[flag] + " " + line.strip()).strip()
        else:
            flag = None
    return out


def test_usage_line_names_every_command():
    usage = help_text().split("\n\n", 1)[0]
    assert usage.startswith("usage: immich-gpu-exporter [serve] [--once | --dry-run] [options]")
    for command in ("demo", "check"):
        assert f"immich-gpu-exporter {command} [options]" in usage


def test_every_default_is_said_once_and_none_is_never_a_default():
    for command in ((), ("demo",)):
        text = help_text(*command)
        helps = option_helps(text)
        assert "--web.listen-address" in helps and "--log.level" in helps
        assert "(default: None)" not in text
        for flag, h in helps.items():
            assert h.count("(default:") <= 1, (flag, h)
        assert "(default: detected)" in helps.get("--systemd.cgroup-root", "(default: detected)")
    serve = option_helps(help_text())
    assert "$STATE_DIRECTORY" in serve["--state.directory"] and "(default:" not in serve["--state.directory"]
    assert serve["--collection.interval"].endswith("(default: 5.0)")
    assert serve["--gpu.pid-labels"].endswith("(default: disabled)")


def test_demo_help_describes_the_demo_and_lists_only_its_flags():
    text = help_text("demo")
    assert text.startswith("usage: immich-gpu-exporter demo [options]\n\nServe a looping replay")
    flags = set(option_helps(text))
    assert not any(f.startswith(("--immich.", "--journal.", "--nvml.", "--state.", "--component."))
                   for f in flags), flags
    assert "--demo.speed" in flags and "--once" not in flags
    assert "--demo.speed" not in option_helps(help_text())  # and the daemon does not offer the demo's flag
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_a_flag_that_does_not_apply_to_the_demo_is_refused_in_one_line():
    r = run_cli(["demo", "--immich.url=http://x:2283"], env=WIDTH)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "immich-gpu-exporter: error: unrecognized arguments: --immich.url=http://x:2283"]


def test_every_option_reaches_some_command():
    serve, demo = option_helps(help_text()), option_helps(help_text("demo"))
    for o in configmod.OPTIONS:
        if o.key not in configmod.NOT_A_FLAG:
            assert o.flag in serve or o.flag in demo, o.key
