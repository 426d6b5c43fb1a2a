"""The model options of GPTConfig (upstream nanochat's 2026 model, MODEL_2026) at a context of 512,
where the short window (128) is shorter than the sequence: each option against a reference forward
written here from upstream's formulas; all-full windows equal no windows; an option at its neutral
values equals classic; the window masks against a brute-force rule; cached decoding equal to uncached
with every option on and rows at different positions; the 2026 init; the counts; checkpoints; and
flash attention used only where it runs."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat import checkpoint, flash_attention, inference, loss, storage
from nanochat.engine import CacheView, RowCache
from nanochat.gpt import GPT, AttentionMasks, GPTConfig, causal_attention, reaches_back, window_mask
from nanochat.presets import MODEL_2026
from nanochat.tokenizer import Tokenizer

pytest_plugins = ["tests.support.cpupaths"]

TOKENIZER = Tokenizer({bytes([i]): i for i in range(256)})  # every byte a token, and the special tokens
CLASSIC = GPTConfig(sequence_len=512, vocab_size=TOKENIZER.vocab_size, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
RECIPE = dataclasses.replace(CLASSIC, **MODEL_2026)
# each option alone, at its recipe value
OPTIONS = {name: dataclasses.replace(CLASSIC, **{name: value}) for name, value in MODEL_2026.items()}


def randomized(config, seed=0):
    """A model whose every weight is random (at init the output projections are zero and smear_lambda
    is 0, which would hide attention and the smear): matrices N(0, 0.3), embeddings N(0, 1), the
    scalars moved off their init by N(0, 0.3)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(0.0, 1.0 if "wte" in name or "value_embeds" in name else 0.3)
    return model.eval()


