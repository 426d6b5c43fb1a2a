"""The `speedrun` flow: the pipeline (nanochat/pipeline.py) as a DAG of cached, retryable tasks, then
the report.

    python -m flows.speedrun --preset tiny                     runs it now (a temporary local Prefect server)
    python -m flows.speedrun --preset d24 --skip mid_train,chat_rl    upstream's 2026 shape: base -> SFT, no RL
    prefect deployment run speedrun/speedrun -p preset=tiny    through a server and a worker (prefect.yaml)
    prefect deployment run stage/tok_train -p run_name=speedrun-tiny   re-runs one stage on an existing run

Stages run as soon as their upstream stages are done (tok_eval beside base_train). A re-run of a
finished run is all cache hits; after a failure, the finished stages are cache hits and the failed
one resumes from its checkpoints.
"""

import argparse
import os
import signal
import subprocess
import sys

import psutil
from prefect import flow, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.futures import wait

import nanochat.storage
from flows import launch, stages
from nanochat import pipeline, presets, report
from nanochat.stage import SUMMARY, imported_stages, read_summary
from nanochat.training_options import COUNT, RATE

# The final artifact: the output of the last stage run that trains a model, else the tokenizer.
FINAL = (*reversed(pipeline.SOURCES.values()), "tok_train")
RUN_RECORD = "run.json"  # what the speedrun flow ran the run with: the stage flow's defaults, and the stages it skipped


def run_spec(preset, run_name, storage_root, data_mirror, nproc_per_node, nnodes, overrides):
    """The run's RunSpec; an unknown preset, an override for a stage the pipeline lacks or of an
    option the stage lacks is a ValueError before anything runs or is recorded (a typo would
    otherwise fail every stage's cache key or its stage, or be ignored)."""
    if preset not in presets.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(sorted(presets.PRESETS))}")
    if unknown := sorted(set(overrides or {}) - set(pipeline.STAGES)):
        raise ValueError(f"overrides for {', '.join(map(repr, unknown))}, which the pipeline has no stage of; its stages: "
                         f"{', '.join(pipeline.STAGES)}")
    for name, options in (overrides or {}).items():  # a misspelt option failed the stage, after those before it
        known = launch.option_names(pipeline.STAGES[name].module)
        if unknown := sorted(set(options) - known):
            raise ValueError(f"overrides for {name}: it has no option {', '.join(map(repr, unknown))}; its options: "
                             f"{', '.join(sorted(known))}")
    root = nanochat.storage.storage_root(storage_root)
    return launch.RunSpec(run=nanochat.storage.run_uri(run_name or f"speedrun-{preset}", root), preset=preset,
                          storage=root, data_mirror=data_mirror, nproc_per_node=nproc_per_node or default_nproc(preset),
                          nnodes=nnodes, overrides=overrides or {})


def recorded_spec(run_name, storage_root, data_mirror, preset, nproc_per_node, nnodes, overrides):
    """The spec of a re-run of one stage: what is given, else what the run recorded, so a stage of a
    d20 run re-runs as d20 with the run's overrides."""
    run = nanochat.storage.run_uri(run_name, nanochat.storage.storage_root(storage_root))
    record = read_record(run)
    preset = preset or record.get("preset") or imported_preset(run)
    if preset is None:
        uri = nanochat.storage.join(run, RUN_RECORD)
        raise ValueError(f"{nanochat.storage.redact(uri)} does not exist (the speedrun flow writes it, `nanochat import "
                         "--preset` records one): give the preset")
    return run_spec(preset, run, storage_root, data_mirror,
                    nproc_per_node or record.get("nproc_per_node"), nnodes or record.get("nnodes", 1),
                    record.get("overrides") if overrides is None else overrides)


def imported_preset(run):
    """The preset `nanochat import --preset` recorded for the run's later stages, or None."""
    for name in sorted(imported_stages(run)):
        if preset := read_summary(run, name)["config"].get("preset"):
            return preset
    return None


def spec_from_parameters(flow_name, parameters):
    """The RunSpec a flow run of `speedrun` or `stage` resolves its parameters to (what every node of
    a multi-node launch needs to build the same stage command)."""
    p = dict(parameters)
    if flow_name == "stage":
        return recorded_spec(p["run_name"], p.get("storage"), p.get("data_mirror"), p.get("preset"),
                             p.get("nproc_per_node"), p.get("nnodes"), p.get("overrides"))
    overrides = with_identity(p.get("overrides"), p.get("identity"), p.get("identity_weight"))
    return run_spec(p.get("preset", "tiny"), p.get("run_name"), p.get("storage"), p.get("data_mirror"),
                    p.get("nproc_per_node"), p.get("nnodes", 1), overrides)


