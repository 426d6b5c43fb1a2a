"""The CPU forms of the model's RMSNorms, logit cap and head (nanochat.gpt's norm, rotary_norm,
GPT.cap and GPT.head hooks) and of the engine's sampling passes (nanochat.engine.SamplingOps). Each takes what its fast path
takes and hands anything else to the torch function beside it, with the same signature and results
up to rounding."""


import torch

from nanochat import engine, gpt
from nanochat.cpu import kernels
from nanochat.cpu.linears import AmxLinear

# torch's rms_norm of bf16 computes in fp32, with fp32's epsilon (tests/test_cpu_kernels.py holds it to that)
NORM_EPS = torch.finfo(torch.float32).eps
NORM_DTYPES = kernels.NORM_KERNELS["rms_norm"].keys()  # the dtypes the norm kernels take


def rms_norm(x):
    """GPT.norm on CPU: bf16 or fp32 activations without a gradient by the kernel (a new tensor);
    else gpt.norm."""
    rows = x.reshape(-1, x.size(-1))
    if x.requires_grad or x.dtype not in NORM_DTYPES or not kernels.takes(rows, x.dtype):
        return gpt.norm(x)
    return kernels.rms_norm(rows, NORM_EPS).view(x.shape)


def rotary_norm(x, cos, sin):
    """An attention's rotary_norm on CPU: bf16 or fp32 queries or keys of one position per row (B,
    heads, 1, dim), without a gradient, by the kernel (a new tensor); else gpt.rotary_norm."""
    dim = x.size(-1)
    if x.size(2) != 1 or x.requires_grad or x.dtype not in NORM_DTYPES or x.stride(-1) != 1 or dim % 16 or dim > 1024:
        return gpt.rotary_norm(x, cos, sin)
    angles = [a.reshape(-1, dim // 2) for a in (cos, sin)]  # (1, dim / 2), or a row for each row of x
    if not all(kernels.takes(a, x.dtype) for a in angles) or angles[0].stride() != angles[1].stride():
        return gpt.rotary_norm(x, cos, sin)
    return kernels.rotary_norm(x[:, :, 0], *angles, NORM_EPS).view(x.shape)


def softcap(logits):
    """GPT.cap on CPU: the soft cap by the kernel on logits without a gradient, fp32 ones in place and
    bf16 ones into new fp32 logits in the same pass as the upcast; else gpt.softcap."""
    rows = logits.reshape(-1, logits.size(-1))  # a view for the model's logits (rows of a padded vocabulary)
    if logits.requires_grad:
        return gpt.softcap(logits)
    if kernels.takes(rows, torch.bfloat16):
        return kernels.softcap_bf16(rows, gpt.LOGIT_SOFTCAP).view(logits.shape)
    if kernels.takes(rows):
        return kernels.softcap_(rows, gpt.LOGIT_SOFTCAP).view(logits.shape)
    return gpt.softcap(logits)


def head(model, x):
    """GPT.head on CPU (bound to its model by nanochat.cpu.apply): an AmxLinear lm_head without a
    gradient computes the logits and their cap in one pass, never writing the bf16 logits; else the
    model's own head (lm_head, then its cap hook)."""
    if isinstance(model.lm_head, AmxLinear) and not x.requires_grad:
        return model.lm_head(x, gpt.LOGIT_SOFTCAP)[..., :model.config.vocab_size]
    return gpt.GPT.head(model, x)


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
