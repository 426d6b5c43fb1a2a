"""MuonAdamW: orthogonalisation quality, both recipes' updates against references (torch.optim.AdamW,
today's Muon step, each 2026 refinement computed directly), the properties upstream's optimizer tests
check (determinism, semi-orthogonal first update, convergence), the schedules, and the distributed
step (2 real gloo processes, sharded state, a resumed checkpoint) against one process."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from nanochat import checkpoint, common
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import (
    MUON_2026,
    MUON_REFINEMENTS,
    RECIPES,
    MuonAdamW,
    equilibrate_rows,
    lr_multiplier,
    muon_momentum,
    muon_update,
    orthogonalize,
    polar_dtype,
    setup_optimizers,
    weight_decay_multiplier,
)

# 3 layers: every Muon group holds 3 matrices, so 2 ranks own 2 and 1 (a zero-padded slot)
CONFIG = GPTConfig(sequence_len=16, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
OPTIONS = dataclasses.replace(CONFIG, value_embeds=True, lambdas=True, smear=True, backout=True)
STEPS = 4
SAVED_AT = 2  # the distributed runs checkpoint after this many steps, and resume from there
MUON_FIELDS = ("muoneq", "muon_plus", "normuon_beta2", "cautious", "polar_margin")


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second OpenMP thread gains nothing, and when the cores are busy (a
    background run of the suite) the threads wait on each other, 20-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gpt_with_options():
    """The GPT with every model option that has parameters (value embeddings on layers 0 and 2 with
    their gates, residual and x0 lambdas, smear gate, backout); the optimizer finds them by name."""
    torch.manual_seed(0)
    return GPT(OPTIONS)


@pytest.mark.parametrize("shape,dtype", [((64, 64), torch.bfloat16), ((96, 32), torch.bfloat16),
                                         ((32, 96), torch.bfloat16), ((4, 48, 16), torch.bfloat16),
                                         ((96, 32), torch.float32)])  # float32: GPUs without bf16
def test_orthogonalize_maps_singular_values_near_one(shape, dtype):
    torch.manual_seed(0)
    *batch, m, n = shape
    U, _ = torch.linalg.qr(torch.randn(*batch, m, min(m, n)))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, min(m, n)))
    S = torch.logspace(-2, 0, min(m, n)) * 5.0  # condition number 100, arbitrary scale
    G = U @ torch.diag_embed(S.expand(*batch, -1)) @ V.mT
    X = orthogonalize(G, dtype=dtype)
    assert X.dtype == dtype and X.shape == G.shape
    singular = torch.linalg.svdvals(X.float())
    assert singular.min() > 0.7 and singular.max() < 1.2
    polar = U @ V.mT  # the exact answer
    assert (X.float() - polar).norm() / polar.norm() < 0.15
    torch.testing.assert_close(orthogonalize(G.mT, dtype=dtype), X.mT, rtol=0, atol=0.05)  # up to bf16 rounding


def test_the_polar_margin_is_each_recipes_own():
    """The iterations start from G / (margin * ||G||_F), and the optimizer iterates with its group's
    margin: the two recipes' (1.02, 1.01) give different updates."""
    G = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(orthogonalize(G, steps=0, dtype=torch.float32, margin=1.01),
                               G / (G.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6))
    updates = {}
    for margin in (1.02, 1.01):
        p = nn.Parameter(torch.zeros(24, 8))
        optimizer = MuonAdamW([muon_group([p], "classic", lr=1.0, momentum=0.0, polar_margin=margin)])
        p.grad = G[0].clone()
        optimizer.step()
        expected = -orthogonalize(G[:1], dtype=optimizer.polar_dtype, margin=margin).float()[0] * 3 ** 0.5
        torch.testing.assert_close(p.detach(), expected)
        updates[margin] = p.detach()
    assert not torch.equal(updates[1.02], updates[1.01])


@pytest.mark.parametrize("flags,dtype", [({"avx512f", "amx_bf16"}, torch.bfloat16), ({"avx512_bf16"}, torch.bfloat16),
                                         ({"avx512f", "avx2"}, torch.float32), (set(), torch.float32)])
