"""nanochat.cpu's ops: the RMSNorms, the soft cap and sampling's passes equal the torch functions
they stand in for (the oracles), the kernel counted as it runs (a machine without the kernels skips
those tests outside CI and fails them under it); the build: compiled once per source version into
the cache and reused, only when asked (never by a check on the hot path); a compiler that fails or
is missing, or a CPU without AVX2, turns the kernels off with the reason in the log, leaving no
file. (The matmul is checked against torch in test_linears.py.)"""

import logging
import os

import pytest
import torch

from nanochat import engine, gpt
from nanochat.cpu import kernels, ops
from tests.support.cpupaths import needs_kernels

pytest_plugins = ["tests.support.cpupaths"]
CAN_BUILD = {"avx2", "fma"}  # a CPU the kernels build for, whatever runs the test


def logits(rows, n, seed=0, dtype=torch.float32):
    """Logits as the engine sees them: rows of a wider buffer (a padded vocabulary sliced back), with
    values far beyond the cap, -inf, and a width that leaves a tail after the 8-float vectors."""
    torch.manual_seed(seed)
    x = torch.randn(rows, n + 5) * 20
    x[:, 3], x[0, -7], x[-1, 1] = float("-inf"), 1e6, -1e6
    return x.to(dtype)[:, :n]


@pytest.mark.parametrize("rows,n", [(1, 65536), (8, 65536), (3, 1003), (5, 7)])
def test_softcap_equals_torch(rows, n, kernel_calls):
    """fp32 logits capped in place; bf16 ones (as a bf16 lm_head gives them) into new fp32 logits (on a
    CPU with AVX-512 by avx512.c's cap, 16 lanes at a time with a masked tail)."""
    x = logits(rows, n)
    got = ops.softcap(x)
    assert got.data_ptr() == x.data_ptr()  # in place
    torch.testing.assert_close(got, gpt.softcap(logits(rows, n)), rtol=0, atol=1e-5)
    model_shaped = logits(rows, n)[:, None]  # the model's (B, T, vocab) logits
    torch.testing.assert_close(ops.softcap(model_shaped), gpt.softcap(logits(rows, n)[:, None]), rtol=0, atol=1e-5)
    bf16 = logits(rows, n, dtype=torch.bfloat16)[:, None]
    got = ops.softcap(bf16)
    assert got.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got, gpt.softcap(bf16), rtol=0, atol=1e-5)
    assert kernel_calls == {"softcap": 2, "softcap_bf16": 1}


def test_the_avx2_bf16_cap_equals_torch(kernel_calls):
    """The bf16 cap's AVX2 form, which a CPU without AVX-512 takes (softcap_bf16 picks it in C, so it
    is called by name here), in a vector and in the tail, NaN included."""
    x = logits(3, 1003, dtype=torch.bfloat16)
    x[0, 5], x[2, 1001] = float("nan"), float("nan")
    out = torch.empty(x.shape)
    kernels.LIBRARY.softcap_bf16_avx2(x.data_ptr(), 3, 1003, x.stride(0), out.data_ptr(), gpt.LOGIT_SOFTCAP, 1)
    torch.testing.assert_close(out, gpt.softcap(x), rtol=0, atol=1e-5, equal_nan=True)
    assert kernel_calls == {"softcap_bf16_avx2": 1}