def default_nproc(preset):
    """Processes per node when not given: one per GPU on a GPU preset, else the preset's choice."""
    if preset not in presets.GPU_PRESETS:
        return presets.cpu_nproc(preset)
    gpus = gpu_count()
    if not gpus:
        raise ValueError(f"preset {preset} runs one process per GPU and this node has none: give nproc_per_node")
    return gpus


def gpu_count():
    """This node's GPUs: those CUDA_VISIBLE_DEVICES names (as Slurm and Kubernetes set it), else
    those `nvidia-smi -L` lists (the flow process never imports torch)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def check_storage(storage, nnodes, deployed=False):
    """Refuses the worker's local disk as a run's storage where other machines read and write the
    run: nodes after the first, stages sent to their deployments, or a worker that is not a
    process on this machine."""
    if storage or os.environ.get("NANOCHAT_STORAGE"):
        return
    pool = work_pool_type()
    if nnodes > 1 or deployed or pool not in (None, "process"):
        where = (f"{nnodes} nodes" if nnodes > 1 else "stage deployments" if deployed else f"a {pool} work pool")
        raise ValueError(f"a run on {where} needs storage every node reaches: give the storage parameter "
                         "(s3://bucket/prefix, or a shared filesystem path) or set NANOCHAT_STORAGE")


def work_pool_type():
    """The type of the work pool this flow run came from (None when run directly)."""
    context = FlowRunContext.get()
    name = context.flow_run.work_pool_name if context and context.flow_run else None
    if not name:
        return None
    with get_client(sync_client=True) as client:
        return client.read_work_pool(name).type


def record_run(spec, skip):
    record = {"preset": spec.preset, "nproc_per_node": spec.nproc_per_node, "nnodes": spec.nnodes,
              "overrides": spec.overrides, **({"skip": list(skip)} if skip else {})}
    nanochat.storage.write_json(nanochat.storage.join(spec.run, RUN_RECORD), record)


def read_record(run):
    """The run's run.json ({} if the speedrun flow never ran it)."""
    uri = nanochat.storage.join(run, RUN_RECORD)
    return nanochat.storage.read_json(uri) if nanochat.storage.exists(uri) else {}


def run_stage_row(run, name):
    """Stage `name`'s row in `run`, rewired by the stages the run skips (run.json): what the stage
    flow re-runs, and what the other nodes of a multi-node launch build their command from."""
    return pipeline.stage(name, read_record(run).get("skip"))


def speedrun_name():
    """speedrun-<preset>-<run> (just the run's name when it is the default, speedrun-<preset>)."""
    p = runtime.flow_run.parameters
    default = f"speedrun-{p.get('preset', 'tiny')}"
    run = os.path.basename(str(p.get("run_name") or default).rstrip("/"))
    return run if run == default else f"{default}-{run}"


def stage_name():
    """<stage>-<run>."""
    p = runtime.flow_run.parameters
    return f"{p['name']}-{os.path.basename(str(p['run_name']).rstrip('/'))}"


@task
def publish_report(run: str) -> str:
    """Writes <run>/report.md and publishes it (artifact `report-card`) with the stage table."""
    uri, markdown = report.write(run)
    shown = nanochat.storage.redact(run)
    create_markdown_artifact(markdown, key="report-card", description=f"report card of {shown}")
    create_table_artifact(report.stage_rows(report.load(run)), key="stage-outputs", description=f"stages of {shown}")
    return uri


