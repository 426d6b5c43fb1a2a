"""The Prefect task that runs one stage (a row of the table in nanochat/pipeline.py) as a child
process (flows/launch.py builds its command and runs it). Its result (the stage's stage.json) is
cached under a key of stage + its arguments + resolved config + what the files its options name hold
+ upstream stage.json sha256 + code version, in `<run>/prefect-results/`, while the run holds it (StageCache).
"""

import contextlib
import hashlib
import importlib.util
import json
import os
import shlex
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy
from prefect.deployments import run_deployment
from prefect.filesystems import RemoteFileSystem
from prefect.results import ResultRecord
from prefect.runtime import task_run
from prefect.settings import PREFECT_HOME
from prefect.tasks import exponential_backoff
from prefect.transactions import IsolationLevel

from flows.launch import RunSpec, arguments, child_env, command, launch
from flows.locks import FlockLockManager
from flows.slots import node_slot
from nanochat import presets, storage
from nanochat.common import code_version
from nanochat.pipeline import Stage
from nanochat.stage import SUMMARY, checked_summary

# Caching

WORK_RECORD = "flow_work.json"  # in a stage's folder: the work the flow last ran the stage for (clear_other_work)

def summary_uri(name, spec):
    return storage.join(spec.run, name, SUMMARY)


