"""The Prefect task that runs one stage (a row of the table in nanochat/pipeline.py) as a child:

    python -m nanochat.stages.<module> --run RUN --preset P --storage S [options]
    python -m torch.distributed.run --standalone --nproc_per_node N -m nanochat.stages.<module> ...
    python -m torch.distributed.run --nnodes M --rdzv-backend c10d --rdzv-endpoint H:P ...   (M > 1)

in this process's group. It logs every output line, and on failure or cancellation leaves no process
of the child's tree behind. Its result (the stage's stage.json) is cached under a key of stage +
resolved config + upstream stage.json sha256 + code version, in `<run>/prefect-results/`.
"""

import collections
import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy
from prefect.filesystems import RemoteFileSystem
from prefect.settings import PREFECT_HOME
from prefect.tasks import exponential_backoff
from prefect.transactions import IsolationLevel

from flows.locks import FlockLockManager
from nanochat import presets, storage
from nanochat.common import code_version
from nanochat.pipeline import Stage
from nanochat.stage import SUMMARY


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


def options(overrides):
    """{"num_steps": 10, "verify": True} -> ["--num-steps", "10", "--verify"]."""
    out = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def command(stage, spec):
    """The stage's command line under `spec` (torchrun for multi-process stages)."""
    module = f"nanochat.stages.{stage.module}"
    args = ["--run", spec.run, "--preset", spec.preset, "--storage", spec.storage, *stage.args,
            *options(spec.overrides.get(stage.name, {}))]
    if not stage.torchrun:
        return [sys.executable, "-m", module, *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.nproc_per_node}"]
    if spec.nnodes > 1:
        endpoint = os.environ.get("NANOCHAT_RDZV_ENDPOINT")
        if not endpoint:
            raise ValueError(f"nnodes={spec.nnodes} needs NANOCHAT_RDZV_ENDPOINT=host:port (the c10d rendezvous)")
        torchrun += [f"--nnodes={spec.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}"]
    else:
        torchrun.append("--standalone")  # a free local port: parallel torchrun stages never collide
    # e.g. NANOCHAT_LAUNCHER="srun --ntasks-per-node=1" under Slurm: one torchrun per node
    launcher = shlex.split(os.environ.get("NANOCHAT_LAUNCHER", ""))
    # `--`: without it torchrun's parser takes `--run` for an abbreviation of its own `--run-path`
    return [*launcher, *torchrun, "-m", module, "--", *args]


def child_env(spec):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if spec.data_mirror:
        env["NANOCHAT_DATA_MIRROR"] = spec.data_mirror
    return env


# Running a child process

LAUNCH_TAG = "NANOCHAT_LAUNCH"  # in the environment of every process one launch starts


