"""The GPT at toy size: shapes, causality, KV-cache decoding, GQA, parameter count, the fused
loss against F.cross_entropy, and seeded init."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat import gpt
from nanochat.gpt import GPT, GPTConfig, KVCache, softcap

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
    cache = KVCache(CONFIG.n_layer, max_len=24)
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
    masked prefix) equals SDPA computed in fp32, in either dtype's kernel."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = (torch.arange(10) < torch.tensor([10, 4, 7])[:, None])[:, None, None, :] if masked else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = gpt.causal_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


def test_uncapped_logits_are_the_capped_ones_before_the_cap():
    model = random_model()
    idx = tokens()
    capped, raw = model(idx), model(idx, capped=False)
    torch.testing.assert_close(softcap(raw), capped)
    assert (raw - capped).abs().max() > 0.5 and torch.equal(raw.argmax(-1), capped.argmax(-1))


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


@pytest.mark.parametrize("rows_per_chunk", [(14, 4), (7, 7), None], ids=["blocks_in_pieces", "chunked", "one_chunk"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_gradients_equal_cross_entropy_of_the_logits(reduction, rows_per_chunk, monkeypatch):
    if rows_per_chunk:  # 48 tokens in matmul blocks of 14 or 7 rows, softmax pieces of 4 or 7: last ones partial
        monkeypatch.setitem(gpt.LOSS_CHUNK_ELEMENTS, "cpu", tuple(n * CONFIG.vocab_size for n in rows_per_chunk))
    model = random_model()
    idx, targets = tokens(seed=2), tokens(seed=3)
    targets[0, :5] = -1
    targets[1, 17] = -1
    loss = model(idx, targets, loss_reduction=reduction)
    weights = torch.rand(loss.shape)  # a non-uniform upstream gradient for 'none'
    grads = torch.autograd.grad((loss * weights).sum(), list(model.parameters()))

    logits = model(idx)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
    expected = expected.view(2, 24) if reduction == "none" else expected
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(model.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets, loss_reduction=reduction), expected, rtol=1e-5, atol=1e-5)


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
        loss = model(idx, targets)
        loss.backward()
    assert loss.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(loss, model(idx, targets), rtol=0.05, atol=0.05)


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
    cache = KVCache(CONFIG.n_layer, max_len=10 * CONFIG.sequence_len + 1)
    cache.advance(10 * CONFIG.sequence_len)
    with pytest.raises(ValueError, match="rotary"):
        model(tokens(T=1), kv_cache=cache)


def test_softcap_bounds_logits():
    x = torch.tensor([-1e4, -15.0, 0.0, 1.0, 1e4])
    capped = softcap(x)
    assert capped.abs().max() <= 15.0 and capped[2] == 0 and abs(capped[3] - 1.0) < 1e-2
