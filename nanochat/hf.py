"""Our GPT <-> Hugging Face transformers' `nanochat` model: parameter names, the rotary convention,
config.json and generation_config.json's sampling fields, both ways. Plain tensors and dicts; transformers itself is never imported.

transformers' `nanochat` type (5.0+) is our classic model under other names, with one difference
of convention: its rotary embedding turns each pair (x[i], x[i + D/2]) by the opposite angle to
ours. Negating the second half of every query and key head's rows of c_q and c_k (`flip_rotary`)
makes the two forwards equal: RMSNorm and qk_scale commute with the sign flip, and in q.k the
flipped halves meet each other. The flip is its own inverse, so export and import share it.

A model with the 2026 options (sliding windows, value embeddings, lambdas, smear, backout,
qk_scale) has no native transformers type: it is exported as `nanochat_ext`, whose modeling code
(nanochat/hf_remote) travels with the model and uses the names of REMOTE_KEYS.
"""

import torch

from nanochat.common import log
from nanochat.gpt import GPT, LOGIT_SOFTCAP, GPTConfig

NATIVE_TYPE = "nanochat"
REMOTE_TYPE = "nanochat_ext"
REMOTE_FILES = ("configuration_nanochat_ext.py", "modeling_nanochat_ext.py")
REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_nanochat_ext.NanoChatExtConfig",
    "AutoModelForCausalLM": "modeling_nanochat_ext.NanoChatExtForCausalLM",
}
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # our parameter-free RMSNorm's eps in fp32 (F.rms_norm's default)
MAX_RMS_NORM_EPS = 1e-5  # an imported model normalized with a larger eps would differ from ours noticeably
# Substring renames, ours -> transformers, applied in order to every parameter name.
RENAMES = [
    ("transformer.wte.", "model.embed_tokens."),
    ("transformer.h.", "model.layers."),
    (".attn.c_q.", ".self_attn.q_proj."),
    (".attn.c_k.", ".self_attn.k_proj."),
    (".attn.c_v.", ".self_attn.v_proj."),
    (".attn.c_proj.", ".self_attn.o_proj."),
    (".attn.ve_gate.", ".self_attn.ve_gate."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
]
# The 2026 options' parameters sit under the remote model's `model.` like the blocks.
REMOTE_KEYS = ("value_embeds.", "resid_lambdas", "x0_lambdas", "smear_gate.", "smear_lambda", "backout_lambda")
REMOTE_OPTIONS = ("window_pattern", "value_embeds", "lambdas", "smear", "backout", "qk_scale", "init")
# The transformers `nanochat` config fields that describe our architecture, with the only values
# we can run; import refuses any other value, naming the field.
FIXED = {"hidden_act": "relu2", "final_logit_softcapping": LOGIT_SOFTCAP, "attention_bias": False}

# generation_config.json's sampling fields: ours (chat.GENERATION's) -> transformers'. The frequency
# penalty has no transformers equivalent (repetition_penalty is multiplicative).
GENERATION_FIELDS = {"temperature": "temperature", "top_k": "top_k", "max_tokens": "max_new_tokens"}

class ConversionError(ValueError):
    """A transformers model that our GPT cannot represent exactly; the message names the field or key."""


def flip_rotary(weight, n_heads, head_dim):
    """A copy of a c_q/c_k weight (n_heads * head_dim, C) with the second half of every head's rows
    negated: converts between our rotary convention and upstream's/transformers' (either way)."""
    sign = torch.ones(n_heads, head_dim, 1, dtype=weight.dtype, device=weight.device)
    sign[:, head_dim // 2:] = -1
    return (weight.reshape(n_heads, head_dim, -1) * sign).reshape(weight.shape)


def native(config):
    """Whether transformers' own `nanochat` type runs this model (the classic architecture, any
    rope_base): else the export needs the remote code."""
    no_windows = all(window is None for window in config.windows)
    options = config.value_embeds or config.lambdas or config.smear or config.backout
    return no_windows and not options and config.qk_scale == 1.0


def shapes(config):
    """Our state dict's keys and shapes for GPT(config), without allocating it."""
    with torch.device("meta"):
        model = GPT(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def hf_key(key):
    """transformers' name of one of our parameters."""
    if key.startswith(REMOTE_KEYS):
        return "model." + key
    for ours, theirs in RENAMES:
        key = key.replace(ours, theirs)
    return key


def is_vocab(key):
    """Parameters with a row per token (padded to gpt.VOCAB_MULTIPLE in our model; exactly the
    vocabulary in transformers and in upstream's older checkpoints)."""
    return key in ("transformer.wte.weight", "lm_head.weight") or key.startswith("value_embeds.")


def pad_vocab(tensor, rows):
    """A vocabulary tensor with zero rows appended up to `rows` (its shape in `shapes(config)`)."""
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.size(0), *tensor.shape[1:])])


