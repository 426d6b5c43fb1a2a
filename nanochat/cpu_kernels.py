"""nanochat's C kernels for fp32 inference on x86 CPUs (cpu_kernels.c), with AVX2 and FMA:
- x @ W.T, the weight packed once into panels: 2-4x faster than torch's matmul (MKL) at the sizes
  decoding uses (measured on an AVX2-only AMD EPYC, 2 cores; see nanochat/linears.py);
- sampling's passes over (rows, vocab) logits: the soft cap (in place), softmax weights and the
  argmax (8 x 65,536 on that CPU: cap 0.39 ms in torch, softmax weights 0.39, argmax 0.27-0.6).

Compiled on first use with the machine's C compiler ($CC, else cc; under a second) into
$XDG_CACHE_HOME/nanochat/kernels (default ~/.cache/nanochat/kernels), one file per version of the
source, and loaded with ctypes, which releases the GIL for the call. Where they cannot run (no AVX2
and FMA, no compiler, a failed build) `library()` says why in the log and returns None.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from nanochat.common import cpu_flags, log

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
PANEL = 16  # output features per panel, as in cpu_kernels.c


@functools.cache
def library():
    """The compiled kernels (a ctypes library), or None where they cannot run here."""
    if not {"avx2", "fma"} <= cpu_flags():
        log.info("CPU kernels off: the CPU lacks AVX2 or FMA")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("CPU kernels off: no C compiler (set $CC); inference runs torch's matmul")
        return None
    try:
        lib = ctypes.CDLL(str(compiled(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("CPU kernels off: building %s failed: %s", SOURCE.name, getattr(e, "stderr", None) or e)
        return None
    rows = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long]  # x, rows, n, row stride
    for name, argtypes in {"panel_matmul": [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4,
                           "softcap": [*rows, ctypes.c_float, ctypes.c_int],
                           "softmax_weights": [*rows, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int],
                           "argmax": [*rows, ctypes.c_void_p, ctypes.c_int]}.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    return lib


def compiled(compiler):
    """The shared library built from SOURCE by `compiler`, compiled unless already cached (a new
    build removes those of other versions). The build writes a temporary file renamed into place,
    so a reader never sees half a library."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), *map(str.encode, FLAGS)])).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanochat" / "kernels"
    path = cache / f"cpu_kernels-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.info("compiled %s into %s", SOURCE.name, path)
        for stale in set(cache.glob("cpu_kernels-*.so")) - {path}:  # other versions' builds (mapped ones live on)
            stale.unlink(missing_ok=True)
    return path


def pack(weight):
    """An fp32 weight (n, k), n a multiple of PANEL, as panel_matmul takes it: (n / PANEL, k, PANEL)."""
    n, k = weight.shape
    assert weight.dtype == torch.float32 and n % PANEL == 0, (weight.dtype, weight.shape)
    return weight.detach().view(n // PANEL, PANEL, k).transpose(1, 2).contiguous()


def panel_matmul(x, panels):
    """x (rows, k) @ W.T for W packed by `pack`: a new (rows, n) fp32 tensor, row-major."""
    x = x.contiguous()
    groups, k, _ = panels.shape
    assert x.dtype == torch.float32 and x.size(1) == k, (x.dtype, x.shape, panels.shape)
    y = torch.empty(x.size(0), groups * PANEL)
    library().panel_matmul(panels.data_ptr(), x.data_ptr(), y.data_ptr(), x.size(0), k, groups * PANEL,
                           torch.get_num_threads())
    return y


def takes(x):
    """Whether the row kernels below take x: fp32 (rows, n) on the CPU, each row contiguous, and the
    kernels available."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1 \
        and library() is not None


def softcap_(x, cap):
    """x -> cap * tanh(x / cap), in place; x as `takes` wants it."""
    library().softcap(x.data_ptr(), x.size(0), x.size(1), x.stride(0), cap, torch.get_num_threads())
    return x


def softmax_weights(x, scale):
    """Per row r of x: exp((x - the row's max) * scale[r]), softmax's unnormalized weights, in a new
    tensor; scale a number or one per row."""
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).expand(x.size(0)).contiguous()
    out = torch.empty(x.shape)
    library().softmax_weights(x.data_ptr(), x.size(0), x.size(1), x.stride(0), scale.data_ptr(), out.data_ptr(),
                              torch.get_num_threads())
    return out


def argmax(x):
    """Per row of x, the index of its first maximum: (rows,) int64."""
    out = torch.empty(x.size(0), dtype=torch.int64)
    library().argmax(x.data_ptr(), x.size(0), x.size(1), x.stride(0), out.data_ptr(), torch.get_num_threads())
    return out
