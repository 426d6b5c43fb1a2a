"""How a stage's process starts: its command line (one builder for every node of a launch) and a
launcher that runs it as a child, streams its output and leaves no process of its tree behind.

    python -m nanochat.stages.<module> --run RUN --preset P --storage S [options]
    python -m torch.distributed.run --standalone --nproc_per_node N -m nanochat.stages.<module> ...
    python -m torch.distributed.run --nnodes M --rdzv-endpoint H:P --rdzv-id ID ...   (M > 1)

With M > 1 every node runs the same command (node 0 from its Prefect task, the others from
flows/node.py), and each attempt of each stage of a run meets under its own rendezvous id, so a
launch at the same endpoint (another stage, an earlier attempt's late node) never joins it.

Stages run with the project's own interpreter (its .venv, beside the code this module is loaded
from), so a worker whose Python belongs elsewhere runs the deployed code with its own packages.
"""

import collections
import dataclasses
import functools
import hashlib
import importlib
import os
import shlex
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import psutil

from nanochat import presets, storage

REPO = Path(__file__).resolve().parent.parent


def project_python():
    """The interpreter of the project this code belongs to: its .venv's python, else this one."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Where and how a run's stages execute (what the flow's parameters resolve to)."""

    run: str  # the run URI
    preset: str
    storage: str  # the storage root URI (runs and the data cache)
    data_mirror: str | None = None
    nproc_per_node: int = 1
    nnodes: int = 1
    overrides: dict = dataclasses.field(default_factory=dict)  # {stage: {option: value}}

    def config(self, stage):
        """The stage's resolved config: the preset's values, then the overrides."""
        return {**presets.get(self.preset, stage.module), **self.overrides.get(stage.name, {})}


def options(overrides, negatable=()):
    """{"num_steps": 10, "verify": True, "fp8": False} -> ["--num-steps", "10", "--verify", "--no-fp8"]:
    False is --no-<name> where the stage has that flag (`negatable`: its --no- options, which may turn
    off what its preset turns on), else left out (a plain flag's default); None is left out."""
    out = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out += ["--no-" + flag[2:]] if "--no-" + flag[2:] in negatable else []
        elif value is not None:
            out += [flag, str(value)]
    return out


@functools.cache
def option_names(module):
    """The options of stage program `module` that an override may set, by name (--num-steps is
    num_steps); the run, preset and storage are the flow's own."""
    parser = importlib.import_module(f"nanochat.stages.{module}").build_parser()
    return frozenset(a.dest for a in parser._actions if a.option_strings) - {"help", "run", "preset", "storage"}


@functools.cache
def negatable_options(module):
    """The --no-<name> options of stage program `module` (its argparse BooleanOptionalActions)."""
    parser = importlib.import_module(f"nanochat.stages.{module}").build_parser()
    return frozenset(o for action in parser._actions for o in action.option_strings if o.startswith("--no-"))


def arguments(stage, spec):
    """What the stage program is given: the run, preset and storage, the row's own arguments, then
    the run's overrides for it as options."""
    return ["--run", spec.run, "--preset", spec.preset, "--storage", spec.storage, *stage.args,
            *options(spec.overrides.get(stage.name, {}), negatable_options(stage.module))]


