"""Bits per byte: cross-entropy normalised by the bytes the targets stand for.

Unlike the mean loss per token, bits per byte does not depend on the tokenizer's vocabulary, so
models with different tokenizers compare. Targets that are ignored (-1) or decode to no bytes
(special tokens) count neither loss nor bytes.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def bits_per_byte(model, batches, token_bytes, autocast):
    """Bits per byte of `model` over the (inputs, targets) `batches`, summed over every rank.
    `token_bytes[i]` is the byte length of token i; `autocast` is a context manager factory."""
    device = token_bytes.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for inputs, targets in batches:
        with autocast():
            loss = model(inputs, targets, loss_reduction="none").flatten()
        targets = targets.flatten()
        weights = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)
        nats += (loss.double() * (weights > 0)).sum()
        n_bytes += weights.sum()
    if dist.is_initialized():
        dist.all_reduce(nats)
        dist.all_reduce(n_bytes)
    if n_bytes.item() == 0:
        raise ValueError("no target bytes to evaluate on")
    return nats.item() / (math.log(2) * n_bytes.item())
