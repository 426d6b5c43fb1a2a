"""The training loss, fused: lm_head matmul + logit soft cap + cross-entropy, a chunk of rows at a time,
so the (tokens, vocab) fp32 logits never exist at once (as Liger-Kernel's fused linear cross-entropy).

    loss = cross_entropy(x, w, targets, "mean", chunk_sizes(x.device.type), cap=15.0)

The caller gives the chunk sizes, in logits per chunk: (rows of the lm_head matmul, rows of the
softmax). `chunk_sizes(device_type)` holds the two pairs this code was tuned with.
"""

import torch

# (lm_head matmul block, softmax piece) in logits. CPU: the matmul on blocks of 2^23 logits (128 rows
# at vocab 65,536; smaller blocks re-read the weight too often), the softmax and its gradient on
# pieces of 2^20 (4 MB in fp32, so their temporaries stay in cache). GPU: 1 GiB for both, few chunks,
# as there kernel launches cost more than memory traffic.
CPU_CHUNKS = (2**23, 2**20)
GPU_CHUNKS = (2**28, 2**28)


def chunk_sizes(device_type):
    """The (matmul block, softmax piece) sizes in logits for a device type."""
    return CPU_CHUNKS if device_type == "cpu" else GPU_CHUNKS


def matmul_dtype(x):
    """The dtype autocast would run a matmul on x in (x's own dtype outside autocast)."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def chunked_cross_entropy(x, w, targets, chunks, cap, grad_logits=None):
    """Per-token cross-entropy (fp32; 0 where the target is -1) of the soft-capped logits
    cap * tanh(x @ w.T / cap), computed a few rows at a time (`chunks`, see chunk_sizes) so the
    (tokens, vocab) logits never exist at once. If grad_logits (tokens, vocab) is given, it receives
    each token's d loss / d logits (before the cap; 0 for ignored tokens)."""
    block, piece = (max(1, n // w.size(0)) for n in chunks)
    # cap tanh(z / cap) = 2 cap sigmoid(2z / cap) - cap, and softmax ignores the -cap: CPU sigmoid
    # kernels are several times faster than tanh, and d cap / dz = 1 - tanh^2 = 4 gate (1 - gate)
    # comes from the same gate. Ignored tokens' rows get a factor 0 instead of 4.
    grad_scale = (4.0 * (targets != -1))[:, None]
    losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    for start in range(0, x.size(0), block):
        gate_logits = (x[start:start + block] * (2 / cap)) @ w.T  # the 2/cap scales x, much smaller than z
        for i in range(0, gate_logits.size(0), piece):
            gate = gate_logits[i:i + piece].float().sigmoid_()
            rows = slice(start + i, start + i + gate.size(0))
            probs = torch.softmax(gate * (2 * cap), dim=-1)
            target = targets[rows].clamp(min=0)[:, None]
            # The cap bounds the logits to +-cap, so no probability underflows and log(p) is accurate.
            losses[rows] = probs.gather(1, target).squeeze(1).log_().neg_()
            if grad_logits is not None:
                # d loss / d capped logits = probs - onehot(target), times d cap / dz
                probs.scatter_add_(1, target, torch.full_like(probs[:, :1], -1.0))
                probs.mul_(gate)
                probs.addcmul_(probs, gate, value=-1)
                torch.mul(probs, grad_scale[rows], out=grad_logits[rows])
    return losses.masked_fill_(targets == -1, 0.0)


def reduce_losses(losses, targets, reduction):
    """F.cross_entropy's reductions of per-token losses (ignored tokens hold 0)."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / (targets != -1).sum()
    raise ValueError(f"unknown loss reduction {reduction!r}")


class LinearCrossEntropy(torch.autograd.Function):
    """lm_head matmul + soft cap + cross-entropy, with the logits' gradient computed during the
    forward pass chunk by chunk, so backward is two matmuls. Holds one (tokens, vocab) buffer in the
    matmul dtype instead of several fp32 logits."""

    @staticmethod
    def forward(ctx, x, w, targets, reduction, chunks, cap):
        dtype = matmul_dtype(x)
        ctx.dtypes, ctx.reduction = (x.dtype, w.dtype), reduction
        x, w = x.to(dtype), w.to(dtype)
        grad_logits = torch.empty(x.size(0), w.size(0), dtype=dtype, device=x.device)
        losses = chunked_cross_entropy(x, w, targets, chunks, cap, grad_logits)
        ctx.save_for_backward(x, w, grad_logits, (targets != -1).sum())
        return reduce_losses(losses, targets, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        x, w, grad_logits, count = ctx.saved_tensors
        if ctx.reduction == "none":  # a weight per token: scale the rows
            grad_logits = grad_logits * grad_output[:, None].to(grad_logits.dtype)
            scale = 1.0
        else:  # one weight for all: scale the small x and grad_x rather than anything vocab-sized
            scale = grad_output / count if ctx.reduction == "mean" else grad_output
        grad_x = (grad_logits @ w) * scale
        grad_w = grad_logits.T @ (x * scale).to(x.dtype)
        return grad_x.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None, None


def cross_entropy(x, w, targets, reduction, chunks, cap):
    """F.cross_entropy(cap * tanh(x @ w.T / cap), targets, ignore_index=-1, reduction=reduction),
    fused and chunked (`chunks`: see chunk_sizes); 'none' gives 0 for ignored tokens."""
    if torch.compiler.is_compiling():
        # already fused by hand (traced, its chunk loop would unroll into a long compile): the graph
        # breaks here and the call runs eagerly. Disabled only when traced, as a decorator would
        # import torch._dynamo (about a second) into every process that imports the model.
        return torch.compiler.disable(cross_entropy)(x, w, targets, reduction, chunks, cap)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return LinearCrossEntropy.apply(x, w, targets, reduction, chunks, cap)
    dtype = matmul_dtype(x)
    return reduce_losses(chunked_cross_entropy(x.to(dtype), w.to(dtype), targets, chunks, cap), targets, reduction)