def launch(cmd, env, log, tick=None, tail_lines=40, grace=10.0):
    """Runs `cmd` as a child in this process group (not a new session: a signal to the group, as a
    worker cancelling a flow run sends, reaches it too), passing each output line to `log`. Returns
    (exit code, last lines). However this call ends, no process of the child's tree outlives it:
    torchrun's workers live in sessions of their own, so they are tracked while they run, and found
    at the end by a tag in their environment (a worker born since the last look, orphaned when the
    agent was killed, has no parent left to find it by)."""
    tag = uuid.uuid4().hex
    tail = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(cmd, env={**env, LAUNCH_TAG: tag}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    reader = threading.Thread(target=pump, args=(proc.stdout, log, tail), daemon=True)
    reader.start()
    tree = {proc.pid: psutil.Process(proc.pid)}
    try:
        while True:
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
        proc.wait()
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


# Caching

def summary_uri(name, spec):
    return storage.join(spec.run, name, SUMMARY)


def committed(stage, spec):
    """The stage is done in the run: its stage.json exists and every output matches its sha256."""
    uri = summary_uri(stage.name, spec)
    if not storage.exists(uri):
        return False
    outputs = storage.read_json(uri)["outputs"].values()
    return all(storage.exists(o["uri"]) and storage.sha256(o["uri"]) == o["sha256"] for o in outputs)


def results_uri(run):
    return storage.join(run, "prefect-results")


def result_storage(run):
    """Where the run's cached task results live: a local path, or a saved RemoteFileSystem block
    (fsspec; credentials come from the environment, never from the block)."""
    uri = results_uri(run)
    path = storage.local_path(uri)
    if path:
        return Path(path)
    block = RemoteFileSystem(basepath=uri)
    block.save(f"nanochat-results-{hashlib.sha256(uri.encode()).hexdigest()[:16]}", overwrite=True)
    return block


class StageCache(CachePolicy):
    """Key: the stage, its resolved config, its upstream stages' stage.json sha256 and the code version.
    A cached result whose stage is no longer committed (outputs gone or changed) is dropped, so the
    stage runs again."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        stage, spec = inputs["stage"], inputs["spec"]
        key = {
            "stage": [stage.name, stage.module, list(stage.args)],
            "config": spec.config(stage),
            "run": [spec.run, spec.preset, spec.nproc_per_node, spec.nnodes],
            "inputs": {name: storage.sha256(summary_uri(name, spec)) for name in stage.needs},
            "code": {k: v for k, v in code_version().items() if k != "commit"},  # version + source hash
        }
        key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        if not committed(stage, spec):
            storage.remove(storage.join(results_uri(spec.run), key))
        return key


def stage_task(stage, spec, retries=2, force=False):
    """The task that runs `stage` in the run: cached beside the run, and locked so that concurrent
    runs of one stage on this machine execute it once. `force` runs it even on a cache hit."""
    locks = FlockLockManager(Path(PREFECT_HOME.value()) / "locks")
    return run_stage.with_options(
        name=stage.name,
        cache_policy=StageCache().configure(lock_manager=locks, isolation_level=IsolationLevel.SERIALIZABLE),
        result_storage=result_storage(spec.run),
        refresh_cache=force,
        retries=retries,
    )


class StageFailed(Exception):
    """A stage exited non-zero; the message carries its last output lines."""


# Results are JSON (a stage.json), never pickles: a run directory from elsewhere cannot run code here.
@task(persist_result=True, result_serializer="json", retry_delay_seconds=exponential_backoff(backoff_factor=10),
      retry_jitter_factor=0.5, task_run_name="{stage.name}")
def run_stage(stage: Stage, spec: RunSpec) -> dict:
    """Runs one stage to completion and returns its stage.json; a retry resumes from the stage's
    checkpoints (stages resume by default)."""
    logger = get_run_logger()
    cmd = command(stage, spec)
    logger.info("$ %s", storage.redact(shlex.join(cmd)))
    progress = Progress(stage, spec)
    code, tail = launch(cmd, child_env(spec), logger.info, tick=progress.update)
    if code != 0:
        raise StageFailed(f"stage {stage.name} exited with code {code}; last output:\n{tail}")
    progress.update(final=True)
    return storage.read_json(summary_uri(stage.name, spec))


class Progress:
    """A progress artifact for a training stage (one with `num_steps`), from the `step` of the last
    line of `<run>/<stage>/metrics.jsonl`, refreshed every `every` seconds."""

    def __init__(self, stage, spec, every=10.0):
        self.num_steps = spec.config(stage).get("num_steps")
        self.key = f"progress-{stage.name.replace('_', '-')}"
        self.metrics = storage.join(spec.run, stage.name, "metrics.jsonl")
        self.every, self.last, self.artifact = every, 0.0, None

    def update(self, final=False):
        if not self.num_steps or (time.monotonic() - self.last < self.every and not final):
            return
        self.last = time.monotonic()
        step = last_step(self.metrics)
        if step is None:
            return
        percent = min(100.0, 100.0 * step / self.num_steps)
        if self.artifact is None:
            self.artifact = create_progress_artifact(percent, key=self.key, description=f"step {step}/{self.num_steps}")
        else:
            update_progress_artifact(self.artifact, percent, description=f"step {step}/{self.num_steps}")


def last_step(metrics_uri):
    """The `step` of the last complete line of a metrics.jsonl, or None."""
    if not storage.exists(metrics_uri):
        return None
    for line in reversed(storage.read_text(metrics_uri).splitlines()):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return None
