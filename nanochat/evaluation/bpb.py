"""Bits per byte: cross-entropy normalised by the bytes the targets stand for.

Unlike the mean loss per token, bits per byte does not depend on the tokenizer's vocabulary, so
models with different tokenizers compare. Targets that are ignored (-1) or decode to no bytes
(special tokens) count neither loss nor bytes. The unigram model (token frequencies, no context)
gives the baseline a language model has to beat.
"""

import math

import torch

from nanochat.common import sum_over_ranks


@torch.no_grad()
def bits_per_byte(batches, token_bytes, **losses):
    """{name: bits per byte} over the (inputs, targets) `batches` (read once), summed over every
    rank, for each `losses[name](inputs, targets)`, the loss in nats of each target.
    `token_bytes[i]` is the byte length of token i."""
    device = token_bytes.device
    nats = torch.zeros(len(losses), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for inputs, targets in batches:
        flat = targets.flatten()
        weights = torch.where(flat >= 0, token_bytes[flat.clamp(min=0)], 0)
        for i, loss in enumerate(losses.values()):
            nats[i] += (loss(inputs, targets).flatten().double() * (weights > 0)).sum()
        n_bytes += weights.sum()
    sum_over_ranks(nats, n_bytes)
    if n_bytes.item() == 0:
        raise ValueError("no target bytes to evaluate on")
    return {name: n.item() / (math.log(2) * n_bytes.item()) for name, n in zip(losses, nats)}


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
    sum_over_ranks(counts)
    return counts
