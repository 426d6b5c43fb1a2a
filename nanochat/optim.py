"""Muon + AdamW in one optimizer that also owns gradient synchronisation, and the schedules.

Muon (https://kellerjordan.github.io/posts/muon/) runs SGD with Nesterov momentum and replaces each
2-D update by its nearest semi-orthogonal matrix, computed with Polar Express iterations
(Amsel, Persson, Musco, Gower 2025, https://arxiv.org/abs/2505.16932) in bfloat16. It is meant for
the transformer's hidden matrices only; the embedding, the lm_head and any scalars use AdamW.

Distributed training does not wrap the model in DDP. Each rank runs forward/backward on its own
micro-batches (gradient accumulation needs no no_sync), and `step()` synchronises:
- AdamW gradients are all-reduced (averaged); every rank applies the same update.
- The matrices of a Muon group are stacked and reduce-scattered (averaged), so each rank receives
  the mean gradient of its own share; it keeps the momentum of that share only, orthogonalises it,
  updates those matrices, and the results are all-gathered into every rank's parameters.
Collectives are launched asynchronously so communication overlaps compute. Averages are taken as
sums of gradients divided by the world size beforehand, since gloo lacks ReduceOp.AVG in older
releases; likewise, where gloo lacks reduce_scatter (it has it in torch 2.13, for fp32 and bf16),
the Muon gradients are all-reduced whole and each rank keeps its share. Build the optimizer after
the process group exists. The Muon state is sharded: a checkpoint holds one optimizer state per
rank and resumes only with the same number of processes.
"""

import math

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

# Polar Express coefficients (a, b, c) of the odd quintics a*x + b*x^3 + c*x^5, one per iteration,
# for 5 iterations with safety factor 2e-2 and cushion 2 (the paper's setting, as in nanochat).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G, steps=5):
    """Approximately U V^T for G = U S V^T, batched over leading dims, computed in bfloat16 (stable
    for these iterations, and fast on GPUs and on CPUs with bf16 units). Returns bfloat16."""
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    # The Frobenius norm bounds the spectral norm, so singular values start in (0, 1]; the 2% margin
    # (nanochat's) keeps bf16 rounding from pushing the largest past 1, where the polynomials diverge.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def muon_update(params, grads, momentum_buffer, lr, momentum, ns_steps, weight_decay):
    """One Muon step on stacked params (K, rows, cols) given their mean gradients (consumed)."""
    momentum_buffer.lerp_(grads, 1 - momentum)
    update = grads.lerp_(momentum_buffer, momentum)  # Nesterov: look ahead along the momentum
    update = orthogonalize(update, ns_steps).to(params.dtype)
    # Orthogonal updates have unit spectral norm; tall matrices (more outputs than inputs) get
    # sqrt(rows/cols) so their RMS update matches square ones (Keller Jordan's Muon scaling).
    rows, cols = params.shape[-2:]
    params.mul_(1 - lr * weight_decay)
    params.add_(update, alpha=-lr * max(1.0, rows / cols) ** 0.5)