def test_softcap_keeps_nan(kernel_calls):
    """A NaN logit (a broken weight) stays NaN through the cap, in a vector and in the tail, as in
    torch: clamping it to a finite number would hide the fault from every check after it."""
    x = logits(2, 1003)
    x[0, 5], x[1, 1001] = float("nan"), float("nan")
    expected = gpt.softcap(x.clone())
    torch.testing.assert_close(ops.softcap(x.clone()), expected, rtol=0, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(ops.softcap(x.bfloat16()), gpt.softcap(x.bfloat16()), rtol=0, atol=1e-5, equal_nan=True)
    assert kernel_calls == {"softcap": 1, "softcap_bf16": 1}


# bf16 results are torch's to the bit (both compute in fp32 and round to nearest even); fp32 ones
# to fp32's rounding (the kernel sums the squares in another order)
NORM_TOLERANCE = {torch.bfloat16: {"rtol": 0, "atol": 0}, torch.float32: {"rtol": 1e-6, "atol": 1e-6}}


@pytest.mark.parametrize("dtype", NORM_TOLERANCE, ids=["bf16", "fp32"])
def test_rms_norm_equals_torch(dtype, kernel_calls):
    """bf16 and fp32 activations as the model norms them: the residual stream (B, 1, C), and queries
    and keys (B, H, 1, D) as a view of the fused projection's heads; a width with a tail after the
    8-float vectors, rows of zeros, of large and of tiny values, and a NaN, which spreads over its
    row as in torch. Other dtypes and activations with a gradient take torch's."""
    torch.manual_seed(0)
    stream = (torch.randn(8, 1, 256) * torch.logspace(-3, 3, 8)[:, None, None]).to(dtype)
    stream[2] = 0
    stream[5, 0, 7] = float("nan")
    heads = torch.randn(8, 1, 6, 128).to(dtype).transpose(1, 2)[:, :4]  # a view with strides
    tail = torch.randn(3, 1003).to(dtype)
    for x in (stream, heads, tail):
        got = ops.rms_norm(x)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got.isnan(), gpt.norm(x).isnan()) and got.isnan().sum() == (x is stream) * 256
        torch.testing.assert_close(got, gpt.norm(x), **NORM_TOLERANCE[dtype], equal_nan=True)
    fp16, trained = torch.randn(4, 64, dtype=torch.float16), torch.randn(4, 64, dtype=dtype, requires_grad=True)
    torch.testing.assert_close(ops.rms_norm(fp16), gpt.norm(fp16), rtol=0, atol=0)  # torch's, not counted
    torch.testing.assert_close(ops.rms_norm(trained), gpt.norm(trained), rtol=0, atol=0)
    assert ops.rms_norm(trained).requires_grad
    assert kernel_calls == {kernels.NORM_KERNELS["rms_norm"][dtype]: 3}


@pytest.mark.parametrize("dtype", NORM_TOLERANCE, ids=["bf16", "fp32"])
def test_rotary_norm_equals_torch(dtype, kernel_calls):
    """Decoding's queries and keys, (B, heads, 1, dim) as a view of the fused projection's heads, with
    the angles of one position for every row and of a position per row (rows at different lengths),
    in the model's dtype as the model holds its tables; a NaN spreads over its head. In bf16 every
    product and sum is rounded as torch's bf16 ops round them. More than one position (a prefill) or
    a gradient takes torch's."""
    torch.manual_seed(0)
    qkv = (torch.randn(8, 1, 6 * 128) * 3).to(dtype)
    qkv[5, 0, 130] = float("nan")  # row 5, head 1
    x = qkv.view(8, 1, -1, 128).transpose(1, 2)[:, :4]
    cos, sin = (table.to(dtype) for table in gpt.rotary_tables(300, 128, 10000.0))
    positions = torch.randint(0, 300, (8, 1))
    for angles in [(cos[37:38], sin[37:38]), (cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))]:
        got, expected = ops.rotary_norm(x, *angles), gpt.rotary_norm(x, *angles)
        assert got.shape == expected.shape and got.isnan().sum() == 128
        torch.testing.assert_close(got, expected, **NORM_TOLERANCE[dtype], equal_nan=True)
    prefill = torch.randn(2, 4, 3, 128).to(dtype)
    torch.testing.assert_close(ops.rotary_norm(prefill, cos[:3], sin[:3]), gpt.rotary_norm(prefill, cos[:3], sin[:3]), rtol=0, atol=0)
    trained = x.detach().clone().requires_grad_()
    assert ops.rotary_norm(trained, cos[:1], sin[:1]).requires_grad
    assert kernel_calls == {kernels.NORM_KERNELS["rotary_norm"][dtype]: 2}


