"""Bits per byte: cross-entropy normalised by the bytes the targets stand for.

Unlike the mean loss per token, bits per byte does not depend on the tokenizer's vocabulary, so
models with different tokenizers compare. Targets that are ignored (-1) or decode to no bytes
(special tokens) count neither loss nor bytes. The unigram model (token frequencies, no context)
gives the baseline a language model has to beat.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def bits_per_byte(losses, batches, token_bytes):
    """Bits per byte over the (inputs, targets) `batches`, summed over every rank. `losses(inputs,
    targets)` gives the loss in nats of each target, and `token_bytes[i]` the byte length of token i."""
    device = token_bytes.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for inputs, targets in batches:
        loss = losses(inputs, targets).flatten()
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


def model_losses(model, autocast):
    """`losses` for bits_per_byte: the model's per-token cross-entropy."""
    def losses(inputs, targets):
        with autocast():
            return model(inputs, targets, loss_reduction="none")
    return losses


def unigram_losses(counts):
    """`losses` for bits_per_byte: -log p(target) under the token frequencies `counts` (add-one
    smoothed, so unseen tokens cost a finite amount)."""
    log_p = torch.log(counts.double() + 1) - math.log(counts.sum().item() + len(counts))
    return lambda inputs, targets: -log_p[targets.clamp(min=0)]


@torch.no_grad()
def token_counts(batches, vocab_size, device):
    """How often each token id occurs as a target in the batches, summed over every rank."""
    counts = torch.zeros(vocab_size, dtype=torch.int64, device=device)
    for _, targets in batches:
        counts += torch.bincount(targets[targets >= 0].flatten(), minlength=vocab_size)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return counts