def test_the_polar_iterations_run_in_bf16_only_on_cpus_that_multiply_it(monkeypatch, flags, dtype):
    """A CPU without AMX or AVX512-BF16 emulates bf16 matmuls, 2-3x slower than fp32 (the
    optimizer step was a quarter of a cpu-preset step on such a CPU), so there they run in fp32."""
    monkeypatch.setattr(common, "cpu_flags", lambda: flags)
    assert polar_dtype(torch.device("cpu")) == dtype
    assert setup_optimizers(GPT(CONFIG)).polar_dtype == dtype  # what the optimizer runs them in


@pytest.mark.parametrize("native,dtype,polar", [(True, torch.bfloat16, torch.bfloat16), (False, torch.float16, torch.float32)])
def test_a_gpu_that_emulates_bf16_trains_in_fp16(monkeypatch, native, dtype, polar):
    """torch.cuda.is_bf16_supported() says yes on a V100 or T4, which emulate bf16 (slower than their
    fp16), and no there without emulation: such a GPU trains in fp16, its polar iterations in fp32."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert common.autocast_dtype("cuda") == dtype
    assert polar_dtype(torch.device("cuda")) == polar


def todays_muon_step(stacked, grads, buffer, lr, momentum, weight_decay):
    """The classic Muon step as it was before the 2026 refinements, written out."""
    buffer.lerp_(grads, 1 - momentum)
    update = orthogonalize(grads.lerp(buffer, momentum), dtype=polar_dtype(stacked.device)).to(stacked.dtype)
    rows, cols = stacked.shape[-2:]
    stacked.mul_(1 - lr * weight_decay)
    stacked.add_(update, alpha=-lr * max(1.0, rows / cols) ** 0.5)


def test_classic_equals_todays_optimizer_bit_for_bit():
    """The classic recipe: torch.optim.AdamW (fused) on lm_head and wte at today's rates, today's
    Muon step on the stacked block matrices, momentum and lr from the schedules; weights equal."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = setup_optimizers(model, weight_decay=0.1)
    scale = (CONFIG.n_embd / 768) ** -0.5
    adamw = {name: torch.optim.AdamW([reference[name]], lr=lr * scale, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                                     fused=True) for name, lr in (("lm_head.weight", 0.004), ("transformer.wte.weight", 0.2))}
    matrices = [name for name in reference if name.startswith("transformer.h.")]
    shapes = sorted({tuple(reference[name].shape) for name in matrices})
    buffers = {shape: None for shape in shapes}
    for step in range(STEPS):
        lrm, momentum = lr_multiplier(step, STEPS, warmdown_ratio=0.5), muon_momentum(step, STEPS)
        optimizer.set_schedule(lrm, momentum)
        grads = {name: torch.randn(p.shape) for name, p in reference.items()}
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        optimizer.step()
        for name, opt in adamw.items():
            opt.param_groups[0]["lr"] = opt.defaults["lr"] * lrm
            reference[name].grad = grads[name]
            opt.step()
        for shape in shapes:
            names = [name for name in matrices if tuple(reference[name].shape) == shape]
            stacked = torch.stack([reference[name] for name in names])
            stacked_grads = torch.stack([grads[name] for name in names])
            if buffers[shape] is None:
                buffers[shape] = torch.zeros_like(stacked)
            todays_muon_step(stacked, stacked_grads, buffers[shape], 0.02 * lrm, momentum, 0.1)
            for name, new in zip(names, stacked):
                reference[name].copy_(new)
    for name, p in model.named_parameters():
        assert torch.equal(p, reference[name]), name


