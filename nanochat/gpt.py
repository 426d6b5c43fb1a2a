"""The GPT model, in reading order: attention -> MLP -> block -> config -> model. Its fused training
loss is nanochat/loss.py.

Features (as nanochat):
- rotary position embeddings, no learned positions
- QK-norm: parameter-free RMSNorm on queries and keys, after rotary
- grouped-query attention (n_kv_head < n_head) through SDPA's enable_gqa
- ReLU^2 MLP, no biases, parameter-free RMSNorm, norm after the token embedding
- untied embedding and lm_head; vocabulary padded to a multiple of 64 (logits are sliced back)
- logit soft-capping: 15 * tanh(logits / 15)

Options, each a GPTConfig field whose default leaves the model above ("classic") as it was;
nanochat.presets.MODEL_2026 turns on all of upstream nanochat's 2026 model (karpathy/nanochat 92d63d4):
- window_pattern: sliding-window attention on the layers marked S (a quarter of the context)
- value_embeds: token embeddings added to the values of alternating layers, gated by the input
- lambdas: learnable per-layer scales of the residual stream and of the embedding mixed back in
- smear: each token's embedding takes in the previous token's, gated (cheap bigram information)
- backout: a learnable share of the mid-layer residual taken out before the final norm
- qk_scale, rope_base: sharper attention, longer rotary wavelengths
- init "2026": upstream's current initialisation (GPT.init_weights)

Generation goes through a KV cache (the KVCache protocol below): prefill the prompt in one forward,
then one token per forward.

The same code runs on every device, with one exception: where flash attention is installed and
runs (nanochat.flash_attention: CUDA, fp16/bf16), attention without a per-row mask goes through it.
Hooks let an inference model take another form of an operation, set per instance (nanochat.cpu sets
them on the model it loads), each by default the op the model runs everywhere else: GPT.cap(logits),
the logit soft cap of forward's output, in fp32 whatever the lm_head's dtype (a CPU kernel upcasts
and caps in one pass), softcap by default; GPT.head(x), forward's logits of its last hidden states
(the lm_head, then the cap hook; a CPU kernel does both in one pass); and the RMSNorms (set by
GPT.use_norms): norm(x) of the model and its blocks, norm by default, and each attention's
rotary_norm(x, cos, sin) of its queries and keys, rotary_norm by default (CPU kernels do in one call
what takes torch seven ops, or fifteen).

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

from nanochat import flash_attention, loss

LOGIT_SOFTCAP = 15.0
VOCAB_MULTIPLE = 64  # pad the embedding/lm_head rows so matmuls hit aligned shapes
ROTARY_HEADROOM = 10  # rotary tables cover 10x sequence_len, so generation can run past training length
VE_GATE_CHANNELS = 12  # the value embeddings' gate reads this many channels of the block's input (upstream)
SMEAR_CHANNELS = 24  # the smear gate reads this many channels of the token's embedding (upstream)
INITS = ("classic", "2026")


def norm(x):
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(num_positions, head_dim, base, device=None):
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


def rotary_norm(x, cos, sin):
    """The queries' or keys' rotary (apply_rotary), then their RMSNorm (QK-norm), in x's dtype: CUDA
    autocast computes rms_norm in fp32, and flash attention takes queries, keys and values of one
    half-precision dtype (fp32 ones would send every layer to SDPA)."""
    return norm(apply_rotary(x, cos, sin)).to(x.dtype)


class KVCache(Protocol):
    """What a forward needs of a KV cache: the model calls get_pos and reads attn_mask once, calls
    insert_embedding once if it has the smear option, insert_kv once per layer, then advance once.
    The engine's RowCache views are the batched one."""

    # None: every row at the same position, the queries the last T of the keys (plain causal
    # attention over the cache); else the boolean (B, 1, T, keys) mask of the keys each query sees.
    # The model adds its sliding windows to either.
    attn_mask: torch.Tensor | None

    def get_pos(self) -> int | torch.Tensor:
        """The rotary offset of this forward: an int for every row, or a (B,) tensor, a position per
        row (never 0: such rows have been prefilled)."""

    def insert_embedding(self, x: torch.Tensor) -> torch.Tensor | None:
        """Stores this forward's token embeddings x (B, T, n_embd); returns each row's embedding of
        the token before them (B, 1, n_embd), or None where the rows start at position 0."""

    def insert_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this forward's k, v (B, n_kv_head, T, head_dim) of a layer; returns the keys and
        values its queries attend to: those of each row's positions from 0 on."""

    def advance(self, num_tokens: int) -> None:
        """Moves past the num_tokens positions this forward fed."""


def causal_attention(q, k, v, mask=None):
    """SDPA where the Tq queries are the last Tq of the Tk key positions; any earlier keys are a
    cached prefix that every query sees in full. A boolean `mask` ((Tq, Tk), or (B, 1, Tq, Tk) from
    a cache whose rows are at different positions) says instead which keys each query sees."""
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


