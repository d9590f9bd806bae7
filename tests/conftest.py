"""Suite-wide settings. With IMMICH_GPU_EXPORTER_TEST_NO_SKIP=1 (set by scripts/test.sh, so in CI)
a skipped test fails the run: every test must really run where CI runs."""

from __future__ import annotations

import os

import pytest

NO_SKIP = os.environ.get("IMMICH_GPU_EXPORTER_TEST_NO_SKIP") == "1"
_skipped: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if NO_SKIP and rep.skipped and not hasattr(rep, "wasxfail"):
        _skipped.append(f"{item.nodeid}: {rep.longrepr[-1] if isinstance(rep.longrepr, tuple) else rep.longrepr}")
        rep.outcome = "failed"
        rep.longrepr = f"skipped, but IMMICH_GPU_EXPORTER_TEST_NO_SKIP=1 forbids skips: {rep.longrepr}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if _skipped:
        terminalreporter.write_line(f"{len(_skipped)} test(s) skipped where skips are forbidden:", red=True)
        for s in _skipped:
            terminalreporter.write_line("  " + s)


@pytest.fixture(scope="session")
def dockerd():  # type: ignore[no-untyped-def]
    """One private dockerd for the whole run (tests/support/dockerd.py); skipped with a one-line
    reason only where it cannot run and CI is not true."""
    from tests.support.dockerd import Dockerd, DockerdFailed, unavailable

    reason = unavailable()
    d = None
    if reason is None:
        d = Dockerd()
        try:
            d.start()
        except DockerdFailed as e:
            reason = f"dockerd cannot start here: {e}"
            d.stop()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield d
    finally:
        d.stop()
