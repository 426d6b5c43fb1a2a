"""Muon + AdamW in one optimizer that also owns gradient synchronisation, and the schedules.

Muon (https://kellerjordan.github.io/posts/muon/) runs SGD with Nesterov momentum and replaces each
2-D update by its nearest semi-orthogonal matrix, computed with Polar Express iterations
(Amsel, Persson, Musco, Gower 2025, https://arxiv.org/abs/2505.16932) in bfloat16 where the hardware
multiplies it fast (`polar_dtype`). It is meant for the transformer's hidden matrices only; the
embeddings, the lm_head and any scalars use AdamW.
Two recipes build the groups (`setup_optimizers`): "classic", nanochat's of late 2025, and "2026",
upstream nanochat's current one, which adds to Muon four refinements, each a group field:
MuonEq row equilibration, Muon+ renormalisation, NorMuon variance reduction and cautious weight decay.

Distributed training does not wrap the model in DDP. Each rank runs forward/backward on its own
micro-batches (gradient accumulation needs no no_sync), and `step()` synchronises (ZeRO-2):
- A large AdamW parameter (first dim divisible by the world size) has its gradient reduce-scattered
  (averaged): each rank updates its share of the rows with its share of the AdamW state, and the
  shares are all-gathered. Small ones are all-reduced and updated whole on every rank.
- The matrices of a Muon group are stacked and reduce-scattered, so each rank receives the mean
  gradient of its own matrices; it keeps their momentum only, orthogonalises them, updates them, and
  the results are all-gathered into every rank's parameters.
Collectives are launched asynchronously so communication overlaps compute, and average with
ReduceOp.AVG (NCCL's, and gloo's in torch 2.13): no pass over the gradients divides them first.
Where gloo lacks reduce_scatter (it has it in torch 2.13, for fp32 and bf16), gradients are
all-reduced whole and each rank keeps its share, so the state is sharded the same way.
Build the optimizer after the process group exists. A checkpoint holds one optimizer state per rank
and resumes only with the same number of processes (`load_state_dict` refuses another).
"""

import math

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

from nanochat.common import cpu_has_fast_bf16

# Polar Express coefficients (a, b, c) of the odd quintics a*x + b*x^3 + c*x^5, one per iteration,
# for 5 iterations with safety factor 2e-2 and cushion 2 (the paper's setting, as in nanochat).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
AVG = dist.ReduceOp.AVG
SHARD_MIN_NUMEL = 1024  # smaller AdamW parameters (scalars, gates) are all-reduced and replicated
RECIPES = ("classic", "2026")
# Each recipe's Muon fields; polar_margin is orthogonalize's (upstream's 6ed7d1d moved it from 1.02 to 1.01).
MUON_REFINEMENTS = dict(muoneq=False, muon_plus=False, normuon_beta2=None, cautious=False, polar_margin=1.02)  # classic
MUON_2026 = dict(muoneq=True, muon_plus=True, normuon_beta2=0.9, cautious=True, polar_margin=1.01)