def window_mask(window, Tq, Tk, pos=None, base=None, device=None):
    """Which of Tk keys each of Tq queries sees under a sliding window: itself and the `window` keys
    before it (window + 1 in all, as flash attention's window_size=(window, 0)), none after it.
    Without `base` the queries are the last Tq of the keys: (Tq, Tk). With a cache's mask `base`
    (B, 1, Tq, Tk) row b's queries are at pos[b] on, and the result is base's keys in the window."""
    if base is None:
        query = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    else:
        query = (pos[:, None] + torch.arange(Tq, device=device))[:, None, :, None]
    key = torch.arange(Tk, device=device)
    mask = (key <= query) & (key >= query - window)
    return mask if base is None else mask & base


class AttentionMasks:
    """The attention masks of one forward: the KV cache's mask (`base`; None without a cache or with
    every row at one position) and, per sliding window, that mask with the window added, built when
    the first layer of that window asks for it and shared by the others."""

    def __init__(self, pos=0, base=None):
        self.pos, self.base, self.windowed, self.blocks = pos, base, {}, {}

    def get(self, window, Tq, Tk, device):
        """The mask of a layer of `window` (None: full context) for causal_attention."""
        if reaches_back(window, Tk):
            return self.base
        if window not in self.windowed:
            self.windowed[window] = window_mask(window, Tq, Tk, self.pos, self.base, device)
        return self.windowed[window]

    def block(self, window, T, device):
        """FlexAttention's block mask of a layer of `window` over T training positions, or None for
        a full-context layer (flash_attention.window_block_mask)."""
        if reaches_back(window, T):
            return None
        if window not in self.blocks:
            self.blocks[window] = flash_attention.window_block_mask(window, T, device)
        return self.blocks[window]


def reaches_back(window, Tk):
    """Whether a layer of `window` (None: full context) sees every one of Tk keys: its window
    reaches back past the first key."""
    return window is None or window >= Tk - 1


def softcap(logits):
    """The logit soft cap in fp32, 15 tanh(z / 15)."""
    logits = logits.float()
    return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)


class CausalSelfAttention(nn.Module):
    rotary_norm = staticmethod(rotary_norm)  # hook: the rotary and RMSNorm of queries and keys (GPT.use_norms)

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.window = config.windows[layer_idx]
        self.qk_scale = config.qk_scale
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.c_qkv = None  # for inference, c_q, c_k and c_v as one layer (see fuse_qkv)
        if layer_idx in config.value_embed_layers:
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x, cos, sin, masks, ve=None, kv_cache=None):
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if ve is not None:  # the value embeddings (B, T, kv dims) of the tokens, each head gated in (0, 3) by x
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS])).transpose(1, 2).unsqueeze(-1)
            v = v + gate * ve.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2).to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        if masks.base is None and (flash := flash_attention.kernel(q, k, v)) is not None:
            y = flash_attention.attention(flash, q, k, v, self.window)
        elif masks.base is None and flash_attention.flex_applies(q, k) and (block := masks.block(self.window, T, q.device)) is not None:
            y = flash_attention.flex(q, k, v, block)
        else:
            y = causal_attention(q, k, v, masks.get(self.window, T, k.size(2), q.device))
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

    def project(self, x, cos, sin):
        """Queries, keys (rotated, normed, scaled by qk_scale) and values of x: (B, heads, T, head_dim) each."""
        B, T, _ = x.shape
        if self.c_qkv is None:
            q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
            k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            q, k = self.rotary_norm(q, cos, sin), self.rotary_norm(k, cos, sin)
        else:  # one matmul; the query and key heads sit side by side, so one rotary and one norm take both
            qkv = self.c_qkv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
            qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
            q, k = self.rotary_norm(qk, cos, sin).split([self.n_head, self.n_kv_head], dim=1)
        if self.qk_scale != 1.0:  # the scores grow by its square: sharper attention
            q, k = q * self.qk_scale, k * self.qk_scale
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
    norm = staticmethod(norm)  # hook: the RMSNorm before attention and MLP (GPT.use_norms)

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, masks, ve=None, kv_cache=None):
        x = x + self.attn(self.norm(x), cos, sin, masks, ve, kv_cache)
        return x + self.mlp(self.norm(x))


