"""Bits per byte against hand-computed values: targets weighted by their bytes, ignored (-1) and
special (0-byte) targets left out, several losses over one pass, and the unigram baseline."""

import math

import pytest
import torch

from nanochat.evaluation.bpb import bits_per_byte, token_counts, unigram_losses

TOKEN_BYTES = torch.tensor([1, 3, 0, 2])  # token 2 is special: no bytes


def batches():
    inputs = torch.zeros(2, 3, dtype=torch.long)
    yield inputs, torch.tensor([[0, 1, 2], [3, -1, 1]])
    yield inputs[:1], torch.tensor([[3, 3, 0]])


def test_bits_per_byte_weights_targets_by_their_bytes():
    # a loss of (target + 1) nats per target: counted are 0, 1, 3, 1, 3, 3, 0 (not 2, not -1)
    losses = {"model": lambda inputs, targets: (targets + 1).float(), "flat": lambda inputs, targets: torch.ones(targets.shape)}
    got = bits_per_byte(batches(), TOKEN_BYTES, **losses)
    n_bytes = 1 + 3 + 2 + 3 + 2 + 2 + 1
    assert got["model"] == pytest.approx((1 + 2 + 4 + 2 + 4 + 4 + 1) / (math.log(2) * n_bytes))
    assert got["flat"] == pytest.approx(7 / (math.log(2) * n_bytes))


def test_unigram_baseline():
    counts = token_counts(batches(), 4, "cpu")
    assert counts.tolist() == [2, 2, 1, 3]  # -1 is not a token
    log_p = [math.log((c + 1) / (8 + 4)) for c in counts.tolist()]  # add-one smoothing
    nats = -sum(log_p[t] for t in (0, 1, 3, 1, 3, 3, 0))
    got = bits_per_byte(batches(), TOKEN_BYTES, unigram=unigram_losses(counts))["unigram"]
    assert got == pytest.approx(nats / (math.log(2) * 14))


def test_no_bytes_is_an_error():
    with pytest.raises(ValueError, match="no target bytes"):
        bits_per_byte(iter([(torch.zeros(1, 1), torch.tensor([[2]]))]), TOKEN_BYTES, model=lambda i, t: t.float())
