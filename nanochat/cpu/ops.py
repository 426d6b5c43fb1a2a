"""The CPU forms of the model's hooks (nanochat.gpt) and the engine's sampling passes
(nanochat.engine.SamplingOps). Each takes what its fast path takes and hands anything else to the
torch function beside it, with the same signature and results up to rounding."""

import torch

from nanochat import engine, gpt
from nanochat.cpu import kernels


def decode_attention(q, k, v, mask=None):
    """Attention of one query per row (B, H, 1, D) over its keys (B, Hkv, Tk, D), `mask` saying which
    it sees (all if None): (B, 1, 1, Tk) for rows at their own positions, or (1, Tk), a sliding
    window over rows at one position. Two batched matmuls with fp32 scores, as SDPA computes them.
    In bf16 on CPU faster than SDPA's kernel at decode sizes; in fp32 slower (figures in
    docs/ARCHITECTURE.md)."""
    B, H, _, D = q.shape
    q = q.view(B, k.size(1), H // k.size(1), D)  # the query heads sharing a key head side by side
    scores = (q.float() @ k.float().transpose(-1, -2)).mul_(D ** -0.5)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return (scores.softmax(dim=-1).to(v.dtype) @ v).view(B, H, 1, D)


def attention(q, k, v, mask=None):
    """CausalSelfAttention.attend on CPU: decode_attention for one query per row in a low-precision
    dtype, else the model's SDPA (gpt.causal_attention)."""
    if q.size(2) == 1 and q.dtype != torch.float32:
        return decode_attention(q, k, v, mask)
    return gpt.causal_attention(q, k, v, mask)


def softcap(logits):
    """GPT.cap on CPU: the soft cap in place by the kernel on fp32 logits without a gradient, else
    gpt.softcap."""
    rows = logits.reshape(-1, logits.size(-1))  # a view for the model's logits (rows of a padded vocabulary)
    if logits.requires_grad or not kernels.takes(rows):
        return gpt.softcap(logits)
    return kernels.softcap_(rows, gpt.LOGIT_SOFTCAP).view(logits.shape)


def softmax_weights(logits, temperature):
    """engine.softmax_weights by the kernel on fp32 CPU rows."""
    rows = logits[None] if logits.dim() == 1 else logits
    if not kernels.takes(rows):
        return engine.softmax_weights(logits, temperature)
    return kernels.softmax_weights(rows, 1 / temperature).view(logits.shape)


def argmax(x):
    """engine.row_argmax by the kernel on fp32 CPU rows (torch's argmax is not vectorized)."""
    return kernels.argmax(x) if kernels.takes(x) else engine.row_argmax(x)


SAMPLING = engine.SamplingOps(softmax_weights=softmax_weights, argmax=argmax)
