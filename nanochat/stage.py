"""The stage contract shared by every program in nanochat/stages.

A stage takes `--run RUN_URI --preset NAME [options]`; the preset supplies the defaults and each
option overrides its own. Outputs go under `<run>/<stage>/`, and the stage commits by writing
`<run>/<stage>/stage.json` last (config, inputs and outputs with sha256, metrics, wall time, code
version). No stage.json means the stage is not done. Credentials never reach stage.json or the
logs: both go through `storage.redact`.
"""

import argparse
import logging
import os
import sys
import time

from nanochat import presets, storage
from nanochat.common import code_version

SUMMARY = "stage.json"


class StageError(Exception):
    """A stage cannot run: bad arguments or missing/invalid inputs. Reported as one line."""


def parser(stage, doc):
    """An argument parser with the options every stage shares; `doc` is the module docstring."""
    p = argparse.ArgumentParser(
        prog=f"python -m nanochat.stages.{stage}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, help="run URI, path, or name (a name X means <storage>/runs/X)")
    p.add_argument("--preset", required=True, choices=sorted(presets.PRESETS), help="defaults for every option below")
    p.add_argument("--storage", default=None, help="storage root for run names and the data cache (default: $NANOCHAT_STORAGE or file://~/.cache/nanochat)")
    return p


def add_compute_options(p):
    """--dtype and --device-type, for stages that run the model."""
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="autocast dtype; auto: bf16 where the hardware does it fast")
    p.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None,
                   help="default: cuda > mps > cpu, whichever exists")


def parse_args(p, stage, argv=None):
    """Parses in two passes: the preset first, whose values become the defaults, then the rest."""
    show_preset_defaults(p, stage)
    known, _ = p.parse_known_args(argv)
    p.set_defaults(**presets.get(known.preset, stage))
    args = p.parse_args(argv)
    args.run = storage.run_uri(args.run, args.storage)
    return args


def show_preset_defaults(p, stage):
    """Appends each option's value under every preset to its --help text."""
    for action in p._actions:
        values = {name: presets.get(name, stage).get(action.dest) for name in sorted(presets.PRESETS)}
        if any(v is not None for v in values.values()) and action.help:
            action.help += " [" + ", ".join(f"{k}: {v}" for k, v in values.items() if v is not None) + "]"


def stage_uri(run, stage, *parts):
    return storage.join(run, stage, *parts)


def read_summary(run, stage):
    """The committed summary of an upstream stage; a clear StageError if it is not done."""
    uri = stage_uri(run, stage, SUMMARY)
    if not storage.exists(uri):
        raise StageError(f"stage {stage!r} has not completed in run {run} (no {uri}); run it first")
    return storage.read_json(uri)


def upstream_checkpoint(run, upstream):
    """The final checkpoint directory of stage `upstream` in `run` (its `checkpoint` output)."""
    return read_summary(run, upstream)["outputs"]["checkpoint"]["uri"].rsplit("/", 1)[0]


def artifact(uri):
    """An input/output entry: the URI with the sha256 and size of its bytes."""
    return {"uri": uri, "sha256": storage.sha256(uri), "bytes": storage.size(uri)}


def commit(run, stage, args, inputs, outputs, metrics, started):
    """Writes stage.json last, recording everything needed to trust and reuse the outputs (storage
    retries transient errors; if it gives up, the stage is not done and a rerun commits it)."""
    config = {k: v for k, v in sorted(vars(args).items()) if k not in ("run", "storage")}
    summary = {
        "stage": stage,
        "run": run,
        "config": config,
        "inputs": {name: artifact(uri) for name, uri in inputs.items()},
        "outputs": {name: artifact(uri) for name, uri in outputs.items()},
        "metrics": metrics,
        "wall_time_s": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code_version(),
    }
    summary = storage.redact(summary)
    storage.write_json(stage_uri(run, stage, SUMMARY), summary)
    return summary


def fault(stage, step=None):
    """Fault injection for fail-and-resume tests: `NANOCHAT_FAULT=<stage>[:<step>][:hang]` makes
    `stage` crash (exit code 3) or hang at its start, or right after step <step> for a training loop
    that calls `fault(STAGE, step)` once a step (and its checkpoint) is done."""
    spec = os.environ.get("NANOCHAT_FAULT", "")
    hang = spec.endswith(":hang")
    name, _, at = spec.removesuffix(":hang").partition(":")
    if name != stage or at != ("" if step is None else str(step)):
        return
    where = "start" if step is None else f"step {step}"
    # one write: ranks share the unbuffered pipe, and print() writes the newline apart
    sys.stderr.write(f"{stage}: injected fault at {where} ({'hang' if hang else 'crash'})\n")
    sys.stderr.flush()
    while hang:
        time.sleep(60)
    os._exit(3)


def run_main(main, p, stage, argv=None):
    """Entry point for `python -m nanochat.stages.X`: one-line reason on stderr and exit 1 on a
    StageError or on storage that kept failing (a rerun resumes), exit 0 when done; the process
    group, if main joined one, is destroyed either way."""
    from nanochat.common import compute_cleanup, setup_logging

    setup_logging()
    redact_logs()
    args = parse_args(p, stage, argv)
    fault(stage)
    try:
        main(args)
    except (StageError, storage.StorageError) as e:
        print(storage.redact(f"{stage}: error: {e}"), file=sys.stderr)
        sys.exit(1)
    finally:
        compute_cleanup()


def redact_logs():
    """Passes every log record through `storage.redact` (URIs in messages may carry credentials)."""
    def scrub(record):
        record.msg, record.args = storage.redact(record.getMessage()), ()
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(scrub)