def tokens(B=2, T=512, seed=1):
    return torch.randint(0, CLASSIC.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_logits(model, idx):
    """The model's logits computed from its weights by upstream nanochat's formulas (gpt.py at
    92d63d4), written out: upstream's window sizes, attention as an explicit softmax with every
    query's visible keys picked by their distance. The rotation is nanochat's classic one (upstream
    rotates the other way; the model keeps its checkpoints')."""
    c, w = model.config, dict(model.named_parameters())
    B, T = idx.shape
    H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
    short = -(-c.sequence_len // 4 // 128) * 128
    windows = [short if c.window_pattern[i % len(c.window_pattern)] == "S" else c.sequence_len for i in range(c.n_layer)]
    windows[-1] = c.sequence_len
    angles = torch.arange(T, dtype=torch.float32)[:, None] / c.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (T, 1, D/2): over (B, T, heads, D/2)
    distance = torch.arange(T)[:, None] - torch.arange(T)  # query minus key position

    def rotate(x):
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def rms(x):
        return F.rms_norm(x, (x.size(-1),))

    def linear(x, name):
        return x @ w[name].T

    x = rms(w["transformer.wte.weight"][idx])
    if c.smear:
        gate = w["smear_lambda"] * torch.sigmoid(linear(x[..., :24], "smear_gate.weight"))
        x = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
    x0 = x
    for i in range(c.n_layer):
        layer = f"transformer.h.{i}."
        if c.lambdas:
            x = w["resid_lambdas"][i] * x + w["x0_lambdas"][i] * x0
        h = rms(x)
        q = linear(h, layer + "attn.c_q.weight").view(B, T, H, D)
        k = linear(h, layer + "attn.c_k.weight").view(B, T, Hkv, D)
        v = linear(h, layer + "attn.c_v.weight").view(B, T, Hkv, D)
        if c.value_embeds and i % 2 == (c.n_layer - 1) % 2:
            gate = 3 * torch.sigmoid(linear(h[..., :12], layer + "attn.ve_gate.weight"))
            v = v + gate[..., None] * w[f"value_embeds.{i}.weight"][idx].view(B, T, Hkv, D)
        q, k = rms(rotate(q)) * c.qk_scale, rms(rotate(k)) * c.qk_scale
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
        scores = scores.masked_fill((distance < 0) | (distance > windows[i]), float("-inf"))
        y = torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v).reshape(B, T, H * D)
        x = x + linear(y, layer + "attn.c_proj.weight")
        x = x + linear(F.relu(linear(rms(x), layer + "mlp.c_fc.weight")).square(), layer + "mlp.c_proj.weight")
        if i == c.n_layer // 2:
            mid = x
    if c.backout:
        x = x - w["backout_lambda"] * mid
    logits = linear(rms(x), "lm_head.weight")[..., :c.vocab_size]
    return 15 * torch.tanh(logits / 15)


@pytest.fixture(scope="module")
def recipe_model():
    return randomized(RECIPE)


@pytest.mark.parametrize("config", [CLASSIC, *OPTIONS.values(), RECIPE], ids=["classic", *OPTIONS, "recipe"])
def test_each_option_computes_upstreams_formulas(config):
    """Classic, each option alone and all of them: the logits are the reference's, and each option
    changes them (so the reference computes it too)."""
    model = randomized(config)
    idx = tokens(B=1, T=300)
    with torch.no_grad():
        expected = reference_logits(model, idx)
        torch.testing.assert_close(model(idx), expected, rtol=1e-4, atol=1e-4)
        if dataclasses.replace(config, init="classic") != CLASSIC:  # (the init has no say over random weights)
            classic = copy.copy(model)
            classic.config = CLASSIC
            assert (reference_logits(classic, idx) - expected).abs().max() > 1e-2


def test_full_windows_equal_no_windows():
    """A window that reaches every key is no window: the 128-key short window over 129 positions is
    the model without windows (bit for bit); over 130 the last query loses the first key, and only
    the S layers' outputs change; a window of the whole context masks nothing."""
    windowed, full = randomized(OPTIONS["window_pattern"]), randomized(CLASSIC)
    idx = tokens(T=130)
    with torch.no_grad():
        assert torch.equal(windowed(idx[:, :129]), full(idx[:, :129]))
        a, b = windowed(idx), full(idx)
    assert torch.equal(a[:, :129], b[:, :129]) and (a[:, 129] - b[:, 129]).abs().max() > 1e-3
    q, k, v = torch.randn(3, 2, 4, 512, 16).unbind()
    causal = torch.ones(512, 512, dtype=torch.bool).tril()
    assert torch.equal(window_mask(511, 512, 512), causal) and AttentionMasks().get(511, 512, 512, "cpu") is None
    torch.testing.assert_close(causal_attention(q, k, v, causal), causal_attention(q, k, v))
    all_but_one = causal.clone()
    all_but_one[511, 0] = False
    assert torch.equal(AttentionMasks().get(510, 512, 512, "cpu"), all_but_one)


def test_options_at_neutral_values_equal_classic():
    """From one seed an option's model has classic's weights (the options draw theirs after), and with
    its own parameters at their neutral values (resid 1, x0 0, smear and backout 0, value embeddings
    0) its logits are classic's, bit for bit."""
    classic = randomized(CLASSIC, seed=3)
    idx = tokens(T=200)
    with torch.no_grad():
        expected = classic(idx)
        for name in ("value_embeds", "lambdas", "smear", "backout"):
            torch.manual_seed(3)
            model = GPT(OPTIONS[name])
            state = model.state_dict()
            torch.manual_seed(3)
            assert all(torch.equal(p, state[key]) for key, p in GPT(CLASSIC).state_dict().items()), name
            model.load_state_dict(classic.state_dict(), strict=False)
            for key, p in model.named_parameters():
                if key not in classic.state_dict():
                    p.fill_(1.0 if key == "resid_lambdas" else 0.0)
            assert torch.equal(model(idx), expected), name


def test_window_masks_equal_a_brute_force_rule():
    """A window of N: each query sees itself and the N keys before it. For queries that are the last
    of the keys (a cached prefix before them) and for rows at their own positions (the cache's mask)."""
    for window, Tq, Tk in [(3, 10, 10), (3, 4, 10), (3, 1, 10), (0, 6, 6), (7, 10, 10)]:
        expected = torch.tensor([[0 <= Tk - Tq + i - j <= window for j in range(Tk)] for i in range(Tq)])
        mask = AttentionMasks().get(window, Tq, Tk, "cpu")
        assert torch.equal(expected.tril(Tk - Tq) if mask is None else mask, expected), (window, Tq, Tk)
    pos = torch.tensor([2, 7, 4])
    base = (torch.arange(8) <= pos[:, None])[:, None, None, :]  # as a RowCache decode view has it
    expected = torch.tensor([[0 <= p - j <= 3 for j in range(8)] for p in pos.tolist()])[:, None, None, :]
    assert torch.equal(AttentionMasks(pos, base).get(3, 1, 8, "cpu"), expected)


def test_windows_per_layer():
    """The pattern is tiled over the layers and the last is always full; the short window is a
    quarter of the context rounded up to 128 (upstream's rule), at most the context."""
    assert RECIPE.windows == [128, 128, 128, None]
    assert dataclasses.replace(RECIPE, n_layer=5, window_pattern="SL").windows == [128, None, 128, None, None]
    for sequence_len in (64, 512, 1000, 2048, 2050):
        upstream = -(-sequence_len // 4 // 128) * 128
        assert dataclasses.replace(RECIPE, sequence_len=sequence_len).short_window == min(upstream, sequence_len)
    for field, value in (("window_pattern", "SXL"), ("window_pattern", ""), ("init", "2025")):
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(RECIPE, **{field: value})


def test_compiled_training_step_equals_eager(monkeypatch):
    """What the GPU presets run (`--compile`): torch.compile of the model with every option on, short
    windows shorter than the sequence, traced by dynamo and AOT autograd as on a GPU (the aot_eager
    backend runs the traced graphs with eager kernels: inductor's code generation is the only part
    left out). Loss and gradients equal eager's, the fused loss runs outside the graphs (eagerly), and
    a second step of the same shape does not recompile."""
    traced = []
    chunked = loss.chunked_cross_entropy
    monkeypatch.setattr(loss, "chunked_cross_entropy",
                        lambda *a, **kw: traced.append(torch.compiler.is_compiling()) or chunked(*a, **kw))
    eager = randomized(RECIPE).train()
    compiled = copy.deepcopy(eager)
    idx, targets = tokens(B=1, T=256), tokens(B=1, T=256, seed=2)
    eager(idx, targets).backward()
    step = torch.compile(compiled, backend="aot_eager", dynamic=False)
    value = step(idx, targets)
    value.backward()
    torch.testing.assert_close(value, eager(idx, targets).detach(), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch._dynamo.config.patch(error_on_recompile=True):  # (monkeypatch's undo would delete the setting)
        step(tokens(B=1, T=256, seed=3), targets).backward()
    assert traced == [False] * 4  # eager twice (the second computing the expected loss), compiled twice


def test_a_compiled_model_without_flash_attention_attends_through_windows_with_flex(monkeypatch):
    """On a GPU without flash attention, a compiled model's windowed layers, and only they, attend
    through FlexAttention with their block masks; the CPU stands in for the GPU here, forward only
    (torch 2.13 has no FlexAttention backward on a CPU: bench/gpu_check.py compares the gradients on a
    GPU). The loss equals the eager model's, whose windows are SDPA masks."""
    blocks, flex = [], flash_attention.flex
    monkeypatch.setattr(flash_attention, "FLEX_DEVICES", ("cpu",))
    monkeypatch.setattr(flash_attention, "flex", lambda q, k, v, block: blocks.append(block) or flex(q, k, v, block))
    model, idx, targets = randomized(RECIPE), tokens(B=1, T=256), tokens(B=1, T=256, seed=2)
    with torch.no_grad():
        expected = model(idx, targets)
        assert blocks == []  # eager: SDPA
        value = torch.compile(model, backend="aot_eager", dynamic=False)(idx, targets)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    windowed = [w for w in RECIPE.windows if not reaches_back(w, 256)]
    assert len(blocks) == len(windowed) == 3 and all(block.shape[-2:] == (256, 256) for block in blocks)


# the largest difference allowed, and a fifth of it on average: bf16 rounds each of q, k, v to 8 bits, which moves
# these logits by 0.02 on average and at most 0.2; a window of the wrong size, by 0.5 on average
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.5)], ids=["fp32", "bf16"])
def test_cached_decoding_equals_uncached(recipe_model, fastpaths, dtype, tolerance):
    """Every option on, the model in its serving form (nanochat.cpu's fast paths, or with
    NANOCHAT_CPU_FASTPATHS=0 torch's ops), driven through RowCache and its views as the engine drives
    them: a padded prefill of prompts of different lengths, a row copied to another slot, rows
    decoding at their own positions past the short window, a row leaving and the last one moved
    into its slot, then a lone row (one position: no cache mask) fed a token, then five at once. The
    logits at each step are those of the uncached forward of the whole sequence."""
    model = copy.deepcopy(recipe_model).to(dtype)
    inference.prepare(model)
    sequences, lengths = tokens(B=3, T=300), [150, 40, 220]
    cache = RowCache(model.config, rows=4, max_len=300, dtype=dtype, device="cpu")
    with torch.inference_mode():
        expected = model(sequences)

        def check(logits, rows, positions):
            difference = (logits - expected[rows, positions]).abs()
            assert difference.max() < tolerance and difference.mean() < tolerance / 5, (difference.max(), difference.mean())

        prompts = torch.stack([torch.cat([s[:n], torch.zeros(220 - n, dtype=torch.long)]) for s, n in zip(sequences, lengths)])
        logits = model(prompts, kv_cache=cache.prefill(0, 3), positions=torch.tensor(lengths) - 1)
        check(logits, [0, 1, 2], [n - 1 for n in lengths])
        cache.lengths[:3] = lengths
        cache.copy(0, 3)
        rows = [0, 1, 2, 0]  # the sequence each slot decodes
        for step in range(30):
            if step == 15:  # slot 1's row finishes; the last row moves into its slot
                cache.copy(3, 1)
                rows = rows[:1] + rows[3:] + rows[2:3]
            positions = cache.lengths[:len(rows)]
            check(model(sequences[rows, positions][:, None], kv_cache=cache.decode(len(rows)))[:, -1], rows, positions)
        position = cache.lengths[0]
        check(model(sequences[:1, position:position + 1], kv_cache=cache.decode(1))[:, -1], [0], [position])
        view = CacheView(cache, slice(0, 1), position + 1)
        check(model(sequences[:1, position + 1:position + 6], kv_cache=view)[0], 0, list(range(position + 1, position + 6)))


