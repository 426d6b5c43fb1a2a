"""Every claim of the project that only a CUDA GPU can check, on one GPU in under 10 minutes (H100):

    .venv/bin/python bench/gpu_check.py [--steps 8] [--device-batch-size 16]

- Training: the base_train stage itself at preset d20, --steps steps of --device-batch-size rows of
  2,048 tokens, on shards of synthetic text written here and the preset's tokenizer (32,768 tokens) trained on
  them (tok_train): bf16 eager and compiled, FP8 eager and compiled, fp16 with its gradient scaler.
  Each must learn (its last loss below its first, every loss finite) in the dtype asked for; FP8 must
  have converted layers, fp16 must have checkpointed its scaler. And a small bf16 run crashed after
  a checkpoint resumes from it on the GPU. tok/s and MFU are the medians of
  the steps after the first two (compilation, warm-up); MFU is against the bf16 matmul peak measured
  by the stage, FP8's too (as upstream counts it).
- Decoding on CUDA: the engine's cached, batched greedy decoding equals uncached greedy decoding of
  a random GPT with every option of the 2026 recipe (sliding windows, grouped-query attention; fp32,
  weights large enough that no choice is a near tie), rows joining at different steps and positions;
  and the bf16 run's d20 model as load_engine serves it on the GPU runs torch's attention and
  sampling (nanochat.cpu is for CPUs), with its decode tok/s at batch 1 and 8.
- Flash attention, where a build of it runs on this GPU (else the check is skipped): it agrees with
  SDPA, and a model attends through it in every layer, with bf16 weights (inference) and with fp32
  weights under bf16 autocast (training); the engine of that fp32 model decodes under autocast.
- FlexAttention, which a compiled model's sliding windows use where no flash attention runs: it
  agrees with SDPA under a window mask at d20's shapes (forward and backward, compiled), with the
  times of both; without flash attention, a compiled model calls it in its windowed layers.
- The training loss at d20's sizes: nanochat.loss's fused one agrees with F.cross_entropy of the
  capped logits compiled (upstream's formulation), and the times of both (forward and backward).
- Serving: `nanochat serve` of the d20 model on the GPU answers a chat completion and a streamed one
  through the official openai client.

Without a CUDA device it says so and exits with status 1 before any work. Prints a table of the
checks (pass, FAIL or skip, seconds, figures), then one JSON line (the GPU, the commit, each check,
and FP8's speed-up over bf16, both compiled, measured in the same run); exits with status 1 if a
check failed.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESET, SEQ_LEN = "d20", 2048  # d20's rows are 2,048 tokens
WARMUP_STEPS = 2  # left out of the tok/s and MFU medians
TRAIN_CHARS = 8_000_000  # about 1.3M tokens: each run reads the first --steps x batch of them
# base_train's options per run, and the seconds it may take (compiling d20 takes a minute or two)
RUNS = {
    "bf16": (["--dtype", "bfloat16", "--no-compile", "--no-fp8"], 180),
    "bf16+compile": (["--dtype", "bfloat16", "--compile", "--no-fp8"], 300),
    "fp8": (["--dtype", "bfloat16", "--no-compile", "--fp8"], 180),
    "fp8+compile": (["--dtype", "bfloat16", "--compile", "--fp8"], 300),
    "fp16+scaler": (["--dtype", "float16", "--no-compile", "--no-fp8"], 180),
}
SERVED_RUN = "bf16"  # whose model the decoding and serving checks load
# every check's base_train trains only: no evaluation, CORE or samples between steps
TRAINING_ONLY = ["--eval-every", "-1", "--core-every", "-1", "--sample-every", "-1"]
FP8_LOG = re.compile(r"FP8 training: (\d+) of (\d+) linear layers converted")  # nanochat.fp8.convert_linears


class CheckFailed(Exception):
    """A check found the claim false (the message says how)."""


class Skipped(Exception):
    """A check that does not apply to this machine (the message says why)."""


def write_shards(directory, train_chars, seed=0):
    """Two shards of synthetic documents (the last is validation): Zipf-distributed pseudo-words, so
    BPE finds the preset's 32,768 tokens in them and the model has something to learn."""
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

    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    for index, chars in enumerate((train_chars, train_chars // 16)):
        pq.write_table(pa.table({"text": list(documents(chars))}), directory / f"shard_{index:05d}.parquet")


def prepare(data, tokenizer_run):
    """The shards and a run holding the tokenizer trained on them, which every training run copies."""
    write_shards(data, TRAIN_CHARS)
    stage("tok_train", tokenizer_run, "--data", str(data), timeout=300)
    return {"train_chars": TRAIN_CHARS}


def stage(module, run, *options, timeout, fault=None):
    """Runs nanochat.stages.<module> on `run` at the preset; the completed process, or CheckFailed
    with the end of its output. With `fault` (a NANOCHAT_FAULT spec) it must crash there (exit 3)."""
    cmd = [sys.executable, "-m", f"nanochat.stages.{module}", "--run", str(run), "--preset", PRESET, *options]
    env = {**os.environ, **({"NANOCHAT_FAULT": fault} if fault else {})}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{module} ran past {timeout} s") from None
    if done.returncode != (3 if fault else 0):
        raise CheckFailed(f"{module} {f'with the fault {fault} ' if fault else ''}ended with {done.returncode}: "
                          f"{done.stderr[-1500:]}")
    return done


def train(name, tokenizer_run, data, workdir, args):
    """One base_train run of RUNS; its figures, or CheckFailed naming what is wrong."""
    options, timeout = RUNS[name]
    run = workdir / name
    shutil.copytree(tokenizer_run, run)
    try:
        return check_training(run, options, timeout, data, args)
    finally:
        if name != SERVED_RUN:
            shutil.rmtree(run)  # a d20 checkpoint with its optimizer state is some 5 GB


def check_training(run, options, timeout, data, args):
    """base_train with `options` in `run`, and what it recorded checked; its figures."""
    from nanochat import storage

    rows = args.device_batch_size * SEQ_LEN
    done = stage("base_train", run, "--data", str(data), "--num-steps", str(args.steps), "--device-batch-size",
                 str(args.device_batch_size), "--total-batch-size", str(rows), *TRAINING_ONLY, "--eval-tokens", str(rows),
                 "--checkpoint-every", "-1", "--keep-last", "1", *options, timeout=timeout)
    summary = json.loads((run / "base_train" / "stage.json").read_text())
    records = [json.loads(line) for line in (run / "base_train" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    timed = [r for r in steps if r["step"] > WARMUP_STEPS] or steps
    figures = {"tok_per_s": statistics.median(r["tok_per_s"] for r in timed),
               "mfu": statistics.median(r["mfu"] for r in timed),
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


def resumed_training(tokenizer_run, data, workdir):
    """base_train crashed right after its step-2 checkpoint resumes there and ends: the optimizer
    state, read on the CPU, goes back to the GPU (the fused AdamW kernel takes nothing else). A
    depth-4 model, bf16: the resume is what is checked, not the size."""
    run = workdir / "resumed"
    shutil.copytree(tokenizer_run, run)
    options = ["--data", str(data), "--depth", "4", "--num-steps", "4", "--checkpoint-every", "2", "--device-batch-size",
               "4", "--total-batch-size", str(4 * SEQ_LEN), *TRAINING_ONLY, "--dtype", "bfloat16", "--no-compile", "--no-fp8"]
    stage("base_train", run, *options, timeout=180, fault="base_train:2")
    done = stage("base_train", run, *options, timeout=180)
    records = [json.loads(line) for line in (run / "base_train" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and r["step"] > 2]
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


def cached_equals_uncached(device="cuda"):
    """The engine on CUDA: requests joining a running batch at different steps, each row at its own
    position (the masked SDPA path), decode as uncached greedy decoding does, token for token, with
    every model option of the 2026 recipe on (past position 128, the sliding windows)."""
    import torch

    from nanochat.engine import Engine, Request, SamplingParams

    tokenizer, model = recipe_model(n_embd=64, device=device)
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


def served_decoding(run, device="cuda"):
    """The run's model as load_engine serves it on CUDA: bf16, SDPA and torch's sampling (no hook of
    nanochat.cpu set), and its decode speed."""
    import torch

    from nanochat.engine import SamplingOps, SamplingParams
    from nanochat.inference import load_engine

    engine = load_engine(str(run), "base", device)
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


def flash_attention_check():
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


def flex_attention_check(batch=8, heads=10, context=2048, head_dim=128, window=512, repeats=5):
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


def fused_loss_against_compiled(tokens=32_768, width=1280, repeats=5):
    """The training loss at d20's sizes (--device-batch-size 16 rows of 2,048), forward and backward
    under bf16 autocast: nanochat.loss's fused, chunked one (kept out of compiled graphs) against
    F.cross_entropy of the capped logits compiled (upstream's formulation). They must agree; their
    times say whether the fusion, tuned on CPUs, pays on this GPU too."""
    import torch
    import torch.nn.functional as F

    from nanochat import gpt, loss, presets

    vocab = presets.get(PRESET, "tok_train")["vocab_size"]
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


def serving(run, timeout=180):
    """`nanochat serve` of the run's base model on the GPU: a chat completion and a streamed one
    through the openai client."""
    try:
        import openai
    except ImportError:
        raise CheckFailed("the openai package is missing (pip install -e '.[dev]')") from None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen([sys.executable, "-m", "nanochat.cli", "serve", "--run", str(run), "--source", "base",
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            deadline = time.monotonic() + timeout
            while (status := health(url)) is None:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise CheckFailed(f"the server did not answer /health within {timeout} s: {log.read()[-1500:]}")
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


def checked(results, name, fn, *args):
    """Runs one check, recording it as passed with its figures or failed with why; returns the figures."""
    print(f"{name} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    figures, result, why = None, "pass", None
    try:
        figures = fn(*args)
    except Skipped as e:
        result, why = "skip", str(e)
    except Exception as e:  # one failed check must not hide the others
        result, why = "FAIL", str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
    results.append({"check": name, "result": result, "seconds": round(time.perf_counter() - started, 1),
                    **({"figures": figures} if figures else {}), **({"why": why} if why else {})})
    return figures


def print_table(results):
    print(f"{'check':<28}{'result':<8}{'seconds':>8}  figures", file=sys.stderr)
    for r in results:
        figures = r.get("figures") or {}
        shown = ", ".join(f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        print(f"{r['check']:<28}{r['result']:<8}{r['seconds']:>8.0f}  {shown or r['why'][:300]}", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="base_train steps per run (default: %(default)s)")
    parser.add_argument("--device-batch-size", type=int, default=16, help="rows of 2,048 tokens per step, in every "
                        "run (default: %(default)s, half of d20's: the eager runs keep more activations)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is false): every check needs one GPU; "
                 "nothing was run")
    from nanochat.common import git_commit

    results = []
    with tempfile.TemporaryDirectory(prefix="nanochat-gpu-check-") as tmp:
        workdir = Path(tmp)
        data, tokenizer_run = workdir / "data", workdir / "tokenizer"
        if checked(results, "shards and tok_train", prepare, data, tokenizer_run):
            figures = {name: checked(results, f"base_train {name}", train, name, tokenizer_run, data, workdir, args)
                       for name in RUNS}
            checked(results, "base_train resumed", resumed_training, tokenizer_run, data, workdir)
        else:
            figures = dict.fromkeys(RUNS)
        checked(results, "engine cached = uncached", cached_equals_uncached)
        checked(results, "flash attention", flash_attention_check)
        checked(results, "flex attention", flex_attention_check)
        checked(results, "fused loss vs compiled", fused_loss_against_compiled)
        checked(results, "served model decoding", served_decoding, workdir / SERVED_RUN)  # base_train bf16's model
        torch.cuda.empty_cache()
        checked(results, "nanochat serve + openai", serving, workdir / SERVED_RUN)
    print_table(results)
    bf16, fp8 = figures["bf16+compile"], figures["fp8+compile"]
    print(json.dumps({"bench": "gpu_check", "device": torch.cuda.get_device_name(),
                      "capability": ".".join(map(str, torch.cuda.get_device_capability())), "torch": torch.__version__,
                      "commit": git_commit(), "checks": results, "reference": "base_train bf16+compile, this run",
                      "fp8_speedup": round(fp8["tok_per_s"] / bf16["tok_per_s"], 3) if bf16 and fp8 else None}))
    sys.exit(1 if any(r["result"] == "FAIL" for r in results) else 0)


if __name__ == "__main__":
    main()