def holds(stage, spec, record):
    """The run still holds the result cached in `record`: the stage's stage.json is the very one the
    result is (a run under another key, or a stage run by hand, rewrites the stage's directory) and
    every output still matches its sha256."""
    uri = summary_uri(stage.name, spec)
    if not storage.exists(uri):
        return False
    try:
        summary = storage.read_json(uri)
    except ValueError:  # a damaged stage.json: the stage runs again and writes it anew
        return False
    if ResultRecord.deserialize(storage.read_bytes(record)).result != summary:
        return False
    outputs = summary["outputs"].values()
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
    """Key: the stage and the arguments it is given, its resolved config (preset values, then
    overrides), what the files and folders that config names hold (`named_contents`), the run's
    processes and nodes, its upstream stages' stage.json sha256 and the code
    version (package version and the sources of nanochat/, tasks/ and rustbpe/: the code the stage
    process runs; not the git commit, so a docs commit keeps the cache).

    flows/ is not in it: the stage computes what its command line and inputs say, and the key holds
    that command line's arguments (launch.arguments) rather than the code that builds them. The rest
    of flows/ schedules and watches stages (slots, retries, timeouts, artifacts, notices), and a fix
    there must not make every finished run train its models again.

    A cached result counts while the run holds it (`holds`); otherwise it is dropped and the stage
    runs again."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        stage, spec = inputs["stage"], inputs["spec"]
        key = {**asked(stage, spec), "inputs": {name: upstream_sha256(summary_uri(name, spec)) for name in stage.needs},
               "code": code_version(commit=False)}  # version + source hash
        key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        record = storage.join(results_uri(spec.run), key)
        if storage.exists(record) and not holds(stage, spec, record):
            storage.remove(record)
        return key


def asked(stage, spec):
    """What the stage is asked for in the run: its command line's arguments, its resolved config, what
    the files that config names hold, and its processes (the cache key adds its upstream stages'
    stage.json and the code version)."""
    config = spec.config(stage)
    return {"stage": [stage.name, stage.module, *arguments(stage, spec)], "config": config, "named": named_contents(config),
            "processes": [spec.nproc_per_node, spec.nnodes]}


def made(name, spec):
    """What upstream stage `name` made in the run, by content: each output's sha256 but its metrics',
    a checkpoint by its weights (its meta.json, and so its manifest, change whenever the same model
    is saved again); None where it is not done."""
    uri = summary_uri(name, spec)
    if not storage.exists(uri):
        return None
    out = {}
    for output, entry in checked_summary(uri)["outputs"].items():
        if output == "checkpoint":
            out[output] = storage.read_json(entry["uri"])["files"]["model.safetensors"]["sha256"]
        elif output != "metrics":
            out[output] = entry["sha256"]
    return out


def clear_other_work(stage, spec, logger):
    """Makes the stage's folder hold only this work (`asked` and what its upstream stages `made`):
    where the flow last ran the stage for other work (an option or override changed, a file it names
    changed in place, an upstream stage made another model), a training stage would resume that
    work's checkpoints as this one's and train nothing, so the folder goes first. The same work (a
    retry, a lost output, new code, an upstream stage committed again with the same results)
    resumes from it. Records the work, in WORK_RECORD, before the stage starts."""
    work = {**asked(stage, spec), "upstream": {name: made(name, spec) for name in stage.needs}}
    digest = hashlib.sha256(json.dumps(work, sort_keys=True).encode()).hexdigest()
    folder = storage.join(spec.run, stage.name)
    record = storage.join(folder, WORK_RECORD)
    if storage.exists(record) and storage.read_json(record).get("work") != digest:
        logger.info("stage %s: the run holds it for other options or inputs; it starts again from nothing", stage.name)
        storage.remove(folder, recursive=True)
    storage.write_json(record, {"work": digest})


def named_contents(config):
    """What the files outside the run that a stage's options name hold, by option and name: a file's
    sha256 (an identity file), a folder's entries with their sizes and modification times (your own
    text: download hashes the files themselves), a `module:Class` task's source file. A file changed
    under the same name is then a new key, not a stale hit. Values that name nothing are skipped."""
    named = {}
    for option, value in sorted(config.items()):
        for item in value.split(",") if isinstance(value, str) else ():
            held = contents(item)
            if held is not None:
                named[f"{option}={item}"] = held
    return named


def contents(item):
    """sha256 or listing of what `item` names (see named_contents), or None."""
    if ":" in item and "://" not in item:  # module:Class
        try:
            found = importlib.util.find_spec(item.split(":", 1)[0])
        except Exception:  # noqa: BLE001 - the stage itself says what is wrong with the task
            return None
        origin = found and found.origin
        return storage.sha256(origin) if origin and os.path.isfile(origin) else None
    if "://" not in item and not os.path.exists(os.path.expanduser(item)):
        return None
    fs, path = storage.filesystem(item)
    if not fs.exists(path):
        return None
    if not fs.isdir(path):
        return storage.sha256(item)
    return sorted([e["name"].rstrip("/").rsplit("/", 1)[-1], e.get("size"),
                   str(e.get("mtime") or e.get("LastModified") or e.get("ETag"))] for e in fs.ls(path, detail=True))


def upstream_sha256(uri):
    """sha256 of an upstream stage's stage.json; None for one that never ran, as what a stage
    imported into the run needed (the flow does not select it)."""
    return storage.sha256(uri) if storage.exists(uri) else None


# A stage's first retry waits about this long (with jitter), each later one twice as long as the last.
RETRY_DELAY_S = 10


def stage_task(stage, spec, retries=2, force=False, deployed=False):
    """The task that runs `stage` in the run: cached beside the run, and locked so that concurrent
    runs of one stage on this machine execute it once. `force` runs it even on a cache hit;
    `deployed` runs a torchrun stage through its deployment (`run_deployed_stage`)."""
    locks = FlockLockManager(Path(PREFECT_HOME.value()) / "locks")
    body = run_deployed_stage if deployed and stage.torchrun else run_stage
    return body.with_options(
        name=stage.name,
        cache_policy=StageCache().configure(lock_manager=locks, isolation_level=IsolationLevel.SERIALIZABLE),
        result_storage=result_storage(spec.run),
        refresh_cache=force,
        retries=retries,
        # computed here, as Prefect expands a backoff for the decorator's retries only
        retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_DELAY_S)(retries),
        tags={f"stage:{stage.name}"},
    )


def imported_summary(stage, spec, logger):
    """The stage.json of a stage imported into the run (nanochat import), which is done for good:
    the flow takes it as it is and never runs (nor overwrites) the stage; None otherwise."""
    uri = summary_uri(stage.name, spec)
    summary = storage.read_json(uri) if storage.exists(uri) else {}
    if not summary.get("imported"):
        return None
    logger.info("stage %s was imported into the run: taken as it is, not run", stage.name)
    return summary


class StageFailed(Exception):
    """A stage exited non-zero, or ran past its timeout; the message carries its last output lines."""


# Results are JSON (a stage.json), never pickles: a run directory from elsewhere cannot run code here.
@task(persist_result=True, result_serializer="json", retry_jitter_factor=0.5, task_run_name="{stage.name}")
def run_stage(stage: Stage, spec: RunSpec) -> dict:
    """Runs one stage to completion and returns its stage.json; a retry resumes from the stage's
    checkpoints (stages resume by default). A torchrun stage holds its node's slot while it runs
    (flows/slots.py); every stage is stopped at its preset's timeout."""
    logger = get_run_logger()
    if done := imported_summary(stage, spec, logger):
        return done
    clear_other_work(stage, spec, logger)
    attempt = task_run.run_count  # part of a multi-node rendezvous id; injected faults may name it
    cmd = command(stage, spec, attempt)
    progress = Progress(stage, spec)
    with node_slot(logger.info) if stage.torchrun else contextlib.nullcontext() as slot:
        logger.info("$ %s", storage.redact(shlex.join(cmd)))
        deadline = Deadline(stage, spec)
        code, tail = launch(cmd, child_env(spec, attempt), logger.info, tick=lambda: (progress.update(), deadline.check()),
                            keep_fds=() if slot is None else (slot,))
    if code != 0:
        raise StageFailed(f"stage {stage.name} exited with code {code}; last output:\n{tail}")
    progress.update(final=True)
    return storage.read_json(summary_uri(stage.name, spec))