@pytest.mark.parametrize("rows,n", [(1, 65536), (8, 65536), (3, 1003), (5, 7)])
def test_softmax_weights_equal_torch(rows, n, kernel_calls):
    """Per-row temperatures from 0.01 (most weights underflow to 0) to 2; a 1-D row with a number as
    its temperature."""
    x = gpt.softcap(logits(rows, n))
    temperatures = torch.linspace(0.01, 2.0, rows)[:, None]
    expected = engine.softmax_weights(x, temperatures)
    got = ops.softmax_weights(x, temperatures)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-30)
    # a weight torch gives 0 is 0 (never drawn); ours are 0 below the smallest normal float, where torch
    # still has denormals
    assert torch.all(got[expected == 0] == 0) and torch.all(expected[got == 0] < torch.finfo(torch.float32).tiny)
    row = x[-1]
    torch.testing.assert_close(ops.softmax_weights(row, 0.7), engine.softmax_weights(row, 0.7), rtol=1e-5, atol=1e-30)
    assert kernel_calls == {"softmax_weights": 2}


@pytest.mark.parametrize("rows,n", [(1, 65536), (8, 65536), (3, 1003), (5, 7)])
def test_argmax_equals_torch_first_maximum(rows, n, kernel_calls):
    """Ties (few distinct values) take the first maximum, as torch's argmax does; a row with a NaN
    gives its first NaN's index, as in torch (in a vector, in the tail, after a larger value)."""
    with_nan = logits(rows, n)
    with_nan[0, n // 2], with_nan[-1, n - 1], with_nan[-1, 0] = float("nan"), float("nan"), 1e9
    for x in (logits(rows, n), torch.randint(0, 5, (rows, n)).float(), torch.full((rows, n), float("-inf")), with_nan):
        assert torch.equal(ops.argmax(x), engine.row_argmax(x))
    assert kernel_calls == {"argmax": 4}


def test_the_hot_path_never_builds(monkeypatch):
    """With the kernels not loaded, the ops' checks never start a compiler: each gives torch's result."""
    monkeypatch.setattr(kernels, "LIBRARY", None)
    monkeypatch.setattr(kernels, "load", lambda: pytest.fail("the hot path tried to build the kernels"))
    monkeypatch.setattr(kernels, "compiled", lambda compiler: pytest.fail("the hot path started a compiler"))
    x = logits(2, 1003)
    assert not kernels.takes(x)
    torch.testing.assert_close(ops.softcap(x.clone()), gpt.softcap(x))
    torch.testing.assert_close(ops.softmax_weights(x, 0.5), engine.softmax_weights(x, 0.5))
    assert torch.equal(ops.argmax(x), x.argmax(dim=-1))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache, and no kernels loaded yet."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "LIBRARY", None)
    return tmp_path / "nanochat" / "kernels"


def test_built_once_then_reused(fresh_cache, monkeypatch):
    needs_kernels()
    fresh_cache.mkdir(parents=True)
    (fresh_cache / "cpu_kernels-0123456789abcdef.so").write_text("an older version's build")
    library = kernels.build()
    assert library is not None and kernels.LIBRARY is library
    (built,) = fresh_cache.iterdir()  # the older one removed
    assert built.name.startswith("cpu_kernels-") and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    with monkeypatch.context() as m:  # loaded: build() again does nothing
        m.setattr(kernels, "load", lambda: pytest.fail("built twice"))
        assert kernels.build() is library
    monkeypatch.setattr(kernels, "LIBRARY", None)  # another process: loads the cached build
    assert kernels.build() is not None
    assert list(fresh_cache.iterdir()) == [built] and built.stat().st_mtime_ns == stamp


def test_a_failing_compiler_turns_the_kernel_off(fresh_cache, tmp_path, monkeypatch, caplog):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'cc: internal error: no AVX2 today' >&2\nexit 1\n")
    os.chmod(compiler, 0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setattr(kernels, "cpu_flags", lambda: CAN_BUILD)
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        assert kernels.build() is None
    assert "no AVX2 today" in caplog.text
    assert list(fresh_cache.iterdir()) == []  # no half-built library left behind


@pytest.mark.parametrize("flags,cc,reason", [(CAN_BUILD, "no-such-cc", "no C compiler"),
                                              ({"avx2", "sse4_2"}, "cc", "the CPU lacks AVX2 or FMA")])
def test_a_machine_without_what_they_need_turns_the_kernels_off(flags, cc, reason, fresh_cache, monkeypatch, caplog):
    """No compiler, or a CPU without FMA: no build is tried, and the log says why."""
    monkeypatch.setenv("CC", cc)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    monkeypatch.setattr(kernels, "compiled", lambda compiler: pytest.fail("tried to build"))
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        assert kernels.build() is None
    assert reason in caplog.text
