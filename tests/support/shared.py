"""Tests that need `../shared` (the project's research material beside the repository).

A contributor's plain `git clone` has no `../shared`; CI (`CI=true`) always has it. So a test
marked with `needs(path)` skips with a one-line reason where the file is absent and CI is not
true, and fails where CI is true; tests/conftest.py applies the rule and lets exactly these skips
through the no-skip rule of scripts/test.sh (IMMICH_GPU_EXPORTER_TEST_NO_SKIP=1).
"""

from __future__ import annotations

import os
import pathlib

import pytest

from .proc import ROOT

SHARED = ROOT.parent / "shared"
MARK = "needs_shared"


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def needs(path: pathlib.Path) -> pytest.MarkDecorator:
    """Mark a test (or a module, as `pytestmark`) as needing `path` under ../shared."""
    return getattr(pytest.mark, MARK)(path=pathlib.Path(path))


def missing_reason(path: pathlib.Path) -> str:
    try:
        shown = "../" + str(pathlib.Path(path).relative_to(ROOT.parent))
    except ValueError:
        shown = str(path)
    return f"needs {shown}, absent here (a plain clone has no ../shared)"