@flow(name="speedrun", flow_run_name=speedrun_name)
def speedrun(preset: str = "tiny", run_name: str | None = None, storage: str | None = None,
             data_mirror: str | None = None, nproc_per_node: int | None = None, nnodes: int = 1,
             overrides: dict[str, dict] | None = None, retries: int = 2, only: list[str] | None = None,
             identity: str | None = None, identity_weight: float | None = None, parallel: bool | None = None,
             stage_deployments: bool = False, skip: list[str] | None = None) -> str:
    """Runs the pipeline on `preset` in run `run_name` (default speedrun-<preset>) under `storage`
    (default $NANOCHAT_STORAGE); `overrides` = {stage: {option: value}}; `only`: just these stages
    and the ones they need (not what the stages imported into the run needed: those are done);
    `skip`: leave out these optional stages (mid_train, chat_rl) and the evaluations of their
    models, the next stage training on the model before (skip=["mid_train", "chat_rl"] is
    upstream's 2026 shape: chat_sft trains on base_train's model); `identity`: a JSONL
    file (path or URI) of your own conversations (a name, a personality) mixed into midtraining and
    SFT, `identity_weight` times; `parallel`: stages whose inputs are ready run side by side
    (default: the preset's choice; the cpu preset runs one stage at a time, as two would only share
    its cores), though torchrun stages never share a node (flows/slots.py); `nproc_per_node`:
    default one per GPU on GPU presets; `stage_deployments`: torchrun stages run as flow runs of
    their `stage/<name>` deployments, wherever those were deployed (a Kubernetes pool runs each as a
    multi-node Job) instead of on this node. Records the run's preset, overrides and skipped stages
    in <run>/run.json, the stage flow's defaults. Returns the URI of the final artifact: the last
    training stage's `checkpoint` output; else the directory of tok_train or, in a run of stages
    that produce neither (only=["download"]), of the last stage."""
    spec, selected = plan(preset, run_name, storage, data_mirror, nproc_per_node, nnodes, overrides, only, identity,
                          identity_weight, stage_deployments, skip)
    record_run(spec, skip)
    if parallel is None:
        parallel = preset not in presets.ONE_STAGE_AT_A_TIME
    futures = {}
    for stage in selected:
        task_ = stages.stage_task(stage, spec, retries=retries, deployed=stage_deployments)
        # (what an imported stage needed is not selected)
        upstream = [futures[n] for n in stage.needs if n in futures] if parallel else list(futures.values())
        futures[stage.name] = task_.submit(stage, spec, wait_for=upstream)
    wait(list(futures.values()))
    summaries = {name: future.result() for name, future in futures.items()}  # raises the first failure
    publish_report(spec.run)
    final = next((name for name in FINAL if name in summaries), list(summaries)[-1])
    return summaries[final]["outputs"].get("checkpoint", {}).get("uri") or nanochat.storage.join(spec.run, final)


def plan(preset, run_name, storage, data_mirror, nproc_per_node, nnodes, overrides, only, identity, identity_weight,
         stage_deployments, skip):
    """(the run's RunSpec, the stages to run), or what the flow refuses before any stage runs, as a
    ValueError or PipelineError: storage this machine or others cannot reach, an identity file that is not
    there (mid_train would find out after base_train), a count of nodes or processes below 1 or a
    negative identity weight (the stages would find out, the weight after base_train), an unknown
    preset or override, stages that `only` and `skip` cannot select, a skip the run's finished
    stages contradict."""
    if nnodes < 1 or (nproc_per_node is not None and nproc_per_node < 1):
        raise ValueError(f"nnodes {nnodes} and nproc_per_node {nproc_per_node}: each must be at least 1")
    if identity_weight is not None and not identity_weight >= 0:
        raise ValueError(f"identity_weight {identity_weight}: epochs of your conversations, a number from 0 up")
    check_storage(storage, nnodes, stage_deployments)
    if identity and not nanochat.storage.exists(identity):
        raise ValueError(f"identity {identity}: no such file (your conversations for mid_train and chat_sft)")
    spec = run_spec(preset, run_name, storage, data_mirror, nproc_per_node, nnodes, with_identity(overrides, identity, identity_weight))
    try:  # the run's first read of its storage (a bucket without credentials was a traceback of some 200 lines)
        imported = imported_stages(spec.run)
    except Exception as e:  # noqa: BLE001 - whatever the filesystem raises, the run cannot use it
        raise ValueError(f"storage {nanochat.storage.redact(spec.storage)}: cannot reach it ({type(e).__name__}: {e})") from None
    selected = pipeline.select(only, skip, done=imported)  # imported stages are done and need nothing
    check_skip(spec.run, skip)
    return spec, selected


def check_skip(run, skip):
    """A ValueError if the run holds a finished stage that `skip` leaves out: it would stay beside the
    models trained without it (`nanochat chat` would take its model, the report would show it)."""
    kept = {row.name for row in pipeline.select(skip=skip)}
    held = [row.name for row in pipeline.PIPELINE
            if row.name not in kept and nanochat.storage.exists(nanochat.storage.join(run, row.name, SUMMARY))]
    if held:
        raise ValueError(f"run {run} holds {', '.join(held)}, which skip={list(skip)} leaves out: train this one in a new run, "
                         "or remove those stages' folders first")


