"""A pytest plugin (tests/conftest.py loads it): under CI (CI=true, which .ci/run exports) a skipped
test fails the run, whatever skipped it (`pytest.skip`, `skipif`, an `importorskip`), so a broken
setup on the CI machine can never pass as a shorter suite."""

import os

import pytest

skipped = []


def pytest_runtest_logreport(report):
    if report.skipped:
        skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") == "true" and skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("CI") == "true" and skipped:
        terminalreporter.write_sep("=", f"CI=true: {len(skipped)} skipped test(s) fail the run", red=True)
        for nodeid in skipped:
            terminalreporter.write_line(nodeid)
