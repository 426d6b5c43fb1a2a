"""nanochat's C kernels: sampling's passes equal torch's (the engine's path without the kernels,
the oracle), and the build: compiled once per source version into the cache and reused; a compiler
that fails or is missing turns the kernels off with the reason in the log, leaving no file. (The
matmul is checked against torch in test_linears.py.)"""

import logging
import os

import pytest
import torch

from nanochat import cpu_kernels, engine
from nanochat.gpt import softcap


def torch_path(fn, *args, monkeypatch):
    """fn(*args) as the engine computes it where the kernels cannot run."""
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "library", lambda: None)
        return fn(*args)


def logits(rows, n, seed=0):
    """Logits as the engine sees them: rows of a wider buffer (a padded vocabulary sliced back), with
    values far beyond the cap, -inf, and a width that leaves a tail after the 8-float vectors."""
    torch.manual_seed(seed)
    x = torch.randn(rows, n + 5) * 20
    x[:, 3], x[0, -7], x[-1, 1] = float("-inf"), 1e6, -1e6
    return x[:, :n]


@pytest.mark.parametrize("rows,n", [(1, 65536), (8, 65536), (3, 1003), (5, 7)])
def test_softcap_equals_torch(rows, n, monkeypatch):
    x = logits(rows, n)
    expected = torch_path(engine.capped, x.clone(), monkeypatch=monkeypatch)
    got = engine.capped(x)
    assert got.data_ptr() == x.data_ptr()  # in place
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, softcap(logits(rows, n)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows,n", [(1, 65536), (8, 65536), (3, 1003), (5, 7)])
def test_softmax_weights_equal_torch(rows, n, monkeypatch):
    """Per-row temperatures from 0.01 (most weights underflow to 0) to 2; a 1-D row with a number as
    its temperature."""
    x = softcap(logits(rows, n))
    temperatures = torch.linspace(0.01, 2.0, rows)[:, None]
    expected = torch_path(engine.softmax_weights, x, temperatures, monkeypatch=monkeypatch)
    got = engine.softmax_weights(x, temperatures)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-30)
    # a weight torch gives 0 is 0 (never drawn); ours are 0 below the smallest normal float, where torch
    # still has denormals
    assert torch.all(got[expected == 0] == 0) and torch.all(expected[got == 0] < torch.finfo(torch.float32).tiny)
    row = x[-1]
    torch.testing.assert_close(engine.softmax_weights(row, 0.7), torch_path(engine.softmax_weights, row, 0.7, monkeypatch=monkeypatch),
                               rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("rows,n", [(1, 65536), (8, 65536), (3, 1003), (5, 7)])
def test_argmax_equals_torch_first_maximum(rows, n, monkeypatch):
    """Ties (few distinct values) take the first maximum, as torch's argmax does."""
    for x in (logits(rows, n), torch.randint(0, 5, (rows, n)).float(), torch.full((rows, n), float("-inf"))):
        assert torch.equal(engine.row_argmax(x), torch_path(engine.row_argmax, x, monkeypatch=monkeypatch))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache, and library() forgetting what it loaded (before and after)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels.library.cache_clear()
    yield tmp_path / "nanochat" / "kernels"
    cpu_kernels.library.cache_clear()


def test_built_once_then_reused(fresh_cache):
    fresh_cache.mkdir(parents=True)
    (fresh_cache / "cpu_kernels-0123456789abcdef.so").write_text("an older version's build")
    assert cpu_kernels.library() is not None
    (built,) = fresh_cache.iterdir()  # the older one removed
    assert built.name.startswith("cpu_kernels-") and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    cpu_kernels.library.cache_clear()
    assert cpu_kernels.library() is not None
    assert list(fresh_cache.iterdir()) == [built] and built.stat().st_mtime_ns == stamp


def test_a_failing_compiler_turns_the_kernel_off(fresh_cache, tmp_path, monkeypatch, caplog):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'cc: internal error: no AVX2 today' >&2\nexit 1\n")
    os.chmod(compiler, 0o755)
    monkeypatch.setenv("CC", str(compiler))
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        assert cpu_kernels.library() is None
    assert "no AVX2 today" in caplog.text
    assert list(fresh_cache.iterdir()) == []  # no half-built library left behind


def test_a_missing_compiler_turns_the_kernel_off(fresh_cache, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-cc")
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        assert cpu_kernels.library() is None
    assert "no C compiler" in caplog.text