# (lr, betas, weight_decay) of each AdamW parameter, as upstream nanochat's setup_optimizer sets them
# (lm_head and wte: the 2026 ones under recipe 2026, today's under classic); scalar_lr=0.5
SCALE = (CONFIG.n_embd / 768) ** -0.5
OPTION_ADAMW = {
    "value_embeds.0.weight": (0.2 * SCALE * 0.5, (0.8, 0.995), 0.01),
    "value_embeds.2.weight": (0.2 * SCALE * 0.5, (0.8, 0.995), 0.01),
    "resid_lambdas": (0.5 * 0.01, (0.8, 0.95), 0.05),
    "x0_lambdas": (0.5, (0.96, 0.95), 0.0),
    "smear_gate.weight": (0.2, (0.8, 0.95), 0.0),
    "smear_lambda": (0.2, (0.8, 0.95), 0.0),
    "backout_lambda": (0.2, (0.8, 0.95), 0.0),
}
EXPECTED_ADAMW = {
    "classic": {"lm_head.weight": (0.004 * SCALE, (0.8, 0.95), 0.0),
                "transformer.wte.weight": (0.2 * SCALE, (0.8, 0.95), 0.0), **OPTION_ADAMW},
    "2026": {"lm_head.weight": (0.004 * SCALE, (0.8, 0.96), 0.01),
             "transformer.wte.weight": (0.2 * SCALE, (0.8, 0.995), 0.001), **OPTION_ADAMW},
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_groups_and_adamw_equal_upstream_hyperparameters_and_torch_adamw(recipe):
    """Every parameter in exactly one group; the AdamW ones step as torch.optim.AdamW with upstream's
    hyperparameters; the Muon groups hold the block matrices (the value-embedding gates included)."""
    model = gpt_with_options()
    named = dict(model.named_parameters())
    optimizer = setup_optimizers(model, weight_decay=0.2, recipe=recipe)
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in named.values())  # each exactly once
    muon = [g for g in optimizer.param_groups if g["kind"] == "muon"]
    matrices = {name for name in named if name.startswith("transformer.h.")}
    assert {id(p) for g in muon for p in g["params"]} == {id(named[name]) for name in matrices}
    assert any(name.endswith("ve_gate.weight") for name in matrices)
    # upstream's polar margin: 1.02 in 2025, 1.01 since 6ed7d1d (nanochat/optim.py muon_step_fused)
    expected = {"classic": dict(muoneq=False, muon_plus=False, normuon_beta2=None, cautious=False, polar_margin=1.02),
                "2026": dict(muoneq=True, muon_plus=True, normuon_beta2=0.9, cautious=True, polar_margin=1.01)}[recipe]
    assert all({k: g[k] for k in MUON_FIELDS} == expected and g["lr"] == 0.02 and g["weight_decay"] == 0.2
               for g in muon)

    references = {name: (named[name].detach().clone(), hyper) for name, hyper in EXPECTED_ADAMW[recipe].items()}
    torch_adamw = [torch.optim.AdamW([p], lr=lr, betas=betas, eps=1e-10, weight_decay=wd)
                   for p, (lr, betas, wd) in references.values()]
    assert len(references) == len(named) - len(matrices)  # every AdamW parameter has its expectation
    for _ in range(3):
        for name, p in named.items():
            p.grad = torch.randn_like(p)
            if name in references:
                references[name][0].grad = p.grad.clone()
        optimizer.step()
        for opt in torch_adamw:
            opt.step()
    for name, (p, _) in references.items():
        torch.testing.assert_close(named[name], p, msg=name)


def test_a_parameter_outside_every_group_is_refused():
    model = GPT(CONFIG)
    model.transformer.h[0].gain = torch.nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.gain"):
        setup_optimizers(model)
    with pytest.raises(ValueError, match="recipe 'modern'"):
        setup_optimizers(GPT(CONFIG), recipe="modern")


# The 2026 refinements, each alone, against its definition computed directly (momentum 0.5, 2 steps).

def reference_muoneq(grads):
    """Each row scaled to the RMS row norm of its matrix, row by row."""
    out = grads.clone()
    for k in range(grads.size(0)):
        target = grads[k].norm() / math.sqrt(grads.size(1))
        for i in range(grads.size(1)):
            out[k, i] = grads[k, i] * target / grads[k, i].norm()
    return out


