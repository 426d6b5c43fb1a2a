"""Every claim of the project that only a CUDA GPU can check, on one GPU, in one command of under
10 minutes (an H100):

    .venv/bin/python bench/gpu_check.py [--deadline 540] [--only KEY ...] [--out DIR]

On a GPU machine whose own python3 holds torch but not this project (the device tool's machines),
`make gpu-wheels` here first (the packages such an image lacks, into .whl/), carry `.whl` and
`rustbpe/_native`, and run there:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
      PYTHONPATH=/tmp/site python3 bench/gpu_check.py --out $OUT

Checks, by key, in the order they run (the claims a GPU user meets first, so that the deadline
cuts the extras):
- engine: the engine's cached, batched greedy decoding equals uncached greedy decoding of a random
  GPT with every option of the 2026 recipe (sliding windows past position 128, grouped-query
  attention; fp32, weights large enough that no choice is a near tie), rows joining at different
  steps and positions.
- prep: shards of synthetic text written here and the preset's tokenizer (d20: 32,768 tokens)
  trained on them (tok_train), which every training check copies.
- bf16, bf16+compile, fp8+compile, fp8, fp16+scaler: the base_train stage itself, --steps steps of
  16 rows of 2,048 tokens (8 rows a pass, two passes), with no warm-up and no batch scaling of the
  learning rate, so that 8 steps show the loss falling. bf16 and the compiled runs at d20; fp8 and
  fp16+scaler, correctness checks, at depth 8. Each must learn (its last loss below its first,
  every loss finite) in the dtype asked for; FP8 must have converted layers, fp16 must have
  checkpointed its scaler. tok/s and MFU are the medians of the steps after the first two
  (compilation, warm-up); MFU's denominator is the bf16 matmul rate the stage measured on this GPU
  (`peak_tflops`), FP8's too, as upstream counts it.
- decode: bf16's d20 model as load_engine serves it on the GPU: bf16 weights, torch's attention and
  sampling (nanochat.cpu is for CPUs), and its decode tok/s at batch 1 and 8.
- serve: `nanochat serve` of bf16's model answers a chat completion and a streamed one through the
  official openai client.
- resume: a small bf16 base_train crashed after its step-2 checkpoint resumes there on the GPU.
- loss: nanochat.loss's fused training loss at d20's sizes agrees with F.cross_entropy of the
  capped logits compiled (upstream's formulation), and the times of both (forward and backward).
- flex: FlexAttention, which a compiled model's sliding windows use where no flash attention runs,
  agrees with SDPA under a window mask at d20's shapes (forward and backward, compiled), with the
  times of both; without flash attention, a compiled model calls it in its windowed layers alone.
- flash: where a build of flash attention runs on this GPU (else skipped), it agrees with SDPA, a
  model attends through it in every layer (bf16 weights, and fp32 ones under bf16 autocast), and
  the engine of that fp32 model decodes under autocast.

Each check runs in a process of its own (its own CUDA context: a device fault or a hang ends that
check alone, killed at its time limit or the deadline), on /dev/shm where it has room for d20's
checkpoints. A check whose prerequisite did not pass is skipped. Each check's row is printed as it
ends, and a JSON line appended to DIR/gpu_check.jsonl with --out; at the end, one JSON line (the
GPU, the commit, each check, FP8's speed-up over bf16, both compiled, in this run). Exits with
status 1 if a check failed or was not reached before the deadline, naming the --only to run them.

Without a CUDA device it says so and exits with status 1 before any work. `--device cpu` runs the
checks a CPU can at the tiny preset, as a test of this script (tests/test_gpu_check.py).
"""

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # a GPU machine's own python runs this without the project installed

WARMUP_STEPS = 2  # left out of the tok/s and MFU medians
SHM_NEEDED = 48e9  # bytes free on /dev/shm to hold the work directory there (d20 checkpoints: ~10 GB each)
SERVED_RUN = "bf16"  # whose model the decode and serve checks load
# every training check trains only: no evaluation, CORE or samples between steps; and no warm-up or
# batch-scaled learning rate, so that a few steps show the loss falling
TRAINING_ONLY = ["--eval-every", "-1", "--core-every", "-1", "--sample-every", "-1", "--warmup-steps", "0",
                 "--no-batch-lr-scaling", "--checkpoint-every", "-1", "--keep-last", "1"]
