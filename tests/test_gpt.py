"""The GPT at toy size: shapes, causality, KV-cache decoding, GQA, the hooks, parameter count and
seeded init. (Its fused loss: test_fused_loss.py.)"""

import math

import pytest
import torch
import torch.nn.functional as F

from bench.reference import PlainKVCache
from nanochat import gpt
from nanochat.gpt import GPT, GPTConfig, softcap

CONFIG = GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def random_model(config=CONFIG, seed=0):
    """A model whose every weight is random: at init the output projections are zero, which would
    make every block the identity and hide attention from these tests."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.ndim == 2 and p is not model.transformer.wte.weight else 1.0)
    return model


def tokens(B=2, T=24, seed=1, vocab=CONFIG.vocab_size):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_padded_vocab():
    model = random_model()
    assert model.padded_vocab_size == 128
    assert model.lm_head.weight.shape == (128, 64) and model.transformer.wte.weight.shape == (128, 64)
    idx = tokens()
    logits = model(idx)
    assert logits.shape == (2, 24, 100) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft-capped
    assert model(idx, idx).shape == ()
    assert model(idx, idx, loss_reduction="none").shape == (2, 24)


def test_logits_at_positions_are_those_of_the_full_forward():
    model = random_model()
    idx = tokens(B=3)
    positions = torch.tensor([0, 23, 7])
    full = model(idx)
    torch.testing.assert_close(model(idx, positions=positions), full[torch.arange(3), positions])


def test_future_tokens_do_not_change_past_logits():
    model = random_model()
    idx = tokens()
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % CONFIG.vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize("prefill", [1, 10, 24])
def test_kv_cache_decoding_equals_full_forward(prefill):
    model = random_model()
    idx = tokens()
    full = model(idx)
    cache = PlainKVCache(CONFIG.n_layer, max_len=24)
    parts = [model(idx[:, :prefill], kv_cache=cache)]
    # the rest in a multi-token step (a cached prefix plus a causal block), then one token at a time
    if prefill < 20:
        parts.append(model(idx[:, prefill:20], kv_cache=cache))
    parts += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(max(prefill, 20), 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.get_pos() == 24
    with pytest.raises(ValueError, match="holds 24 positions"):
        model(idx[:, :1], kv_cache=cache)


def test_gqa_equals_attention_with_repeated_kv_heads():
    gqa = random_model()
    mha = GPT(GPTConfig(**{**CONFIG.__dict__, "n_kv_head": CONFIG.n_head}))
    state = gqa.state_dict()
    group = CONFIG.n_head // CONFIG.n_kv_head
    for i in range(CONFIG.n_layer):
        for name in ("c_k", "c_v"):
            key = f"transformer.h.{i}.attn.{name}.weight"
            heads = state[key].view(CONFIG.n_kv_head, CONFIG.head_dim, CONFIG.n_embd)
            state[key] = heads.repeat_interleave(group, dim=0).reshape(-1, CONFIG.n_embd)
    mha.load_state_dict(state)
    idx = tokens()
    torch.testing.assert_close(mha(idx), gqa(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_equals_sdpa_in_fp32(dtype, masked):
    """Decoding's attention of one query per row (grouped heads; each row seeing all its keys or a
    masked prefix) equals SDPA computed in fp32, in either dtype."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = (torch.arange(10) < torch.tensor([10, 4, 7])[:, None])[:, None, None, :] if masked else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = gpt.causal_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 rounds q, k, v to 8 significant bits (4e-3 each)
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


def test_queries_and_keys_keep_their_dtype_where_autocast_norms_in_fp32(monkeypatch):
    """CUDA autocast computes rms_norm in fp32 (torch has an AutocastCUDA kernel for it and no
    AutocastCPU one, so CPU autocast cannot show it): the rotary and QK-norm still give bf16 queries
    and keys, the values' dtype, as flash attention needs. Here F.rms_norm upcasts as that kernel does."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::rms_norm", "AutocastCUDA")
    rms_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda x, shape, *args: rms_norm(x.float(), shape, *args))
    x = torch.randn(2, 4, 8, 16).bfloat16()
    cos, sin = gpt.rotary_tables(8, 16, 10000.0)
    normed = gpt.rotary_norm(x, cos, sin)
    assert normed.dtype == torch.bfloat16
    assert torch.equal(normed, rms_norm(gpt.apply_rotary(x, cos, sin).float(), (16,)).bfloat16())


def test_the_cap_hook_is_what_forward_calls():
    """The logits are the cap hook's result on the lm_head's output (by default softcap): an
    instance's own cap takes the place of the class's."""
    model = random_model()
    idx = tokens()
    capped = model(idx)
    model.cap = lambda logits: logits
    raw = model(idx)
    torch.testing.assert_close(softcap(raw), capped)
    assert (raw - capped).abs().max() > 0.5
    assert GPT.cap is softcap


def test_parameter_count_and_flops():
    model = GPT(CONFIG)
    C, D, V = CONFIG.n_embd, CONFIG.head_dim, model.padded_vocab_size
    attention = C * CONFIG.n_head * D * 2 + C * CONFIG.n_kv_head * D * 2
    per_layer = attention + 8 * C * C
    assert model.num_params() == 2 * V * C + CONFIG.n_layer * per_layer
    attention_flops = 12 * CONFIG.n_layer * CONFIG.n_head * D * CONFIG.sequence_len
    assert model.estimate_flops() == 6 * (V * C + CONFIG.n_layer * per_layer) + attention_flops


@pytest.mark.parametrize("depth,head_dim,width,heads", [(4, 128, 256, 2), (20, 128, 1280, 10), (3, 128, 256, 2),
                                                        (2, 64, 128, 2), (26, 128, 1664, 13)])
def test_shape_from_depth(depth, head_dim, width, heads):
    config = GPTConfig.from_depth(depth, 65536, 2048, head_dim=head_dim)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (depth, width, heads, heads)


def test_init_is_deterministic_and_as_nanochat():
    torch.manual_seed(7)
    a = GPT(CONFIG)
    torch.manual_seed(7)
    with torch.device("meta"):
        b = GPT(CONFIG)
    b.to_empty(device="cpu")
    b.init_weights()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    torch.testing.assert_close(a.cos, b.cos)
    torch.manual_seed(8)
    assert not torch.equal(GPT(CONFIG).lm_head.weight, a.lm_head.weight)

    block = a.transformer.h[0]
    assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
    assert a.lm_head.weight.std() < 0.002
    assert block.attn.c_q.weight.abs().max() <= math.sqrt(3 / CONFIG.n_embd)
    assert abs(a.transformer.wte.weight.std() - 1.0) < 0.05


def test_rotary_positions_beyond_the_tables_are_refused():
    model = GPT(CONFIG)
    cache = PlainKVCache(CONFIG.n_layer, max_len=10 * CONFIG.sequence_len + 1)
    cache.advance(10 * CONFIG.sequence_len)
    with pytest.raises(ValueError, match="rotary"):
        model(tokens(T=1), kv_cache=cache)


def test_softcap_bounds_logits():
    x = torch.tensor([-1e4, -15.0, 0.0, 1.0, 1e4])
    capped = softcap(x)
    assert capped.abs().max() <= 15.0 and capped[2] == 0 and abs(capped[3] - 1.0) < 1e-2
    torch.testing.assert_close(capped, 15 * torch.tanh(x / 15))
