"""Suite-wide settings. With IMMICH_GPU_EXPORTER_TEST_NO_SKIP=1 (set by scripts/test.sh, so in CI)
a skipped test fails the run: every test must really run where CI runs.

The one exception: a test marked `tests.support.shared.needs(path)` skips with a one-line reason
where `path` (under ../shared, which a plain clone lacks) is absent and CI is not `true`; under
CI=true the same absence fails the test."""

from __future__ import annotations

import os

import pytest

from tests.support import shared

NO_SKIP = os.environ.get("IMMICH_GPU_EXPORTER_TEST_NO_SKIP") == "1"
_skipped: list[str] = []
_SHARED_ABSENT = pytest.StashKey[bool]()


def pytest_configure(config):  # type: ignore[no-untyped-def]
    config.addinivalue_line("markers", f"{shared.MARK}(path): needs a file under ../shared (see tests/support/shared.py)")


def pytest_runtest_setup(item):  # type: ignore[no-untyped-def]
    for mark in item.iter_markers(shared.MARK):
        path = mark.kwargs["path"]
        if not path.exists():
            if shared.in_ci():
                pytest.fail(f"{shared.missing_reason(path)}; CI=true forbids skipping it", pytrace=False)
            item.stash[_SHARED_ABSENT] = True
            pytest.skip(shared.missing_reason(path))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    allowed = item.stash.get(_SHARED_ABSENT, False) and not shared.in_ci()
    if NO_SKIP and rep.skipped and not hasattr(rep, "wasxfail") and not allowed:
        _skipped.append(f"{item.nodeid}: {rep.longrepr[-1] if isinstance(rep.longrepr, tuple) else rep.longrepr}")
        rep.outcome = "failed"
        rep.longrepr = f"skipped, but IMMICH_GPU_EXPORTER_TEST_NO_SKIP=1 forbids skips: {rep.longrepr}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if _skipped:
        terminalreporter.write_line(f"{len(_skipped)} test(s) skipped where skips are forbidden:", red=True)
        for s in _skipped:
            terminalreporter.write_line("  " + s)
