"""Linear layers for CPU inference: each bias-free nn.Linear of an inference model held in the form
its matmul runs fastest at decode sizes (a few rows of activations against a large weight). Each
form computes what nn.Linear computes, up to rounding, PanelLinear of its weight rounded to bf16
(tests/test_linears.py).

- bf16 weights, on a CPU with AMX where nanochat's kernels are loaded: `AmxLinear`, nanochat's AMX
  matmul (avx512.c) on the weight packed into panels of 16 outputs; at decode sizes a call through
  torch's oneDNN costs several times the work. Each MLP whose layers both fit is an `AmxMLP`. A
  layer whose sizes do not fill whole tiles, or any layer where there is no AMX but the CPU
  multiplies bf16 fast (AVX512-BF16): `PackedLinear`, the weight reordered once into oneDNN's
  blocked layout (as torch.compile's freezing does) rather than on every call.
- fp32 weights, where nanochat's kernels are loaded: `PanelLinear`, nanochat's AVX2 matmul
  (kernels.c) on the weight rounded to bf16 and packed into panels of 16 outputs, multiplied in
  fp32. A decode step's matmuls stream their weights from memory, so half the bytes is up to half
  the time (and half the memory); bf16 weights are what every other device serves (CUDA, and CPUs
  with bf16 arithmetic, round the activations to bf16 too). A layer whose outputs do not fill whole
  panels stays nn.Linear.
- elsewhere every layer stays nn.Linear.
"""

import torch

from nanochat.common import cpu_has_fast_bf16, log
from nanochat.cpu import kernels


class PackedLinear(torch.nn.Module):
    """A bias-free nn.Linear with its weight reordered once into oneDNN's blocked layout. It runs on
    torch's private oneDNN ops, so building one also runs it once: a torch without them (or where
    they fail) raises here, at load, never in the middle of a request (see packed_or_kept)."""

    def __init__(self, linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # 1: a batch-size hint
        self(linear.weight.new_zeros(1, linear.in_features))

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class AmxLinear(torch.nn.Module):
    """A bias-free bf16 nn.Linear computed by nanochat's AMX kernel, its weight packed once into
    panels of 16 output features (kernels.pack_bf16). The output is row-major."""

    def __init__(self, linear):
        super().__init__()
        self.panels = kernels.pack_bf16(linear.weight)

    def forward(self, x, cap=None, relu_square=False):
        """nn.Linear's output y; with `relu_square` relu(y) ** 2, with a `cap` its fp32 cap * tanh(y /
        cap), either computed in the same pass (kernels.amx_matmul)."""
        rows = x.reshape(-1, x.size(-1))
        y = kernels.amx_matmul(rows if rows.stride(-1) == 1 else rows.contiguous(), self.panels, cap, relu_square)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def fits(linear):
        return linear.out_features % kernels.PANEL == 0 and linear.in_features % kernels.AMX_DEPTH == 0


class AmxMLP(torch.nn.Module):
    """nanochat.gpt's MLP, c_proj(relu(c_fc(x)) ** 2), in bf16 on AMX: the ReLU and square are done
    as c_fc's sums are written, with torch's roundings, where the MLP would run two more ops."""

    def __init__(self, mlp):
        super().__init__()
        self.c_fc, self.c_proj = AmxLinear(mlp.c_fc), AmxLinear(mlp.c_proj)

    def forward(self, x):
        return self.c_proj(self.c_fc(x, relu_square=True))

    @staticmethod
    def fits(mlp):
        return all(isinstance(linear, torch.nn.Linear) and AmxLinear.fits(linear) for linear in (mlp.c_fc, mlp.c_proj))


class PanelLinear(torch.nn.Module):
    """A bias-free fp32 nn.Linear computed by nanochat's AVX2 kernel, its weight rounded to bf16 and
    packed once into panels of 16 output features; fp32 inputs, sums and output (row-major)."""

    def __init__(self, linear):
        super().__init__()
        self.panels = kernels.pack(linear.weight)

    def forward(self, x):
        y = kernels.panel_matmul(x.reshape(-1, x.size(-1)), self.panels)
        return y.view(*x.shape[:-1], -1)


def fastest_linears(model):
    """The model (in place) with its bias-free linear layers in the form that runs fastest here for
    their dtype (see the module docstring). Needs the kernels built (kernels.build) for AmxLinear and
    PanelLinear."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16 and kernels.has_amx():
        for block in model.transformer.h:
            if AmxMLP.fits(block.mlp):
                block.mlp = AmxMLP(block.mlp)
        replace_linears(model, AmxLinear, AmxLinear.fits)
    if dtype == torch.bfloat16 and cpu_has_fast_bf16() and torch.backends.mkldnn.is_available():
        return packed_or_kept(model)
    if dtype == torch.float32 and kernels.LIBRARY is not None:
        return replace_linears(model, PanelLinear, lambda linear: linear.out_features % kernels.PANEL == 0)
    return model


def packed_or_kept(model):
    """The model (in place) with its bias-free linear layers as PackedLinear; where torch's private
    oneDNN ops are missing or fail, the layers stay nn.Linear (logged once)."""
    failures = []

    def pack(linear):
        try:
            return PackedLinear(linear)
        except (AttributeError, RuntimeError) as e:  # AttributeError: the op is not in this torch
            failures.append(e)
            return linear

    replace_linears(model, pack)
    if failures:
        log.warning("%d linear layers stay nn.Linear: torch's oneDNN packing failed here (%s)", len(failures), failures[0])
    return model


def replace_linears(model, form, fits=lambda linear: True):
    """The model (in place) with every bias-free nn.Linear that `fits` replaced by form(linear)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear) and child.bias is None and fits(child):
                setattr(module, name, form(child))
    return model
