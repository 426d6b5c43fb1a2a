"""CPU inference linear layers: every form computes what nn.Linear computes (the oracle), for the
row counts decoding and prefill use; nanochat.cpu picks the form by dtype and CPU, and with
NANOCHAT_CPU_FASTPATHS=0 none (test_apply_picks_the_form_for_the_dtype runs both ways, the one test
here whose result depends on the switch); where nanochat's kernels cannot run or torch's private
oneDNN ops are missing or fail, layers stay nn.Linear with the same logits. The tests of the kernels'
forms need the kernels, and AmxLinear's a CPU with AMX too (a skip outside CI on a machine without
them, a failure under CI)."""

import copy
import logging
import types

import pytest
import torch

from nanochat import cpu, gpt
from nanochat.common import cpu_flags, cpu_has_fast_bf16
from nanochat.cpu import kernels, linears
from nanochat.cpu.linears import AmxLinear, AmxMLP, PackedLinear, PanelLinear
from nanochat.gpt import GPTConfig
from tests.support.cpupaths import kernels_here, panel_weights
from tests.support.stagerun import missing
from tests.test_gpt import random_model

pytest_plugins = ["tests.support.cpupaths"]
FORMS = [PackedLinear, PanelLinear, AmxLinear]


def amx_here():
    """Whether the AMX forms run here: nanochat's kernels loaded on a CPU with AMX. A CPU without it
    (most: every AMD one) has no AMX path to test, under CI too; the caller then ends, and
    test_apply_picks_the_form_for_the_dtype checks that no AMX form is chosen. A CPU with AMX whose
    kernels did not get its tiles is missing() (a skip outside CI, a failure under it)."""
    kernels_here()
    if kernels.has_amx():
        return True
    if kernels.AMX_FLAGS <= cpu_flags():
        missing("this CPU has AMX, but the kernels could not use it (did Linux grant the tiles? see the log)")
    return False


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (8, 64), (3, 5, 64), (8, 1, 64)])
def test_forms_equal_nn_linear(form, shape):
    """Same values and shape as nn.Linear, and the output reshapes as the model reshapes it; AmxLinear
    in bf16, where its values are nn.Linear's (oneDNN's) to the bit; PanelLinear of its weight
    rounded to bf16 (to nearest even: a weight cut short instead would be off by far more than the
    tolerance)."""
    dtype, tolerance = torch.float32, 1e-5
    if form is PanelLinear:
        kernels_here()
    if form is AmxLinear:
        if not amx_here():
            return
        dtype, tolerance = torch.bfloat16, 0
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=False).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.inference_mode():
        expected, got = (panel_weights(linear) if form is PanelLinear else linear)(x), form(linear)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got.reshape(-1, 4, 24), expected.reshape(-1, 4, 24), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("rows", [1, 8, 15, 16, 17, 33, 512])
def test_amx_matmul_equals_torch(rows, kernel_calls):
    """Row counts of decoding and of a prefill (512: 8 prompts of 64), with a block of 16 rows and a
    part of one; an odd number of panels (the last alone), a depth of several tiles; an input with
    strides between its rows; values spread over magnitudes, a NaN spreading over its output row.
    bf16 results equal torch's bf16 linear (both sum in fp32, round to nearest even) to the bit."""
    if not amx_here():
        return
    torch.manual_seed(rows)
    weight = (torch.randn(80, 96) * torch.logspace(-2, 2, 96)).bfloat16()
    x = torch.randn(rows, 128).bfloat16()[:, 16:112]  # rows 128 apart
    x[-1, 5] = float("nan")
    got = kernels.amx_matmul(x, kernels.pack_bf16(weight))
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight), rtol=0, atol=0, equal_nan=True)
    assert got[-1].isnan().all() and not got[:-1].isnan().any()
    assert kernel_calls == {"amx_matmul": 1}


@pytest.mark.parametrize("rows", [*range(1, 14), 1021, 2045])
@pytest.mark.parametrize("in_features", [64, 100])
def test_panel_matmul_equals_float64_matmul(rows, in_features):
    """Every count of rows a tile can leave over, and enough rows to span blocks (1020 rows of 64
    features each) with some left over; a width that is not a multiple of the vector width."""
    kernels_here()
    torch.manual_seed(rows)
    weight, x = torch.randn(48, in_features), torch.randn(rows, in_features)
    expected = (x.double() @ weight.bfloat16().double().T).float()  # of the weight rounded to bf16, in fp32
    torch.testing.assert_close(kernels.panel_matmul(x, kernels.pack(weight)), expected, rtol=1e-5, atol=1e-4)


