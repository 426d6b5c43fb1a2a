"""The `speedrun` flow: the pipeline (nanochat/pipeline.py) as a DAG of cached, retryable tasks, then
the report.

    python -m flows.speedrun --preset tiny                     runs it now (a temporary local Prefect server)
    prefect deployment run speedrun/speedrun -p preset=tiny    through a server and a worker (prefect.yaml)
    prefect deployment run stage/tok_train -p run_name=speedrun-tiny   re-runs one stage on an existing run

Stages run as soon as their upstream stages are done (tok_eval beside base_train). A re-run of a
finished run is all cache hits; after a failure, the finished stages are cache hits and the failed
one resumes from its checkpoints.
"""

import argparse

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import wait

import nanochat.storage
from flows import launch, stages
from nanochat import pipeline, presets, report

# The final artifact: the output of the last stage run that trains a model, else the tokenizer.
FINAL = (*reversed(pipeline.SOURCES.values()), "tok_train")


def run_spec(preset, run_name, storage_root, data_mirror, nproc_per_node, nnodes, overrides):
    root = nanochat.storage.storage_root(storage_root)
    return launch.RunSpec(run=nanochat.storage.run_uri(run_name or f"speedrun-{preset}", root), preset=preset,
                          storage=root, data_mirror=data_mirror, nproc_per_node=nproc_per_node, nnodes=nnodes,
                          overrides=overrides or {})


def spec_from_parameters(flow_name, parameters):
    """The RunSpec a flow run of `speedrun` or `stage` resolves its parameters to (what every node of
    a multi-node launch needs to build the same stage command)."""
    p = dict(parameters)
    overrides = p.get("overrides")
    if flow_name == "speedrun":
        overrides = with_identity(overrides, p.get("identity"), p.get("identity_weight"))
    return run_spec(p.get("preset", "tiny"), p.get("run_name"), p.get("storage"), p.get("data_mirror"),
                    p.get("nproc_per_node", 1), p.get("nnodes", 1), overrides)


@task
def publish_report(run: str) -> str:
    """Writes <run>/report.md and publishes it (artifact `report-card`) with the stage table."""
    uri, markdown = report.write(run)
    shown = nanochat.storage.redact(run)
    create_markdown_artifact(markdown, key="report-card", description=f"report card of {shown}")
    create_table_artifact(report.stage_rows(report.load(run)), key="stage-outputs", description=f"stages of {shown}")
    return uri


@flow(name="speedrun")
def speedrun(preset: str = "tiny", run_name: str | None = None, storage: str | None = None,
             data_mirror: str | None = None, nproc_per_node: int = 1, nnodes: int = 1,
             overrides: dict[str, dict] | None = None, retries: int = 2, only: list[str] | None = None,
             identity: str | None = None, identity_weight: float | None = None, parallel: bool | None = None) -> str:
    """Runs the pipeline on `preset` in run `run_name` (default speedrun-<preset>) under `storage`
    (default $NANOCHAT_STORAGE); `overrides` = {stage: {option: value}}; `only`: just these stages
    and the ones they need; `identity`: a JSONL file (path or URI) of your own conversations (a
    name, a personality) mixed into midtraining and SFT, `identity_weight` times; `parallel`: stages
    whose inputs are ready run side by side (default: the preset's choice; the cpu preset runs one
    stage at a time, as two would only share its cores). Returns the URI
    of the final artifact: the last training stage's `checkpoint` output; else the directory of
    tok_train or, in a run of stages that produce neither (only=["download"]), of the last stage."""
    overrides = with_identity(overrides, identity, identity_weight)
    spec = run_spec(preset, run_name, storage, data_mirror, nproc_per_node, nnodes, overrides)
    if parallel is None:
        parallel = preset not in presets.ONE_STAGE_AT_A_TIME
    futures = {}
    for stage in pipeline.select(only):  # a PipelineError here, before any stage runs
        task_ = stages.stage_task(stage, spec, retries=retries)
        upstream = [futures[n] for n in stage.needs] if parallel else list(futures.values())
        futures[stage.name] = task_.submit(stage, spec, wait_for=upstream)
    wait(list(futures.values()))
    summaries = {name: future.result() for name, future in futures.items()}  # raises the first failure
    publish_report(spec.run)
    final = next((name for name in FINAL if name in summaries), list(summaries)[-1])
    return summaries[final]["outputs"].get("checkpoint", {}).get("uri") or nanochat.storage.join(spec.run, final)


def with_identity(overrides, identity, weight):
    """`overrides` with the user's identity conversations given to mid_train and chat_sft."""
    out = {stage: dict(options) for stage, options in (overrides or {}).items()}
    if identity:
        for stage in ("mid_train", "chat_sft"):
            out.setdefault(stage, {})["identity"] = identity
            if weight is not None:
                out[stage]["identity_weight"] = weight
    return out


@flow(name="stage")
def one_stage(name: str, preset: str = "tiny", run_name: str | None = None, storage: str | None = None,
              data_mirror: str | None = None, nproc_per_node: int = 1, nnodes: int = 1,
              overrides: dict[str, dict] | None = None, retries: int = 2) -> dict:
    """Re-runs stage `name` on an existing run (its upstream stages must be done there), bypassing
    the cache; returns its stage.json."""
    spec = run_spec(preset, run_name, storage, data_mirror, nproc_per_node, nnodes, overrides)
    stage = pipeline.stage(name)
    return stages.stage_task(stage, spec, retries=retries, force=True)(stage, spec)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m flows.speedrun", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--run", default=None, help="run name or URI (default: speedrun-<preset>)")
    p.add_argument("--storage", default=None, help="storage root (default: $NANOCHAT_STORAGE or file://~/.cache/nanochat)")
    p.add_argument("--data-mirror", default=None, help="mirror of the data sources (default: $NANOCHAT_DATA_MIRROR)")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--identity", default=None, help="JSONL of your own conversations to mix into mid_train and chat_sft")
    p.add_argument("--identity-weight", type=float, default=None, help="times the identity conversations are repeated")
    args = p.parse_args(argv)
    final = speedrun(args.preset, args.run, args.storage, args.data_mirror, args.nproc_per_node, args.nnodes,
                     identity=args.identity, identity_weight=args.identity_weight)
    run = run_spec(args.preset, args.run, args.storage, None, 1, 1, None).run
    print(f"\nfinal artifact: {final}\nreport card:    {nanochat.storage.join(run, report.REPORT)}\n"
          f"chat with it:   .venv/bin/nanochat chat --run {run}\n"
          f"or serve it:    .venv/bin/nanochat serve --run {run}   (API and web UI on http://127.0.0.1:8000)")


if __name__ == "__main__":
    main()