def flip_qk(key, tensor, config):
    """Parameter `key`'s tensor in the other rotary convention: flip_rotary for c_q and c_k, else as it is."""
    if key.endswith(".attn.c_q.weight"):
        return flip_rotary(tensor, config.n_head, config.head_dim)
    if key.endswith(".attn.c_k.weight"):
        return flip_rotary(tensor, config.n_kv_head, config.head_dim)
    return tensor


def export_state(model_state, config, dtype=None):
    """transformers' state dict of our model's: renamed, vocabulary rows cut to config.vocab_size
    (the padding rows are untrained and have no token), q/k flipped to transformers' rotary, each
    tensor its own contiguous copy (safetensors refuses shared storage), cast to `dtype` if given."""
    expected = shapes(config)
    if set(model_state) != set(expected):
        extra, missing = sorted(set(model_state) - set(expected)), sorted(set(expected) - set(model_state))
        raise ConversionError(f"model state does not match its config: unexpected {extra[:4]}, missing {missing[:4]}")
    out = {}
    for key, tensor in model_state.items():
        tensor = tensor.detach()
        if is_vocab(key):
            tensor = tensor[:config.vocab_size]
        tensor = flip_qk(key, tensor, config)
        out[hf_key(key)] = tensor.to(dtype or tensor.dtype).contiguous().clone()
    return out


def hf_config(config, tokenizer, dtype=torch.float32):
    """config.json (a dict) for our model: transformers' `nanochat` fields, all of them written
    (its defaults are not one consistent model); for a non-native model also the options, the
    remote type and its auto_map. bos is <|bos|>; eos and pad are <|assistant_end|> (the end of a
    chat turn). Only fields transformers declares go in a native config: provenance lives elsewhere."""
    out = {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": NATIVE_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
        "rms_norm_eps": RMS_NORM_EPS,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": tokenizer.special_ids["<|bos|>"],
        "eos_token_id": tokenizer.special_ids["<|assistant_end|>"],
        "pad_token_id": tokenizer.special_ids["<|assistant_end|>"],
        "dtype": str(dtype).removeprefix("torch."),
        **FIXED,
    }
    if not native(config):
        out.update({
            "architectures": ["NanoChatExtForCausalLM"],
            "model_type": REMOTE_TYPE,
            "auto_map": dict(REMOTE_AUTO_MAP),
            "use_cache": False,  # the remote model recomputes the whole sequence each step (no KV cache)
            "short_window": config.short_window,
            **{name: getattr(config, name) for name in REMOTE_OPTIONS},
        })
    return out