def test_init_2026():
    """Upstream's init: embedding std 0.8, c_fc within 0.4 of the bound, the lambdas on their ramps,
    smear_lambda 0 and backout_lambda 0.2, the gates in [0, 0.02], the value embeddings as c_v; with
    the classic init the lambdas start neutral."""
    config = dataclasses.replace(RECIPE, n_embd=256, n_head=2, n_kv_head=2)
    torch.manual_seed(0)
    model = GPT(config)
    bound = math.sqrt(3 / config.n_embd)
    assert abs(model.transformer.wte.weight.std() - 0.8) < 0.01
    for block in model.transformer.h:
        assert 0.38 * bound < block.mlp.c_fc.weight.abs().max() <= 0.4 * bound
        assert 0.95 * bound < block.attn.c_q.weight.abs().max() <= bound
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    gates = [model.smear_gate.weight, *(model.transformer.h[i].attn.ve_gate.weight for i in (1, 3))]
    assert all(0 <= g.min() and g.max() <= 0.02 for g in gates)
    assert all(0.95 * bound < e.weight.abs().max() <= bound for e in model.value_embeds.values())
    classic_init = GPT(dataclasses.replace(config, init="classic"))
    assert torch.equal(classic_init.resid_lambdas, torch.ones(4)) and torch.equal(classic_init.x0_lambdas, torch.zeros(4))
    assert abs(classic_init.transformer.wte.weight.std() - 1.0) < 0.01