def orthogonalize(G, steps=5, dtype=torch.bfloat16, margin=1.02):
    """Approximately U V^T for G = U S V^T, batched over leading dims, computed in `dtype`: bfloat16
    is stable for these iterations, and fast on GPUs and on CPUs with bf16 units (see polar_dtype)."""
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    # The Frobenius norm bounds the spectral norm, so singular values start in (0, 1]; the margin
    # (nanochat's: 2%, 1% since 2026) keeps bf16 rounding from pushing the largest past 1, where the
    # polynomials diverge.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def polar_dtype(device):
    """bfloat16 where the hardware multiplies it fast (GPUs with native bf16, CPUs with AMX or
    AVX512-BF16), else float32: other CPUs emulate bf16 matmuls, 2-3x slower than fp32, and a GPU
    without bf16 trains in fp16, whose narrow exponent range these iterations would overflow."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.bfloat16


def equilibrate_rows(G):
    """MuonEq (https://arxiv.org/abs/2603.28254): every row rescaled to the matrix's RMS row norm
    (the Frobenius norm is kept), so the spectrum entering orthogonalisation is better conditioned."""
    target = G.norm(dim=(-2, -1), keepdim=True) / G.size(-2) ** 0.5
    return G * (target / G.norm(dim=-1, keepdim=True).clamp_min(1e-6))


def renormalize(U):
    """Muon+ (https://arxiv.org/abs/2602.21545): the Frobenius norm set to sqrt(min(rows, cols)), that
    of a full-rank semi-orthogonal matrix. The polar factor of a rank-r gradient has norm sqrt(r), so
    without this a low-rank gradient moves the weights far less than a full-rank one."""
    return U * (min(U.shape[-2:]) ** 0.5 / U.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))


def normuon_dim(shape):
    """The dim NorMuon averages over: the columns of a tall or square matrix (one second moment per
    row), the rows of a wide one (one per column), as upstream nanochat chooses."""
    return -1 if shape[-2] >= shape[-1] else -2


def variance_reduce(U, second_moment, beta2):
    """NorMuon (https://arxiv.org/abs/2510.05491): orthogonalised updates have uneven row (or column)
    scales; divide each by the root of its running mean square (`second_moment`, updated in place),
    then restore the update's Frobenius norm, so no bias correction is needed."""
    second_moment.lerp_(U.square().mean(dim=normuon_dim(U.shape), keepdim=True), 1 - beta2)
    scaled = U * second_moment.clamp_min(1e-10).rsqrt()
    return scaled * (U.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


def muon_update(params, grads, momentum_buffer, lr, momentum, ns_steps, weight_decay, muoneq=False,
                muon_plus=False, second_moment=None, normuon_beta2=None, cautious=False, dtype=torch.bfloat16,
                polar_margin=1.02):
    """One Muon step on stacked params (K, rows, cols) given their mean gradients (consumed); the
    refinements are off by default (classic Muon). NorMuon runs when `normuon_beta2` is set, with
    its `second_moment` buffer (K, rows, 1) or (K, 1, cols). `dtype` and `polar_margin`: the polar
    iteration's (orthogonalize)."""
    momentum_buffer.lerp_(grads, 1 - momentum)
    update = grads.lerp_(momentum_buffer, momentum)  # Nesterov: look ahead along the momentum
    if muoneq:
        update = equilibrate_rows(update)
    update = orthogonalize(update, ns_steps, dtype, polar_margin).to(params.dtype)
    if muon_plus:
        update = renormalize(update)
    if normuon_beta2 is not None:
        update = variance_reduce(update, second_moment, normuon_beta2)
    # Orthogonal updates have unit spectral norm; tall matrices (more outputs than inputs) get
    # sqrt(rows/cols) so their RMS update matches square ones (Keller Jordan's Muon scaling).
    rows, cols = params.shape[-2:]
    scaled_lr = lr * max(1.0, rows / cols) ** 0.5
    if cautious:  # decay only where the update also pulls the weight toward 0, at the update's rate (upstream's)
        params.sub_(params * (update * params >= 0), alpha=scaled_lr * weight_decay)
    else:
        params.mul_(1 - lr * weight_decay)
    params.add_(update, alpha=-scaled_lr)


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
        kind='muon':  lr, momentum, ns_steps, weight_decay; all params 2-D and of one shape; optional
                      refinements (`muon_update`): muoneq, muon_plus, normuon_beta2, cautious, polar_margin
    Every group also gets 'initial_lr' (its lr at construction), and Muon groups 'initial_weight_decay',
    for `set_schedule`. Every parameter must have a gradient when `step()` runs.
    """

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            if group["kind"] == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a Muon group needs 2-D params of one shape, got {sorted(shapes)}")
                for key, value in MUON_REFINEMENTS.items():
                    group.setdefault(key, value)
                group.setdefault("initial_weight_decay", group["weight_decay"])
            elif group["kind"] != "adamw":
                raise ValueError(f"unknown optimizer kind {group['kind']!r}")
            group.setdefault("initial_lr", group["lr"])
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        device = self.param_groups[0]["params"][0].device
        self.reduce_scatter = distributed and reduce_scatter_works(device)
        self.polar_dtype = polar_dtype(device)

    def set_schedule(self, lr_multiplier, muon_momentum=None, weight_decay_multiplier=None):
        """Sets every group's lr to initial_lr * lr_multiplier and, if given, the Muon groups'
        momentum and weight decay (initial_weight_decay * weight_decay_multiplier)."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] != "muon":
                continue
            if muon_momentum is not None:
                group["momentum"] = muon_momentum
            if weight_decay_multiplier is not None:
                group["weight_decay"] = group["initial_weight_decay"] * weight_decay_multiplier

    def load_state_dict(self, state_dict):
        """torch's, plus: AdamW's step counts go to their parameters' devices with the rest of the
        state (torch leaves them where they were loaded, on the CPU, unless a group says `fused`,
        and the fused CUDA kernel refuses them there); group fields the saved state lacks (it
        predates them) keep their values from construction; AdamW state saved whole on every rank
        (before it was sharded) gives this rank its rows; and a state sharded for another number
        of processes is refused."""
        constructed = [dict(group) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        for group, fields in zip(self.param_groups, constructed):
            merged = {**fields, **group}  # in construction's order, as a state saved after a fresh start
            group.clear()
            group.update(merged)
        for group in self.param_groups:
            for p, key, shape in self._state_shapes(group):
                saved = self.state[p].get(key)
                if group["kind"] == "adamw" and saved is not None and saved.shape == p.shape != shape:
                    saved = self.state[p][key] = saved[self._adamw_rows(p)].clone()
                if saved is not None and tuple(saved.shape) != shape:
                    raise ValueError(f"optimizer state {key!r} of shape {tuple(saved.shape)} does not fit {shape}: "
                                     f"it was saved by a different number of processes than {self.world_size}")

    def _state_shapes(self, group):
        """(param, state key, shape) of every sharded state tensor of the group on this rank."""
        if group["kind"] == "adamw":
            for p in group["params"]:
                rows = self._adamw_rows(p)
                shape = tuple(p.shape if rows is None else p[rows].shape)
                yield p, "exp_avg", shape
                yield p, "exp_avg_sq", shape
            return
        chunk = self._muon_shard(group)[0]
        shape = group["params"][0].shape
        yield group["params"][0], "momentum_buffer", (chunk, *shape)
        moment = list(shape)
        moment[normuon_dim(shape)] = 1
        yield group["params"][0], "second_moment", (chunk, *moment)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    raise RuntimeError(f"a parameter of shape {tuple(p.shape)} has no gradient")
        # 1. launch every gradient reduction; 2. as each one lands, compute that group's update and
        # launch the gathers of the new weights; 3. wait for the gathers (and copy Muon's back).
        reductions = [self._reduce(group) for group in self.param_groups]
        gathers = []
        for group, pending in zip(self.param_groups, reductions):
            gathers += self._update(group, pending)
        for work, gathered, params in gathers:
            work.wait()
            if params is not None:
                torch._foreach_copy_(params, list(gathered[:len(params)].unbind(0)))

    def _adamw_rows(self, p):
        """The rows of an AdamW parameter this rank updates and keeps state for: its share when the
        parameter is large and its first dim divides evenly, else None (all of them)."""
        if self.world_size == 1 or p.numel() < SHARD_MIN_NUMEL or p.size(0) % self.world_size:
            return None
        rows = p.size(0) // self.world_size
        return slice(self.rank * rows, (self.rank + 1) * rows)

    def _muon_shard(self, group):
        """(chunk, start, end): each rank owns `chunk` stacked slots, of which params[start:end]."""
        num = len(group["params"])
        chunk = math.ceil(num / self.world_size)
        start = min(num, self.rank * chunk)
        return chunk, start, min(num, start + chunk)

    def _reduce(self, group):
        """Starts averaging the group's gradients: [(work or None, this rank's share of the mean
        gradient)] per param (AdamW), or one such pair for the stacked gradients (Muon)."""
        params = group["params"]
        if group["kind"] == "adamw":
            if self.world_size == 1:
                return [(None, p.grad) for p in params]
            pending = []
            for p in params:
                rows = self._adamw_rows(p)
                if rows is not None and self.reduce_scatter:
                    own = torch.empty_like(p.grad[rows])
                    pending.append((dist.reduce_scatter_single(own, p.grad, op=AVG, async_op=True), own))
                else:
                    pending.append((dist.all_reduce(p.grad, op=AVG, async_op=True), p.grad if rows is None else p.grad[rows]))
            return pending
        chunk, _, _ = self._muon_shard(group)
        # Zero-padded to chunk * world_size slots, so every rank receives an equal share.
        grads = params[0].new_zeros(chunk * self.world_size, *params[0].shape)
        torch._foreach_copy_(list(grads[:len(params)].unbind(0)), [p.grad for p in params])
        if self.world_size == 1:
            return None, grads
        if self.reduce_scatter:
            own = torch.empty_like(grads[:chunk])
            return dist.reduce_scatter_single(own, grads, op=AVG, async_op=True), own
        own = grads[self.rank * chunk:(self.rank + 1) * chunk]
        return dist.all_reduce(grads, op=AVG, async_op=True), own

    def _update(self, group, pending):
        """Applies the group's update once its gradients have landed; returns the gathers it
        launched, as (work, gathered, params to copy them into, or None if gathered in place)."""
        if group["kind"] == "adamw":
            for work, _ in pending:
                if work is not None:
                    work.wait()
            rows = [self._adamw_rows(p) for p in group["params"]]
            owned = [p if r is None else p[r] for p, r in zip(group["params"], rows)]
            self._adamw_step(group, owned, [grad for _, grad in pending])
            # the input is a copy: it must not alias the output
            return [(dist.all_gather_single(p, share.clone(), async_op=True), None, None)
                    for p, r, share in zip(group["params"], rows, owned) if r is not None]

        work, own_grads = pending
        if work is not None:
            work.wait()
        params = group["params"]
        chunk, start, end = self._muon_shard(group)
        state = self.state[params[0]]  # stacked buffers per group, kept on the first param
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(own_grads)
        if group["normuon_beta2"] is not None and "second_moment" not in state:
            shape = list(own_grads.shape)
            shape[normuon_dim(shape)] = 1
            state["second_moment"] = own_grads.new_zeros(shape)
        owned = torch.stack(params[start:end]) if end > start else own_grads[:0]
        if end > start:  # with fewer matrices than ranks, the last ranks own none
            second_moment = state["second_moment"][:end - start] if "second_moment" in state else None
            muon_update(owned, own_grads[:end - start], state["momentum_buffer"][:end - start], group["lr"],
                        group["momentum"], group["ns_steps"], group["weight_decay"], muoneq=group["muoneq"],
                        muon_plus=group["muon_plus"], second_moment=second_moment,
                        normuon_beta2=group["normuon_beta2"], cautious=group["cautious"], dtype=self.polar_dtype,
                        polar_margin=group["polar_margin"])
        if self.world_size == 1:
            torch._foreach_copy_(params, list(owned.unbind(0)))
            return []
        new = torch.zeros_like(own_grads)
        new[:end - start] = owned
        gathered = new.new_empty(chunk * self.world_size, *new.shape[1:])
        return [(dist.all_gather_single(gathered, new, async_op=True), gathered, params)]

    def _adamw_step(self, group, params, grads):
        """torch.optim.AdamW's update of `params` (whole parameters or this rank's rows of them),
        through its fused kernel (CPU and CUDA): one pass instead of one per arithmetic operation."""
        for p, param in zip(params, group["params"]):
            state = self.state[param]
            if not state:  # the layout torch.optim.AdamW(fused=True) uses
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in group["params"]]
        beta1, beta2 = group["betas"]
        adamw(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def adamw_groups(recipe, embedding_lr, unembedding_lr, scalar_lr, adamw_scale):
    """[(parameter names matched, AdamW hyperparameters)] per group. The model options' groups
    (value embeddings, lambdas, smear and backout) are upstream nanochat's under both recipes;
    the 2026 recipe also takes its betas and weight decays for lm_head and wte."""
    classic = recipe == "classic"
    return [
        (lambda n: n == "lm_head.weight",
         dict(lr=unembedding_lr * adamw_scale, betas=(0.8, 0.95) if classic else (0.8, 0.96),
              weight_decay=0.0 if classic else 0.01)),
        (lambda n: n == "transformer.wte.weight",
         dict(lr=embedding_lr * adamw_scale, betas=(0.8, 0.95) if classic else (0.8, 0.995),
              weight_decay=0.0 if classic else 0.001)),
        (lambda n: n.startswith("value_embeds."),
         dict(lr=embedding_lr * adamw_scale * 0.5, betas=(0.8, 0.995), weight_decay=0.01)),
        (lambda n: n == "resid_lambdas", dict(lr=scalar_lr * 0.01, betas=(0.8, 0.95), weight_decay=0.05)),
        (lambda n: n == "x0_lambdas", dict(lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0)),
        (lambda n: n in ("smear_gate.weight", "smear_lambda", "backout_lambda"),
         dict(lr=0.2, betas=(0.8, 0.95), weight_decay=0.0)),
    ]


def setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                     scalar_lr=0.5, recipe="classic"):
    """The MuonAdamW of a GPT: AdamW for the embeddings, the lm_head and the model options' scalars
    and gates, Muon for the block matrices (one group per shape, so they can be stacked), with the
    2026 refinements under recipe "2026". The embedding and lm_head rates were tuned at width 768
    and scale as 1/sqrt(width); `weight_decay` is the Muon groups' (the AdamW ones are fixed)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown optimizer recipe {recipe!r}: choose from {', '.join(RECIPES)}")
    named = list(model.named_parameters())
    adamw_scale = (model.config.n_embd / 768) ** -0.5
    groups = []
    for matches, hyper in adamw_groups(recipe, embedding_lr, unembedding_lr, scalar_lr, adamw_scale):
        params = [p for name, p in named if matches(name)]
        if params:
            groups.append(dict(kind="adamw", params=params, eps=1e-10, **hyper))
    matrices = [p for name, p in named if name.startswith("transformer.h.") and p.ndim == 2]
    refinements = MUON_REFINEMENTS if recipe == "classic" else MUON_2026
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr,
                           momentum=0.95, ns_steps=5, weight_decay=weight_decay, **refinements))
    grouped = {id(p) for group in groups for p in group["params"]}
    missing = [name for name, p in named if id(p) not in grouped]
    if missing:
        raise ValueError(f"parameters in no optimizer group: {', '.join(missing)}")
    return MuonAdamW(groups)


def lr_multiplier(step, num_steps, warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Learning-rate multiplier at `step` of `num_steps`: linear warmup over `warmup_steps`, constant,
    then a linear warmdown over the last warmdown_ratio of training to final_lr_frac."""
    warmdown = round(warmdown_ratio * num_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if warmdown == 0 or step <= num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step, num_steps, schedule="classic", warmdown_ratio=0.2):
    """Muon momentum at `step`. classic: 0.85 -> 0.95 over the first 300 steps. 2026 (upstream's):
    0.85 -> 0.97 over the first 400 steps, then down to 0.90 over the LR warmdown."""
    if schedule == "classic":
        return interpolate(0.85, 0.95, min(step / 300, 1.0))
    if schedule != "2026":
        raise ValueError(f"unknown momentum schedule {schedule!r}: choose from classic, 2026")
    warmdown = round(warmdown_ratio * num_steps)
    if step < 400:
        return interpolate(0.85, 0.97, step / 400)
    if step >= num_steps - warmdown:
        return interpolate(0.97, 0.90, (step - (num_steps - warmdown)) / warmdown)
    return 0.97


def interpolate(start, end, frac):
    return (1 - frac) * start + frac * end


def weight_decay_multiplier(step, num_steps, schedule="constant"):
    """The Muon weight decay's multiplier at `step`: 1, or a cosine from 1 to 0 over training (upstream's)."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown weight decay schedule {schedule!r}: choose from constant, cosine")
    return 0.5 * (1 + math.cos(math.pi * step / num_steps))
