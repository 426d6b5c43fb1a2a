"""A nanochat model with the 2026 options, for Hugging Face transformers (remote code).

Written by `nanochat export` next to the weights; loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Self-contained: torch and
transformers only. The math is nanochat's GPT (nanochat/gpt.py) in transformers' `nanochat`
conventions (its rotary direction, its parameter names), plus the options:
- sliding windows: an S layer's query sees itself and the `short_window` keys before it
- value embeddings: per-token vectors added to the values of every other layer, gated per head
- lambdas: learnable per-layer scales of the residual stream and of the first embedding mixed back in
- smear: each token's embedding takes in the previous token's, gated
- backout: a learnable share of the mid-layer residual taken out before the final norm
- qk_scale: queries and keys scaled after their norm

There is no KV cache (use_cache is false): generation recomputes the whole sequence each step,
which keeps this file independent of transformers' cache API. Padding is not supported.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanochat_ext import NanoChatExtConfig

VE_GATE_CHANNELS = 12  # the value embeddings' gate reads this many channels of the block's input
SMEAR_CHANNELS = 24  # the smear gate reads this many channels of the token's embedding


def rms_norm(x, eps):
    """Parameter-free RMSNorm over the last dimension, computed in fp32."""
    return F.rms_norm(x.float(), (x.size(-1),), eps=eps).type_as(x)


def apply_rotary(x, cos, sin):
    """transformers' nanochat rotary: each pair (x[i], x[i + D/2]) turned by minus its angle."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def layer_windows(config):
    """Each layer's window: short_window for S in the tiled pattern, None (full context) for L and the last layer."""
    pattern = config.window_pattern
    windows = [config.short_window if pattern[i % len(pattern)] == "S" else None for i in range(config.num_hidden_layers)]
    return windows[:-1] + [None]


def value_embed_layers(config):
    """The layers with value embeddings: every other one, ending with the last."""
    n = config.num_hidden_layers
    return [i for i in range(n) if config.value_embeds and i % 2 == (n - 1) % 2]


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.n_head
        self.eps, self.qk_scale = config.rms_norm_eps, config.qk_scale
        self.window = layer_windows(config)[layer_idx]
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)
        if layer_idx in value_embed_layers(config):
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x, cos, sin, ve=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = rms_norm(apply_rotary(q, cos, sin), self.eps), rms_norm(apply_rotary(k, cos, sin), self.eps)
        q, k = q * self.qk_scale, k * self.qk_scale
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS])).transpose(1, 2).unsqueeze(-1)
            v = v + gate * ve.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2).to(v.dtype)
        groups = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if self.window is None or self.window >= T - 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            pos = torch.arange(T, device=x.device)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)).square())


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, ve=None):
        x = x + self.self_attn(rms_norm(x, self.eps), cos, sin, ve)
        return x + self.mlp(rms_norm(x, self.eps))


class NanoChatExtModel(nn.Module):
    """Embeddings and blocks up to the final norm; the options' parameters exist only where on."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        kv_dim = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim) for i in value_embed_layers(config)})
        if config.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))

    def rotary(self, T, device, dtype):
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        angles = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, input_ids):
        c, eps = self.config, self.config.rms_norm_eps
        x = rms_norm(self.embed_tokens(input_ids), eps)
        cos, sin = self.rotary(input_ids.size(1), x.device, x.dtype)
        if c.smear:
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        x0 = x
        for i, layer in enumerate(self.layers):
            if c.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = layer(x, cos, sin, ve)
            if i == c.num_hidden_layers // 2:
                mid = x
        if c.backout:
            x = x - self.backout_lambda * mid
        return rms_norm(x, eps)


class NanoChatExtForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatExtConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.model = NanoChatExtModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        """Logits (B, T, vocab) of input_ids, soft-capped; with labels (-100 = ignore) also the
        next-token loss. Cache and position arguments are accepted and ignored (no KV cache)."""
        if input_ids is None:
            raise ValueError("nanochat_ext takes input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("nanochat_ext does not support padding: pass sequences of equal length")
        logits = self.lm_head(self.model(input_ids))
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """The whole sequence every step (there is no cache to continue from)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