def _rope_theta(cfg):
    """rope_theta of a transformers config (rope_parameters, or the legacy top-level rope_theta)."""
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ConversionError(f"config.json: rope_parameters {rope or cfg.get('rope_scaling')}: only plain rotary "
                              "(rope_type 'default') is supported")
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def import_config(cfg, vocab_size):
    """Our GPTConfig of a transformers `nanochat` (or exported `nanochat_ext`) config.json dict,
    for a tokenizer of `vocab_size` tokens; raises ConversionError naming the first field we cannot
    represent exactly."""
    model_type = cfg.get("model_type")
    if model_type not in (NATIVE_TYPE, REMOTE_TYPE):
        raise ConversionError(f"config.json: model_type {model_type!r}, expected {NATIVE_TYPE!r} or {REMOTE_TYPE!r}")
    for field, value in FIXED.items():
        if cfg.get(field, value) != value:
            raise ConversionError(f"config.json: {field} {cfg[field]!r}, expected {value!r} (our architecture)")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "vocab_size"):
        if not isinstance(cfg.get(field), int) or cfg[field] <= 0:
            raise ConversionError(f"config.json: {field} must be a positive integer, got {cfg.get(field)!r}")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("intermediate_size") != 4 * hidden:
        raise ConversionError(f"config.json: intermediate_size {cfg.get('intermediate_size')!r}, expected 4 * hidden_size = {4 * hidden}")
    if hidden % heads or cfg.get("head_dim", hidden // heads) != hidden // heads:
        raise ConversionError(f"config.json: head_dim must be hidden_size / num_attention_heads ({hidden} / {heads})")
    if cfg["vocab_size"] < vocab_size:
        raise ConversionError(f"config.json: vocab_size {cfg['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    eps = cfg.get("rms_norm_eps", 1e-6)
    if eps > MAX_RMS_NORM_EPS:
        log.warning("config.json: rms_norm_eps %g; our RMSNorm uses %g, so outputs will differ slightly", eps, RMS_NORM_EPS)
    options = {}
    if model_type == REMOTE_TYPE:
        missing = [name for name in REMOTE_OPTIONS if name not in cfg]
        if missing:
            raise ConversionError(f"config.json: {REMOTE_TYPE} without {', '.join(missing)}")
        options = {name: cfg[name] for name in REMOTE_OPTIONS}
    try:
        config = GPTConfig(sequence_len=cfg["max_position_embeddings"], vocab_size=vocab_size,
                           n_layer=cfg["num_hidden_layers"], n_head=heads,
                           n_kv_head=cfg.get("num_key_value_heads") or heads, n_embd=hidden,
                           rope_base=_rope_theta(cfg), **options)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"config.json: {e}") from None
    if model_type == REMOTE_TYPE and cfg.get("short_window", config.short_window) != config.short_window:
        raise ConversionError(f"config.json: short_window {cfg['short_window']}, expected {config.short_window} "
                              "(a quarter of max_position_embeddings, rounded up to 128)")
    return config


def import_state(hf_state, hf_config_dict, vocab_size):
    """(GPTConfig, our state dict) of a transformers model, for loading with
    `GPT(config).load_state_dict(state)` (strict).

    hf_state: transformers' tensors by name, as in its model.safetensors (any float dtype);
    hf_config_dict: its config.json as a dict (model_type `nanochat`, or `nanochat_ext` as we export);
    vocab_size: the tokenizer's size, which becomes config.vocab_size (the model may have more rows:
    they are dropped). The state comes back in fp32, q/k converted to our rotary, vocabulary rows
    zero-padded to our multiple of 64; with tie_word_embeddings the lm_head is the embedding's copy.
    Raises ConversionError naming the config field or tensor that does not fit (unknown, missing or
    misshapen tensors, values of FIXED fields other than ours, non-default rope, ...)."""
    config = import_config(hf_config_dict, vocab_size)
    hf_state = dict(hf_state)
    if hf_config_dict.get("tie_word_embeddings"):
        hf_state.setdefault("lm_head.weight", hf_state.get("model.embed_tokens.weight"))
    expected = shapes(config)
    by_hf = {hf_key(key): key for key in expected}
    unknown = sorted(set(hf_state) - set(by_hf))
    missing = sorted(name for name in by_hf if hf_state.get(name) is None)
    if unknown or missing:
        raise ConversionError(f"model weights: unknown tensors {unknown[:4]}, missing {missing[:4]} "
                              f"(a {hf_config_dict['model_type']} model of this config.json has exactly {len(by_hf)})")
    state = {}
    for name, key in by_hf.items():
        tensor = hf_state[name].detach().to(torch.float32)
        if is_vocab(key):
            if tensor.dim() != 2 or tensor.size(0) < vocab_size:
                raise ConversionError(f"model weights: {name} {tuple(tensor.shape)}: fewer rows than the {vocab_size} tokens")
            tensor = pad_vocab(tensor[:vocab_size], expected[key][0])
        if tuple(tensor.shape) != expected[key]:
            raise ConversionError(f"model weights: {name} has shape {tuple(tensor.shape)}, config.json implies {expected[key]}")
        state[key] = flip_qk(key, tensor, config).contiguous().clone()
    return config, state


def export_generation(generation):
    """generation_config.json's sampling fields of our generation config (chat.GENERATION's fields):
    temperature 0 is greedy (no sampling), and top_k None (every token) is transformers' 0."""
    out = {theirs: generation[ours] for ours, theirs in GENERATION_FIELDS.items()}
    return {**out, "top_k": out["top_k"] or 0, "do_sample": generation["temperature"] > 0}


def import_generation(theirs):
    """The fields of our generation config that a generation_config.json (a dict) gives, unchecked
    (chat.generation_config checks them); transformers' top_k 0 is every token (None), and do_sample
    false is greedy decoding (transformers' generate ignores the temperature then): temperature 0."""
    given = {ours: theirs[name] for ours, name in GENERATION_FIELDS.items() if theirs.get(name) is not None}
    if given.get("top_k") == 0:
        given["top_k"] = None
    if theirs.get("do_sample") is False:
        given["temperature"] = 0.0
    return given