def muon_reference(params, grads, buffer, moment, lr, wd, muoneq=False, muon_plus=False, normuon=False,
                   cautious=False):
    """One step of Muon with the refinements asked for, each written from its paper's definition."""
    buffer.lerp_(grads, 0.5)
    g = grads.lerp(buffer, 0.5)
    if muoneq:
        g = reference_muoneq(g)
    U = orthogonalize(g).float()
    K, rows, cols = U.shape
    if muon_plus:  # the norm of a full-rank semi-orthogonal matrix
        U = U * math.sqrt(min(rows, cols)) / U.norm(dim=(1, 2), keepdim=True)
    if normuon:  # per row (tall or square) or per column (wide): divide by the running RMS, keep the norm
        dim = 2 if rows >= cols else 1
        moment.mul_(0.9).add_(0.1 * U.square().mean(dim=dim, keepdim=True))
        V = U / moment.sqrt()
        U = V * U.norm(dim=(1, 2), keepdim=True) / V.norm(dim=(1, 2), keepdim=True)
    scaled_lr = lr * max(1, rows / cols) ** 0.5
    if cautious:  # decay where update and weight agree in sign, at the update's rate
        decay = scaled_lr * wd * params * ((torch.sign(U) == torch.sign(params)) | (U == 0))
    else:
        decay = lr * wd * params
    return params - scaled_lr * U - decay


@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
@pytest.mark.parametrize("refinement", ["classic", "muoneq", "muon_plus", "normuon", "cautious", "all"])
def test_each_muon_refinement_equals_its_definition(refinement, shape):
    torch.manual_seed(0)
    flags = dict(muoneq=False, muon_plus=False, normuon=False, cautious=False)
    flags.update({k: True for k in flags if refinement in (k, "all")})
    params = torch.randn(2, *shape)
    ours, ref = params.clone(), params.clone()
    ours_buffer, ref_buffer = torch.zeros_like(params), torch.zeros_like(params)
    moment_shape = (2, shape[0], 1) if shape[0] >= shape[1] else (2, 1, shape[1])
    ours_moment, ref_moment = torch.zeros(moment_shape), torch.zeros(moment_shape)
    for _ in range(2):
        grads = torch.randn(2, *shape) + torch.linspace(-2, 2, shape[0])[:, None]  # uneven rows
        expected = muon_reference(ref, grads, ref_buffer, ref_moment, 0.1, 0.5, **flags)
        muon_update(ours, grads.clone(), ours_buffer, lr=0.1, momentum=0.5, ns_steps=5, weight_decay=0.5,
                    muoneq=flags["muoneq"], muon_plus=flags["muon_plus"], second_moment=ours_moment,
                    normuon_beta2=0.9 if flags["normuon"] else None, cautious=flags["cautious"])
        # the reference equilibrates in another order, so MuonEq's bf16 input may round differently
        torch.testing.assert_close(ours, expected, rtol=0, atol=2e-3 if flags["muoneq"] else 1e-5)
        ref = expected
    torch.testing.assert_close(ours_buffer, ref_buffer)
    torch.testing.assert_close(ours_moment, ref_moment)


def test_muoneq_equalises_rows_and_keeps_the_norm():
    G = torch.randn(3, 16, 8) * torch.logspace(-2, 1, 16)[:, None]
    out = equilibrate_rows(G)
    torch.testing.assert_close(out, reference_muoneq(G))
    torch.testing.assert_close(out.norm(dim=(1, 2)), G.norm(dim=(1, 2)))


def muon_group(params, recipe, **fields):
    """A Muon group with `recipe`'s fields (test_groups_and_adamw_equal_upstream_hyperparameters checks
    their values), overridden by `fields`."""
    refinements = MUON_2026 if recipe == "2026" else MUON_REFINEMENTS
    return {**dict(kind="muon", params=params, lr=0.02, momentum=0.95, ns_steps=5, weight_decay=0.0),
            **refinements, **fields}