def test_parameter_names_and_counts():
    """The options' parameters, by the names the optimizer groups them by, exist only with their
    option; scaling_params counts the blocks' matrices and the lm_head; estimate_flops every 2-D
    weight but the embeddings, and each layer's attention over min(window, context)."""
    model = GPT(RECIPE)
    C, V, D, kv = RECIPE.n_embd, model.padded_vocab_size, RECIPE.head_dim, RECIPE.n_kv_head * RECIPE.head_dim
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    classic_shapes = {name: tuple(p.shape) for name, p in GPT(CLASSIC).named_parameters()}
    assert {name: shape for name, shape in shapes.items() if name not in classic_shapes} == {
        "value_embeds.1.weight": (V, kv), "value_embeds.3.weight": (V, kv),
        "transformer.h.1.attn.ve_gate.weight": (2, 12), "transformer.h.3.attn.ve_gate.weight": (2, 12),
        "resid_lambdas": (4,), "x0_lambdas": (4,), "smear_gate.weight": (1, 24), "smear_lambda": (1,),
        "backout_lambda": (1,)}
    assert classic_shapes.items() <= shapes.items()
    per_layer = 2 * C * C + 2 * C * kv + 8 * C * C
    blocks = 4 * per_layer + 2 * 2 * 12
    assert model.scaling_params() == blocks + V * C
    assert model.estimate_flops() == 6 * (blocks + V * C + 24) + 12 * RECIPE.n_head * D * (3 * 128 + 512)
    assert GPT(CLASSIC).scaling_params() == GPT(CLASSIC).num_params() - V * C


