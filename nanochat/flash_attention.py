"""Flash attention for the model's causal attention where a build of it is installed and can run: FA3
(`flash_attn_interface`, built from flash-attention's hopper/ directory) on Hopper GPUs, else FA2 (the
`flash_attn` package) on Ampere or newer, in fp16 or bf16. Neither is a dependency of nanochat: without
them, and on every other device or dtype, the model attends with SDPA (nanochat.gpt.causal_attention).

Both take a sliding window as window_size=(left, right): a query at position i sees the keys
i - left .. i + right, so a window of N admits N + 1 keys, as nanochat.gpt's window masks do. With
causal=True and fewer queries than keys, the queries are the last ones (a cached prefix before them).

Without either, a model compiled on a GPU attends through its sliding windows with FlexAttention,
torch's own: compiled, it skips the blocks of keys outside the window, where SDPA with a mask would
compute every score (`flex`).
"""

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:
    from flash_attn_interface import flash_attn_func as fa3
except ImportError:  # not installed, or built for another torch
    fa3 = None
try:
    from flash_attn import flash_attn_func as fa2
except ImportError:
    fa2 = None

HALF = (torch.float16, torch.bfloat16)
# Where a compiled model's sliding windows go to FlexAttention when no flash attention runs: eager,
# FlexAttention computes every score, and on a CPU SDPA with a mask is the tuned path.
FLEX_DEVICES = ("cuda",)


def for_device(device):
    """The flash attention function installed for `device` (FA3 on Hopper, else FA2 on Ampere or
    newer), or None."""
    if (fa3 is None and fa2 is None) or device.type != "cuda":
        return None
    major = torch.cuda.get_device_properties(device).major  # (torch.compile folds this call to a constant)
    if fa3 is not None and major == 9:
        return fa3
    return fa2 if fa2 is not None and major >= 8 else None


def kernel(q, k, v):
    """The flash attention function that runs the attention of q (B, heads, T, head_dim), k and v, or
    None: it takes CUDA tensors of one half-precision dtype only (an engine's fp32 cache of an fp32
    model under bf16 autocast, as chat_eval and chat_rl run it, goes to SDPA, which autocast casts)."""
    if q.dtype not in HALF or not q.dtype == k.dtype == v.dtype:
        return None
    return for_device(q.device)


def attention(function, q, k, v, window=None):
    """Causal attention by `function` (a kernel() result) of the queries q (B, H, Tq, D), the last Tq
    positions of the keys k, v (B, Hkv, Tk, D), each seeing at most `window` keys before it (None:
    all). Same layout in and out as SDPA; flash attention's own is (B, T, heads, D)."""
    out = function(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                   window_size=(-1 if window is None else window, 0))
    if isinstance(out, tuple):  # FA3 builds before 2025 also return the softmax's log-sum-exp
        out = out[0]
    return out.transpose(1, 2)


def flex_applies(q, k):
    """Whether FlexAttention runs a sliding window over q and k: training rows (as many queries as
    keys) on a FLEX_DEVICES device, inside a graph torch is compiling."""
    return q.device.type in FLEX_DEVICES and q.size(2) == k.size(2) and torch.compiler.is_compiling()


def window_block_mask(window, T, device):
    """FlexAttention's block mask of a causal sliding window over T positions: each query sees
    itself and the `window` keys before it, as window_size=(window, 0) and nanochat.gpt's masks."""
    def in_window(batch, head, query, key):
        return (key <= query) & (query - key <= window)

    return create_block_mask(in_window, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def flex(q, k, v, block_mask):
    """Attention of q (B, H, T, D) over k, v (B, Hkv, T, D) within `block_mask` (window_block_mask)."""
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))
