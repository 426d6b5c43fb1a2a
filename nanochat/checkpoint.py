"""Checkpoints through storage URIs: safetensors weights, per-rank optimizer state, meta.json, and a
manifest written last.

Layout of one checkpoint, `<dir>/step_NNNNNN/`:
    model.safetensors          the weights (rank 0 writes them; every rank holds the same model)
    optim_rank_RRR.safetensors each rank's optimizer state and RNG state (tensors)
    optim_rank_RRR.json        the non-tensor part of that state
    meta.json                  model config, step, world size, tokenizer URI, each rank's loader state,
                               the running totals (tokens, train and batch time), and optionally
                               `generation`: the model's own generation defaults (see `generation`)
    manifest.json              sha256 and size of every file above: written last, by rank 0

An imported model (`nanochat import`) is a checkpoint of the first, fourth and last file alone
(`save_weights`): later stages start from it, nothing resumes it.

A checkpoint exists only once its manifest does, so a crash or a storage outage mid-save (storage
retries transient errors, then raises) leaves nothing that a loader would take. Loading verifies
every file against the manifest; resuming skips a corrupt checkpoint and falls back to the previous
complete one. Tensors are only ever read as safetensors and the rest is JSON: nothing is unpickled,
so a checkpoint from an untrusted URI cannot run code.
"""

import dataclasses
import hashlib
import json
import os
import re
import tempfile

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from nanochat import chat, pipeline, stage, storage
from nanochat.common import InputError, log
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step_(\d{6,})$")


class CheckpointError(InputError):
    """A checkpoint is missing, partial or corrupt; the message names the file (credentials redacted)."""

    def __init__(self, message):
        super().__init__(storage.redact(message))


def step_dir(directory, step):
    return storage.join(directory, f"step_{step:06d}")


# saving

def write_tensors(tensors, uri):
    """Writes a dict of tensors as safetensors at `uri` atomically; returns (sha256, size)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with tempfile.TemporaryDirectory(prefix="nanochat-ckpt-") as tmp:
        path = os.path.join(tmp, "t.safetensors")
        save_file(tensors, path)
        digest = file_sha256(path)
        storage.upload(path, uri)
        return digest, os.path.getsize(path)


def write_json(obj, uri):
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    storage.write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest(), len(data)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(storage.CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def split_state(state, prefix=""):
    """Splits a nested state (dicts/lists of tensors and plain values) into a flat dict of tensors
    keyed by dotted path and the same structure with tensors replaced by their key."""
    tensors = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            tensors[path] = x
            return {"__tensor__": path}
        if isinstance(x, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, (list, tuple)):
            return {"__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot checkpoint a {type(x).__name__} at {path}")

    return tensors, walk(state, prefix or "s")


def join_state(skeleton, tensors):
    """Inverse of split_state."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [join_state(v, tensors) for v in skeleton["__list__"]]
    return skeleton


def save(directory, step, model_state, optim_state, meta, rank=0, world_size=1, keep_last=None):
    """Saves a checkpoint; call on every rank with that rank's optimizer state. Rank 0 writes the
    weights, meta.json and, after all ranks' files are written, the manifest. Returns its URI."""
    target = step_dir(directory, step)
    files = write_weights(target, step, model_state, meta, world_size) if rank == 0 else {}
    rank_state = {"optimizer": optim_state, "rng": rng_state()}
    tensors, skeleton = split_state(rank_state)
    name = f"optim_rank_{rank:03d}"
    files[f"{name}.safetensors"] = write_tensors(tensors, storage.join(target, f"{name}.safetensors"))
    files[f"{name}.json"] = write_json(skeleton, storage.join(target, f"{name}.json"))

    if world_size > 1 and dist.is_initialized():
        gathered = [None] * world_size
        dist.all_gather_object(gathered, files)  # also a barrier: every rank's files are written
        files = {k: v for part in gathered for k, v in part.items()}
    if rank == 0:
        write_manifest(target, step, world_size, files)
        if keep_last:
            prune(directory, keep_last)
    if world_size > 1 and dist.is_initialized():
        dist.barrier()
    return target


def save_weights(directory, step, model_state, meta):
    """Saves a checkpoint of the weights alone, as an import writes one: a later stage can start
    from it (load_model), nothing can resume it (it holds no optimizer or RNG state). Returns its URI."""
    target = step_dir(directory, step)
    write_manifest(target, step, 1, write_weights(target, step, model_state, meta, 1))
    return target


