"""Running stage programs from tests, as users do: `python -m` or torchrun, in a subprocess; and
the rule for a missing test dependency."""

import os
import subprocess
import sys

import pytest

from tests.support import waiting

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def missing(reason):
    """Skips the test for want of something outside the repo, except in CI (CI=true): an error there."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def stage(module, run, env, *options, nproc=None, check=True, preset="tiny", background=False, timeout=480, cwd=None):
    """Runs nanochat.stages.<module> on `run` (the code of the checkout `cwd`, by default this one);
    with nproc, under torchrun (`--` ends torchrun's options: it would take `--run` for its
    `--run-path`). Returns the completed process (ended with its workers, and a TimeoutError, after
    `timeout` s), or with `background` the running one (output discarded)."""
    prefix = [*TORCHRUN, str(nproc), "-m", module, "--"] if nproc else [sys.executable, "-m", module]
    cmd = [*prefix, "--run", str(run), "--preset", preset, *options]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    done = waiting.run(cmd, timeout, env=env, cwd=cwd)
    if check and done.returncode != 0:
        raise AssertionError(f"{module} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done