def with_identity(overrides, identity, weight):
    """`overrides` with the user's identity conversations given to mid_train and chat_sft."""
    out = {stage: dict(options) for stage, options in (overrides or {}).items()}
    if identity:
        for stage in ("mid_train", "chat_sft"):
            out.setdefault(stage, {})["identity"] = identity
            if weight is not None:
                out[stage]["identity_weight"] = weight
    return out


@flow(name="stage", flow_run_name=stage_name)
def one_stage(name: str, run_name: str, preset: str | None = None, storage: str | None = None,
              data_mirror: str | None = None, nproc_per_node: int | None = None, nnodes: int | None = None,
              overrides: dict[str, dict] | None = None, retries: int = 2) -> dict:
    """Re-runs stage `name` on an existing run (its upstream stages must be done there), bypassing
    the cache; returns its stage.json. The preset, processes, nodes and overrides default to the
    run's own (its run.json), and a stage the run skipped cannot be re-run (the one after it starts
    from the model before, as in the run)."""
    check_storage(storage, nnodes or 1)
    spec = recorded_spec(run_name, storage, data_mirror, preset, nproc_per_node, nnodes, overrides)
    stage = run_stage_row(spec.run, name)
    return stages.stage_task(stage, spec, retries=retries, force=True)(stage, spec)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m flows.speedrun", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(presets.PRESETS), help="the stages' defaults (default: tiny)")
    p.add_argument("--run", default=None, help="run name or URI (default: speedrun-<preset>)")
    p.add_argument("--storage", default=None, help="storage root (default: $NANOCHAT_STORAGE or file://~/.cache/nanochat)")
    p.add_argument("--data-mirror", default=None, help="mirror of the data sources (default: $NANOCHAT_DATA_MIRROR)")
    p.add_argument("--nproc-per-node", type=COUNT, default=None, help="processes per node (default: one per GPU on GPU presets)")
    p.add_argument("--nnodes", type=COUNT, default=1, help="machines the torchrun stages span (default: 1)")
    p.add_argument("--identity", default=None, help="JSONL of your own conversations to mix into mid_train and chat_sft")
    p.add_argument("--identity-weight", type=RATE, default=None, help="times the identity conversations are repeated")
    p.add_argument("--skip", default=None, type=skippable,
                   help=f"comma-separated stages to leave out, of {', '.join(pipeline.SKIPPABLE)} "
                        "(mid_train,chat_rl: upstream's 2026 speedrun, SFT straight from the base model)")
    return p


def skippable(text):
    """--skip's value: comma-separated stages, refused at once (before a Prefect server starts)
    unless a run may skip them."""
    names = [name for name in text.split(",") if name]
    try:
        pipeline.select(skip=names)
    except pipeline.PipelineError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return names


def stop_on_interrupt(signum, frame):
    """Ctrl-C (or SIGTERM) of `python -m flows.speedrun`: ends the running stages' processes, then this
    one. Prefect's engine would go on for minutes, retrying its stages against the temporary server
    that the same Ctrl-C ended. Finished stages are kept, and the same command resumes the rest."""
    print(f"\npython -m flows.speedrun: {signal.Signals(signum).name}: stopping; finished stages are kept, and the same "
          "command resumes the rest", file=sys.stderr, flush=True)
    launch.kill_tree(psutil.Process().children(recursive=True), grace=10)  # the stages (torchrun, its workers), the server
    os._exit(128 + signum)


def main(argv=None):
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGINT, stop_on_interrupt)
    signal.signal(signal.SIGTERM, stop_on_interrupt)
    try:  # what the flow would refuse, in one line, before a Prefect server starts
        plan(args.preset, args.run, args.storage, args.data_mirror, args.nproc_per_node, args.nnodes, None, None, args.identity,
             args.identity_weight, False, args.skip)
    except (ValueError, pipeline.PipelineError) as e:
        sys.exit(f"python -m flows.speedrun: {e}")
    final = speedrun(args.preset, args.run, args.storage, args.data_mirror, args.nproc_per_node, args.nnodes,
                     identity=args.identity, identity_weight=args.identity_weight, skip=args.skip)
    run = nanochat.storage.run_uri(args.run or f"speedrun-{args.preset}", nanochat.storage.storage_root(args.storage))
    print(f"\nfinal artifact: {final}\nreport card:    {nanochat.storage.join(run, report.REPORT)}\n"
          f"chat with it:   .venv/bin/nanochat chat --run {run}\n"
          f"or serve it:    .venv/bin/nanochat serve --run {run}   (API and web UI on http://127.0.0.1:8000)")


if __name__ == "__main__":
    main()
