"""bench/gpu_check.py on a machine without CUDA (the GPU hidden where there is one): it says so and
exits with status 1 before any work, rather than failing halfway or passing with nothing checked."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_without_cuda_it_exits_at_once_saying_why(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert "gpu_check: no CUDA device here" in done.stderr and "nothing was run" in done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []  # no table, no JSON line, no work directory