def write_weights(target, step, model_state, meta, world_size):
    """Writes model.safetensors and meta.json of checkpoint `target`; returns their manifest entries."""
    meta = storage.redact({**meta, "step": step, "world_size": world_size})  # it may hold data URIs
    return {"model.safetensors": write_tensors(model_state, storage.join(target, "model.safetensors")),
            "meta.json": write_json(meta, storage.join(target, "meta.json"))}


def write_manifest(target, step, world_size, files):
    """Writes the manifest, which makes the checkpoint exist: after every file it lists."""
    manifest = {"step": step, "world_size": world_size,
                "files": {k: {"sha256": h, "bytes": n} for k, (h, n) in sorted(files.items())}}
    write_json(manifest, storage.join(target, MANIFEST))
    log.info("checkpoint saved: %s", storage.redact(target))


def prune(directory, keep_last):
    """Deletes all but the newest `keep_last` complete checkpoints (manifest first, so a partly
    deleted checkpoint never looks complete) and any incomplete ones older than the newest."""
    steps = list_steps(directory)
    complete = [s for s, done in steps if done]
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else -1
    for step, done in steps:
        if step in keep or (not done and step > newest):
            continue
        uri = step_dir(directory, step)
        storage.remove(storage.join(uri, MANIFEST))
        storage.remove(uri, recursive=True)


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# finding and loading

def list_steps(directory):
    """[(step, has_manifest)] of the checkpoints under `directory`, oldest first."""
    out = []
    for name in storage.listdir(directory):
        m = STEP_RE.match(name)
        if m:
            out.append((int(m.group(1)), storage.exists(storage.join(directory, name, MANIFEST))))
    return sorted(out)


def read_verified(uri, entry):
    data = storage.read_bytes(uri)
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{uri}: does not match its manifest (corrupt or partial)")
    return data


def read_tensors(uri, entry):
    """The tensors of a verified safetensors file; anything else (a pickle, say) is refused."""
    try:
        return st_load(read_verified(uri, entry))
    except SafetensorError as e:
        raise CheckpointError(f"{uri}: not a safetensors file ({e}); tensors are never unpickled") from None


def read_manifest(target):
    uri = storage.join(target, MANIFEST)
    if not storage.exists(uri):
        raise CheckpointError(f"{target}: no {MANIFEST} (an incomplete checkpoint)")
    try:
        return storage.read_json(uri)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load(target, rank=0, device="cpu", load_optimizer=True):
    """Loads and verifies one checkpoint: (model_state, optimizer_state or None, meta). The
    optimizer state (and RNG state, restored here) is that of `rank`; a rank past those that saved
    it gets none, and meta's world_size says how many did (a caller with more processes refuses to
    resume: skipping the checkpoint as if broken would start over and prune it)."""
    manifest = read_manifest(target)
    meta = read_meta(target, manifest)
    model_state = read_tensors(storage.join(target, "model.safetensors"), manifest_entry(target, manifest, "model.safetensors"))
    model_state = {k: v.to(device) for k, v in model_state.items()}
    optim_state = None
    if load_optimizer:
        if manifest["world_size"] != meta["world_size"]:
            raise CheckpointError(f"{target}: saved by {manifest['world_size']} ranks, cannot restore rank {rank}")
        if rank < manifest["world_size"]:
            optim_state, rng = load_rank_state(target, rank, manifest)
            set_rng_state(rng)
    return model_state, optim_state, meta


def manifest_entry(target, manifest, name):
    if name not in manifest["files"]:
        raise CheckpointError(f"{target}: {name} is not in the manifest")
    return manifest["files"][name]


def read_meta(target, manifest=None):
    """A checkpoint's meta.json, verified against its manifest; the weights are not read."""
    manifest = manifest or read_manifest(target)
    return json.loads(read_verified(storage.join(target, "meta.json"), manifest_entry(target, manifest, "meta.json")))


def generation(target, meta=None):
    """A checkpoint's generation config, the model's sampling defaults: chat.GENERATION overlaid with
    its meta.json's `generation` (an imported model's, from its generation_config.json). `meta`: the
    checkpoint's, if already read."""
    meta = read_meta(target) if meta is None else meta
    return chat.generation_config(meta.get("generation") or {}, storage.redact(storage.join(target, "meta.json")))


def load_rank_state(target, rank, manifest=None):
    """(optimizer state, RNG state) that rank `rank` saved in checkpoint `target`, verified; the
    weights are not read and nothing is restored."""
    manifest = manifest or read_manifest(target)
    if rank >= manifest["world_size"]:
        raise CheckpointError(f"{target}: saved by {manifest['world_size']} ranks, cannot restore rank {rank}")
    name = f"optim_rank_{rank:03d}"
    tensors_entry, skeleton_entry = (manifest_entry(target, manifest, f"{name}.{ext}") for ext in ("safetensors", "json"))
    tensors = read_tensors(storage.join(target, f"{name}.safetensors"), tensors_entry)
    rank_state = join_state(json.loads(read_verified(storage.join(target, f"{name}.json"), skeleton_entry)), tensors)
    return rank_state["optimizer"], rank_state["rng"]


