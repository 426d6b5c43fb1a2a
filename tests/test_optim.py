"""MuonAdamW: orthogonalisation quality, AdamW against torch.optim.AdamW, the GPT's parameter
groups, the schedules, and the distributed step (2 real gloo processes) against one process."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import MuonAdamW, lr_multiplier, muon_momentum, muon_update, orthogonalize, setup_optimizers
from tests.support.s3server import free_port

# 3 layers: every Muon group holds 3 matrices, so 2 ranks own 2 and 1 (a zero-padded slot)
CONFIG = GPTConfig(sequence_len=16, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
STEPS = 3


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (4, 48, 16)])
def test_orthogonalize_maps_singular_values_near_one(shape):
    torch.manual_seed(0)
    *batch, m, n = shape
    U, _ = torch.linalg.qr(torch.randn(*batch, m, min(m, n)))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, min(m, n)))
    S = torch.logspace(-2, 0, min(m, n)) * 5.0  # condition number 100, arbitrary scale
    G = U @ torch.diag_embed(S.expand(*batch, -1)) @ V.mT
    X = orthogonalize(G)
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    singular = torch.linalg.svdvals(X.float())
    assert singular.min() > 0.7 and singular.max() < 1.2
    polar = U @ V.mT  # the exact answer
    assert (X.float() - polar).norm() / polar.norm() < 0.15
    torch.testing.assert_close(orthogonalize(G.mT), X.mT, rtol=0, atol=0.05)  # up to bf16 rounding


def test_muon_update_is_nesterov_momentum_then_orthogonalisation():
    torch.manual_seed(0)
    params, grads = torch.randn(2, 32, 16), torch.randn(2, 32, 16)
    buffer = torch.randn(2, 32, 16)
    expected_buffer = 0.9 * buffer + 0.1 * grads
    step = orthogonalize(0.1 * grads + 0.9 * expected_buffer).float() * (32 / 16) ** 0.5
    expected = params * (1 - 0.02 * 0.5) - 0.02 * step
    muon_update(params, grads.clone(), buffer, lr=0.02, momentum=0.9, ns_steps=5, weight_decay=0.5)
    torch.testing.assert_close(buffer, expected_buffer)
    torch.testing.assert_close(params, expected, rtol=0, atol=1e-3)


def test_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    a = [torch.randn(10, 4, requires_grad=True), torch.randn(3, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    ours = MuonAdamW([dict(kind="adamw", params=a, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
    ref = torch.optim.AdamW(b, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(4):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        ours.step()
        ref.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb)


def test_groups_partition_the_gpt_parameters():
    model = GPT(CONFIG)
    optimizer = setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    adamw = [g for g in optimizer.param_groups if g["kind"] == "adamw"]
    muon = [g for g in optimizer.param_groups if g["kind"] == "muon"]
    scale = (CONFIG.n_embd / 768) ** -0.5
    assert [(g["params"], g["lr"]) for g in adamw] == [([model.lm_head.weight], 0.004 * scale),
                                                       ([model.transformer.wte.weight], 0.2 * scale)]
    assert all(p.ndim == 2 and g["lr"] == 0.02 for g in muon for p in g["params"])
    assert sum(len(g["params"]) for g in muon) == 6 * CONFIG.n_layer


def test_a_parameter_outside_every_group_is_refused():
    model = GPT(CONFIG)
    model.transformer.h[0].gain = torch.nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.gain"):
        setup_optimizers(model)


def test_schedules():
    assert [lr_multiplier(s, 10, warmup_ratio=0.2, warmdown_ratio=0.5) for s in (0, 1, 2, 5)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_multiplier(8, 10, warmdown_ratio=0.5) == pytest.approx(0.4)
    assert lr_multiplier(10, 10, warmdown_ratio=0.5, final_lr_frac=0.1) == pytest.approx(0.1)
    assert lr_multiplier(99, 100, warmdown_ratio=0.0) == 1.0
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(10_000) == pytest.approx(0.95)


def rank_grads(model, rank, step):
    """The gradients rank `rank` computes at `step` (a fixed function of both)."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=generator) for p in model.parameters()]


def train(world_size, rank=0, reduce_scatter=True):
    """STEPS optimizer steps of a fresh GPT; each rank sees its own gradients, a single process
    (world_size=1) the mean of those of 2 ranks. Returns the final weights."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = setup_optimizers(model, weight_decay=0.1)
    optimizer.reduce_scatter = optimizer.reduce_scatter and reduce_scatter
    for step in range(STEPS):
        optimizer.set_schedule(lr_multiplier(step, STEPS, warmdown_ratio=0.5), muon_momentum(step))
        if world_size == 1:
            grads = [torch.stack(g).mean(0) for g in zip(*(rank_grads(model, r, step) for r in range(2)))]
        else:
            grads = rank_grads(model, rank, step)
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        optimizer.step()
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for reduce_scatter in (True, False):
            save_file(train(2, rank, reduce_scatter), f"{out_dir}/rank{rank}_{reduce_scatter}.safetensors")
    finally:
        dist.destroy_process_group()


def test_distributed_step_equals_single_process(tmp_path):
    """Both ways of sharing the Muon gradients: reduce_scatter, and the all_reduce fallback."""
    context = mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    try:
        for _ in range(12):  # 2 minutes at most, rather than a hang
            if context.join(timeout=10):
                break
        else:
            pytest.fail("the 2-process run did not finish")
    finally:
        for process in context.processes:
            process.kill()
    single = train(1)
    for rank in range(2):
        for reduce_scatter in (True, False):
            weights = load_file(tmp_path / f"rank{rank}_{reduce_scatter}.safetensors")
            for name, expected in single.items():
                torch.testing.assert_close(weights[name], expected, rtol=0, atol=1e-6,
                                           msg=f"rank {rank}, reduce_scatter={reduce_scatter}: {name}")
    torch.manual_seed(0)
    initial = GPT(CONFIG).state_dict()
    assert not any(torch.equal(single[name], initial[name]) for name in single)  # every weight trained
