"""Decode throughput of the engine on the upstream-equivalent d4 model (width 256, 2 heads of 128,
vocab 65,536), 64-token prompt, 128 greedy tokens, batch 1 and 8, against the reference measured in
the same run: upstream's loop (the model in fp32 as nanochat.gpt defines it, with SDPA and the
tanh soft cap, the plain KV cache of bench/reference.py, argmax each step). Our attention and model
code are shared with the reference, so it is faster than upstream would be wherever they are. Ours
runs the model as `load_engine` serves it (nanochat.inference.prepare): in the dtype the CPU
multiplies fastest, its query, key and value layers fused, and nanochat.cpu applied (its linear
layers in the form that dtype multiplies fastest; in fp32 on an AVX2 CPU nanochat's own kernels,
nanochat/cpu/kernels.c, on the weights held in bf16, which also take the soft cap and the engine's
argmax).

    python bench/inference.py [--repeats 3]

Prints one JSON line: the CPU, tok/s of ours and of the reference per batch size, the ratios, the
dtype and whether nanochat's CPU kernels ran.
"""

import argparse
import functools
import json
import os
import time

import torch
from reference import PlainKVCache  # bench/ is on sys.path: this file runs as a script

from nanochat.common import autocast_dtype, cpu_has_fast_bf16, cpu_model, git_commit
from nanochat.cpu import kernels
from nanochat.engine import Engine, SamplingParams
from nanochat.gpt import GPT, GPTConfig
from nanochat.inference import prepare
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

PROMPT_TOKENS, NEW_TOKENS = 64, 128
CONFIG = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=4, n_head=2, n_kv_head=2, n_embd=256)


@torch.inference_mode()
def reference(model, prompt, batch):
    """Upstream's structure: prefill, then one forward per token through the plain KV cache."""
    cache = PlainKVCache(CONFIG.n_layer, PROMPT_TOKENS + NEW_TOKENS)
    ids = torch.tensor([prompt] * batch)
    for _ in range(NEW_TOKENS):
        ids = model(ids, kv_cache=cache)[:, -1].argmax(dim=-1, keepdim=True)


def ours(engine, prompt, batch):
    request = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS), n=batch)
    assert all(len(c.token_ids) == NEW_TOKENS for c in request.completions)


def synthetic_tokenizer(vocab_size):
    """A tokenizer of the d4 model's vocabulary size: the 256 bytes, then byte pairs."""
    pairs = (bytes([a, b]) for a in range(256) for b in range(256))
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size - len(SPECIAL_TOKENS):
        ranks[next(pairs)] = len(ranks)
    return Tokenizer(ranks)


def random_model():
    """The d4 model with seeded random weights, its logits trained-like: no early <|assistant_end|>,
    no near-ties. Each weight is a bf16 value (kept in fp32), so that every form that holds them
    multiplies the same weights: fp32 ones, bf16 ones, and the bf16 panels an fp32 model's linear
    layers take on a CPU without bf16 arithmetic (nanochat.cpu.linears.PanelLinear)."""
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.05)
        for p in model.parameters():
            p.copy_(p.bfloat16())
    return model


def tokens_per_second(fn, batch, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return batch * NEW_TOKENS / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = random_model()
    tokenizer = synthetic_tokenizer(CONFIG.vocab_size)
    dtype = autocast_dtype("cpu")
    fast = GPT(CONFIG).eval()
    fast.load_state_dict(model.state_dict())
    fast.to(dtype)
    engine = Engine(fast, tokenizer, max_rows=8, max_len=PROMPT_TOKENS + NEW_TOKENS + 1, ops=prepare(fast))
    prompt = torch.randint(0, 256, (PROMPT_TOKENS,)).tolist()
    result = {"bench": "inference", "device": "cpu", "cpu": cpu_model(), "fast_bf16": cpu_has_fast_bf16(), "commit": git_commit(),
              "load_average_1m": os.getloadavg()[0], "dtype": str(dtype).removeprefix("torch."),
              "cpu_kernels": kernels.LIBRARY is not None,
              "reference_dtype": "float32", "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
    for batch in (1, 8):
        ref = tokens_per_second(functools.partial(reference, model, prompt, batch), batch, args.repeats)
        our = tokens_per_second(functools.partial(ours, engine, prompt, batch), batch, args.repeats)
        result[f"batch{batch}"] = {"ours_tok_s": round(our, 1), "reference_tok_s": round(ref, 1),
                                   "ratio": round(our / ref, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
