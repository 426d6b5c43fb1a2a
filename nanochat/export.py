"""`nanochat export`: a run's model as a Hugging Face transformers directory, loadable as it is.

    nanochat export --run myrun --to ./myrun-hf                      the newest model (rl, sft, mid, base)
    nanochat export --run myrun --source base --to s3://bucket/m     one stage's model; DIR may be any storage URI
    nanochat export --run file:///path/to/checkpoints/step_000100 --to DIR

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR)                 # trust_remote_code=True for 2026 models
    tokenizer = AutoTokenizer.from_pretrained(DIR)

DIR gets config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja,
generation_config.json (temperature, top-k and max new tokens: the model's generation config, which
`nanochat import` reads back),
nanochat.json (where it came from, and what transformers cannot express: the frequency penalty),
README.md (a model card with the run's metrics) and, for a model with the 2026 options, which
transformers' own `nanochat` type lacks, the modeling code (nanochat/hf_remote) that config.json's
auto_map names. Everything is written to a staging directory first; a local DIR then appears in one
rename, and on an object store config.json is the last object written (a directory without it is
incomplete). A non-empty DIR is replaced only with --force.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import uuid
from importlib import resources

from nanochat import chat, pipeline, report, storage
from nanochat.common import log

FORMAT = "nanochat-export/1"
WHAT = {"base": "A pretrained base model (text completion)", "mid": "A mid-trained model (chat format, tools)",
        "sft": "A chat model (supervised fine-tuning)", "rl": "A chat model (reinforcement learning on GSM8K)"}
DTYPES = ("float32", "bfloat16")


class ExportError(Exception):
    """The export cannot be made (no model, a non-empty destination); the message says what to do."""


def build_parser():
    p = argparse.ArgumentParser(prog="nanochat export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    pipeline.add_model_options(p)
    p.add_argument("--to", required=True, metavar="DIR", help="the directory to write: a path or any storage URI")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="of the saved weights (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace DIR if it is not empty")
    return p


def generation_config(tokenizer, remote, generation):
    """generation_config.json: the model's generation config (`generation`, which `nanochat chat` and
    `nanochat serve` use) as transformers reads it (hf.export_generation), stopping where our engine stops."""
    from nanochat import hf

    ids = tokenizer.special_ids
    return {"bos_token_id": ids["<|bos|>"], "eos_token_id": [ids["<|assistant_end|>"], ids["<|bos|>"]],
            "pad_token_id": ids["<|assistant_end|>"], **hf.export_generation(generation), "use_cache": not remote}


def model_card(config, provenance, metrics, remote, generation):
    """README.md: what the model is, how to load it, where it differs from `nanochat chat`, its metrics."""
    source = provenance.get("source")
    name = provenance["run"].rstrip("/").rsplit("/", 1)[-1] if provenance.get("run") else "nanochat model"
    origin = (f"run `{provenance['run']}`, stage `{source}`" if source else f"checkpoint `{provenance.get('checkpoint')}`") \
        + f", step {provenance.get('step')}"
    trust = ", trust_remote_code=True" if remote else ""
    options = [name for name in ("value_embeds", "lambdas", "smear", "backout") if getattr(config, name)]
    if any(w is not None for w in config.windows):
        options.append(f"sliding windows ({config.window_pattern}, {config.short_window} tokens)")
    if config.qk_scale != 1.0:
        options.append(f"qk_scale {config.qk_scale}")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- nanochat", "---", "",
        f"# {name}", "",
        f"{WHAT.get(source, 'A model')}, trained with nanochat ({origin}).", "",
        f"GPT: {config.n_layer} layers, width {config.n_embd}, {config.n_head} query heads, {config.n_kv_head} key/value "
        f"heads, context {config.sequence_len}, vocabulary {config.vocab_size}, rotary base {config.rope_base:g}"
        + (f"; options: {', '.join(options)}." if options else "."), "",
        "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'tokenizer = AutoTokenizer.from_pretrained("DIR"{trust})',
        f'model = AutoModelForCausalLM.from_pretrained("DIR"{trust})',
        *(['inputs = tokenizer("The capital of France is", return_tensors="pt")  # starts with <|bos|>'] if source == "base" else
          ['inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,',
           '                                       return_tensors="pt", return_dict=True)']),
        "out = model.generate(**inputs)",
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", "",
        "`tokenizer(text)` starts with `<|bos|>`, as the training documents did; the chat template adds its own.", "",
        "## Differences from `nanochat chat`", "",
        f"- generation_config.json has its temperature ({generation['temperature']}), top-k ({generation['top_k'] or 'off'}) "
        f"and maximum new tokens ({generation['max_tokens']}: at most the model's context, {config.sequence_len} tokens, "
        "where `nanochat chat` stops). Its frequency penalty "
        f"({generation['frequency_penalty']}, subtracted from a token's "
        "logit per earlier occurrence) has no transformers equivalent (repetition_penalty is multiplicative): it is "
        "only in nanochat.json.",
        "- Special-token strings inside message text become special tokens; pass `sanitize_control_tokens=True` "
        "to apply_chat_template (transformers 5.20+) to keep them text, as nanochat does.",
        "- Two adjacent text parts of an assistant message are encoded as one string (nanochat encodes each part).",
    ]
    if remote:
        lines.append("- The model's options are outside transformers' `nanochat` type, so its code ships here "
                     "(modeling_nanochat_ext.py). It has no KV cache: generation recomputes the sequence each step.")
    lines += ["", "## Metrics", "", metrics or "No evaluation metrics were recorded for this run.", ""]
    return "\n".join(lines)


def write_model_dir(directory, model_state, config, tokenizer, provenance=None, metrics=None, dtype="float32",
                    generation=None):
    """Writes the export's files for our model (its state dict, GPTConfig, Tokenizer and generation
    config, by default chat.GENERATION) into a local `directory`; returns their names."""
    import torch
    from safetensors.torch import save

    from nanochat import hf, hf_tokenizer
    from nanochat.common import code_version

    provenance, generation = dict(provenance or {}), dict(generation or chat.GENERATION)
    # at most the context's new tokens: our engine stops there, transformers' generate would go on
    # past the positions the model was trained on
    generation["max_tokens"] = min(generation["max_tokens"], config.sequence_len)
    remote = not hf.native(config)
    tensors = hf.export_state(model_state, config, getattr(torch, dtype))
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:  # save_file would make it 0600 whatever the umask
        f.write(save(tensors, metadata={"format": "pt"}))
    files = {
        "config.json": hf.hf_config(config, tokenizer, getattr(torch, dtype)),
        "generation_config.json": generation_config(tokenizer, remote, generation),
        "tokenizer.json": hf_tokenizer.tokenizer_json(tokenizer),
        "tokenizer_config.json": hf_tokenizer.tokenizer_config(config.sequence_len),
        "nanochat.json": {"format": FORMAT, **provenance, "model_config": provenance.get("model_config") or dataclasses.asdict(config),
                          "frequency_penalty": generation["frequency_penalty"], "code": code_version()},
    }
    for name, obj in files.items():
        with open(os.path.join(directory, name), "w") as f:
            json.dump(obj, f, indent=None if name == "tokenizer.json" else 2, ensure_ascii=False)
    texts = {"chat_template.jinja": hf_tokenizer.CHAT_TEMPLATE, "README.md": model_card(config, provenance, metrics, remote, generation)}
    if remote:
        code = resources.files("nanochat") / "hf_remote"
        texts.update({name: (code / name).read_text() for name in hf.REMOTE_FILES})
    for name, text in texts.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    return sorted(["model.safetensors", *files, *texts])


def publish(staged, to, force=False):
    """Makes the staged local directory's files the contents of `to`. A local `to` appears in one
    rename (the old one renamed aside, then removed); elsewhere each file is one atomic upload,
    config.json last, with any old config.json removed first and old files not in the export after."""
    present = storage.listdir(to)
    if present and not force:
        raise ExportError(f"{storage.redact(to)} is not empty ({', '.join(present[:4])}...): pass --force to replace it")
    local = storage.local_path(to)
    if local is not None:
        aside = f"{local}.old-{uuid.uuid4().hex[:8]}"
        if os.path.lexists(local):
            os.rename(local, aside)
        os.rename(staged, local)
        shutil.rmtree(aside, ignore_errors=True)
        return
    names = sorted(os.listdir(staged), key=lambda name: name == "config.json")
    if "config.json" in present:
        storage.remove(storage.join(to, "config.json"))
    for name in names:
        storage.upload(os.path.join(staged, name), storage.join(to, name))
    for name in set(present) - set(names):
        storage.remove(storage.join(to, name), recursive=True)


def run_metrics(run):
    """The report card's BASE/MID/SFT/RL metrics table of a run, or None."""
    try:
        return report.metrics_table(report.load(run))
    except (OSError, KeyError, ValueError) as e:  # the card is still worth having without them
        log.warning("export: no metrics for the model card (%s)", storage.redact(str(e)))
        return None


