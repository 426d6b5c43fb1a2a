"""The stage contract shared by every program in nanochat/stages.

A stage takes `--run RUN_URI --preset NAME [options]`; the preset supplies the defaults and each
option overrides its own. Outputs go under `<run>/<stage>/`, and the stage commits by writing
`<run>/<stage>/stage.json` last (config, inputs and outputs with sha256, metrics, wall time, code
version). No stage.json means the stage is not done. Credentials never reach stage.json or the
logs: both go through `storage.redact`.

Imported stages. `nanochat import` (nanochat/importer.py) commits a model trained elsewhere as a
stage: its stage.json has an `imported` entry (format, source, step). Such a stage is done for
good: the flow never runs it (nor pulls in the stages before it), and running its program on the
run is refused; only another import (`--force`) replaces it.

Declared data. In a run whose `download` stage is committed, a stage that reads data (one whose row
in `nanochat.pipeline` needs download) resolves every data file through that run's files.json,
found through download's stage.json: a file is that declared URI or a StageError naming it, and
is never downloaded. `commit` records files.json and the declared files the stage resolved as its
inputs. A stage run on its own, in a run without a committed download, fetches as `dataset` does.
"""

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time

from nanochat import pipeline, presets, sources, storage
from nanochat.common import InputError, code_version, compute_cleanup, log, setup_logging

SUMMARY = "stage.json"
DOWNLOAD = "download"  # the stage whose `files` output (files.json) declares a run's data


class StageError(Exception):
    """A stage cannot run: bad arguments or missing/invalid inputs. Reported as one line."""


class SummaryError(StageError, ValueError):
    """A stage.json that is not a stage's summary (a ValueError too, for the commands that read runs)."""


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


def add_source_option(p):
    """--source, for stages that read the pretraining shards."""
    p.add_argument("--source", default=None, choices=sorted(sources.CORPORA),
                   help="pretraining corpus when the run has no committed download (default: "
                        f"{sources.DEFAULT_CORPUS}); in a run, the one its download fetched")


def add_compute_options(p):
    """--dtype and --device-type, for stages that run the model."""
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="autocast dtype; auto: bf16 where the hardware does it fast, fp16 (with loss scaling) on "
                        "GPUs without bf16, else fp32")
    p.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None,
                   help="default: cuda > mps > cpu, whichever exists")


def parse_args(p, stage, argv=None):
    """Parses in two passes: the preset first, whose values become the defaults, then the rest."""
    show_preset_defaults(p, stage)
    known, _ = p.parse_known_args(argv)
    p.set_defaults(**presets.get(known.preset, stage))
    args = p.parse_args(argv)
    try:
        args.run = storage.run_uri(args.run, args.storage)
    except ValueError as e:  # a run name or storage URI that cannot be (e.g. an unknown scheme)
        p.error(str(e))
    return args


def show_preset_defaults(p, stage):
    """Appends each option's value under every preset to its --help text, and the default it has
    where a preset does not set it (unless the text says it already)."""
    for action in p._actions:
        if not action.help:
            continue
        values = {name: presets.get(name, stage).get(action.dest) for name in sorted(presets.PRESETS)}
        shown = [f"{k}: {v}" for k, v in values.items() if v is not None]
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in action.help and len(shown) < len(values):
            shown.append(f"{'otherwise' if shown else 'default'}: {action.default}")
        if shown:
            action.help += " [" + ", ".join(shown) + "]"


def stage_uri(run, stage, *parts):
    return storage.join(run, stage, *parts)


def read_summary(run, stage):
    """The committed summary of an upstream stage; a clear StageError if it is not done."""
    uri = stage_uri(run, stage, SUMMARY)
    if not storage.exists(uri):
        raise StageError(f"stage {stage!r} has not completed in run {run} (no {uri}); run it first")
    return checked_summary(uri)


def checked_summary(uri):
    """The stage.json at `uri`; a SummaryError naming it unless it is a JSON object whose outputs map
    names to objects with a uri (what the stages after it read)."""
    damaged = f"{storage.redact(uri)}: not a stage summary ({{}}): run the stage again, or remove its folder"
    try:
        summary = json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as e:
        raise SummaryError(damaged.format(f"invalid JSON: {e}")) from None
    outputs = summary.get("outputs") if isinstance(summary, dict) else None
    if not isinstance(outputs, dict):
        raise SummaryError(damaged.format("no 'outputs' object"))
    for name, output in outputs.items():
        if not (isinstance(output, dict) and isinstance(output.get("uri"), str)):
            raise SummaryError(damaged.format(f"output {name!r} has no 'uri'"))
    return summary


