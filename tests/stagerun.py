"""Running stage programs from tests, as users do: `python -m` or torchrun, in a subprocess."""

import subprocess
import sys

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def stage(module, run, env, *options, nproc=None, check=True, preset="tiny"):
    """Runs nanochat.stages.<module> on `run`; with nproc, under torchrun. Returns the completed process."""
    prefix = [*TORCHRUN, str(nproc), "-m", module, "--"] if nproc else [sys.executable, "-m", module]
    done = subprocess.run([*prefix, "--run", str(run), "--preset", preset, *options], env=env, capture_output=True,
                          text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{module} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done