@dataclass
class GPTConfig:
    sequence_len: int = 2048  # training context; rotary tables cover ROTARY_HEADROOM times this
    vocab_size: int = 65536  # the tokenizer's size; the model pads it to a multiple of 64
    n_layer: int = 20
    n_head: int = 10  # query heads; head_dim = n_embd // n_head
    n_kv_head: int = 10  # key/value heads: equal to n_head, or a divisor of it for GQA
    n_embd: int = 1280
    # The options (module docstring); these defaults are the classic model, presets.MODEL_2026 upstream's.
    window_pattern: str = "L"  # tiled over the layers, the last always L: S a short window, L the full context
    value_embeds: bool = False
    lambdas: bool = False
    smear: bool = False
    backout: bool = False
    qk_scale: float = 1.0
    rope_base: float = 10000.0
    init: str = "classic"  # or "2026"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} does not divide n_head {self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern {self.window_pattern!r}: expected letters S (short window) and L (full context)")
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r}: expected one of {', '.join(INITS)}")
        if self.qk_scale <= 0 or self.rope_base <= 1:
            raise ValueError(f"qk_scale {self.qk_scale} must be positive and rope_base {self.rope_base} above 1")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def short_window(self):
        """The keys before a query that an S layer's query sees as well: a quarter of the context,
        rounded up to a multiple of 128 (flash attention's tile), at most the context (upstream)."""
        return min(math.ceil(self.sequence_len / 4 / 128) * 128, self.sequence_len)

    @property
    def windows(self):
        """Each layer's window: short_window (S), or None (L: every key before the query; upstream's
        window of sequence_len, which is the same within the training context)."""
        pattern = self.window_pattern
        windows = [self.short_window if pattern[i % len(pattern)] == "S" else None for i in range(self.n_layer)]
        return windows[:-1] + [None]

    @property
    def backout_layer(self):
        """The layer whose output backout takes a share of: the middle one (upstream's n_layer // 2). Below
        3 layers that is the last, whose output backout would only scale before the final norm."""
        return self.n_layer // 2

    @property
    def value_embed_layers(self):
        """The layers with value embeddings: every other one, ending with the last (upstream)."""
        return [i for i in range(self.n_layer) if self.value_embeds and i % 2 == (self.n_layer - 1) % 2]

    @classmethod
    def from_depth(cls, depth, vocab_size, sequence_len, head_dim=128, aspect_ratio=64, n_kv_head=None, **options):
        """nanochat's sizing rule: width = aspect_ratio * depth, rounded up to whole heads of
        head_dim (tiny presets pass a smaller head_dim). n_kv_head defaults to n_head (no GQA).
        `options`: the model options (window_pattern, ..., init), as GPTConfig's fields."""
        n_embd = math.ceil(aspect_ratio * depth / head_dim) * head_dim
        n_head = n_embd // head_dim
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_kv_head or n_head, n_embd=n_embd, **options)


