"""The GPT model, in reading order: attention -> MLP -> block -> config -> model. Its fused training
loss is nanochat/loss.py.

Features (as nanochat):
- rotary position embeddings, no learned positions
- QK-norm: parameter-free RMSNorm on queries and keys, after rotary
- grouped-query attention (n_kv_head < n_head) through SDPA's enable_gqa
- ReLU^2 MLP, no biases, parameter-free RMSNorm, norm after the token embedding
- untied embedding and lm_head; vocabulary padded to a multiple of 64 (logits are sliced back)
- logit soft-capping: 15 * tanh(logits / 15)

Generation goes through a KV cache (the KVCache protocol below): prefill the prompt in one forward,
then one token per forward.

The same code runs on every device. Two hooks let an inference model take other forms of two
operations (nanochat.cpu sets them per instance on the model it loads):
- CausalSelfAttention.attend(q, k, v, mask): the attention; SDPA (causal_attention) by default.
- GPT.cap(logits): the logit soft cap of forward's output; softcap by default.

GPT(config) allocates on the default device and draws every weight in init_weights(), so a seed
gives the same weights either way; to allocate on a device only later:
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
"""

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import loss

LOGIT_SOFTCAP = 15.0
VOCAB_MULTIPLE = 64  # pad the embedding/lm_head rows so matmuls hit aligned shapes
ROTARY_HEADROOM = 10  # rotary tables cover 10x sequence_len, so generation can run past training length
ROTARY_BASE = 10000


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


class KVCache(Protocol):
    """What a forward needs of a KV cache: the model calls get_pos once, then insert_kv and reads
    attn_mask once per layer, then advance once. The engine's RowCache views are the batched one."""

    # None: every row at the same position, plain causal attention over the cache; else the boolean
    # (B, 1, T, keys) mask of the keys each query sees
    attn_mask: torch.Tensor | None

    def get_pos(self) -> int | torch.Tensor:
        """The rotary offset of this forward: an int for every row, or a (B,) tensor, a position per row."""

    def insert_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this forward's k, v (B, n_kv_head, T, head_dim) of a layer; returns the keys and
        values its queries attend to."""

    def advance(self, num_tokens: int) -> None:
        """Moves past the num_tokens positions this forward fed."""


def causal_attention(q, k, v, mask=None):
    """SDPA where the Tq queries are the last Tq of the Tk key positions; any earlier keys are a
    cached prefix that every query sees in full. A boolean `mask` (B, 1, Tq, Tk), given by a cache
    whose rows are at different positions, says instead which keys each query sees."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
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


def softcap(logits):
    """The logit soft cap, 15 tanh(z / 15)."""
    return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)


class CausalSelfAttention(nn.Module):
    attend = staticmethod(causal_attention)  # hook: the attention of (q, k, v, mask); an instance may set its own

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
        y = self.attend(q, k, v, mask)
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


class GPT(nn.Module):
    cap = staticmethod(softcap)  # hook: the soft cap of forward's logits; an instance may set its own

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

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, loss_reduction="mean", positions=None):
        """idx: (B, T) token ids. Without targets: the soft-capped logits (B, T, vocab_size), fp32,
        or with `positions` ((B,) a position per row) only those rows' logits there, (B, vocab_size),
        which spares the vocabulary projection of every other position. With targets (B, T; -1 =
        ignore): the cross-entropy in fp32, a scalar ('mean'/'sum') or (B, T) ('none')."""
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
            return self.cap(self.lm_head(x)[..., :self.config.vocab_size].float())
        w = self.lm_head.weight
        if self.padded_vocab_size != self.config.vocab_size:  # even a full slice would cost a copy in backward
            w = w[:self.config.vocab_size]
        losses = loss.cross_entropy(x.reshape(B * T, -1), w, targets.reshape(B * T), loss_reduction,
                                    loss.chunk_sizes(x.device.type), LOGIT_SOFTCAP)
        return losses.view(B, T) if loss_reduction == "none" else losses

    def fuse_qkv(self):
        """The model (in place) with each attention's c_q, c_k and c_v as one layer, for inference:
        at decode sizes a matmul costs about as much for three times the rows, and the rotary and
        norm after it take queries and keys together. The model can no longer train."""
        for block in self.transformer.h:
            block.attn.fuse_qkv()
        return self

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