def upstream_output(run, upstream, name):
    """The URI of output `name` of stage `upstream` in `run`, as its stage.json records it."""
    outputs = read_summary(run, upstream)["outputs"]
    if name not in outputs:
        raise StageError(f"stage {upstream!r} in run {run} has no {name!r} output (it has: {', '.join(outputs)})")
    return outputs[name]["uri"]


def upstream_dir(run, upstream, name):
    """The directory holding output `name` of stage `upstream` (a tokenizer, a checkpoint)."""
    return upstream_output(run, upstream, name).rsplit("/", 1)[0]


def upstream_checkpoint(run, upstream):
    """The final checkpoint directory of stage `upstream` in `run` (its `checkpoint` output)."""
    return upstream_dir(run, upstream, "checkpoint")


def imported(run, stage):
    """The `imported` entry of stage `stage`'s stage.json in `run`, or None (not done, trained here, or
    a damaged stage.json, which running the stage again replaces)."""
    uri = stage_uri(run, stage, SUMMARY)
    try:
        return checked_summary(uri).get("imported") if storage.exists(uri) else None
    except SummaryError as e:
        log.warning("%s", e)
        return None


def imported_stages(run):
    """The names of the pipeline's stages that were imported into `run`."""
    return {row.name for row in pipeline.PIPELINE if imported(run, row.name)}


def artifact(uri):
    """An input/output entry: the URI with the sha256 and size of its bytes."""
    return {"uri": uri, "sha256": storage.sha256(uri), "bytes": storage.size(uri)}


class DeclaredData:
    """A run's data as its download stage declared it: files.json, {relpath: {uri, url, bytes,
    sha256}}, and the entries of the files this process resolved, which `commit` records."""

    def __init__(self, artifact, files):
        self.artifact = artifact  # files.json as download's stage.json records it (uri, sha256, bytes)
        self.uri, self.files = artifact["uri"], files
        self.resolved = {}

    def resolve(self, relpath):
        """The declared URI of a data file, checked to be there with its declared size; a StageError
        naming the file otherwise. It is not hashed again: download hashed it into files.json, and
        files.json is checked against download's stage.json (shards are large; a stage reads many)."""
        if relpath in self.resolved:  # checked once: a loader resolves its shards at every evaluation
            return self.resolved[relpath]["uri"]
        entry = self.files.get(relpath)
        if entry is None:
            raise StageError(f"data file {relpath} is not declared in {self.uri} (the run's download did not fetch it)")
        uri = entry["uri"]
        try:
            size = storage.size(uri)
        except FileNotFoundError:
            size = None
        if size != entry["bytes"]:
            found = "it is missing" if size is None else f"it has {size:,} bytes, not {entry['bytes']:,}"
            raise StageError(f"data file {relpath} declared in {self.uri}: {uri}: {found}")
        self.resolved[relpath] = {"uri": uri, "sha256": entry["sha256"], "bytes": entry["bytes"]}
        return uri

    def relpaths(self, pattern):
        """The declared relpaths matching the compiled regex `pattern`, sorted."""
        return sorted(r for r in self.files if pattern.match(r))

    def inputs(self):
        """stage.json inputs: files.json itself, then each resolved file under its relpath."""
        return {"files.json": self.artifact, **self.resolved}


_declared = None  # this process's DeclaredData, once declare_data found a committed download


def declare_data(run):
    """Makes this process read data through `run`'s files.json if its download stage is committed
    (files.json found through download's stage.json, and checked against the sha256 there);
    otherwise data is fetched into the cache as usual. Returns the DeclaredData or None."""
    global _declared
    _declared = None
    if storage.exists(stage_uri(run, DOWNLOAD, SUMMARY)):
        files = read_summary(run, DOWNLOAD)["outputs"]["files"]
        try:
            data = storage.read_bytes(files["uri"])
        except FileNotFoundError:
            data = None
        if data is None or hashlib.sha256(data).hexdigest() != files["sha256"]:
            raise StageError(f"{files['uri']} is missing or differs from what stage {DOWNLOAD!r} committed; "
                             f"run {DOWNLOAD} again")
        _declared = DeclaredData(files, json.loads(data))
    return _declared