# base_train's options per training check, and whether it runs at the preset's depth (else Scale.small_depth)
RUNS = {
    "bf16": (["--dtype", "bfloat16", "--no-compile", "--no-fp8"], True),
    "bf16+compile": (["--dtype", "bfloat16", "--compile", "--no-fp8"], True),
    "fp8+compile": (["--dtype", "bfloat16", "--compile", "--fp8"], True),
    "fp8": (["--dtype", "bfloat16", "--no-compile", "--fp8"], False),
    "fp16+scaler": (["--dtype", "float16", "--no-compile", "--no-fp8"], False),
}
FP8_LOG = re.compile(r"FP8 training: (\d+) of (\d+) linear layers converted")  # nanochat.fp8.convert_linears
PEAK_LOG = re.compile(r"matmul peak (\S+) TFLOP/s")  # nanochat.training: MFU's denominator


@dataclasses.dataclass(frozen=True)
class Scale:
    """How large the checks run on a kind of device."""

    preset: str
    train_chars: int  # synthetic text; each training check reads the first steps x rows x passes rows of it
    rows: int  # base_train's --device-batch-size
    passes: int  # forward/backward passes per step (gradient accumulation)
    steps: int
    small_depth: int  # the correctness runs': fp8, fp16+scaler, resume


SCALES = {"cuda": Scale("d20", 8_000_000, rows=8, passes=2, steps=8, small_depth=8),  # eager d20 at 16 rows may not fit 80 GB
          "cpu": Scale("tiny", 400_000, rows=2, passes=1, steps=3, small_depth=2)}


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every check is given: the shared work directory, the device and the scale."""

    workdir: Path
    device: str
    scale: Scale

    @property
    def seq_len(self):
        from nanochat import presets

        return presets.get(self.scale.preset, "base_train")["max_seq_len"]


class CheckFailed(Exception):
    """A check found the claim false (the message says how)."""


class Skipped(Exception):
    """A check that does not apply to this machine (the message says why)."""


def write_shards(directory, train_chars, seed=0):
    """Two shards of synthetic documents (the last is validation): Zipf-distributed pseudo-words, so
    BPE finds the preset's 32,768 tokens in them and the model has something to learn."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words = set()
    while len(words) < 60_000:
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 4))))
    words = sorted(words)
    cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))

    def documents(chars):
        total = 0
        while total < chars:
            drawn = rng.choices(words, cum_weights=cumulative, k=rng.randint(100, 600))
            doc = " ".join(w.capitalize() + "." if i % 12 == 11 else w for i, w in enumerate(drawn))
            total += len(doc)
            yield doc

    directory.mkdir(parents=True)
    for index, chars in enumerate((train_chars, train_chars // 16)):
        pq.write_table(pa.table({"text": list(documents(chars))}), directory / f"shard_{index:05d}.parquet")


def prepare(setup):
    """The shards and a run holding the tokenizer trained on them, which every training check copies."""
    write_shards(setup.workdir / "data", setup.scale.train_chars)
    stage(setup, "tok_train", setup.workdir / "tokenizer", "--data", str(setup.workdir / "data"))
    return {"train_chars": setup.scale.train_chars}


def stage(setup, module, run, *options, fault=None):
    """Runs nanochat.stages.<module> on `run` at the scale's preset; the completed process, or
    CheckFailed with the end of its output. With `fault` (a NANOCHAT_FAULT spec) it must crash there
    (exit 3). No time limit: the check's own process is killed at its limit, this one with it."""
    cmd = [sys.executable, "-m", f"nanochat.stages.{module}", "--run", str(run), "--preset", setup.scale.preset, *options]
    env = {**os.environ, **({"NANOCHAT_FAULT": fault} if fault else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != (3 if fault else 0):
        raise CheckFailed(f"{module} {f'with the fault {fault} ' if fault else ''}ended with {done.returncode}: "
                          f"{done.stderr[-1500:]}")
    return done


def base_train_options(setup):
    """base_train's options for `setup`'s device and batch: rows of the preset's context, in passes."""
    rows, passes = setup.scale.rows, setup.scale.passes
    return ["--data", str(setup.workdir / "data"), "--device-type", setup.device, "--device-batch-size", str(rows),
            "--total-batch-size", str(rows * passes * setup.seq_len), "--eval-tokens", str(rows * setup.seq_len), *TRAINING_ONLY]


def train(name, setup):
    """One base_train run of RUNS; its figures, or CheckFailed naming what is wrong."""
    options, full_depth = RUNS[name]
    run = setup.workdir / name
    shutil.copytree(setup.workdir / "tokenizer", run)
    depth = [] if full_depth else ["--depth", str(setup.scale.small_depth)]
    try:
        return check_training(setup, run, [*options, *depth])
    finally:
        if name != SERVED_RUN:
            shutil.rmtree(run)  # a d20 checkpoint with its optimizer state is some 10 GB


def check_training(setup, run, options):
    """base_train with `options` in `run`, and what it recorded checked; its figures."""
    from nanochat import storage

    done = stage(setup, "base_train", run, *base_train_options(setup), "--num-steps", str(setup.scale.steps), *options)
    summary = json.loads((run / "base_train" / "stage.json").read_text())
    records = [json.loads(line) for line in (run / "base_train" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    timed = [r for r in steps if r["step"] > WARMUP_STEPS] or steps
    peak = PEAK_LOG.search(done.stderr)
    figures = {"tok_per_s": statistics.median(r["tok_per_s"] for r in timed),
               "mfu": statistics.median(r["mfu"] for r in timed), "peak_tflops": float(peak[1]) if peak else None,
               "first_loss": steps[0]["loss"], "final_loss": steps[-1]["loss"], "dtype": summary["metrics"]["dtype"]}
    problems = []
    if not all(math.isfinite(r["loss"]) for r in steps):
        problems.append("a loss is not finite")
    elif figures["final_loss"] >= figures["first_loss"]:
        problems.append("the loss did not fall")
    wanted_dtype = options[options.index("--dtype") + 1]
    if figures["dtype"] != wanted_dtype:
        problems.append(f"trained in {figures['dtype']}, not {wanted_dtype}")
    if "--fp8" in options:
        converted = FP8_LOG.search(done.stderr)
        figures["fp8_layers"] = f"{converted[1]}/{converted[2]}" if converted else None
        if not converted or int(converted[1]) == 0:
            problems.append("no linear layer was converted to FP8")
    if wanted_dtype == "float16":
        checkpoint = summary["outputs"]["checkpoint"]["uri"].rsplit("/", 1)[0]
        if "grad_scaler" not in storage.read_json(storage.join(checkpoint, "meta.json")):
            problems.append("the checkpoint holds no gradient scaler state")
    if problems:
        raise CheckFailed("; ".join(problems) + f" ({json.dumps(figures)})")
    return figures


def resumed_training(setup):
    """base_train crashed right after its step-2 checkpoint resumes there and ends: the optimizer
    state, read on the CPU, goes back to the GPU (the fused AdamW kernel takes nothing else). A
    small model in bf16: the resume is what is checked, not the size."""
    run = setup.workdir / "resumed"
    shutil.copytree(setup.workdir / "tokenizer", run)
    options = [*base_train_options(setup), "--depth", str(setup.scale.small_depth), "--num-steps", "4", "--checkpoint-every", "2",
               "--dtype", "bfloat16", "--no-compile", "--no-fp8"]
    stage(setup, "base_train", run, *options, fault="base_train:2")
    done = stage(setup, "base_train", run, *options)
    records = [json.loads(line) for line in (run / "base_train" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and r["step"] > 2]
    shutil.rmtree(run)
    if "resumed at step 2" not in done.stderr or len(losses) != 2 or not all(map(math.isfinite, losses)):
        raise CheckFailed(f"losses after the resume {losses}: {done.stderr[-1500:]}")
    return {"resumed_at": 2, "losses_after": len(losses)}


def greedy_uncached(model, prompt, num_tokens):
    import torch

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(num_tokens):
            ids.append(int(model(torch.tensor([ids], device=model.cos.device))[0, -1].argmax()))
    return ids[len(prompt):]


def cached_equals_uncached(setup):
    """The engine on CUDA: requests joining a running batch at different steps, each row at its own
    position (the masked SDPA path), decode as uncached greedy decoding does, token for token, with
    every model option of the 2026 recipe on (past position 128, the sliding windows)."""
    import torch

    from nanochat.engine import Engine, Request, SamplingParams

    tokenizer, model = recipe_model(n_embd=64, device=setup.device)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    engine, greedy = Engine(model, tokenizer, max_rows=8), SamplingParams(temperature=0, max_tokens=32)
    prompts = [[tokenizer.bos_token_id, *tokenizer.encode(text)] for text in ("hi", "hello there, model", "x" * 150)]
    requests = [Request(prompt, greedy, n=n) for prompt, n in zip(prompts, (1, 3, 2))]
    for request, steps in zip(requests, (5, 1, 0)):
        engine.add(request)
        for _ in range(steps):
            engine.step()
    while engine.rows:
        engine.step()
    rows = 0
    for request in requests:
        expected = greedy_uncached(model, request.prompt_ids, greedy.max_tokens)
        for completion in request.completions:
            got = completion.token_ids
            if got != expected[:len(got)] or not got:
                raise CheckFailed(f"prompt of {len(request.prompt_ids)} tokens: cached {got}, uncached {expected}")
            rows += 1
    return {"rows": rows, "tokens": greedy.max_tokens}


def served_decoding(setup):
    """The run's model as load_engine serves it on CUDA: bf16, SDPA and torch's sampling (no hook of
    nanochat.cpu set), and its decode speed."""
    import torch

    from nanochat.engine import SamplingOps, SamplingParams
    from nanochat.inference import load_engine

    engine = load_engine(str(setup.workdir / SERVED_RUN), "base", setup.device)
    model = engine.model
    problems = []
    if engine.ops != SamplingOps():
        problems.append(f"sampling ops {engine.ops}, not torch's")
    if "cap" in vars(model):
        problems.append("the CPU's cap hook is set on the model")
    dtype = next(model.parameters()).dtype
    if dtype != torch.bfloat16:
        problems.append(f"weights in {dtype}, not bf16")
    if problems:
        raise CheckFailed("; ".join(problems))
    ordinary = len(engine.tokenizer.mergeable_ranks)  # the special tokens' ids come after these
    prompt = torch.randint(0, ordinary, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=128)
    figures = {}
    for batch in (1, 8):
        engine.generate(prompt, params, n=batch)  # warm-up
        started = time.perf_counter()
        request = engine.generate(prompt, params, n=batch)
        tokens = sum(len(c.token_ids) for c in request.completions)  # a row may end early, on an end token
        figures[f"decode_tok_per_s_batch{batch}"] = round(tokens / (time.perf_counter() - started), 1)
    return figures


def flash_attention_check(setup):
    """Where a flash attention build runs on this GPU: it agrees with SDPA (whole context and a
    sliding window; all queries, and the last few after a cached prefix; grouped-query heads), and a
    model's attention goes through it in every layer, with bf16 weights and with fp32 ones under bf16
    autocast; and the engine of such an fp32 model under autocast (its cache fp32) decodes."""
    import torch

    from nanochat import flash_attention, gpt
    from nanochat.engine import Engine, SamplingParams

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, heads, 256, 64, device="cuda", generator=g, dtype=torch.bfloat16) for heads in (8, 2, 2))
    function = flash_attention.kernel(q, k, v)
    if function is None:
        installed = [name for name, f in (("FA3", flash_attention.fa3), ("FA2", flash_attention.fa2)) if f is not None]
        raise Skipped(f"{' and '.join(installed) or 'no flash attention'} installed, none runs here: the model uses SDPA")
    worst = 0.0
    for window in (None, 64):
        for queries in (256, 16):
            mask = gpt.window_mask(window, queries, 256, device="cuda") if window else None
            want = gpt.causal_attention(q[:, :, -queries:], k, v, mask)
            got = flash_attention.attention(function, q[:, :, -queries:], k, v, window)
            worst = max(worst, (got.float() - want.float()).abs().max().item())
    if worst > 0.02:  # outputs of magnitude ~1 in bf16, whose last place there is 0.008
        raise CheckFailed(f"flash attention differs from SDPA by up to {worst:.3g}")

    tokenizer, model = recipe_model(n_embd=256)
    config = model.config
    # as inference runs it (bf16 weights) and as training does (fp32 weights, bf16 autocast: a query
    # or key that autocast left in fp32 would send every layer to SDPA)
    for weights, dtype, context in (("bf16", torch.bfloat16, contextlib.nullcontext()),
                                    ("fp32 under bf16 autocast", torch.float32, torch.autocast("cuda", torch.bfloat16))):
        calls = flash_attention_calls(model.to(dtype), context)
        if calls != config.n_layer:
            raise CheckFailed(f"the model with {weights} weights called flash attention in {calls} of its "
                              f"{config.n_layer} layers")
    # the engine over fp32 weights under bf16 autocast (chat_eval's, chat_rl's): its cache is fp32,
    # which flash attention cannot take beside bf16 queries; such layers must go to SDPA
    engine = Engine(model.to(torch.float32), tokenizer, max_rows=2)
    with torch.autocast("cuda", torch.bfloat16):
        engine.generate(list(range(1, 40)), SamplingParams(temperature=0, max_tokens=8), n=2)
    return {"kernel": function.__module__, "max_abs_diff_vs_sdpa": worst}


def flex_attention_check(setup, batch=8, heads=10, context=2048, head_dim=128, window=512, repeats=5):
    """FlexAttention, which a compiled model's sliding-window layers attend with where no flash
    attention runs: at d20's shapes (a window of 512 of 2,048 positions, heads of 128) in bf16, forward
    and backward compiled, it agrees with SDPA under the window's mask, and the times of both; and
    without flash attention, a compiled model's windowed layers, and only they, call it."""
    import torch

    from nanochat import flash_attention, gpt

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad_out = (torch.randn(batch, heads, context, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
                         for _ in range(4))
    inputs = [t.requires_grad_() for t in (q, k, v)]
    ways = {"flex": (torch.compile(flash_attention.flex, dynamic=False), flash_attention.window_block_mask(window, context, "cuda")),
            "sdpa_mask": (torch.compile(gpt.causal_attention, dynamic=False), gpt.window_mask(window, context, context, device="cuda"))}
    results = {}
    for name, (fn, mask) in ways.items():
        times = []
        for _ in range(repeats + 1):  # the first compiles and warms up
            for t in inputs:
                t.grad = None
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = fn(q, k, v, mask)
            out.backward(grad_out)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        results[name] = ([out.detach(), *(t.grad.clone() for t in inputs)], statistics.median(times[1:]))
    (flex, flex_s), (sdpa, sdpa_s) = results["flex"], results["sdpa_mask"]
    worst = max((a.float() - b.float()).abs().max().item() / b.float().abs().max().item() for a, b in zip(flex, sdpa))
    if worst > 0.02:  # bf16 outputs and gradients: their last place is 0.4% of their magnitude
        raise CheckFailed(f"FlexAttention's output or gradients differ from SDPA's by up to {worst:.3g} of their largest")
    figures = {"flex_ms": round(flex_s * 1e3, 2), "sdpa_mask_ms": round(sdpa_s * 1e3, 2),
               "sdpa_mask_over_flex": round(sdpa_s / flex_s, 2)}
    if flash_attention.for_device(torch.device("cuda")) is None:
        _, model = recipe_model(n_embd=256)
        config = model.config
        windowed = sum(1 for w in config.windows if not gpt.reaches_back(w, config.sequence_len))
        calls = flash_attention_calls(torch.compile(model, dynamic=False), torch.autocast("cuda", torch.bfloat16), "flex")
        if calls != windowed:
            raise CheckFailed(f"the compiled model called FlexAttention in {calls} layers, not its {windowed} windowed ones")
        figures["model_flex_layers"] = calls
    return figures


def fused_loss_against_compiled(setup, tokens=32_768, width=1280, repeats=5):
    """The training loss at d20's sizes (--device-batch-size 16 rows of 2,048), forward and backward
    under bf16 autocast: nanochat.loss's fused, chunked one (kept out of compiled graphs) against
    F.cross_entropy of the capped logits compiled (upstream's formulation). They must agree; their
    times say whether the fusion, tuned on CPUs, pays on this GPU too."""
    import torch
    import torch.nn.functional as F

    from nanochat import gpt, loss, presets

    vocab = presets.get(SCALES["cuda"].preset, "tok_train")["vocab_size"]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, width, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(vocab, width, device="cuda", generator=g) * width**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)

    def fused(x, w, targets):
        return loss.cross_entropy(x, w, targets, "mean", loss.chunk_sizes("cuda"), gpt.LOGIT_SOFTCAP)

    def upstreams(x, w, targets):
        return F.cross_entropy(gpt.softcap(x @ w.T), targets, ignore_index=-1)

    plain = torch.compile(upstreams, dynamic=False)
    results = {}
    for name, fn in (("fused", fused), ("compiled", plain)):
        times = []
        for _ in range(repeats + 1):  # the first compiles and warms up
            x.grad = w.grad = None
            torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16):
                value = fn(x, w, targets)
            value.backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        results[name] = (value.item(), x.grad.clone(), w.grad.clone(), statistics.median(times[1:]))
    (fused_loss, fused_gx, fused_gw, fused_s), (plain_loss, plain_gx, plain_gw, plain_s) = results["fused"], results["compiled"]
    worst = max((a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
                for a, b in ((fused_gx, plain_gx), (fused_gw, plain_gw)))
    if abs(fused_loss - plain_loss) > 0.01 * plain_loss or worst > 0.05:
        raise CheckFailed(f"fused loss {fused_loss:.5f} against {plain_loss:.5f}; gradients apart by up to {worst:.3g} "
                          "of their largest")
    return {"fused_ms": round(fused_s * 1e3, 1), "compiled_ms": round(plain_s * 1e3, 1),
            "fused_over_compiled": round(fused_s / plain_s, 2)}


def recipe_model(n_embd, device="cuda"):
    """(byte tokenizer, a seeded 4-layer GPT of width `n_embd` on `device`) with every option of the
    2026 recipe: a context of 256, three layers of short windows (128), grouped-query heads."""
    import torch

    from nanochat.gpt import GPT, GPTConfig
    from nanochat.presets import MODEL_2026
    from nanochat.tokenizer import Tokenizer

    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    config = GPTConfig(sequence_len=256, vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_kv_head=2,
                       n_embd=n_embd, **MODEL_2026)
    torch.manual_seed(0)
    with torch.device(device):
        return tokenizer, GPT(config)


def flash_attention_calls(model, context, function="attention"):
    """How many times one forward of `model` in `context` calls nanochat.flash_attention.<function>
    (a compiled model: while it is traced)."""
    import torch

    from nanochat import flash_attention

    original, calls = getattr(flash_attention, function), []
    setattr(flash_attention, function, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    try:
        with torch.no_grad(), context:
            model(torch.randint(0, model.config.vocab_size, (2, model.config.sequence_len), device="cuda"))
    finally:
        setattr(flash_attention, function, original)
    return len(calls)


def health(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


def serving(setup, timeout=180):
    """`nanochat serve` of the run's base model on the GPU: a chat completion and a streamed one
    through the openai client."""
    try:
        import openai
    except ImportError:
        raise CheckFailed("the openai package is missing (pip install -e '.[dev]')") from None
    from nanochat.serve import SERVING_ON

    with tempfile.TemporaryFile("w+") as log:  # it binds a free port (--port 0) and names it: "serving ... on http://HOST:PORT"
        server = subprocess.Popen([sys.executable, "-m", "nanochat.cli", "serve", "--run", str(setup.workdir / SERVED_RUN),
                                   "--source", "base", "--port", "0"],
                                  stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            deadline, url = time.monotonic() + timeout, None
            while not (status := url and health(url)):
                output = os.pread(log.fileno(), 1 << 20, 0).decode(errors="replace")  # (a seek would move the server's writes)
                if url is None and (named := SERVING_ON.search(output)):
                    url = f"http://127.0.0.1:{named.group(1)}"
                    continue
                if server.poll() is not None or time.monotonic() > deadline:
                    raise CheckFailed(f"the server did not answer /health within {timeout} s: {output[-1500:]}")
                time.sleep(0.5)
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            messages = [{"role": "user", "content": "Why is the sky blue?"}]
            reply = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=32, temperature=0)
            finish = reply.choices[0].finish_reason
            text, finishes = "", []
            for chunk in client.chat.completions.create(model="nanochat", messages=messages, max_tokens=32,
                                                        temperature=0, stream=True):
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    finishes += [choice.finish_reason] if choice.finish_reason else []
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    if status["devices"] != 1 or finish not in ("stop", "length") or not reply.usage.completion_tokens:
        raise CheckFailed(f"/health {status}; finish {finish!r}, usage {reply.usage}")
    if finishes != [finish] or text != reply.choices[0].message.content:
        raise CheckFailed(f"streamed {text!r} ending {finishes}, not {reply.choices[0].message.content!r} ending {finish!r}")
    return {"completion_tokens": reply.usage.completion_tokens}


@dataclasses.dataclass(frozen=True)
class Check:
    key: str
    title: str
    run: object  # (Setup) -> its figures, or CheckFailed / Skipped
    seconds: int  # its time limit on a GPU (compiling d20 takes a minute or two)
    needs: tuple = ()  # checks that must pass first
    cuda_only: bool = False  # skipped by --device cpu


CHECKS = [
    Check("engine", "engine cached = uncached", cached_equals_uncached, 90),
    Check("prep", "shards and tok_train", prepare, 120),
    Check("bf16", "base_train bf16", functools.partial(train, "bf16"), 240, ("prep",)),
    Check("decode", "served model decoding", served_decoding, 120, ("bf16",), cuda_only=True),
    Check("serve", "nanochat serve + openai", serving, 180, ("bf16",)),
    *(Check(name, f"base_train {name}", functools.partial(train, name), 300 if "compile" in name else 150, ("prep",),
            cuda_only=name != "fp16+scaler") for name in ("bf16+compile", "fp8+compile", "fp8", "fp16+scaler")),
    Check("resume", "base_train resumed", resumed_training, 150, ("prep",)),
    Check("loss", "fused loss vs compiled", fused_loss_against_compiled, 150, cuda_only=True),
    Check("flex", "flex attention", flex_attention_check, 180, cuda_only=True),
    Check("flash", "flash attention", flash_attention_check, 90, cuda_only=True),
]
BY_KEY = {check.key: check for check in CHECKS}
MIN_START = 15  # seconds: a check is not started with less of the deadline left


def with_prerequisites(keys):
    """The checks of `keys` and those they need, in CHECKS' order."""
    wanted, stack = set(), list(keys)
    while stack:
        key = stack.pop()
        if key not in wanted:
            wanted.add(key)
            stack += BY_KEY[key].needs
    return [check for check in CHECKS if check.key in wanted]


def run_check(check, setup, steps_option, left):
    """Runs one check in a process of its own, killed (with its stages) after its limit or what is left of
    the deadline; {result: pass | FAIL | skip | not run, seconds, figures or why}."""
    limit = min(check.seconds, left)
    result_file, log_file = setup.workdir / f"{check.key}.result.json", setup.workdir / f"{check.key}.log"
    cmd = [sys.executable, __file__, "--child", check.key, "--workdir", str(setup.workdir), "--device", setup.device,
           *steps_option]
    started = time.monotonic()
    with open(log_file, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            process.wait(limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = round(time.monotonic() - started, 1)
    if result_file.exists():
        return {**json.loads(result_file.read_text()), "seconds": seconds}
    if process.returncode == -signal.SIGKILL:
        if limit < check.seconds:
            return {"result": "not run", "seconds": seconds, "why": f"cut at the deadline after {seconds:.0f} s"}
        return {"result": "FAIL", "seconds": seconds, "why": f"ran past its {limit} s: {log_tail(log_file)}"}
    return {"result": "FAIL", "seconds": seconds, "why": f"its process ended with {process.returncode}: {log_tail(log_file)}"}


def log_tail(path, chars=1500):
    return path.read_text(errors="replace")[-chars:]


def child(key, setup):
    """The body of one check's process: runs it and writes its outcome where run_check reads it."""
    try:
        outcome = {"result": "pass", "figures": BY_KEY[key].run(setup)}
    except Skipped as e:
        outcome = {"result": "skip", "why": str(e)}
    except CheckFailed as e:
        outcome = {"result": "FAIL", "why": str(e)}
    except Exception as e:  # a bug or a device error: its traceback's end says where
        outcome = {"result": "FAIL", "why": f"{type(e).__name__}: {e} at {''.join(traceback.format_tb(e.__traceback__)[-2:])}"}
    from nanochat import storage

    storage.write_json(str(setup.workdir / f"{key}.result.json"), outcome)  # whole, or not there


def print_row(row):
    figures = row.get("figures") or {}
    shown = ", ".join(f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
    why = " ".join(row.get("why", "").split())  # one line: a failure's end says most
    print(f"{row['check']:<28}{row['result']:<8}{row['seconds']:>8.0f}  {shown or why[-300:]}", file=sys.stderr, flush=True)


def work_directory(device):
    """Where the checks write: /dev/shm on a GPU machine with room there (d20's checkpoints write and
    hash in seconds), else the temporary directory."""
    if device == "cuda" and os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free >= SHM_NEEDED:
        return "/dev/shm"
    return None


def device_facts(device):
    import torch

    if device != "cuda":
        return {"device": platform.processor() or platform.machine(), "torch": torch.__version__}
    return {"device": torch.cuda.get_device_name(), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "torch": torch.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BY_KEY), metavar="KEY",
                        help=f"run these checks and those they need (default: all): {', '.join(BY_KEY)}")
    parser.add_argument("--deadline", type=float, default=540, help="seconds for all the checks: one not reached by "
                        "then is reported as not run (default: %(default)s, inside a 10-minute command)")
    parser.add_argument("--steps", type=int, help="base_train steps per training check (default: 8 on a GPU)")
    parser.add_argument("--out", help="a directory to append each check's JSON line to (gpu_check.jsonl) as it ends "
                        "(default: $OUT where set)", default=os.environ.get("OUT"))
    parser.add_argument("--device", choices=list(SCALES), default="cuda",
                        help="cpu: the checks a CPU can run, at the tiny preset (a test of this script)")
    parser.add_argument("--child", choices=list(BY_KEY), help=argparse.SUPPRESS)  # one check's own process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    scale = SCALES[args.device]
    if args.steps:
        scale = dataclasses.replace(scale, steps=args.steps)
    if args.child:
        return child(args.child, Setup(Path(args.workdir), args.device, scale))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is false): every check needs one GPU; "
                 "nothing was run")
    from nanochat.common import git_commit

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # eager d20 close to the GPU's memory
    deadline = time.monotonic() + args.deadline
    jsonl = Path(args.out) / "gpu_check.jsonl" if args.out else None
    rows = []
    print(f"{'check':<28}{'result':<8}{'seconds':>8}  figures", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="nanochat-gpu-check-", dir=work_directory(args.device)) as tmp:
        setup = Setup(Path(tmp), args.device, scale)
        passed = set()
        for check in with_prerequisites(args.only or BY_KEY):
            left = deadline - time.monotonic()
            missing = [key for key in check.needs if key not in passed]
            if check.cuda_only and args.device != "cuda":
                row = {"result": "skip", "seconds": 0, "why": "needs CUDA"}
            elif missing:
                row = {"result": "skip", "seconds": 0, "why": f"needs {', '.join(missing)}, which did not pass"}
            elif left < MIN_START:
                row = {"result": "not run", "seconds": 0, "why": f"{max(left, 0):.0f} s of the deadline left"}
            else:
                row = run_check(check, setup, ["--steps", str(scale.steps)], left)
            row = {"check": check.title, "key": check.key, **row}
            passed |= {check.key} if row["result"] == "pass" else set()
            rows.append(row)
            print_row(row)
            if jsonl:
                with open(jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    figures = {row["key"]: row.get("figures") for row in rows}
    bf16, fp8 = figures.get("bf16+compile"), figures.get("fp8+compile")
    summary = {"bench": "gpu_check", **device_facts(args.device), "commit": git_commit(), "deadline_s": args.deadline,
               "checks": rows, "reference": "base_train bf16+compile, this run",
               "fp8_speedup": round(fp8["tok_per_s"] / bf16["tok_per_s"], 3) if bf16 and fp8 else None}
    print(json.dumps(summary), flush=True)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps(summary) + "\n")
    again = [row["key"] for row in rows if row["result"] in ("FAIL", "not run")]
    if again:
        sys.exit(f"gpu_check: failed or not reached: {', '.join(again)}; again: bench/gpu_check.py --only {' '.join(again)}")


if __name__ == "__main__":
    main()
