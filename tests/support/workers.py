"""Prefect's own CLI as the tests drive it: a process work pool from deployments/gpu-pool.json, a
deployment from a prefect.yaml, and a process worker that leaves no process behind."""

import contextlib
import subprocess
import sys
from pathlib import Path

from tests.support.waiting import end, until

PREFECT = [sys.executable, "-m", "prefect"]
POOL_TEMPLATE = Path(__file__).resolve().parents[2] / "deployments" / "gpu-pool.json"


def prefect(*args, env, cwd=None):
    return subprocess.run([*PREFECT, *args], env=env, cwd=cwd, check=True, capture_output=True, timeout=180)


def process_pool(name, env, template=POOL_TEMPLATE):
    prefect("work-pool", "create", name, "--type", "process", "--base-job-template", str(template), "--overwrite", env=env)


def deploy(*args, env, cwd):
    prefect("--no-prompt", "deploy", *args, env=env, cwd=cwd)


@contextlib.contextmanager
def process_worker(pool, env, cwd, log_path):
    """`prefect worker start --pool POOL` in `cwd`, its output in `log_path`; yields its process once
    it says it started (one that exits first is an error with its output: a test would wait for its
    flow runs for good), and kills its whole tree at the end."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*PREFECT, "worker", "start", "--pool", pool], env=env, cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            try:
                until(lambda: "started!" in Path(log_path).read_text(), 120, f"the worker of pool {pool} to start", procs=[proc])
            except RuntimeError as e:
                raise RuntimeError(f"{e}:\n{Path(log_path).read_text()[-3000:]}") from None
            yield proc
        finally:
            end(proc)
