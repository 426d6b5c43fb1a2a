"""Inference linear layers: every form computes what nn.Linear computes (the oracle), for the row
counts decoding and prefill use, and inference_linears picks the form by dtype and CPU."""

from unittest import mock

import pytest
import torch

from nanochat.common import cpu_has_fast_bf16
from nanochat.gpt import GPTConfig
from nanochat.linears import DOUBLES_ONE_ROW, ColumnLinear, PackedLinear, inference_linears, one_row_doubled
from tests.test_gpt import random_model


@pytest.mark.parametrize("form", [PackedLinear, ColumnLinear])
@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (8, 64), (3, 5, 64), (8, 1, 64)])
def test_forms_equal_nn_linear(form, shape):
    """Same values and shape as nn.Linear, and the output reshapes as the model reshapes it."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=False)
    x = torch.randn(shape)
    with torch.inference_mode():
        expected, got = linear(x), form(linear)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.reshape(-1, 4, 24), expected.reshape(-1, 4, 24), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 8, 16])
def test_column_linear_takes_a_column_major_input(rows):
    """An input laid out column-major, as a ColumnLinear's output after an elementwise op (few rows
    are made row-major first, more go as they are), gives nn.Linear's values."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(96, 32, bias=False)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        hidden = torch.relu(ColumnLinear(first)(x))
        assert hidden.stride(0) == 1
        torch.testing.assert_close(ColumnLinear(second)(hidden), second(torch.relu(first(x))), rtol=1e-5, atol=1e-5)


def test_one_row_doubled_equals_nn_linear_and_the_choice_is_made_once_per_shape():
    """The doubled one-row product gives nn.Linear's values; layers of one shape share one measurement."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 4096, bias=False)
    row = torch.randn(1, 32)
    with torch.inference_mode():
        torch.testing.assert_close(one_row_doubled(linear.weight, row), linear(row), rtol=1e-5, atol=1e-5)
    measured = []
    with mock.patch("nanochat.linears.median_seconds", lambda fn, *args: measured.append(fn) or 1.0), \
            mock.patch.dict(DOUBLES_ONE_ROW, clear=True):
        for layer in (linear, torch.nn.Linear(32, 4096, bias=False), torch.nn.Linear(4096, 32, bias=False)):
            ColumnLinear(layer)
        assert len(measured) == 4 and set(DOUBLES_ONE_ROW) == {((4096, 32), torch.float32), ((32, 4096), torch.float32)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_linears_picks_the_form_for_the_dtype(dtype):
    """Each attention's query, key and value layers become one; fp32 weights go as W @ x.T, bf16
    ones are packed for oneDNN where the CPU multiplies bf16 fast; no nn.Linear is left, and the
    logits are those of the model before."""
    # every weight random (at init the output projections are zero, which would hide the attention)
    model = random_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)).eval()
    ids = torch.randint(0, 300, (2, 7))
    with torch.inference_mode():
        model.to(dtype)
        expected = model(ids)
        inference_linears(model)
        got = model(ids)
    wanted = PackedLinear if dtype == torch.bfloat16 and cpu_has_fast_bf16() else ColumnLinear
    assert {type(m) for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear, ColumnLinear))} == {wanted}
    assert all(isinstance(block.attn.c_qkv, wanted) and not hasattr(block.attn, "c_q") for block in model.transformer.h)
    tolerance = 1e-5 if dtype == torch.float32 else 0.1  # bf16: logits up to 15, where an ulp is 1/16
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