@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
@pytest.mark.parametrize("recipe", RECIPES)
def test_first_muon_update_is_semi_orthogonal(recipe, shape):
    """From zero weights, with no momentum, the first update of a full-rank gradient: singular values
    near 1 (classic), or within a narrow band around their mean (NorMuon rescales rows)."""
    p = nn.Parameter(torch.zeros(shape))
    optimizer = MuonAdamW([muon_group([p], recipe, lr=1.0, momentum=0.0)])
    p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    optimizer.step()
    singular = torch.linalg.svdvals(-p.detach()) / max(1, shape[0] / shape[1]) ** 0.5
    if recipe == "classic":
        assert singular.min() > 0.7 and singular.max() < 1.2, singular
    else:
        assert singular.max() / singular.min() < 2.0, singular
        assert singular.square().sum().sqrt() == pytest.approx(min(shape) ** 0.5, rel=1e-3)  # Muon+'s norm


def distance_to_target(fields):
    """Upstream's convergence problem: weights start 0.1 off their targets in every entry, and the
    gradient of ||p - t||^2 is then rank 1 (a constant matrix). Final / initial distance per param."""
    generator = torch.Generator().manual_seed(999)
    targets = [torch.randn(shape, generator=generator) * 0.05 for shape in [(48,)] + [(32, 64)] * 3 + [(64, 32)] * 2]
    params = [nn.Parameter(t + 0.1) for t in targets]
    optimizer = MuonAdamW([dict(kind="adamw", params=params[:1], lr=0.02, betas=(0.8, 0.95), eps=1e-10,
                                weight_decay=0.0),
                           muon_group(params[1:4], "classic", **fields), muon_group(params[4:], "classic", **fields)])
    initial = [(p.detach() - t).norm() for p, t in zip(params, targets)]
    for _ in range(50):
        for p, t in zip(params, targets):
            p.grad = 2 * (p.detach() - t)
        optimizer.step()
    return [((p.detach() - t).norm() / d).item() for p, t, d in zip(params, targets, initial)]


def test_convergence_needs_muon_plus_on_a_rank_one_gradient():
    """The 2026 recipe (and Muon+ alone) halves the distance in 50 steps; classic Muon cannot: the
    polar factor of a rank-1 gradient has Frobenius norm 1, so each step moves a matrix at most
    lr * sqrt(max(1, rows/cols)) = 0.02 or 0.028, about 1.0-1.4 in 50 steps of a 4.5 distance."""
    full = distance_to_target(MUON_2026)
    assert all(r < 0.5 for r in full), full
    assert all(r < 0.5 for r in distance_to_target(dict(muon_plus=True))[1:])
    classic = distance_to_target({})
    assert classic[0] < 0.5  # the AdamW parameter converges either way
    # at most 1.0 of 4.52 (32x64) and 1.41 of 4.52 (64x32): 0.78 and 0.69 left with a polar factor of
    # norm 1 (fp32 iterations: 0.800 and 0.718); bf16 iterations overshoot it a little
    assert all(0.6 < r < 0.85 for r in classic[1:]), classic


