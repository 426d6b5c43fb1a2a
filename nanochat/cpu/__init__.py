"""Everything CPU-specific about inference, applied in one step to a loaded model (`apply`, called by
nanochat.inference.load_engine when the device is the CPU); the model and the engine run torch's
ops everywhere else, and on a CPU where NANOCHAT_CPU_FASTPATHS=0.

- kernels.c, avx512.c / kernels.py: nanochat's C kernels (fp32 matmul of bf16 weights in AVX2, bf16
  matmul on AMX, RMSNorm, rotary, soft cap, softmax weights, argmax), compiled and loaded once, here.
- linears.py: linear layers in the form their dtype multiplies fastest on this CPU.
- ops.py: the CPU form of the model's RMSNorms, logit cap and head and of the engine's sampling
  passes, each falling back to the torch function beside it. (Attention stays the model's SDPA: in
  a decode step its cost is reading the cache, which a kernel of our own read no faster.)
"""

import functools
import os

from nanochat import engine
from nanochat.common import log
from nanochat.cpu import kernels, linears, ops

SWITCH = "NANOCHAT_CPU_FASTPATHS"


def enabled():
    """Whether the switch lets `apply` run: unset or 1. With 0 a model is served on torch's ops, as on
    a CPU without the speed-ups (to compare against them, or to rule them out). Read at each load,
    so a test or a process can set it after import."""
    value = os.environ.get(SWITCH, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{SWITCH}={value!r}: expected 0 (torch's ops) or 1 (nanochat.cpu's fast paths)")
    return value == "1"


def apply(model):
    """Puts a loaded inference model (in place) on the CPU's fast paths and returns the engine's
    sampling ops for it: builds the kernels (once per process; the log says where or why not),
    puts the linear layers in their fastest form, and sets the model's hooks: cap to ops.softcap, head
    to ops.head, the norms to ops.rms_norm and ops.rotary_norm.
    With NANOCHAT_CPU_FASTPATHS=0 it leaves the model as it is and returns torch's ops."""
    if not enabled():
        log.info("CPU fast paths off (%s=0): inference runs torch's ops", SWITCH)
        return engine.SamplingOps()
    kernels.build()
    linears.fastest_linears(model)
    model.cap = ops.softcap
    model.head = functools.partial(ops.head, model)
    model.use_norms(ops.rms_norm, ops.rotary_norm)
    return ops.SAMPLING
