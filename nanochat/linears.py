"""Linear layers for inference: each attention's query, key and value layers fused into one (on
every device), and on CPU the weight held in the form its matmul runs fastest at decode sizes (a
few rows of activations against a large weight).

Measured on the d4 model's lm_head (65,536 x 256), ms per call at 1 / 8 rows, 2 cores:
- AVX2-only CPU (AMD EPYC, fp32): x @ W.T (nn.Linear, MKL) 6.5 / 14.5; oneDNN with the weight
  packed 3.4 / 8.0; W @ x.T 4.6 / 5.5; `PanelLinear` (nanochat's kernel) 1.6-2.9 / 3.2-4.3 (one
  row streams the weight from memory, and the VM's bandwidth varies). The body's layers too are
  2-3x faster than with MKL (768 x 256 at 8 rows: 26 us against 77); from a few thousand rows up
  (long prefills) the two are about even.
- AMX CPU (bf16): oneDNN packed is 2-5x faster than nn.Linear at these sizes.
So `inference_linears` packs bf16 weights for oneDNN and fp32 ones into panels; the results match
nn.Linear's up to rounding. Elsewhere (no AVX2, no C compiler) layers stay nn.Linear.
"""

import torch

from nanochat import cpu_kernels
from nanochat.common import cpu_has_fast_bf16


class PackedLinear(torch.nn.Module):
    """A bias-free nn.Linear with its weight reordered once into oneDNN's blocked layout (as
    torch.compile's freezing does) rather than on every call."""

    def __init__(self, linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # 1: a batch-size hint

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class PanelLinear(torch.nn.Module):
    """A bias-free fp32 nn.Linear computed by nanochat's AVX2 kernel (cpu_kernels.c), its weight
    packed once into panels of 16 output features. The output is row-major."""

    def __init__(self, linear):
        super().__init__()
        self.panels = cpu_kernels.pack(linear.weight)

    def forward(self, x):
        y = cpu_kernels.panel_matmul(x.reshape(-1, x.size(-1)), self.panels)
        return y.view(*x.shape[:-1], -1)


def inference_linears(model):
    """The model (in place) with each attention's query, key and value layers fused into one, and
    on CPU every bias-free linear layer in the form that runs fastest there (see the module
    docstring). The model can no longer train or move to another device."""
    fuse_qkv(model)
    param = next(model.parameters())
    if param.device.type != "cpu":
        return model
    if param.dtype == torch.bfloat16 and cpu_has_fast_bf16() and torch.backends.mkldnn.is_available():
        return replace_linears(model, PackedLinear)
    if param.dtype == torch.float32 and cpu_kernels.library() is not None:
        return replace_linears(model, PanelLinear, lambda linear: linear.out_features % cpu_kernels.PANEL == 0)
    return model


def fuse_qkv(model):
    """The model (in place) with each attention's c_q, c_k and c_v as one layer: at decode sizes a
    matmul costs about as much for three times the rows, and the rotary and norm after it take
    queries and keys together."""
    for block in model.transformer.h:
        block.attn.fuse_qkv()
    return model


def replace_linears(model, form, fits=lambda linear: True):
    """The model (in place) with every bias-free nn.Linear that `fits` replaced by form(linear)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear) and child.bias is None and fits(child):
                setattr(module, name, form(child))
    return model
