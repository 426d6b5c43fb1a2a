"""nanochat's C kernels for inference on x86 CPUs with AVX2 and FMA (kernels.c), and with AVX-512 and
AMX where the CPU has them (avx512.c):
- x @ W.T, the weight packed once into panels: for fp32 x, of the weight rounded to bf16 and
  multiplied in fp32, which at the sizes decoding uses reads half the bytes of torch's fp32 matmul
  (figures in docs/ARCHITECTURE.md, "CPU kernels"); in bf16 on AMX, where a call costs a few
  microseconds against oneDNN's 25-40 through torch;
- the model's RMSNorm of bf16 or fp32 rows, in one call where torch's takes seven ops, and its
  rotary and RMSNorm of decoding's queries and keys, in one call where torch's take fifteen;
- sampling's passes over (rows, vocab) logits: the soft cap (in place, or from bf16 logits into fp32
  ones in the same pass), softmax weights and the argmax.

`build()` compiles them with the machine's C compiler ($CC, else cc) into
$XDG_CACHE_HOME/nanochat/kernels (default ~/.cache/nanochat/kernels), one file per version of the
source, and loads them with ctypes, which releases the GIL for the call. It runs once, when an
inference model is loaded (nanochat.cpu.apply); where the kernels cannot run (no AVX2 and FMA, no
compiler, a failed build) it says why in the log. The hot path only asks `LIBRARY`, never the
compiler.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from nanochat.common import cpu_flags, log

SOURCES = [Path(__file__).with_name(name) for name in ("kernels.c", "avx512.c")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]  # avx512.c turns on its own sets per function
PANEL = 16  # output features per panel, as in kernels.c and avx512.c
AMX_FLAGS = {"amx_tile", "amx_bf16", "avx512_bf16"}  # what avx512.c's AMX matmul needs of the CPU
AMX_DEPTH = 32  # input features per AMX tile: amx_matmul takes multiples of it
NORM_KERNELS = {norm: {torch.bfloat16: f"{norm}_bf16", torch.float32: f"{norm}_f32"} for norm in ("rms_norm", "rotary_norm")}

LIBRARY = None  # the loaded kernels (a ctypes library) once build() has loaded them


def build():
    """Loads the kernels into LIBRARY, compiling them unless this source's build is cached; returns
    LIBRARY (None where they cannot run here, the reason in the log). Loaded once per process."""
    global LIBRARY
    if LIBRARY is None:
        LIBRARY = load()
    return LIBRARY


def has_amx():
    """Whether amx_matmul runs here: the kernels loaded on a CPU with AMX, whose tiles Linux granted."""
    return LIBRARY is not None and LIBRARY.amx


def lacking():
    """What this machine lacks for the kernels (a CPU with AVX2 and FMA, a C compiler), or None."""
    if not {"avx2", "fma"} <= cpu_flags():
        return "the CPU lacks AVX2 or FMA"
    if c_compiler() is None:
        return "no C compiler (set $CC)"
    return None


def c_compiler():
    """The path of the C compiler ($CC, else cc), or None."""
    return shutil.which(os.environ.get("CC", "cc"))


def load():
    """The compiled kernels, a ctypes library, or None where they cannot run here."""
    if reason := lacking():
        log.warning("CPU kernels off: %s; inference runs torch's ops", reason)
        return None
    try:
        path = compiled(c_compiler())
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("CPU kernels off: building %s failed: %s", ", ".join(s.name for s in SOURCES), getattr(e, "stderr", None) or e)
        return None
    rows = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long]  # x, rows, n, row stride
    for name, argtypes in {"panel_matmul": [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4,
                           "softcap": [*rows, ctypes.c_float, ctypes.c_int],
                           "softcap_bf16": [*rows, ctypes.c_void_p, ctypes.c_float, ctypes.c_int],
                           "softcap_bf16_avx2": [*rows, ctypes.c_void_p, ctypes.c_float, ctypes.c_int],
                           **dict.fromkeys(NORM_KERNELS["rms_norm"].values(), [*rows, ctypes.c_void_p, ctypes.c_float, ctypes.c_int]),
                           **dict.fromkeys(NORM_KERNELS["rotary_norm"].values(),
                                           [ctypes.c_void_p] + [ctypes.c_int] * 3 + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 2
                                           + [ctypes.c_long, ctypes.c_void_p, ctypes.c_float, ctypes.c_int]),
                           "softmax_weights": [*rows, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int],
                           "argmax": [*rows, ctypes.c_void_p, ctypes.c_int],
                           "amx_matmul": [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_long, ctypes.c_int, ctypes.c_void_p]
                                         + [ctypes.c_int, ctypes.c_float, ctypes.c_int],
                           "amx_init": []}.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    lib.amx_init.restype = ctypes.c_int
    lib.amx = AMX_FLAGS <= cpu_flags() and lib.amx_init() == 1
    log.info("CPU kernels loaded from %s", path)
    return lib


def compiled(compiler):
    """The shared library built from SOURCES by `compiler`, compiled unless already cached (a new
    build removes those of other versions). The build writes a temporary file renamed into place,
    so a reader never sees half a library."""
    sources = [source.read_bytes() for source in SOURCES]
    key = hashlib.sha256(b"\0".join([*sources, compiler.encode(), *map(str.encode, FLAGS)])).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanochat" / "kernels"
    path = cache / f"cpu_kernels-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.info("compiled %s into %s", " and ".join(s.name for s in SOURCES), path)
        for stale in set(cache.glob("cpu_kernels-*.so")) - {path}:  # other versions' builds (mapped ones live on)
            stale.unlink(missing_ok=True)
    return path


def pack(weight):
    """An fp32 weight (n, k), n a multiple of PANEL, rounded to bf16 (to nearest even, as torch
    rounds) and packed as panel_matmul takes it: (n / PANEL, k, PANEL)."""
    n, k = weight.shape
    assert weight.dtype == torch.float32 and n % PANEL == 0, (weight.dtype, weight.shape)
    return weight.detach().to(torch.bfloat16).view(n // PANEL, PANEL, k).transpose(1, 2).contiguous()


def panel_matmul(x, panels):
    """fp32 x (rows, k) @ W.T for W packed by `pack`, in fp32: a new (rows, n) fp32 tensor, row-major."""
    x = x.contiguous()
    groups, k, _ = panels.shape
    assert x.dtype == torch.float32 and x.size(1) == k and panels.dtype == torch.bfloat16, (x.dtype, x.shape, panels.dtype)
    y = torch.empty(x.size(0), groups * PANEL)
    LIBRARY.panel_matmul(panels.data_ptr(), x.data_ptr(), y.data_ptr(), x.size(0), k, groups * PANEL,
                         torch.get_num_threads())
    return y


def pack_bf16(weight):
    """A bf16 weight (n, k), n a multiple of PANEL and k of AMX_DEPTH, as amx_matmul takes it: per
    panel of 16 outputs, their features in pairs side by side, (n / PANEL, k / 2, PANEL, 2)."""
    n, k = weight.shape
    assert weight.dtype == torch.bfloat16 and n % PANEL == 0 and k % AMX_DEPTH == 0, (weight.dtype, weight.shape)
    return weight.detach().view(n // PANEL, PANEL, k // 2, 2).transpose(1, 2).contiguous()


def amx_matmul(x, panels, cap=None, relu_square=False):
    """bf16 x (rows, k), each row contiguous, @ W.T for W packed by `pack_bf16`: a new (rows, n) bf16
    tensor y, row-major; with `relu_square`, relu(y) ** 2 (in bf16, as torch's ops round it); with a
    `cap`, fp32 cap * tanh(y / cap). Either in the same pass. Only where has_amx()."""
    groups, half, _, _ = panels.shape
    assert x.dtype == torch.bfloat16 and x.size(1) == 2 * half and x.stride(1) == 1, (x.dtype, x.shape, x.stride())
    y = torch.empty(x.size(0), groups * PANEL, dtype=torch.bfloat16 if cap is None else torch.float32)
    op = 2 if cap is not None else 1 if relu_square else 0  # avx512.c's PLAIN, RELU_SQUARE, CAPPED
    LIBRARY.amx_matmul(panels.data_ptr(), x.data_ptr(), x.size(0), x.size(1), x.stride(0), y.size(1), y.data_ptr(),
                       op, cap or 0.0, torch.get_num_threads())
    return y


def takes(x, dtype=torch.float32):
    """Whether the row kernels below take x: (rows, n) of `dtype` on the CPU, each row contiguous, and
    the kernels loaded (this never builds them)."""
    return LIBRARY is not None and x.device.type == "cpu" and x.dtype == dtype and x.dim() == 2 and x.stride(1) == 1


def softcap_(x, cap):
    """x -> cap * tanh(x / cap), in place; x as `takes` wants it."""
    LIBRARY.softcap(x.data_ptr(), x.size(0), x.size(1), x.stride(0), cap, torch.get_num_threads())
    return x


def softcap_bf16(x, cap):
    """cap * tanh(x / cap) of bf16 x (as `takes(x, torch.bfloat16)` wants it) in a new fp32 tensor."""
    out = torch.empty(x.shape)
    LIBRARY.softcap_bf16(x.data_ptr(), x.size(0), x.size(1), x.stride(0), out.data_ptr(), cap, torch.get_num_threads())
    return out


def rms_norm(x, eps):
    """RMSNorm of each row of bf16 or fp32 x (as `takes(x, x.dtype)` wants it) in a new tensor of its dtype."""
    out = torch.empty(x.shape, dtype=x.dtype)
    kernel = getattr(LIBRARY, NORM_KERNELS["rms_norm"][x.dtype])
    kernel(x.data_ptr(), x.size(0), x.size(1), x.stride(0), out.data_ptr(), eps, torch.get_num_threads())
    return out


def rotary_norm(x, cos, sin, eps):
    """RMSNorm(rotary(x)) of bf16 or fp32 x (rows, heads, dim), each head contiguous, by the angles
    cos, sin (rows or 1, dim / 2; x's dtype, each row contiguous), in a new (rows, heads, dim) tensor
    of x's dtype."""
    rows, heads, dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype)
    angle_row = cos.stride(0) if cos.size(0) > 1 else 0
    kernel = getattr(LIBRARY, NORM_KERNELS["rotary_norm"][x.dtype])
    kernel(x.data_ptr(), rows, heads, dim, x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(), angle_row,
           out.data_ptr(), eps, torch.get_num_threads())
    return out


def softmax_weights(x, scale):
    """Per row r of x: exp((x - the row's max) * scale[r]), softmax's unnormalized weights, in a new
    tensor; scale a number or one per row."""
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).expand(x.size(0)).contiguous()
    out = torch.empty(x.shape)
    LIBRARY.softmax_weights(x.data_ptr(), x.size(0), x.size(1), x.stride(0), scale.data_ptr(), out.data_ptr(),
                            torch.get_num_threads())
    return out


def argmax(x):
    """Per row of x, the index of its first maximum: (rows,) int64."""
    out = torch.empty(x.size(0), dtype=torch.int64)
    LIBRARY.argmax(x.data_ptr(), x.size(0), x.size(1), x.stride(0), out.data_ptr(), torch.get_num_threads())
    return out