def command(stage, spec, attempt=1):
    """The stage's command line under `spec` (torchrun for multi-process stages); `attempt` (the
    task run's run count) is part of a multi-node launch's rendezvous id."""
    module = f"nanochat.stages.{stage.module}"
    args = arguments(stage, spec)
    if not stage.torchrun:
        return [project_python(), "-m", module, *args]
    torchrun = [project_python(), "-m", "torch.distributed.run", f"--nproc_per_node={spec.nproc_per_node}"]
    if spec.nnodes > 1:
        endpoint = os.environ.get("NANOCHAT_RDZV_ENDPOINT")
        if not endpoint:
            raise ValueError(f"nnodes={spec.nnodes} needs NANOCHAT_RDZV_ENDPOINT=host:port (the c10d rendezvous)")
        # --max-restarts=0: a lost node fails the launch, and the stage's Prefect retry starts a new
        # one (a new rendezvous id) that resumes from the checkpoint, rather than torchrun waiting
        # in place for a node that may never come back
        torchrun += [f"--nnodes={spec.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                     f"--rdzv-id={rendezvous_id(stage, spec, attempt)}", "--max-restarts=0"]
    else:
        torchrun.append("--standalone")  # a free local port: parallel torchrun stages never collide
    # e.g. NANOCHAT_LAUNCHER="srun --ntasks-per-node=1" under Slurm: one torchrun per node
    launcher = shlex.split(os.environ.get("NANOCHAT_LAUNCHER", ""))
    # `--`: without it torchrun's parser takes `--run` for an abbreviation of its own `--run-path`
    return [*launcher, *torchrun, "-m", module, "--", *args]


def rendezvous_id(stage, spec, attempt):
    """One per (run, stage, attempt): the id under which the nodes of one launch meet."""
    return hashlib.sha256(f"{spec.run}\0{stage.name}\0{attempt}".encode()).hexdigest()[:16]


def child_env(spec, attempt=1):
    """The stage's environment: this one, plus how long its collectives wait for a silent peer
    (the preset's; nanochat.common.compute_init reads it) and which attempt this is (a fault
    injected for one attempt fires in that one only, see nanochat.stage.fault)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NANOCHAT_ATTEMPT": str(attempt),
           "NANOCHAT_COLLECTIVE_TIMEOUT_S": str(presets.collective_timeout(spec.preset))}
    if spec.data_mirror:
        env["NANOCHAT_DATA_MIRROR"] = spec.data_mirror
    return env


# Running a child process

LAUNCH_TAG = "NANOCHAT_LAUNCH"  # in the environment of every process one launch starts


def launch(cmd, env, log, tick=None, tail_lines=40, grace=10.0, keep_fds=()):
    """Runs `cmd` as a child in this process group (not a new session: a signal to the group, as a
    worker cancelling a flow run sends, reaches it too), passing each output line to `log`; the child
    inherits `keep_fds` (the node's slot, which it then holds while it runs). Returns
    (exit code, last lines). However this call ends, no process of the child's tree outlives it:
    torchrun's workers live in sessions of their own, so they are tracked while they run, and found
    at the end by a tag in their environment (a worker born since the last look, orphaned when the
    agent was killed, has no parent left to find it by)."""
    tag = uuid.uuid4().hex
    tail = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(cmd, env={**env, LAUNCH_TAG: tag}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", pass_fds=keep_fds)
    reader = threading.Thread(target=pump, args=(proc.stdout, log, tail), daemon=True)
    reader.start()
    tree = {proc.pid: psutil.Process(proc.pid)}
    try:
        while True:  # no deadline of its own: `tick` raises at the caller's (the stage timeout, node 0 leaving)
            try:
                tree.update((p.pid, p) for p in tree[proc.pid].children(recursive=True))
            except psutil.NoSuchProcess:
                pass
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if tick:
                    tick()
    finally:
        tree.update((p.pid, p) for p in tagged(tag))
        kill_tree(tree.values(), grace)
        proc.wait()  # bounded: what was still alive got SIGKILL
        reader.join(timeout=grace)
    return code, "".join(tail)


def tagged(tag):
    """The processes (of this user) whose environment carries this launch's tag."""
    for p in psutil.process_iter():
        try:
            if p.environ().get(LAUNCH_TAG) == tag:
                yield p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def pump(stream, log, tail):
    for line in stream:  # text mode splits on \n and \r, so progress bars come out line by line
        line = storage.redact(line.rstrip())
        if line:
            log(line)
            tail.append(line + "\n")


def kill_tree(procs, grace):
    """SIGTERM to every process still running, then SIGKILL to those alive after `grace` seconds."""
    alive = [p for p in procs if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, survivors = psutil.wait_procs(alive, timeout=grace)
    for p in survivors:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
