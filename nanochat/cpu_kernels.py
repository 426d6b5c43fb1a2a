"""nanochat's C kernel for fp32 inference on x86 CPUs (cpu_kernels.c): x @ W.T with AVX2 and FMA,
the weight packed once into panels. It runs 2-4x faster than torch's matmul (MKL) at the sizes
decoding uses (measured on an AVX2-only AMD EPYC, 2 cores; see nanochat/linears.py).

Compiled on first use with the machine's C compiler ($CC, else cc) into
$XDG_CACHE_HOME/nanochat (default ~/.cache/nanochat), one file per version of the source, and
loaded with ctypes, which releases the GIL for the call. Where it cannot run (no AVX2 and FMA, no
compiler, a failed build) `library()` says why in the log and returns None.
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
    lib.panel_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
    lib.panel_matmul.restype = None
    return lib


def compiled(compiler):
    """The shared library built from SOURCE by `compiler`, compiled unless already cached. The build
    writes a temporary file renamed into place, so a reader never sees half a library."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), *map(str.encode, FLAGS)])).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanochat"
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
