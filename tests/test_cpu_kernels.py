"""Building nanochat's C kernel: compiled once per source version into the cache and reused; a
compiler that fails or is missing turns the kernel off with the reason in the log, leaving no file."""

import logging
import os

import pytest

from nanochat import cpu_kernels


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache, and library() forgetting what it loaded (before and after)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels.library.cache_clear()
    yield tmp_path / "nanochat"
    cpu_kernels.library.cache_clear()


def test_built_once_then_reused(fresh_cache):
    assert cpu_kernels.library() is not None
    (built,) = fresh_cache.iterdir()
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
