"""FP8 training of the model's linear layers, on GPUs that multiply FP8 (compute capability 8.9
and up: Ada, Hopper and later), as upstream nanochat's --fp8 does it.

    n = fp8.convert(model)          # before torch.compile; the weights and their names stay as they are
    with fp8.disabled(model):       # evaluation and sampling in the autocast dtype
        ...

Tensorwise dynamic scaling (torchao's "tensorwise" recipe): before each of a linear layer's three
matmuls (the output; the gradients of the input and of the weight) each operand is multiplied by
one scalar that puts its largest magnitude on the format's largest finite value and cast to FP8;
torch._scaled_mm multiplies the FP8 operands and divides the scales back out. Inputs and
weights are e4m3 (3 mantissa bits, up to 448), output gradients e5m2 (2 bits, up to 57,344: their
spread is wider). The weights stay fp32, as the optimizer keeps them; their FP8 copies live for
one step, and checkpoints are those of the unconverted model.

A layer is converted if its in and out features are multiples of 16 (cuBLAS's FP8 alignment) and
at least 128 (below that the scaling costs more than the FP8 matmul saves), upstream's rule.
lm_head is not: the training loss multiplies its weight itself, in chunks (nanochat/loss.py), so
an FP8 lm_head would only change the logits of inference.
"""

import contextlib

import torch
import torch.nn as nn

from nanochat.common import log

ALIGNMENT = 16  # cuBLAS's FP8 GEMM wants every dimension it multiplies over a multiple of 16
MIN_FEATURES = 128
MIN_CAPABILITY = (8, 9)  # the first CUDA architecture with FP8 tensor cores (Ada); Hopper is 9.0
NOT_CONVERTED = {"lm_head"}  # see the module docstring
EPS = 1e-12  # the smallest amax scaled: an all-zero tensor gets a finite scale


def quantize(x, dtype):
    """(x in FP8 `dtype`, the inverse scale) with one scale for the whole tensor: its largest
    magnitude becomes the format's largest, so the cast uses the format's whole range whatever x's
    magnitude. The product of the FP8 tensor and the inverse scale is x rounded to `dtype`'s mantissa."""
    fp8_max = torch.finfo(dtype).max
    amax = x.detach().float().abs().max()
    # in fp64, as torchao does: compiled and eager code then agree on the scale to the bit
    scale = (fp8_max / amax.double().clamp(min=EPS)).float()
    # no clamp needed: the largest magnitude lands at most fp32's rounding above fp8_max, which the
    # cast rounds back down (a cast beyond the format's range would give inf or NaN)
    return (x.float() * scale).to(dtype), scale.reciprocal()