def test_schedules():
    # upstream's LR schedule: 40 warmup steps, warmdown over the last 65%, to 5%
    lr = [lr_multiplier(s, 1000, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)
          for s in (0, 39, 40, 350, 675, 1000)]
    assert lr == pytest.approx([1 / 40, 1.0, 1.0, 1.0, 0.525, 0.05])
    assert lr_multiplier(8, 10, warmdown_ratio=0.5) == pytest.approx(0.4)
    assert lr_multiplier(99, 100, warmdown_ratio=0.0) == 1.0
    assert [muon_momentum(s, 1000) for s in (0, 150, 300, 10_000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    # 2026: up to 0.97 over 400 steps, then down to 0.90 over the warmdown (here from step 700 of 2000)
    steps = (0, 200, 400, 700, 1350, 2000)
    assert [muon_momentum(s, 2000, "2026", 0.65) for s in steps] == pytest.approx([0.85, 0.91, 0.97, 0.97, 0.935, 0.90])
    assert weight_decay_multiplier(500, 1000) == 1.0
    assert [weight_decay_multiplier(s, 1000, "cosine") for s in (0, 500, 1000)] == pytest.approx([1.0, 0.5, 0.0])
    for schedule, call in [("momentum", lambda: muon_momentum(0, 10, "fast")),
                           ("weight decay", lambda: weight_decay_multiplier(0, 10, "fast"))]:
        with pytest.raises(ValueError, match=f"unknown {schedule} schedule 'fast'"):
            call()


def test_set_schedule_scales_lr_everywhere_and_momentum_and_weight_decay_of_muon_only():
    optimizer = setup_optimizers(gpt_with_options(), weight_decay=0.28, recipe="2026")
    optimizer.set_schedule(0.5, muon_momentum=0.9, weight_decay_multiplier=0.25)
    for group in optimizer.param_groups:
        assert group["lr"] == group["initial_lr"] * 0.5
        if group["kind"] == "muon":
            assert (group["momentum"], group["weight_decay"]) == (0.9, 0.28 * 0.25)
    assert [g["weight_decay"] for g in optimizer.param_groups if g["kind"] == "adamw"][:2] == [0.01, 0.001]


def rank_grads(model, rank, step):
    """The gradients rank `rank` computes at `step` (a fixed function of both)."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=generator) for p in model.parameters()]


def train(world_size, rank=0, reduce_scatter=True, recipe="classic", save_to=None, resume_from=None):
    """STEPS optimizer steps of a fresh GPT with the options' parameters, under the recipe's
    schedules; each rank sees its own gradients, a single process (world_size=1) the mean of those of
    2 ranks. Saves a checkpoint after SAVED_AT steps to `save_to`, or starts from the one in
    `resume_from`. Returns the final weights."""
    model = gpt_with_options()
    optimizer = setup_optimizers(model, weight_decay=0.1, recipe=recipe)
    optimizer.reduce_scatter = optimizer.reduce_scatter and reduce_scatter
    first = 0
    if resume_from:
        model_state, optim_state, _ = checkpoint.load(checkpoint.step_dir(str(resume_from), SAVED_AT), rank=rank)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        first = SAVED_AT
    schedule = "classic" if recipe == "classic" else "2026"
    for step in range(first, STEPS):
        optimizer.set_schedule(lr_multiplier(step, STEPS, warmup_steps=1, warmdown_ratio=0.5),
                               muon_momentum(step, STEPS, schedule, warmdown_ratio=0.5),
                               weight_decay_multiplier(step, STEPS, "cosine"))
        if world_size == 1:
            grads = [torch.stack(g).mean(0) for g in zip(*(rank_grads(model, r, step) for r in range(2)))]
        else:
            grads = rank_grads(model, rank, step)
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        optimizer.step()
        if save_to and step + 1 == SAVED_AT:
            checkpoint.save(save_to, SAVED_AT, model.state_dict(), optimizer.state_dict(), {}, rank=rank,
                            world_size=world_size)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def worker(rank, out_dir):
    torch.set_num_threads(1)
    # a file rendezvous: a port picked free and then bound can be taken between the two by another
    # process (the suite's other worker), and gloo aborts
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        for recipe in RECIPES:
            for reduce_scatter in (True, False):
                save_to = f"{out_dir}/ckpt_{recipe}" if reduce_scatter else None
                weights = train(2, rank, reduce_scatter, recipe, save_to=save_to)
                save_file(weights, f"{out_dir}/rank{rank}_{recipe}_{reduce_scatter}.safetensors")
            resumed = train(2, rank, True, recipe, resume_from=f"{out_dir}/ckpt_{recipe}")
            save_file(resumed, f"{out_dir}/rank{rank}_{recipe}_resumed.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Both recipes on 2 gloo processes, with both ways of sharing gradients (reduce_scatter, and
    the all_reduce fallback), and each run resumed from its checkpoint; the directory of results."""
    out = tmp_path_factory.mktemp("two_process_optim")
    context = mp.spawn(worker, args=(str(out),), nprocs=2, join=False)
    try:
        for _ in range(18):  # 3 minutes at most, rather than a hang
            if context.join(timeout=10):
                break
        else:
            pytest.fail("the 2-process run did not finish")
    finally:
        for process in context.processes:
            process.kill()
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_distributed_step_equals_single_process_and_resumes_exactly(two_process_runs, recipe):
    """Sharded AdamW and Muon on 2 ranks equal one process stepping on the mean gradient; a run
    resumed from its checkpoint (each rank's sharded state) equals the uninterrupted one bit for bit."""
    single = train(1, recipe=recipe)
    for rank in range(2):
        for reduce_scatter in (True, False):
            weights = load_file(two_process_runs / f"rank{rank}_{recipe}_{reduce_scatter}.safetensors")
            for name, expected in single.items():
                torch.testing.assert_close(weights[name], expected, rtol=0, atol=1e-6,
                                           msg=f"rank {rank}, reduce_scatter={reduce_scatter}: {name}")
        uninterrupted = load_file(two_process_runs / f"rank{rank}_{recipe}_True.safetensors")
        resumed = load_file(two_process_runs / f"rank{rank}_{recipe}_resumed.safetensors")
        assert all(torch.equal(resumed[name], uninterrupted[name]) for name in single), f"rank {rank}"
    initial = gpt_with_options().state_dict()
    assert not any(torch.equal(single[name], initial[name]) for name in single)  # every weight trained


def test_state_of_another_world_size_is_refused(two_process_runs):
    """Rank 0's state (ZeRO-2: half the rows of each large AdamW parameter, the small ones whole; 2 of
    3 slots of each Muon group) cannot resume a single process."""
    model = gpt_with_options()
    optimizer = setup_optimizers(model, recipe="2026")
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    named = dict(model.named_parameters())
    with torch.random.fork_rng():  # loading restores the saved RNG state
        _, state, _ = checkpoint.load(checkpoint.step_dir(str(two_process_runs / "ckpt_2026"), SAVED_AT))
    shape = {name: tuple(state["state"][index[id(named[name])]][key].shape) for name, key in
             [("lm_head.weight", "exp_avg"), ("resid_lambdas", "exp_avg"), ("transformer.h.0.mlp.c_fc.weight",
                                                                             "momentum_buffer")]}
    assert shape == {"lm_head.weight": (64, 64), "resid_lambdas": (3,), "transformer.h.0.mlp.c_fc.weight": (2, 256, 64)}
    with pytest.raises(ValueError, match=r"'exp_avg' of shape \(64, 64\) does not fit \(128, 64\): it was saved by "
                                         "a different number of processes than 1"):
        optimizer.load_state_dict(state)


def test_a_state_saved_before_the_refinements_resumes():
    """A classic optimizer state saved before the Muon groups had the refinements' fields (and
    initial_weight_decay) loads and steps as the optimizer it was saved from."""
    def stepped(optimizer, model, step):
        for p, g in zip(model.parameters(), rank_grads(model, 0, step)):
            p.grad = g
        optimizer.set_schedule(1.0, 0.9, 0.5)
        optimizer.step()

    model, resumed_model = gpt_with_options(), gpt_with_options()
    optimizer, resumed = setup_optimizers(model, weight_decay=0.1), setup_optimizers(resumed_model, weight_decay=0.1)
    stepped(optimizer, model, 0)
    old = copy.deepcopy(optimizer.state_dict())  # as a checkpoint holds it, not the live tensors
    for group in old["param_groups"]:
        for key in (*MUON_FIELDS, "initial_weight_decay"):
            group.pop(key, None)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(old)
    stepped(optimizer, model, 1)
    stepped(resumed, resumed_model, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_a_loaded_state_lives_on_its_parameters_device():
    """A checkpoint's state is read on the CPU; loaded into an optimizer of parameters elsewhere (the
    meta device stands in for a GPU), every state tensor goes there, AdamW's step counts too: torch
    leaves those on the CPU, and the fused CUDA AdamW kernel refuses them."""
    model = gpt_with_options()
    optimizer = setup_optimizers(model, recipe="2026")
    for p, g in zip(model.parameters(), rank_grads(model, 0, 0)):
        p.grad = g
    optimizer.step()
    with torch.device("meta"):
        elsewhere = setup_optimizers(gpt_with_options(), recipe="2026")
    elsewhere.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    placed = {(key, tensor.device.type) for state in elsewhere.state.values() for key, tensor in state.items()}
    assert ("step", "meta") in placed and {device for _, device in placed} == {"meta"}, placed
