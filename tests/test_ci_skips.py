"""Under CI (CI=true) a skip fails the run; elsewhere it is a skip. Checked on a pytest of its own,
with the plugin tests/conftest.py loads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = '''
import pytest

def test_runs():
    assert True

@pytest.mark.skipif(True, reason="a marker's skip")
def test_marked():
    pass

def test_skips_itself():
    pytest.skip("a call's skip")
'''


def run_suite(tmp_path, ci):
    (tmp_path / "test_some.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.support.ci_skips", "-p", "no:cacheprovider", "-q",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", [True, False])
def test_a_skip_fails_the_run_only_under_ci(tmp_path, ci):
    out = run_suite(tmp_path, ci)
    assert "1 passed, 2 skipped" in out.stdout, out.stdout
    if ci:
        assert out.returncode == pytest.ExitCode.TESTS_FAILED, out.stdout
        assert "CI=true: 2 skipped test(s) fail the run" in out.stdout
        assert "test_some.py::test_marked" in out.stdout and "test_some.py::test_skips_itself" in out.stdout
    else:
        assert out.returncode == pytest.ExitCode.OK, out.stdout


def test_ci_run_exports_ci():
    assert "export CI=true" in (REPO / ".ci" / "run").read_text()
