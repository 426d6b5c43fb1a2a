"""The GPT model, in reading order: attention -> MLP -> block -> config -> loss -> model.

Features (as nanochat):
- rotary position embeddings, no learned positions
- QK-norm: parameter-free RMSNorm on queries and keys, after rotary
- grouped-query attention (n_kv_head < n_head) through SDPA's enable_gqa
- ReLU^2 MLP, no biases, parameter-free RMSNorm, norm after the token embedding
- untied embedding and lm_head; vocabulary padded to a multiple of 64 (logits are sliced back)
- logit soft-capping: 15 * tanh(logits / 15)

Generation goes through a KV cache: prefill the prompt in one forward, then one token per forward.
The cache's get_pos() is the rotary offset of the call: an int for all rows (KVCache), or a (B,)
tensor when each row is at its own position (nanochat.engine batches sequences of different
lengths); then its attn_mask says which cached keys each row sees.

GPT(config) allocates on the default device and draws every weight in init_weights(), so a seed
gives the same weights either way; to allocate on a device only later:
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_SOFTCAP = 15.0
VOCAB_MULTIPLE = 64  # pad the embedding/lm_head rows so matmuls hit aligned shapes
ROTARY_HEADROOM = 10  # rotary tables cover 10x sequence_len, so generation can run past training length
ROTARY_BASE = 10000
# Logits per loss chunk: (lm_head matmul block, softmax piece). CPU: the matmul runs on blocks of 2^23
# logits (128 rows at vocab 65,536; smaller blocks re-read the weight too often), the softmax and its
# gradient on pieces of 2^20 (4 MB in fp32, so their temporaries stay in cache). GPU: 1 GiB for both,
# few chunks, as there kernel launches cost more than memory traffic.
LOSS_CHUNK_ELEMENTS = {"cpu": (2**23, 2**20), "gpu": (2**28, 2**28)}


def norm(x):
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(num_positions, head_dim, base=ROTARY_BASE, device=None):
    """cos and sin of shape (num_positions, head_dim // 2), computed in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(num_positions, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotates pairs (x[..., i], x[..., i + D/2]) of x: (B, H, T, D) by each position's angles."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the tables are fp32; under autocast x is bf16
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, in buffers of max_len positions
    allocated on first use with the dtype and device of the keys. The model calls insert_kv once
    per layer and advance once per forward; get_pos is the rotary offset of the next call."""

    attn_mask = None  # every row at the same position: plain causal attention over the cache

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.pos = 0
        self.buffers = [None] * n_layer  # per layer: (2, B, n_kv_head, max_len, head_dim)

    def get_pos(self):
        return self.pos

    def insert_kv(self, layer_idx, k, v):
        """Stores k, v: (B, n_kv_head, T, head_dim) at positions pos..pos+T-1 and returns this
        layer's keys and values for positions 0..pos+T-1."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions, {end} needed")
        if self.buffers[layer_idx] is None:
            B, H, _, D = k.shape
            self.buffers[layer_idx] = k.new_empty(2, B, H, self.max_len, D)
        buffer = self.buffers[layer_idx]
        buffer[0, :, :, self.pos:end] = k
        buffer[1, :, :, self.pos:end] = v
        return buffer[0, :, :, :end], buffer[1, :, :, :end]

    def advance(self, num_tokens):
        self.pos += num_tokens


def causal_attention(q, k, v, mask=None):
    """SDPA where the Tq queries are the last Tq of the Tk key positions; any earlier keys are a
    cached prefix that every query sees in full. A boolean `mask` (B, 1, Tq, Tk), given by a cache
    whose rows are at different positions, says instead which keys each query sees."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if Tq == 1 and q.dtype != torch.float32:
        return decode_attention(q, k, v, mask)  # in fp32 SDPA's own kernel is faster (see there)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    # SDPA's is_causal aligns the triangle to the top-left corner, which is wrong with a prefix:
    # query i (at absolute position Tk - Tq + i) may see keys 0..Tk - Tq + i.
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def decode_attention(q, k, v, mask=None):
    """Attention of one query per row (B, H, 1, D) over its keys (B, Hkv, Tk, D), `mask` (B, 1, 1, Tk)
    saying which it sees (all if None): two batched matmuls with fp32 scores, as SDPA does. In bf16
    on an AMX CPU over twice as fast as SDPA at decode sizes (8 rows x 160 keys: 97 us, SDPA 220);
    in fp32 SDPA is faster (AVX2 CPU, 8 x 160: 66 us, this 109)."""
    B, H, _, D = q.shape
    q = q.view(B, k.size(1), H // k.size(1), D)  # the query heads sharing a key head side by side
    scores = (q.float() @ k.float().transpose(-1, -2)).mul_(D ** -0.5)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return (scores.softmax(dim=-1).to(v.dtype) @ v).view(B, H, 1, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.c_qkv = None  # for inference, c_q, c_k and c_v as one layer (see fuse_qkv)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        mask = None
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
            mask = kv_cache.attn_mask
        y = causal_attention(q, k, v, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

    def project(self, x, cos, sin):
        """Queries, keys (rotated, normed) and values of x: (B, heads, T, head_dim) each."""
        B, T, _ = x.shape
        if self.c_qkv is None:
            q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
            k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            return norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin)), v
        # one matmul; the query and key heads sit side by side, so one rotary and one norm take both
        qkv = self.c_qkv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
        q, k = norm(apply_rotary(qk, cos, sin)).split([self.n_head, self.n_kv_head], dim=1)
        return q, k, v

    def fuse_qkv(self):
        """Replaces c_q, c_k and c_v by one layer c_qkv of their stacked weights (for inference)."""
        if self.c_qkv is not None:
            return
        weight = torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight]).detach()
        self.c_qkv = nn.Linear(weight.size(1), weight.size(0), bias=False, device="meta")
        self.c_qkv.weight = nn.Parameter(weight, requires_grad=False)
        del self.c_q, self.c_k, self.c_v


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))


@dataclass
class GPTConfig:
    sequence_len: int = 2048  # training context; rotary tables cover ROTARY_HEADROOM times this
    vocab_size: int = 65536  # the tokenizer's size; the model pads it to a multiple of 64
    n_layer: int = 20
    n_head: int = 10  # query heads; head_dim = n_embd // n_head
    n_kv_head: int = 10  # key/value heads: equal to n_head, or a divisor of it for GQA
    n_embd: int = 1280

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} does not divide n_head {self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth, vocab_size, sequence_len, head_dim=128, aspect_ratio=64, n_kv_head=None):
        """nanochat's sizing rule: width = aspect_ratio * depth, rounded up to whole heads of
        head_dim (tiny presets pass a smaller head_dim). n_kv_head defaults to n_head (no GQA)."""
        n_embd = math.ceil(aspect_ratio * depth / head_dim) * head_dim
        n_head = n_embd // head_dim
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_kv_head or n_head, n_embd=n_embd)


def softcap(logits):
    """15 tanh(z / 15), as 30 sigmoid(2z / 15) - 15: CPU sigmoid kernels are several times faster than
    tanh. In place on the (fresh) logits when no gradient flows."""
    if logits.requires_grad:
        return torch.sigmoid(logits * (2 / LOGIT_SOFTCAP)) * (2 * LOGIT_SOFTCAP) - LOGIT_SOFTCAP
    return logits.mul_(2 / LOGIT_SOFTCAP).sigmoid_().mul_(2 * LOGIT_SOFTCAP).sub_(LOGIT_SOFTCAP)


def matmul_dtype(x):
    """The dtype autocast would run a matmul on x in (x's own dtype outside autocast)."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def chunked_cross_entropy(x, w, targets, grad_logits=None):
    """Per-token cross-entropy (fp32; 0 where the target is -1) of the soft-capped logits x @ w.T,
    computed a few rows at a time so the (tokens, vocab) logits never exist at once. If grad_logits
    (tokens, vocab) is given, it receives each token's d loss / d logits (before the cap; 0 for
    ignored tokens)."""
    block, piece = (max(1, n // w.size(0)) for n in LOSS_CHUNK_ELEMENTS["cpu" if x.device.type == "cpu" else "gpu"])
    # d cap / dz = 1 - tanh^2 = 4 gate (1 - gate) (below); ignored tokens' rows get a factor 0 instead
    grad_scale = (4.0 * (targets != -1))[:, None]
    losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    for start in range(0, x.size(0), block):
        # 15 tanh(z / 15) = 30 sigmoid(2z / 15) - 15, and softmax ignores the -15; CPU sigmoid kernels
        # are several times faster than tanh. The 2/15 scales x, which is much smaller than z.
        gate_logits = (x[start:start + block] * (2 / LOGIT_SOFTCAP)) @ w.T
        for i in range(0, gate_logits.size(0), piece):
            gate = gate_logits[i:i + piece].float().sigmoid_()
            rows = slice(start + i, start + i + gate.size(0))
            probs = torch.softmax(gate * (2 * LOGIT_SOFTCAP), dim=-1)
            target = targets[rows].clamp(min=0)[:, None]
            # The cap bounds the logits to +-15, so no probability underflows and log(p) is accurate.
            losses[rows] = probs.gather(1, target).squeeze(1).log_().neg_()
            if grad_logits is not None:
                # d loss / d capped logits = probs - onehot(target), times d cap / dz
                probs.scatter_add_(1, target, torch.full_like(probs[:, :1], -1.0))
                probs.mul_(gate)
                probs.addcmul_(probs, gate, value=-1)
                torch.mul(probs, grad_scale[rows], out=grad_logits[rows])
    return losses.masked_fill_(targets == -1, 0.0)


def reduce_losses(losses, targets, reduction):
    """F.cross_entropy's reductions of per-token losses (ignored tokens hold 0)."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / (targets != -1).sum()
    raise ValueError(f"unknown loss reduction {reduction!r}")


class LinearCrossEntropy(torch.autograd.Function):
    """lm_head matmul + soft cap + cross-entropy, with the logits' gradient computed during the
    forward pass chunk by chunk (as Liger-Kernel's fused linear cross-entropy), so backward is two
    matmuls. Holds one (tokens, vocab) buffer in the matmul dtype instead of several fp32 logits."""

    @staticmethod
    def forward(ctx, x, w, targets, reduction):
        dtype = matmul_dtype(x)
        ctx.dtypes, ctx.reduction = (x.dtype, w.dtype), reduction
        x, w = x.to(dtype), w.to(dtype)
        grad_logits = torch.empty(x.size(0), w.size(0), dtype=dtype, device=x.device)
        losses = chunked_cross_entropy(x, w, targets, grad_logits)
        ctx.save_for_backward(x, w, grad_logits, (targets != -1).sum())
        return reduce_losses(losses, targets, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        x, w, grad_logits, count = ctx.saved_tensors
        if ctx.reduction == "none":  # a weight per token: scale the rows
            grad_logits = grad_logits * grad_output[:, None].to(grad_logits.dtype)
            scale = 1.0
        else:  # one weight for all: scale the small x and grad_x rather than anything vocab-sized
            scale = grad_output / count if ctx.reduction == "mean" else grad_output
        grad_x = (grad_logits @ w) * scale
        grad_w = grad_logits.T @ (x * scale).to(x.dtype)
        return grad_x.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None


@torch.compiler.disable  # already fused by hand; traced, its chunk loop would unroll into a long compile
def cross_entropy(x, w, targets, reduction="mean"):
    """F.cross_entropy(softcap(x @ w.T), targets, ignore_index=-1, reduction=reduction), fused and
    chunked; 'none' gives 0 for ignored tokens."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return LinearCrossEntropy.apply(x, w, targets, reduction)
    dtype = matmul_dtype(x)
    return reduce_losses(chunked_cross_entropy(x.to(dtype), w.to(dtype), targets), targets, reduction)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.padded_vocab_size = math.ceil(config.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        device = torch.get_default_device()
        with torch.device("meta"):  # skip the layers' own init: the weights depend on init_weights only
            self.transformer = nn.ModuleDict({
                "wte": nn.Embedding(self.padded_vocab_size, config.n_embd),
                "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            })
            self.lm_head = nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
            # Not saved in checkpoints: rebuilt from the config by init_weights().
            rotary_len = ROTARY_HEADROOM * config.sequence_len
            self.register_buffer("cos", torch.empty(rotary_len, config.head_dim // 2), persistent=False)
            self.register_buffer("sin", torch.empty(rotary_len, config.head_dim // 2), persistent=False)
        self.to_empty(device=device)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: embedding N(0, 1); lm_head N(0, 0.001); the input projections uniform
        with the std of N(0, 1/n_embd) (uniform has no outliers); the output projections of
        attention and MLP zero, so every block starts as the identity."""
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3) / math.sqrt(self.config.n_embd)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                torch.nn.init.uniform_(linear.weight, -bound, bound)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = rotary_tables(self.cos.size(0), self.config.head_dim, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", positions=None, capped=True):
        """idx: (B, T) token ids. Without targets: logits (B, T, vocab_size), fp32, or with
        `positions` ((B,) a position per row) only those rows' logits there, (B, vocab_size), which
        spares the vocabulary projection of every other position; capped=False leaves out the soft
        cap (monotonic, so the argmax is the same). With targets (B, T; -1 = ignore): the
        cross-entropy in fp32, a scalar ('mean'/'sum') or (B, T) ('none')."""
        B, T = idx.shape
        cos, sin = self.rotary(0 if kv_cache is None else kv_cache.get_pos(), T)

        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        if targets is None:
            if positions is not None:
                x = x[torch.arange(B, device=x.device), positions]
            logits = self.lm_head(x)[..., :self.config.vocab_size].float()
            return softcap(logits) if capped else logits
        w = self.lm_head.weight
        if self.padded_vocab_size != self.config.vocab_size:  # even a full slice would cost a copy in backward
            w = w[:self.config.vocab_size]
        loss = cross_entropy(x.reshape(B * T, -1), w, targets.reshape(B * T), loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def rotary(self, pos, T):
        """cos and sin of T positions from pos: an int (every row alike; (T, D/2) each) or a (B,)
        tensor of each row's offset ((B, 1, T, D/2) each, broadcasting over heads)."""
        if isinstance(pos, int):
            if pos + T > self.cos.size(0):
                raise ValueError(f"position {pos + T} is beyond the rotary tables ({self.cos.size(0)})")
            return self.cos[pos:pos + T], self.sin[pos:pos + T]
        positions = pos[:, None] + torch.arange(T, device=pos.device)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward), as nanochat and the PaLM paper count them:
        6 per matmul weight (2 forward, 4 backward; the embedding is a lookup, not a matmul), plus
        12 * L * H * D * T for the attention scores and the weighted sum of values (the causal
        mask is not discounted)."""
        c = self.config
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