@pytest.mark.parametrize("config", [CLASSIC, RECIPE], ids=["classic-before-the-options", "recipe"])
def test_checkpoints_record_the_options(tmp_path, config):
    """A checkpoint records the options and loads with identical logits; one written before the
    options existed (its config without them) loads as the classic model."""
    model = randomized(config)
    saved = dataclasses.asdict(config)
    if config == CLASSIC:
        saved = {k: v for k, v in saved.items() if k not in MODEL_2026}
    tokenizer_uri = TOKENIZER.save(storage.normalize(str(tmp_path / "tokenizer")))["tokenizer"]
    target = checkpoint.save(storage.normalize(str(tmp_path / "ckpt")), 1, model.state_dict(), {},
                             {"model_config": saved, "tokenizer": tokenizer_uri})
    loaded, _, meta = checkpoint.load_model(target)
    idx = tokens(T=200)
    assert loaded.config == config
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
        torch.testing.assert_close(loaded(idx), reference_logits(model, idx), rtol=1e-4, atol=1e-4)


def test_flash_attention_only_where_it_runs(monkeypatch):
    """With flash attention "installed" (a stand-in computing flash_attn_func's documented result),
    the model on CPU attends with SDPA, in fp32 and bf16; and what the model hands flash attention
    (its layout, the window as window_size) gives what its SDPA path computes."""
    calls = []

    def flash_attn_func(q, k, v, causal, window_size):  # (B, T, heads, D); causal aligned to the last key
        calls.append(window_size)
        Tq, Tk, left = q.size(1), k.size(1), window_size[0]
        distance = torch.arange(Tk - Tq, Tk)[:, None] - torch.arange(Tk)
        group = q.size(2) // k.size(2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(group, dim=2)) / math.sqrt(q.size(-1))
        scores = scores.masked_fill((distance < 0) | ((left >= 0) & (distance > left)), float("-inf"))
        return torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v.repeat_interleave(group, dim=2))

    monkeypatch.setattr(flash_attention, "fa2", flash_attn_func)
    monkeypatch.setattr(flash_attention, "fa3", flash_attn_func)
    model, idx = randomized(RECIPE), tokens(T=200)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            model.to(dtype)(idx)
        assert flash_attention.kernel(*(torch.zeros(1, 1, 1, 2, dtype=dtype),) * 3) is None
    assert calls == []
    q, k, v = torch.randn(2, 4, 20, 16), torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    for window in (None, 5):
        for Tq in (20, 3):
            got = flash_attention.attention(flash_attn_func, q[:, :, -Tq:], k, v, window)
            expected = causal_attention(q[:, :, -Tq:], k, v, AttentionMasks().get(window, Tq, 20, "cpu"))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls == [(-1, 0), (-1, 0), (5, 0), (5, 0)]