def reduce_scatter_works(device):
    """Whether this process group can reduce_scatter tensors on `device`. Every rank gets the same
    answer: an unsupported collective fails locally, before any communication."""
    if dist.get_backend() != "gloo":
        return True
    try:
        dist.reduce_scatter_single(torch.zeros(1, device=device), torch.zeros(dist.get_world_size(), device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return True


class MuonAdamW(torch.optim.Optimizer):
    """Muon for 2-D matrices, AdamW for the rest; synchronises gradients across ranks itself.

    param_groups: dicts with 'params' and 'kind':
        kind='adamw': lr, betas, eps, weight_decay (torch.optim.AdamW's update and state)
        kind='muon':  lr, momentum, ns_steps, weight_decay; all params 2-D and of one shape
    Every group also gets 'initial_lr' (its lr at construction) for `set_schedule`. Every parameter
    must have a gradient when `step()` runs.
    """

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            if group["kind"] == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a Muon group needs 2-D params of one shape, got {sorted(shapes)}")
            elif group["kind"] != "adamw":
                raise ValueError(f"unknown optimizer kind {group['kind']!r}")
            group.setdefault("initial_lr", group["lr"])
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.reduce_scatter = distributed and reduce_scatter_works(self.param_groups[0]["params"][0].device)

    def set_schedule(self, lr_multiplier, muon_momentum=None):
        """Sets every group's lr to initial_lr * lr_multiplier and, if given, the Muon momentum."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] == "muon" and muon_momentum is not None:
                group["momentum"] = muon_momentum

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    raise RuntimeError(f"a parameter of shape {tuple(p.shape)} has no gradient")
        # 1. launch every gradient reduction; 2. as each one lands, compute that group's update and
        # launch the gather of the new weights; 3. wait for the gathers and copy back.
        reductions = [self._reduce(group) for group in self.param_groups]
        gathers = [self._update(group, pending) for group, pending in zip(self.param_groups, reductions)]
        for work, gathered, params in filter(None, gathers):
            if work is not None:
                work.wait()
            torch._foreach_copy_(params, list(gathered[:len(params)].unbind(0)))

    def _muon_shard(self, group):
        """(chunk, start, end): each rank owns `chunk` stacked slots, of which params[start:end]."""
        num = len(group["params"])
        chunk = math.ceil(num / self.world_size)
        start = min(num, self.rank * chunk)
        return chunk, start, min(num, start + chunk)

    def _reduce(self, group):
        """Starts averaging the group's gradients: a list of works (AdamW), or (work, this rank's
        share of the stacked mean gradients) (Muon)."""
        params = group["params"]
        if group["kind"] == "adamw":
            if self.world_size == 1:
                return []
            torch._foreach_div_([p.grad for p in params], self.world_size)
            return [dist.all_reduce(p.grad, async_op=True) for p in params]
        chunk, _, _ = self._muon_shard(group)
        # Zero-padded to chunk * world_size slots, so every rank receives an equal share.
        grads = params[0].new_zeros(chunk * self.world_size, *params[0].shape)
        torch._foreach_copy_(list(grads[:len(params)].unbind(0)), [p.grad for p in params])
        if self.world_size == 1:
            return None, grads
        grads.div_(self.world_size)
        if self.reduce_scatter:
            own = torch.empty_like(grads[:chunk])
            return dist.reduce_scatter_single(own, grads, async_op=True), own
        own = grads[self.rank * chunk:(self.rank + 1) * chunk]
        return dist.all_reduce(grads, async_op=True), own

    def _update(self, group, pending):
        """Applies the group's update once its gradients have landed; for Muon, returns the pending
        gather of the updated matrices (work, gathered, params)."""
        if group["kind"] == "adamw":
            for work in pending:
                work.wait()
            self._adamw_step(group)
            return None

        work, own_grads = pending
        if work is not None:
            work.wait()
        params = group["params"]
        chunk, start, end = self._muon_shard(group)
        state = self.state[params[0]]  # one stacked buffer per group, kept on the first param
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(own_grads)
        buffer = state["momentum_buffer"]
        if buffer.shape != own_grads.shape:
            raise RuntimeError(f"Muon momentum of shape {tuple(buffer.shape)} does not fit {tuple(own_grads.shape)}: "
                               "the optimizer state was saved with a different number of processes")
        owned = torch.stack(params[start:end]) if end > start else own_grads[:0]
        if end > start:  # with fewer matrices than ranks, the last ranks own none
            muon_update(owned, own_grads[:end - start], buffer[:end - start], group["lr"], group["momentum"],
                        group["ns_steps"], group["weight_decay"])
        if self.world_size == 1:
            return None, owned, params
        new = torch.zeros_like(own_grads)
        new[:end - start] = owned
        gathered = new.new_empty(chunk * self.world_size, *new.shape[1:])
        return dist.all_gather_single(gathered, new, async_op=True), gathered, params

    def _adamw_step(self, group):
        """torch.optim.AdamW's update, through its fused kernel (CPU and CUDA): one pass over the
        parameters instead of one per arithmetic operation."""
        params = group["params"]
        for p in params:
            state = self.state[p]
            if not state:  # the layout torch.optim.AdamW(fused=True) uses
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                     adam_betas=(0.8, 0.95)):
    """The MuonAdamW of a GPT: AdamW for the embedding and the lm_head, Muon for the block matrices
    (one group per shape, so they can be stacked). The AdamW rates were tuned at width 768 and
    scale as 1/sqrt(width); weight decay applies to the Muon matrices only (as nanochat)."""
    adamw_scale = (model.config.n_embd / 768) ** -0.5
    adamw_group = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
    groups = [
        dict(adamw_group, params=[model.lm_head.weight], lr=unembedding_lr * adamw_scale),
        dict(adamw_group, params=[model.transformer.wte.weight], lr=embedding_lr * adamw_scale),
    ]
    matrices = [p for p in model.transformer.h.parameters() if p.ndim == 2]
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape],
                           lr=matrix_lr, momentum=0.95, ns_steps=5, weight_decay=weight_decay))
    grouped = {id(p) for group in groups for p in group["params"]}
    missing = [name for name, p in model.named_parameters() if id(p) not in grouped]
    if missing:
        raise ValueError(f"parameters in no optimizer group: {', '.join(missing)}")
    return MuonAdamW(groups)


def lr_multiplier(step, num_steps, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Learning-rate multiplier at `step` of `num_steps`: linear warmup, constant, then a linear
    warmdown over the last warmdown_ratio of training to final_lr_frac (nanochat's defaults)."""
    warmup = round(warmup_ratio * num_steps)
    warmdown = round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if warmdown == 0 or step <= num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step, warmup_steps=300, start=0.85, end=0.95):
    """Muon momentum warmup: linear from `start` to `end` over the first `warmup_steps` steps."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end