def embedding(num, dim):
    """An nn.Embedding whose weight is left empty for init_weights: its own init, normal_ on the meta
    device, would import torch._dynamo (about a second) into every process that builds a model."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class GPT(nn.Module):
    cap = staticmethod(softcap)  # hook: the soft cap of forward's logits; an instance may set its own
    norm = staticmethod(norm)  # hook: the RMSNorm of the embeddings and of the last hidden states (GPT.use_norms)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.padded_vocab_size = math.ceil(config.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        device = torch.get_default_device()
        with torch.device("meta"):  # skip the layers' own init: the weights depend on init_weights only
            self.transformer = nn.ModuleDict({
                "wte": embedding(self.padded_vocab_size, config.n_embd),
                "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            })
            self.lm_head = nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
            # the options' parameters exist only where the option is on
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict({str(i): embedding(self.padded_vocab_size, kv_dim)
                                               for i in config.value_embed_layers})
            if config.lambdas:
                self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
                self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
            if config.smear:
                self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
                self.smear_lambda = nn.Parameter(torch.empty(1))
            if config.backout:
                self.backout_lambda = nn.Parameter(torch.empty(1))
            # Not saved in checkpoints: rebuilt from the config by init_weights().
            rotary_len = ROTARY_HEADROOM * config.sequence_len
            self.register_buffer("cos", torch.empty(rotary_len, config.head_dim // 2), persistent=False)
            self.register_buffer("sin", torch.empty(rotary_len, config.head_dim // 2), persistent=False)
        self.to_empty(device=device)
        if device.type != "meta":  # nothing to draw there (and normal_ on meta imports torch._dynamo)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: embedding N(0, 1); lm_head N(0, 0.001); the input projections uniform
        with the std of N(0, 1/n_embd) (uniform has no outliers); the output projections of
        attention and MLP zero, so every block starts as the identity. Init "2026" (upstream's now)
        draws the embedding with std 0.8 and the MLP's c_fc within 0.4 times the bound, and starts
        the lambdas on ramps over depth (resid 1.15 -> 1.05, x0 0.20 -> 0.05) where classic starts
        them neutral (1, 0). Either way, drawn after the weights above as upstream draws them: the
        smear gate uniform in [0, 0.02] with smear_lambda 0, backout_lambda 0.2, the value
        embeddings as c_v, their gates uniform in [0, 0.02]."""
        c = self.config
        modern = c.init == "2026"
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8 if modern else 1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3) / math.sqrt(c.n_embd)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                torch.nn.init.uniform_(linear.weight, -bound, bound)
            fc_bound = 0.4 * bound if modern else bound
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -fc_bound, fc_bound)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        if c.lambdas:
            depth = [i / max(c.n_layer - 1, 1) for i in range(c.n_layer)]
            self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * d if modern else 1.0 for d in depth]))
            self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * d if modern else 0.0 for d in depth]))
        if c.smear:
            torch.nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            torch.nn.init.zeros_(self.smear_lambda)
        if c.backout:
            torch.nn.init.constant_(self.backout_lambda, 0.2)
        for embedding in self.value_embeds.values():
            torch.nn.init.uniform_(embedding.weight, -bound, bound)
        for i in c.value_embed_layers:
            torch.nn.init.uniform_(self.transformer.h[i].attn.ve_gate.weight, 0.0, 0.02)
        cos, sin = rotary_tables(self.cos.size(0), c.head_dim, c.rope_base, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, loss_reduction="mean", positions=None):
        """idx: (B, T) token ids. Without targets: the soft-capped logits (B, T, vocab_size), fp32,
        or with `positions` ((B,) a position per row) only those rows' logits there, (B, vocab_size),
        which spares the vocabulary projection of every other position. With targets (B, T; -1 =
        ignore): the cross-entropy in fp32, a scalar ('mean'/'sum') or (B, T) ('none')."""
        B, T = idx.shape
        pos = 0 if kv_cache is None else kv_cache.get_pos()
        cos, sin = self.rotary(pos, T)
        masks = AttentionMasks(pos, None if kv_cache is None else kv_cache.attn_mask)

        x = self.norm(self.transformer.wte(idx))
        if self.config.smear:
            x = self.smear(x, None if kv_cache is None else kv_cache.insert_embedding(x))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            if self.config.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, masks, ve, kv_cache)
            if i == self.config.backout_layer:
                mid = x
        if self.config.backout:
            x = x - self.backout_lambda * mid
        x = self.norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        if targets is None:
            if positions is not None:
                x = x[torch.arange(B, device=x.device), positions]
            return self.head(x)
        w = self.lm_head.weight
        if self.padded_vocab_size != self.config.vocab_size:  # even a full slice would cost a copy in backward
            w = w[:self.config.vocab_size]
        losses = loss.cross_entropy(x.reshape(B * T, -1), w, targets.reshape(B * T), loss_reduction,
                                    loss.chunk_sizes(x.device.type), LOGIT_SOFTCAP)
        return losses.view(B, T) if loss_reduction == "none" else losses

    def head(self, x):
        """The fp32 logits of the last hidden states x: the lm_head's, its padding rows cut, capped by the
        cap hook. A hook too: an instance may set its own (nanochat.cpu's runs lm_head and cap in one pass)."""
        return self.cap(self.lm_head(x)[..., :self.config.vocab_size])  # the cap returns fp32

    def smear(self, x, previous=None):
        """The token embeddings x (B, T, C), each plus the previous token's times smear_lambda *
        sigmoid(a gate of its own first channels). `previous` (B, 1, C): the embedding of the token
        before x[:, 0] (from a KV cache); None: x[:, 0] starts its sequence and takes nothing."""
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        if previous is None:
            return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        return x + gate * torch.cat([previous.to(x.dtype), x[:, :-1]], dim=1)

    def use_norms(self, norm, rotary_norm):
        """The model (in place) with inference forms of its RMSNorms (as nanochat.cpu's): `norm` as the
        norm hook of itself and every block, `rotary_norm` as every attention's rotary_norm hook."""
        for module in self.modules():
            if isinstance(module, (GPT, Block)):
                module.norm = norm
            elif isinstance(module, CausalSelfAttention):
                module.rotary_norm = rotary_norm
        return self

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

    def scaling_params(self):
        """The parameters that the param:data ratio counts, as upstream counts them: the blocks'
        matrices and the lm_head (no embeddings, no scalars)."""
        return sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward), as nanochat and the PaLM paper count them:
        6 per matmul weight (2 forward, 4 backward; every 2-D weight but the embeddings, which are
        lookups), plus 12 * H * D * min(window, T) per layer for the attention scores and the
        weighted sum of values (the causal mask is not discounted)."""
        c = self.config
        embeddings = [self.transformer.wte, *self.value_embeds.values()]
        matmul_params = sum(p.numel() for p in self.parameters() if p.dim() == 2) - sum(e.weight.numel() for e in embeddings)
        keys = sum(c.sequence_len if window is None else min(window, c.sequence_len) for window in c.windows)
        return 6 * matmul_params + 12 * c.n_head * c.head_dim * keys
