"""`nanochat import`: a model trained elsewhere, as a finished stage of a run.

    nanochat import ~/.cache/nanochat/base_checkpoints/d20 --run myrun        upstream nanochat's base model
    nanochat import ./chatsft_checkpoints/d32 --run myrun --step 700           a chosen step (default: the last)
    nanochat import ./hf/nanochat-d32 --run myrun --as sft                     a transformers `nanochat` directory
    nanochat chat --run myrun                                                  then use it as any stage's model
    nanochat chat_sft --run myrun --preset d24 --from-stage base_train         or train on from it

SRC is either upstream nanochat's checkpoint folder (model_<step>.pt + meta_<step>.json; its
tokenizer.pkl in SRC, in --tokenizer, or in SRC/../../tokenizer/ as upstream lays it out) or a
transformers model directory (config.json, model.safetensors, tokenizer.json). --as names the
stage it becomes (base: base_train, mid: mid_train, sft: chat_sft, rl: chat_rl); for upstream's
folders it defaults to what the folder's parent says (base_checkpoints, ..., chatrl_checkpoints),
for a directory `nanochat export` wrote to the stage it came from. A transformers directory's
generation_config.json (its temperature, top_k and max_new_tokens, as vLLM reads it; the rest is
transformers' own) and nanochat.json's frequency penalty become the model's generation config,
which `nanochat chat`, `nanochat serve` and `nanochat export` then use.

The stage gets its tokenizer (`<run>/<stage>/tokenizer/`, in our format), a checkpoint of the
weights alone (no optimizer state: a warm start of the optimizer from it starts fresh; its
meta.json names that tokenizer, where a trained model's names tok_train's) and a stage.json
marked `imported`, so the flow takes it as done and never trains it again. --preset is recorded
there too, the preset the run's later stages are meant to run with. Nothing in SRC is run:
weights are read as
safetensors or by torch's weights-only unpickler, tokenizer.pkl by an unpickler that admits only a
tiktoken encoding's plain data (nanochat/upstream.py), everything else is JSON.
"""

import argparse
import dataclasses
import sys
import time

from nanochat import chat, pipeline, presets, stage, storage
from nanochat.common import setup_logging

UPSTREAM = "upstream nanochat"
TRANSFORMERS = "transformers"
SHARD_INDEX = "model.safetensors.index.json"  # transformers' map of weights to shard files


@dataclasses.dataclass
class Model:
    """A model read from SRC, as ours: what the stage is made of."""
    format: str  # UPSTREAM or TRANSFORMERS
    config: object  # GPTConfig
    state: dict  # our state dict, fp32
    tokenizer: object  # Tokenizer
    step: int
    source: str | None  # the model source SRC says it is (base, mid, sft, rl), if it says
    inputs: dict  # {name: URI} of the files read
    details: dict  # recorded under stage.json's `imported`
    generation: dict | None = None  # its generation config (chat.generation_config), if SRC gives one


