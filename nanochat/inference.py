"""Load a checkpoint for inference: its weights in the dtype the device multiplies fastest, each
attention's query, key and value layers fused, and on CPU nanochat.cpu's fast paths (this is the
one place they are applied; NANOCHAT_CPU_FASTPATHS=0 turns them off).

    engine = load_engine("speedrun", device="cpu")
"""

import torch

from nanochat import cpu
from nanochat.checkpoint import CheckpointError, find_checkpoint, generation, load_model
from nanochat.common import autocast_dtype
from nanochat.engine import MAX_ROWS, Engine, SamplingOps
from nanochat.stage import StageError

# what finding and loading a model raise where it cannot load, as opposed to a bug: a missing or
# corrupt checkpoint or one of newer code, a run without a model, a device this torch cannot use or
# whose memory the model does not fit (CUDA's out of memory), a bad NANOCHAT_CPU_FASTPATHS
LOAD_ERRORS = (FileNotFoundError, ValueError, CheckpointError, StageError, torch.OutOfMemoryError)


def load_engine(target, source=None, device="cpu", max_rows=MAX_ROWS):
    """The Engine of a checkpoint or a run's model (see checkpoint.find_checkpoint), its weights in the
    dtype the device multiplies fastest (bf16 on CUDA and AMX/AVX512-BF16 CPUs). Its `generation` is
    the model's sampling defaults (checkpoint.generation), from the meta.json read for the weights.
    A device this torch cannot use is a ValueError (usable_device), before any weights load."""
    directory, _ = find_checkpoint(target, source)
    device = usable_device(device)
    model, tokenizer, meta = load_model(directory, device)
    model.to(autocast_dtype(device.type))
    engine = Engine(model, tokenizer, max_rows, ops=prepare(model))
    engine.generation = generation(directory, meta)
    return engine


def usable_device(name):
    """torch.device(name) where this torch can put a tensor on it; else a ValueError naming it (torch's
    own error, for cuda on a CPU build, is an AssertionError from deep inside)."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {name!r} cannot be used here: {str(e).splitlines()[0]}") from None
    if device.type == "meta":
        raise ValueError("device 'meta' cannot be used here: it holds no data")
    return device


def check_switch():
    """Raises ValueError naming NANOCHAT_CPU_FASTPATHS if its value is neither 0 nor 1, so that a
    program that loads models later (the server's workers) refuses it at start."""
    cpu.enabled()


def prepare(model):
    """The engine's sampling ops for an inference model, put (in place) in its serving form: its
    query, key and value layers fused on every device, and on CPU nanochat.cpu applied. The model can
    no longer train or move to another device."""
    model.fuse_qkv()
    if next(model.parameters()).device.type == "cpu":
        return cpu.apply(model)
    return SamplingOps()