def load_latest(directory, rank=0, device="cpu", load_optimizer=True):
    """Loads the newest checkpoint that verifies, skipping (with a warning) partial or corrupt
    newer ones. Returns (model_state, optimizer_state, meta), or None if there is none."""
    for step, _ in reversed(list_steps(directory)):
        target = step_dir(directory, step)
        try:
            loaded = load(target, rank=rank, device=device, load_optimizer=load_optimizer)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            loaded = None
        if all_ranks_agree(loaded is not None, device):
            return loaded
    return None


def all_ranks_agree(ok, device):
    """True only if `ok` on every rank, so that all ranks resume from the same checkpoint."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([int(ok)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def load_model(target, device="cpu"):
    """The GPT of a checkpoint directory, weights verified, in eval mode, and the tokenizer it was
    trained with: (model, tokenizer, meta)."""
    model_state, _, meta = load(target, device=device, load_optimizer=False)
    return build_model(model_config(meta, target), model_state, device), load_tokenizer(meta), meta


def model_config(meta, target):
    """The GPTConfig a checkpoint's meta.json records (fields it lacks take their defaults: an older
    checkpoint); a CheckpointError naming the fields this code does not know (a newer one's)."""
    unknown = sorted(set(meta["model_config"]) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:
        raise CheckpointError(f"{storage.join(target, 'meta.json')}: model options this code does not know: "
                              f"{', '.join(unknown)} (a checkpoint of newer nanochat code: update it)")
    return GPTConfig(**meta["model_config"])


def tokenizer_meta(uri):
    """The meta.json fields of a checkpoint trained with the tokenizer whose tokenizer.json is at `uri`:
    that URI, and the file's sha256, which load_tokenizer checks. A run's tokenizer can be replaced in
    place (tok_train run again, or a stage imported again with --force); without it, its models would
    decode their ids into other text without a word."""
    return {"tokenizer": uri, "tokenizer_sha256": hashlib.sha256(storage.read_bytes(uri)).hexdigest()}


def load_tokenizer(meta):
    """The tokenizer a checkpoint's meta.json names (its tokenizer.json, in a tokenizer directory); a
    CheckpointError if that file is no longer the one the model was trained with (checkpoints from
    before tokenizer_meta carry no sha256 to check)."""
    uri, trained_with = meta["tokenizer"], meta.get("tokenizer_sha256")
    if trained_with and hashlib.sha256(storage.read_bytes(uri)).hexdigest() != trained_with:
        raise CheckpointError(f"{storage.redact(uri)} is not the tokenizer this model was trained with (its sha256 differs from "
                              "the checkpoint's meta.json): the run's tokenizer was replaced since (tok_train run again, or a "
                              "stage imported over); train the model again, or bring the tokenizer it was trained with back")
    return Tokenizer.load(uri.rsplit("/", 1)[0])


def build_model(config, model_state, device="cpu"):
    """The GPT of `config` holding `model_state` (strict), in eval mode: allocated once, on `device`."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # the buffers that are not saved (rotary tables)
    model.load_state_dict(model_state)
    return model.eval()


def find_checkpoint(target, source=None, storage_root=None):
    """(checkpoint directory URI, source) of a checkpoint URI, or of a run (name, in `storage_root`
    or the default storage, or URI): its
    `source` stage's final checkpoint (pipeline.SOURCES), by default the newest model source done
    (rl, then sft, mid, base). A source with a checkpoint URI is a ValueError."""
    uri = storage.normalize(target) if "://" in target or target.startswith(("/", ".", "~")) else None
    if uri is not None:
        uri = uri.removesuffix("/" + MANIFEST)
        if storage.exists(storage.join(uri, MANIFEST)):
            if source:
                raise ValueError(f"{target} is a checkpoint, which is one model: a source ({source}) picks a stage of a run")
            return uri, None
    run = storage.run_uri(target, storage_root)
    newest_first = [source] if source else list(reversed(pipeline.SOURCES))
    for name in newest_first:
        if storage.exists(storage.join(run, pipeline.SOURCES[name], stage.SUMMARY)):
            return stage.upstream_checkpoint(run, pipeline.SOURCES[name]), name
    wanted = " or ".join(pipeline.SOURCES[name] for name in newest_first)
    raise FileNotFoundError(f"{target}: neither a checkpoint nor a run with {wanted} done")
