"""Linear layers for inference: each attention's query, key and value layers fused into one (on
every device), and on CPU the weight held in the form its matmul runs fastest at decode sizes (a
few rows of activations against a large weight).

Measured on the d4 model's lm_head (65,536 x 256), ms per call at 1 / 2 / 8 rows, 2 cores:
- AVX2-only CPU (AMD EPYC, fp32): x @ W.T (nn.Linear, MKL's small-M path) 7.0 / 14.4 / 15.0;
  oneDNN with the weight packed 3.4 / 7.2 / 8.0; W @ x.T (the rows of x as the columns of the
  product) 3.0 / 2.8 / 5.1, at one row only when x is given as two (a one-column product is MKL's
  single-threaded gemv).
- AMX CPU (bf16): oneDNN packed is 2-5x faster than nn.Linear at these sizes.
So `inference_linears` packs bf16 weights for oneDNN and multiplies fp32 ones as W @ x.T; the
results match nn.Linear's up to rounding.
"""

import time

import torch
import torch.nn.functional as F

from nanochat.common import cpu_has_fast_bf16

DOUBLED_ROW_MARGIN = 0.75  # a one-row product goes in doubled only where that takes under 3/4 of the time
ROW_MAJOR_BELOW = 12  # ColumnLinear makes an input of fewer rows row-major (see there)
DOUBLES_ONE_ROW = {}  # (weight shape, dtype) -> doubles_one_row's measured answer


class PackedLinear(torch.nn.Module):
    """A bias-free nn.Linear with its weight reordered once into oneDNN's blocked layout (as
    torch.compile's freezing does) rather than on every call."""

    def __init__(self, linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # 1: a batch-size hint

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class ColumnLinear(torch.nn.Module):
    """A bias-free nn.Linear computed as (W @ x.T).T: the weight's rows are the product's long
    dimension and the rows of x its short one. The output is that product's transpose, a view
    (its last dimension strided). Elementwise ops keep that layout (the MLP's ReLU^2), and MKL
    multiplies such a column-major x 2-4x slower when it has few rows (AVX2 EPYC, 2-10 rows; from
    12 rows up slightly faster), so few rows are made row-major first (ROW_MAJOR_BELOW).

    One row is a matrix-vector product, which MKL runs on one thread: fine while the weight sits
    in cache, half the speed once it streams from memory (the d4 lm_head). There the row goes in
    twice, as a product of two columns on every thread (see doubles_one_row)."""

    def __init__(self, linear):
        super().__init__()
        self.weight = linear.weight.detach()
        self.doubled = doubles_one_row(self.weight)

    def forward(self, x):
        rows = x.reshape(-1, x.size(-1))
        if rows.size(0) > 1:
            if rows.size(0) < ROW_MAJOR_BELOW:
                rows = rows.contiguous()
            return (self.weight @ rows.T).T.view(*x.shape[:-1], -1)
        y = one_row_doubled(self.weight, rows) if self.doubled else F.linear(rows, self.weight)
        return y.view(*x.shape[:-1], -1)


def one_row_doubled(weight, row):
    """row @ weight.T for one row (1, in), as the first column of weight @ [row; row].T."""
    return (weight @ row.repeat(2, 1).T).T[:1].contiguous()


def doubles_one_row(weight):
    """Whether a one-row product with this weight runs faster doubled: measured on the first weight
    of each shape and dtype in a process, then remembered (the time does not depend on the values).
    Doubling must win by a clear margin, so that a near tie, which the two round differently, does
    not flip between runs."""
    key = (tuple(weight.shape), weight.dtype)
    if key not in DOUBLES_ONE_ROW:
        row = torch.randn(1, weight.size(1), dtype=weight.dtype)
        doubled, product = median_seconds(one_row_doubled, weight, row), median_seconds(F.linear, row, weight)
        DOUBLES_ONE_ROW[key] = doubled < DOUBLED_ROW_MARGIN * product
    return DOUBLES_ONE_ROW[key]


def median_seconds(fn, *args, repeats=5):
    """Median wall time of fn(*args) over `repeats` calls, after one warm-up call."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def inference_linears(model):
    """The model (in place) with each attention's query, key and value layers fused into one, and
    on CPU every bias-free linear layer in the form that runs fastest there (see the module
    docstring). The model can no longer train or move to another device."""
    fuse_qkv(model)
    param = next(model.parameters())
    if param.device.type != "cpu":
        return model
    packed = param.dtype == torch.bfloat16 and cpu_has_fast_bf16() and torch.backends.mkldnn.is_available()
    return replace_linears(model, PackedLinear if packed else ColumnLinear)


def fuse_qkv(model):
    """The model (in place) with each attention's c_q, c_k and c_v as one layer: at decode sizes a
    matmul costs about as much for three times the rows, and the rotary and norm after it take
    queries and keys together."""
    for block in model.transformer.h:
        block.attn.fuse_qkv()
    return model


def replace_linears(model, form):
    """The model (in place) with every bias-free nn.Linear replaced by form(linear)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear) and child.bias is None:
                setattr(module, name, form(child))
    return model
