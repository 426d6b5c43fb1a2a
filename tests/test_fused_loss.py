"""The fused loss (nanochat/loss.py) against F.cross_entropy of the soft-capped logits (the oracle):
values and gradients, for every reduction and chunking, ignored targets, bf16 autocast; through the
model and on its own."""

import pytest
import torch
import torch.nn.functional as F

from nanochat import loss
from tests.test_gpt import CONFIG, random_model, tokens


@pytest.mark.parametrize("rows_per_chunk", [(14, 4), (7, 7), None], ids=["blocks_in_pieces", "chunked", "one_chunk"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_gradients_equal_cross_entropy_of_the_logits(reduction, rows_per_chunk, monkeypatch):
    if rows_per_chunk:  # 48 tokens in matmul blocks of 14 or 7 rows, softmax pieces of 4 or 7: last ones partial
        chunks = tuple(n * CONFIG.vocab_size for n in rows_per_chunk)
        monkeypatch.setattr(loss, "chunk_sizes", lambda device_type: chunks)
    model = random_model()
    idx, targets = tokens(seed=2), tokens(seed=3)
    targets[0, :5] = -1
    targets[1, 17] = -1
    got = model(idx, targets, loss_reduction=reduction)
    weights = torch.rand(got.shape)  # a non-uniform upstream gradient for 'none'
    grads = torch.autograd.grad((got * weights).sum(), list(model.parameters()))

    logits = model(idx)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
    expected = expected.view(2, 24) if reduction == "none" else expected
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(model.parameters()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, want in zip(grads, expected_grads):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets, loss_reduction=reduction), expected, rtol=1e-5, atol=1e-5)


def test_any_cap_and_chunking_on_its_own():
    """cross_entropy(x, w, targets, reduction, chunks, cap) is F.cross_entropy of cap tanh(x @ w.T / cap),
    with gradients, whatever the cap and chunk sizes the caller passes."""
    torch.manual_seed(0)
    x, w = torch.randn(37, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[3] = -1
    got = loss.cross_entropy(x * 3, w, targets, "mean", (5 * 50, 2 * 50), 5.0)
    expected = F.cross_entropy(5.0 * torch.tanh((x * 3) @ w.T / 5.0), targets, ignore_index=-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, want in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(expected, (x, w))):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
    assert loss.chunk_sizes("cpu") == (2**23, 2**20) and loss.chunk_sizes("cuda") == (2**28, 2**28)


def test_loss_ignores_minus_one():
    model = random_model()
    idx, targets = tokens(seed=2), tokens(seed=3)
    per_token = model(idx, targets, loss_reduction="none")
    masked = targets.clone()
    masked[:, ::2] = -1
    per_token_masked = model(idx, masked, loss_reduction="none")
    assert (per_token_masked[:, ::2] == 0).all()
    torch.testing.assert_close(per_token_masked[:, 1::2], per_token[:, 1::2])
    torch.testing.assert_close(model(idx, masked), per_token[:, 1::2].mean())


def test_bf16_autocast_loss_is_close_to_fp32():
    model = random_model()
    idx, targets = tokens(seed=2), tokens(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(idx, targets)
        got.backward()
    assert got.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    # bf16 rounds the matmuls' inputs to 8 significant bits (0.4%); the loss moves by well under 1%
    torch.testing.assert_close(got, model(idx, targets), rtol=0.01, atol=0)