def declared_data():
    """The DeclaredData of this process, or None (a stage on its own: data is fetched)."""
    return _declared


def reads_data(stage):
    """Whether stage program `stage` reads data, per the pipeline table (its rows need download)."""
    return any(DOWNLOAD in row.needs for row in pipeline.PIPELINE if row.module == stage)


def utc(seconds):
    """An epoch time as ISO 8601 UTC to the millisecond (what tells two stages' intervals apart)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


def recorded_config(args):
    """A stage's options as its stage.json records them (credentials redacted)."""
    return storage.redact(json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in ("run", "storage")})))


def commit(run, stage, args, inputs, outputs, metrics, started, imported=None, earlier_wall_s=0.0):
    """Writes stage.json last, recording everything needed to trust and reuse the outputs (storage
    retries transient errors; if it gives up, the stage is not done and a rerun commits it). The
    inputs include the declared data the stage resolved (files.json and each file, see
    DeclaredData), after `inputs`. `imported`: what an import brought in (see the module docstring).
    wall_time_s is this attempt's since `started` plus `earlier_wall_s`: a training stage's earlier
    attempts, up to the checkpoint this one resumed from (what the report's cost counts)."""
    config = recorded_config(args)
    declared = _declared.inputs() if _declared is not None else {}
    summary = {
        "stage": stage,
        "run": run,
        "config": config,
        "inputs": {**{name: artifact(uri) for name, uri in inputs.items()}, **declared},
        "outputs": {name: artifact(uri) for name, uri in outputs.items()},
        "metrics": metrics,
        "wall_time_s": round(time.time() - started + earlier_wall_s, 3),
        "started_at": utc(started),
        "finished_at": utc(time.time()),
        "code": code_version(),
        **({"imported": imported} if imported else {}),
    }
    summary = storage.redact(summary)
    storage.write_json(stage_uri(run, stage, SUMMARY), summary)
    return summary


FAULT_FORMAT = "<stage>[:<step>][:hang][@<attempt>]"
FAULT_SPEC = re.compile(r"(?P<stage>\w+)(?::(?P<step>\d+))?(?P<hang>:hang)?(?:@(?P<attempt>[1-9]\d*))?")


def fault_spec():
    """NANOCHAT_FAULT as (stage, step or None, hang, attempt or None), None when unset; a typo is a
    StageError (the stage's one line), not a test whose fault silently never happens. <stage> is a stage program's name
    (chat_eval for each of its rows), the name it calls `fault` with."""
    value = os.environ.get("NANOCHAT_FAULT", "")
    if not value:
        return None
    match = FAULT_SPEC.fullmatch(value)
    programs = sorted({s.module for s in pipeline.PIPELINE})
    if not match or match["stage"] not in programs:
        raise StageError(f"NANOCHAT_FAULT={value!r}: expected {FAULT_FORMAT}, <stage> one of {', '.join(programs)}")
    step = None if match["step"] is None else int(match["step"])
    return match["stage"], step, bool(match["hang"]), match["attempt"]


def fault(stage, step=None):
    """Fault injection for fail-and-resume tests: `NANOCHAT_FAULT=<stage>[:<step>][:hang][@<attempt>]`
    makes `stage` crash (exit code 3) or hang at its start, or right after step <step> for a training
    loop that calls `fault(STAGE, step)` once a step (and its checkpoint) is done; with `@<attempt>`,
    only in that attempt (NANOCHAT_ATTEMPT, which the flow's launcher sets; 1 when unset), so a
    retry of the stage runs clean."""
    spec = fault_spec()
    if spec is None:
        return
    name, at, hang, attempt = spec
    if name != stage or at != step or attempt and attempt != os.environ.get("NANOCHAT_ATTEMPT", "1"):
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
    StageError, an InputError (a checkpoint, shard, source or download that cannot be used) or on
    storage that kept failing (a rerun resumes), exit 0 when done; the process
    group, if main joined one, is destroyed either way."""
    setup_logging()
    redact_logs()
    args = parse_args(p, stage, argv)
    try:
        fault(stage)
        if done := imported(args.run, stage):
            raise StageError(f"stage {stage!r} of run {args.run} was imported from {done['source']}: it is done "
                             "(`nanochat import --force` replaces it; train in another run)")
        if reads_data(stage):
            declare_data(args.run)
        main(args)
    except (StageError, InputError, storage.StorageError) as e:
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