def test_panel_linear_holds_its_weight_in_half_the_bytes():
    """The panels are the weight in bf16, and the layer keeps no fp32 copy: a served model's linear
    layers take half the memory they took in fp32."""
    kernels_here()
    linear = torch.nn.Linear(64, 32, bias=False)
    panel = PanelLinear(linear)
    assert panel.panels.dtype == torch.bfloat16 and panel.panels.nbytes == linear.weight.nbytes // 2
    assert not any(t.dtype == torch.float32 for t in (*panel.parameters(), *panel.buffers(), *vars(panel).values())
                   if isinstance(t, torch.Tensor))


def test_panel_linear_takes_a_strided_input():
    """An input that is a view with strides (a transpose, a slice) gives nn.Linear's values."""
    kernels_here()
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(64, 10).T[::2]
    with torch.inference_mode():
        torch.testing.assert_close(PanelLinear(linear)(x), panel_weights(linear)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_apply_picks_the_form_for_the_dtype(dtype, fastpaths):
    """Each attention's query, key and value layers become one; fp32 weights go into panels for
    nanochat's kernel where this machine can build it, bf16 ones into AMX panels where the CPU has
    AMX (each MLP an AmxMLP), else are packed for oneDNN where it multiplies bf16 fast, else they
    stay nn.Linear, as they all do with NANOCHAT_CPU_FASTPATHS=0; one form for all, and the logits
    are those of the model before (for panels, of its weights rounded to bf16)."""
    # every weight random (at init the output projections are zero, which would hide the attention)
    model = random_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)).eval()
    ids = torch.randint(0, 300, (2, 7))
    with torch.inference_mode():
        model.to(dtype).fuse_qkv()
        expected = model(ids)
        before = panel_weights(model) if dtype == torch.float32 else None
        cpu.apply(model)
        got = model(ids)
    if not fastpaths:
        wanted = torch.nn.Linear
    elif dtype == torch.float32:
        wanted = PanelLinear if kernels.lacking() is None else torch.nn.Linear
    elif kernels.has_amx():
        wanted = AmxLinear
        assert all(isinstance(block.mlp, AmxMLP) for block in model.transformer.h)
    else:
        wanted = PackedLinear if cpu_has_fast_bf16() else torch.nn.Linear
    assert {type(m) for m in model.modules() if isinstance(m, (torch.nn.Linear, *FORMS))} == {wanted}
    assert all(isinstance(block.attn.c_qkv, wanted) and not hasattr(block.attn, "c_q") for block in model.transformer.h)
    if wanted is PanelLinear:  # of the weights rounded to bf16
        with torch.inference_mode():
            expected = before(ids)
    tolerance = 1e-5 if dtype == torch.float32 else 0.1  # bf16: logits up to 15, where an ulp is 1/16
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("fastpaths", [True], ids=["fastpaths"], indirect=True)  # whatever the switch says outside
def test_layers_the_kernel_cannot_take_stay_nn_linear(fastpaths):
    """Layers whose outputs do not fill whole panels of 16 (width 40: the attention's and MLP's
    output projections) stay nn.Linear beside the panel ones, with the logits of the model whose
    panel layers' weights are rounded to bf16 and whose others are not."""
    kernels_here()
    model = random_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=1, n_embd=40)).eval()
    ids = torch.randint(0, 300, (2, 7))
    with torch.inference_mode():
        expected = panel_weights(model.fuse_qkv())(ids)  # the panels' weights rounded to bf16, c_proj's not
        cpu.apply(model)
        got = model(ids)
    block = model.transformer.h[0]
    assert [type(m) for m in (block.attn.c_qkv, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj, model.lm_head)] == \
        [PanelLinear, torch.nn.Linear, PanelLinear, torch.nn.Linear, PanelLinear]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_amx_mlp_equals_the_models_mlp(kernel_calls):
    """AmxMLP gives the bf16 MLP's output to the bit (c_fc's bf16 output through torch's bf16 relu and
    square, then c_proj) in two kernel calls, the ReLU and square in the first; a NaN input spreads as in torch."""
    if not amx_here():
        return
    torch.manual_seed(0)
    mlp = gpt.MLP(GPTConfig(n_embd=64, n_head=2, n_kv_head=2)).to(torch.bfloat16)
    for linear in (mlp.c_fc, mlp.c_proj):
        torch.nn.init.normal_(linear.weight, std=0.3)
    x = torch.randn(8, 1, 64).bfloat16() * 2
    x[3, 0, 5] = float("nan")
    with torch.inference_mode():
        expected, got = mlp(x), AmxMLP(mlp)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert got[3].isnan().all() and not got[:3].isnan().any()
    assert kernel_calls == {"amx_matmul": 2}


