"""Everything CPU-specific about inference, applied in one step to a loaded model (`apply`, called by
nanochat.inference.load_engine when the device is the CPU); the model and the engine run torch's
ops everywhere else.

- kernels.c / kernels.py: nanochat's fp32 AVX2 kernels (matmul, soft cap, softmax weights,
  argmax), compiled and loaded once, here.
- linears.py: linear layers in the form their dtype multiplies fastest on this CPU.
- ops.py: the CPU forms of the model's hooks (attention, logit cap) and of the engine's sampling
  passes, each falling back to the torch function beside it.
"""

from nanochat.cpu import kernels, linears, ops


def apply(model):
    """Puts a loaded inference model (in place) on the CPU's fast paths and returns the engine's
    sampling ops for it: builds the kernels (once per process; the log says where or why not),
    puts the linear layers in their fastest form, and sets the model's hooks to ops.attention and
    ops.softcap."""
    kernels.build()
    linears.fastest_linears(model)
    for block in model.transformer.h:
        block.attn.attend = ops.attention
    model.cap = ops.softcap
    return ops.SAMPLING