def export(run, to, source=None, dtype="float32", force=False, storage_root=None):
    """Exports a run's model (or a checkpoint URI's; a run name in `storage_root`) to `to`; returns
    the export's nanochat.json provenance."""
    from nanochat import checkpoint

    try:
        to = storage.normalize(to)
    except ValueError as e:  # a scheme storage cannot write, refused before anything is read
        raise ExportError(f"--to {e}") from None
    try:
        target, source = checkpoint.find_checkpoint(run, source, storage_root)
    except ValueError as e:  # a source with a checkpoint URI
        raise ExportError(str(e)) from None
    if storage.listdir(to) and not force:  # before the work; publish checks again
        raise ExportError(f"{storage.redact(to)} is not empty: pass --force to replace it")
    try:
        model_state, _, meta = checkpoint.load(target, load_optimizer=False)
        generation = checkpoint.generation(target, meta)
        config = checkpoint.model_config(meta, target)
    except (checkpoint.CheckpointError, ValueError) as e:
        raise ExportError(str(e)) from None
    tokenizer = checkpoint.load_tokenizer(meta)
    run_uri = None if source is None else storage.run_uri(run)
    provenance = {"run": storage.redact(run) if source else None, "source": source, "step": meta.get("step"),
                  "checkpoint": storage.redact(target), "model_config": meta["model_config"]}
    local = storage.local_path(to)
    if local:  # next to DIR, so that it becomes DIR in one rename (and with the umask's permissions)
        staged = os.path.join(os.path.dirname(local), f".{os.path.basename(local)}.staging-{uuid.uuid4().hex[:8]}")
        os.makedirs(staged)
    else:
        staged = tempfile.mkdtemp(prefix="nanochat-export-")
    try:
        write_model_dir(staged, model_state, config, tokenizer, provenance, run_uri and run_metrics(run_uri), dtype,
                        generation)
        publish(staged, to, force)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return provenance


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        provenance = export(args.run, args.to, args.source, args.dtype, args.force, args.storage)
    except (ExportError, FileNotFoundError) as e:
        print(f"nanochat export: {e}", file=sys.stderr)
        return 1
    print(f"exported {provenance['checkpoint']} to {storage.redact(storage.normalize(args.to))}")
    return 0