@pytest.mark.parametrize("fastpaths", [True], ids=["fastpaths"], indirect=True)  # whatever the switch says outside
def test_amx_head_equals_the_models_head(fastpaths, kernel_calls):
    """An AmxLinear lm_head gives the model's logits (GPT.head: the bf16 lm_head, its padding rows cut,
    then softcap) in one kernel pass that caps them too (counted: one matmul, no separate cap), for
    decoding's rows and a prefill's; a hidden state that needs a gradient takes the model's own head
    (the lm_head, then the cap hook)."""
    if not amx_here():
        return
    model = random_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=1, n_embd=64)).eval()
    model.to(torch.bfloat16)
    x = torch.randn(8, 3, 64).bfloat16() * 3
    with torch.inference_mode():
        expected = model.head(x)
        cpu.apply(model.fuse_qkv())
        got = [model.head(x[:, -1:]), model.head(x)]
    assert isinstance(model.lm_head, AmxLinear) and got[1].shape == expected.shape == (8, 3, 300)
    torch.testing.assert_close(got[0], expected[:, -1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], expected, rtol=0, atol=1e-5)
    assert kernel_calls == {"amx_matmul": 2}
    trained = x.clone().requires_grad_()
    torch.testing.assert_close(model.head(trained), expected, rtol=0, atol=1e-5)
    assert kernel_calls == {"amx_matmul": 3, "softcap_bf16": 1}  # the lm_head, then the cap hook


@pytest.mark.parametrize("fastpaths", [True], ids=["fastpaths"], indirect=True)  # whatever the switch says outside
def test_bf16_layers_amx_cannot_take_are_packed(fastpaths):
    """Layers whose inputs do not fill whole AMX tiles of 32 features (width 48: the query, key and
    value, the MLP's input and the lm_head) are packed for oneDNN beside the AMX ones, with the
    logits of the model before."""
    if not amx_here():
        return
    model = random_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=1, n_embd=48)).eval()
    ids = torch.randint(0, 300, (2, 7))
    with torch.inference_mode():
        model.to(torch.bfloat16)
        expected = model(ids)
        cpu.apply(model.fuse_qkv())
        got = model(ids)
    block = model.transformer.h[0]
    assert [type(m) for m in (block.attn.c_qkv, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj, model.lm_head)] == \
        [PackedLinear, PackedLinear, PackedLinear, AmxLinear, PackedLinear]
    torch.testing.assert_close(got, expected, rtol=0.1, atol=0.1)  # bf16: logits up to 15, where an ulp is 1/16


def test_without_the_kernels_every_fp32_layer_stays_nn_linear(monkeypatch):
    """On a CPU the kernels cannot run on (here one that lacks AVX2, as the kernels see it), apply
    leaves every fp32 layer nn.Linear, and the logits are those of the model before."""
    monkeypatch.setattr(kernels, "LIBRARY", None)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"sse4_2"})
    model = random_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=1, n_embd=64)).eval()
    ids = torch.randint(0, 300, (2, 7))
    with torch.inference_mode():
        expected = model(ids)
        cpu.apply(model)
        got = model(ids)
    assert kernels.LIBRARY is None and not any(isinstance(m, PanelLinear) for m in model.modules())
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("breakage", ["missing", "raising"])
def test_packing_falls_back_to_nn_linear(breakage, monkeypatch, caplog):
    """Where torch's private oneDNN ops are missing (another torch) or raise, every layer stays
    nn.Linear, the log says so once, and the logits are those of the packed model. In fp32, which
    oneDNN packs on any x86 CPU (bf16 only on some); the fallback does not look at the dtype."""
    model = random_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    model = model.eval().fuse_qkv()
    ids = torch.randint(0, 300, (2, 7))
    with torch.inference_mode():
        packed = linears.packed_or_kept(copy.deepcopy(model))
        assert isinstance(packed.lm_head, PackedLinear)
        expected = packed(ids)

        def fail(*args):
            raise RuntimeError("oneDNN: unsupported on this CPU")

        if breakage == "missing":
            monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())
        else:
            monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", fail)
        with caplog.at_level(logging.WARNING, logger="nanochat"):
            kept = linears.packed_or_kept(model)
        got = kept(ids)
    assert not any(isinstance(m, PackedLinear) for m in kept.modules())
    assert sum("stay nn.Linear" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
