"""Every benchmark script starts and explains itself: `--help` exits 0 with its usage, so a script
whose imports broke (a helper it takes from another script renamed or gone) fails here, not on
the day someone needs its figures. bench/reference.py is a library of the others, not a script."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "reference.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_benchmark_starts_and_says_what_it_measures(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: ") and len(done.stdout.splitlines()) > 3, done.stdout