def build_parser():
    p = argparse.ArgumentParser(prog="nanochat import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="upstream nanochat checkpoint folder or transformers model directory (path or URI)")
    p.add_argument("--run", required=True, help="run URI, path, or name (a name X means <storage>/runs/X)")
    p.add_argument("--as", dest="source", choices=list(pipeline.SOURCES),
                   help="the model source it becomes (default: what SRC says it is)")
    p.add_argument("--step", type=int, default=None, help="upstream: the checkpoint step (default: the last)")
    p.add_argument("--tokenizer", default=None, help="upstream: the folder holding tokenizer.pkl (default: SRC, "
                   "else SRC/../../tokenizer)")
    p.add_argument("--preset", choices=sorted(presets.PRESETS), default=None,
                   help="the preset the run's later stages take (recorded in stage.json)")
    p.add_argument("--storage", default=None, help="storage root for run names (default: $NANOCHAT_STORAGE or "
                   "file://~/.cache/nanochat)")
    p.add_argument("--force", action="store_true", help="replace the stage if the run has it already")
    return p


def main(argv=None):
    """The command; returns its exit code (1 with one line on stderr when the import is refused)."""
    setup_logging()
    stage.redact_logs()
    args = build_parser().parse_args(argv)
    try:
        args.run = storage.run_uri(args.run, args.storage)
        summary = import_model(args)
    except (ValueError, FileNotFoundError, stage.StageError, storage.StorageError) as e:
        print(storage.redact(f"nanochat import: error: {e}"), file=sys.stderr)
        return 1
    print(storage.redact(f"imported {args.src} as {summary['stage']} of {args.run}"))
    return 0


def import_model(args):
    """Reads SRC, writes the stage (its tokenizer, its checkpoint) and commits it; returns its
    stage.json."""
    from nanochat import checkpoint  # torch: after parsing, so --help stays light

    started = time.time()
    src = storage.normalize(args.src)
    model = read_source(src, args)
    source = args.source or model.source
    if source is None:
        raise stage.StageError(f"{src}: cannot tell which model it is (base, mid, sft or rl): give --as")
    name = pipeline.SOURCES[source]
    check_weights(checkpoint.build_model(model.config, model.state), src)  # loads strictly; before anything is written
    clear_stage(args.run, name, args.force)
    tokenizer = model.tokenizer.save(stage.stage_uri(args.run, name, "tokenizer"))["tokenizer"]
    imported = {"format": model.format, "source": src, "step": model.step, **model.details}
    meta = {"model_config": dataclasses.asdict(model.config), **checkpoint.tokenizer_meta(tokenizer), "imported": imported,
            **({"generation": model.generation} if model.generation else {})}
    target = checkpoint.save_weights(stage.stage_uri(args.run, name, "checkpoints"), model.step, model.state, meta)
    parameters = sum(t.numel() for t in model.state.values())
    outputs = {"checkpoint": storage.join(target, checkpoint.MANIFEST), "tokenizer": tokenizer}
    return stage.commit(args.run, name, args, model.inputs, outputs, {"parameters": parameters}, started,
                        imported=imported)


def read_source(src, args):
    """The Model in SRC, whichever of the two formats it is."""
    names = set(storage.listdir(src))
    if not names:
        raise FileNotFoundError(f"{src}: no such directory, or it is empty")
    if "config.json" in names and names & {"model.safetensors", SHARD_INDEX}:
        if args.step is not None or args.tokenizer:  # it holds one model, with its own tokenizer
            raise stage.StageError(f"{src} is a transformers model directory: --step and --tokenizer apply to an "
                                   "upstream checkpoint folder")
        return read_transformers(src, names)
    return read_upstream(src, args, names)


def read_upstream(src, args, names):
    """An upstream checkpoint folder, whose files are `names`."""
    from nanochat import upstream

    steps = upstream.checkpoint_steps(names)
    if not steps:
        raise FileNotFoundError(f"{src}: neither an upstream nanochat checkpoint folder (model_<step>.pt with "
                                "meta_<step>.json) nor a transformers model directory (config.json, model.safetensors)")
    step = steps[-1] if args.step is None else args.step
    if step not in steps:
        raise FileNotFoundError(f"{src}: no checkpoint of step {step} (it has {', '.join(map(str, steps))})")
    folders = [args.tokenizer] if args.tokenizer else [src, storage.join(src.rsplit("/", 2)[0], "tokenizer")]
    pickles = [storage.join(storage.normalize(f), "tokenizer.pkl") for f in folders]
    pkl = next((uri for uri in pickles if storage.exists(uri)), None)
    if pkl is None:
        raise FileNotFoundError(f"no tokenizer.pkl in {' or '.join(pickles)}: give --tokenizer")
    tokenizer = upstream.load_tokenizer(pkl)
    inputs = {"tokenizer": pkl}
    if storage.exists(lengths := pkl.rsplit("/", 1)[0] + "/token_bytes.pt"):
        upstream.check_token_bytes(lengths, tokenizer)
        inputs["token_bytes"] = lengths
    model_uri, meta_uri = upstream.checkpoint_files(src, step)
    config, state = upstream.read_checkpoint(model_uri, meta_uri)
    if config.vocab_size != tokenizer.vocab_size:
        raise upstream.UpstreamError(f"{src}: the model's vocab_size {config.vocab_size} is not its tokenizer's "
                                     f"({tokenizer.vocab_size}, {pkl})")
    era = "2026" if config.smear else "classic"
    folder = src.rsplit("/", 2)[-2]  # upstream's <base>/base_checkpoints/<tag>
    return Model(UPSTREAM, config, state, tokenizer, step, upstream.SOURCE_DIRS.get(folder),
                 {"model": model_uri, "meta": meta_uri, **inputs}, {"model": era})


def read_transformers(src, names):
    """A transformers `nanochat` directory (transformers' own type, or `nanochat_ext` as `nanochat
    export` writes it) whose files are `names`: config.json, the weights (model.safetensors, or
    shards with their index), tokenizer.json, and nanochat.json if we exported it. Its Python files
    are never run."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from nanochat import hf, hf_tokenizer

    files = {name: storage.join(src, name) for name in ("config.json", "tokenizer.json")}
    if SHARD_INDEX in names:
        weight_map = storage.read_json(storage.join(src, SHARD_INDEX)).get("weight_map") or {}
        shards = {f"weights {name}": storage.join(src, name) for name in sorted(set(weight_map.values()))}
    else:
        shards = {"weights": storage.join(src, "model.safetensors")}
    provenance_uri = storage.join(src, "nanochat.json")
    provenance = storage.read_json(provenance_uri) if "nanochat.json" in names else {}
    state = {}
    for uri in shards.values():
        try:
            state.update(load_safetensors(storage.read_bytes(uri)))
        except SafetensorError as e:
            raise ValueError(f"{uri}: not a safetensors file ({e})") from None
    hf_config = storage.read_json(files["config.json"])
    try:
        tokenizer = hf_tokenizer.from_tokenizer_json(storage.read_json(files["tokenizer.json"]))
        config, state = hf.import_state(state, hf_config, tokenizer.vocab_size)
    except (hf.ConversionError, hf_tokenizer.TokenizerFileError) as e:
        raise ValueError(f"{src}: {e}") from None
    inputs = {"tokenizer": files["tokenizer.json"], "config": files["config.json"], **shards,
              **({"nanochat.json": provenance_uri} if "nanochat.json" in names else {})}
    generation_uri = storage.join(src, "generation_config.json")
    theirs = {}
    if "generation_config.json" in names:
        theirs = storage.read_json(generation_uri)
        inputs["generation_config"] = generation_uri
    generation = read_generation(hf.import_generation(theirs), generation_uri, provenance, provenance_uri)
    return Model(TRANSFORMERS, config, state, tokenizer, provenance.get("step") or 0, provenance.get("source"), inputs,
                 {"model_type": hf_config["model_type"]}, generation)


def read_generation(given, uri, provenance, provenance_uri):
    """The generation config of a transformers directory: the fields its generation_config.json
    (at `uri`) gives (hf.import_generation), then the frequency penalty nanochat.json carries."""
    generation = chat.generation_config(given, uri)
    if "frequency_penalty" in provenance:
        generation = chat.generation_config({**generation, "frequency_penalty": provenance["frequency_penalty"]},
                                            provenance_uri)
    return generation


def clear_stage(run, name, force):
    """Makes way for the imported stage: refuses one the run has (done, or partly trained) unless
    `force`, which removes it (stage.json first, so it is never a done stage with missing files)."""
    if not storage.listdir(stage.stage_uri(run, name)):
        return
    if not force:
        done = storage.exists(stage.stage_uri(run, name, stage.SUMMARY))
        raise stage.StageError(f"run {run} has {'a done' if done else 'a partly trained'} {name}: --force replaces "
                               "it, or import into another run")
    storage.remove(stage.stage_uri(run, name, stage.SUMMARY))
    storage.remove(stage.stage_uri(run, name), recursive=True)


def check_weights(model, src):
    """Refuses a model with a NaN or inf in a weight, naming it. Its logits would not always tell:
    torch's causal SDPA on CPU gives a finite output for a NaN query."""
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{src}: the imported weight {name} is not finite (NaN or inf)")