@task(persist_result=True, result_serializer="json", task_run_name="{stage.name}")
def run_deployed_stage(stage: Stage, spec: RunSpec) -> dict:
    """Runs the stage as a flow run of its deployment `stage/<name>`, on the pool that deployment
    was deployed to (on a Kubernetes pool, a Job of `nnodes` pods), and returns its stage.json. A
    retry of this task is a new flow run, which resumes from the stage's checkpoints."""
    if done := imported_summary(stage, spec, get_run_logger()):
        return done
    parameters = {"name": stage.name, "run_name": spec.run, "preset": spec.preset, "storage": spec.storage,
                  "data_mirror": spec.data_mirror, "nproc_per_node": spec.nproc_per_node, "nnodes": spec.nnodes,
                  "overrides": spec.overrides, "retries": 0}
    # the Job's size (pods, GPUs per pod) follows the run's, not the pool template's defaults
    job = {"nnodes": spec.nnodes, "nproc_per_node": spec.nproc_per_node}
    flow_run = run_deployment(f"stage/{stage.name}", parameters=parameters, job_variables=job, as_subflow=True)
    if not flow_run.state.is_completed():
        raise StageFailed(f"stage {stage.name} ended {flow_run.state.name} in flow run {flow_run.name}: {flow_run.state.message}")
    return storage.read_json(summary_uri(stage.name, spec))


class Deadline:
    """The stage's timeout (presets.LIMITS): checked every second by the launcher, whose cleanup
    then ends the stage's whole process tree."""

    def __init__(self, stage, spec):
        self.name, self.preset = stage.name, spec.preset
        self.seconds = presets.stage_timeout(spec.preset, stage.module)
        self.end = time.monotonic() + self.seconds

    def check(self):
        if time.monotonic() > self.end:
            raise StageFailed(f"stage {self.name} ran past its timeout of {self.seconds} s (preset {self.preset})")


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