def column_major(x):
    """x with the same values laid out column by column, as _scaled_mm wants its second operand."""
    return x.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """input (rows, in) @ weight.T in FP8, the gradients of both in FP8 too; each result in the
    dtype its full-precision counterpart would have."""

    @staticmethod
    def forward(ctx, input, weight, out_dtype):
        input_fp8, input_inv = quantize(input, torch.float8_e4m3fn)
        weight_fp8, weight_inv = quantize(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(input_fp8, input_inv, weight_fp8, weight_inv)
        ctx.dtypes = input.dtype, weight.dtype
        # weight_fp8.t() is column-major as it is; the fast accumulation is upstream's choice for
        # the forward (the gradients accumulate exactly). Every dtype here is explicit: eager CPU
        # autocast would still alter _scaled_mm's result (a compiled graph's it does not)
        with torch.autocast(input.device.type, enabled=False):
            return torch._scaled_mm(input_fp8.contiguous(), weight_fp8.t(), scale_a=input_inv, scale_b=weight_inv,
                                    out_dtype=out_dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_output):
        input_fp8, input_inv, weight_fp8, weight_inv = ctx.saved_tensors
        input_dtype, weight_dtype = ctx.dtypes
        grad_fp8, grad_inv = quantize(grad_output, torch.float8_e5m2)
        grad_fp8 = grad_fp8.contiguous()
        grad_input = grad_weight = None
        with torch.autocast(grad_output.device.type, enabled=False):  # (as in forward)
            if ctx.needs_input_grad[0]:  # (rows, out) @ (out, in)
                grad_input = torch._scaled_mm(grad_fp8, column_major(weight_fp8), scale_a=grad_inv, scale_b=weight_inv,
                                              out_dtype=input_dtype)
            if ctx.needs_input_grad[1]:  # (out, rows) @ (rows, in)
                grad_weight = torch._scaled_mm(grad_fp8.t().contiguous(), column_major(input_fp8), scale_a=grad_inv,
                                               scale_b=input_inv, out_dtype=weight_dtype)
        return grad_input, grad_weight, None


class Float8Linear(nn.Linear):
    """nn.Linear whose matmuls run in FP8 (while `fp8` is true), on the same weight and bias. Its
    output has the dtype nn.Linear's would: the autocast dtype under autocast, else the input's."""

    fp8 = True

    def forward(self, x):
        if not self.fp8:
            return super().forward(x)
        rows = x.reshape(-1, self.in_features)
        if rows.size(0) % ALIGNMENT and torch.is_grad_enabled() and self.weight.requires_grad:
            raise ValueError(f"FP8 training multiplies over the rows of a batch, so it needs a multiple of {ALIGNMENT} "
                             f"rows (batch x sequence), got {rows.size(0)}; evaluate within fp8.disabled(model)")
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = _Float8Matmul.apply(rows, self.weight, out_dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def from_linear(cls, linear):
        """A Float8Linear holding `linear`'s own weight and bias (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new


def convertible(name, linear):
    """Whether the layer called `name` in the model is one that FP8 speeds up (the module docstring)."""
    dims = linear.in_features, linear.out_features
    return (type(linear) is nn.Linear and name not in NOT_CONVERTED
            and all(d % ALIGNMENT == 0 for d in dims) and min(dims) >= MIN_FEATURES)


def unsupported(device):
    """Why FP8 training cannot run on `device` (a torch.device), or None if it can."""
    if device.type != "cuda":
        return f"FP8 training needs a CUDA GPU with FP8 (compute capability {'.'.join(map(str, MIN_CAPABILITY))}+: " \
               f"H100, L4, RTX 4090 and later); this model is on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"FP8 training needs compute capability {'.'.join(map(str, MIN_CAPABILITY))}+ (H100, L4, RTX 4090 "
                f"and later); {torch.cuda.get_device_name(device)} has {'.'.join(map(str, capability))}")
    return None


def convert(model):
    """Converts the model's eligible linear layers (in place) for FP8 training, after checking its
    device has FP8; returns how many. A ValueError saying why on a device without FP8."""
    reason = unsupported(next(model.parameters()).device)
    if reason:
        raise ValueError(reason)
    return convert_linears(model)


def convert_linears(model):
    """Replaces each convertible nn.Linear of the model by a Float8Linear sharing its parameters
    (the optimizer's references, the state dict's names and values stay as they are); returns how
    many. No device check: torch._scaled_mm also runs on CPU, slowly, which the tests use."""
    # the compiler puts the matmul into its graph as one node instead of tracing it (upstream's
    # choice); registered here, not at import, since that imports torch._dynamo
    torch.compiler.allow_in_graph(_Float8Matmul)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [(name, m) for name, m in linears if convertible(name, m)]
    for name, linear in chosen:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, Float8Linear.from_linear(linear))
    log.info("FP8 training: %d of %d linear layers converted", len(chosen), len(linears))
    return len(chosen)


@contextlib.contextmanager
def disabled(model):
    """Within it, the model's Float8Linear layers multiply as nn.Linear does (in the autocast
    dtype): evaluations and samples do not depend on FP8's rounding, nor on a row count FP8
    can take. Each layer's previous state comes back on exit, exception or not."""
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    before = [m.fp8 for m in layers]
    for m in layers:
        m.fp8 = False
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.fp8 = on
