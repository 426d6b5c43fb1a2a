"""Decode throughput of our engine against Hugging Face transformers, the same weights in both.

The model is bench/inference.py's d4 model (width 256, 2 heads of 128, vocabulary 65,536, seeded
random weights, its synthetic tokenizer) exported by `nanochat export`'s writer (nanochat/export.py)
into a temporary directory and loaded there with AutoModelForCausalLM, which gives transformers' own
NanoChatForCausalLM (the d4 model is classic). Both decode greedily, 128 new tokens after 64-token
prompts, at batch 1 and batch 8 (eight different prompts: eight requests to our engine, one batch of
eight rows to `generate`), in one process with the same torch thread count, in fp32 and, where the
CPU multiplies bf16 in hardware (AMX or AVX512-BF16), in bf16.

- transformers: `model.generate(do_sample=False)` with its default KV cache (DynamicCache) and
  attention (SDPA), the model cast to the dtype by `from_pretrained(dtype=...)`.
- ours: nanochat.engine.Engine as `nanochat serve` builds it (nanochat.inference.load_engine): the
  model cast to the dtype, then nanochat.inference.prepare (fused query/key/value layers and
  nanochat.cpu's fast paths: in bf16 nanochat's AMX matmul, RMSNorm, rotary and cap kernels where
  the CPU has AMX, else oneDNN-packed linear layers; in fp32 nanochat's AVX2 kernels, the linear
  layers' weights held in bf16 and multiplied in fp32).

The weights are bf16 values (bench/inference.py's random_model), so in fp32 both sides multiply
the same numbers: transformers holds them in fp32, ours in bf16, half the bytes to read.

The fp32 runs must give the same batch-1 greedy tokens, or the bench fails (a fast wrong answer
proves nothing); every run reports the share of tokens the two sides agree on (in bf16 they may
part: the two round their bf16 ops differently; transformers' RMSNorm, for one, is its own ops,
not torch's rms_norm, which computes in fp32). Each figure is the
best of --repeats runs after one warm-up, the two sides taking turns.

    python bench/peer_inference.py [--repeats 3] [--threads N]     --threads 1 on a machine busy with other work

Prints a table of tok/s and the ratios ours/transformers, then one JSON line with the CPU, the
thread count, transformers' version and, per dtype and batch, both tok/s, the ratio and the share
of tokens the two agree on.
"""

import argparse
import functools
import json
import os
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # read when transformers is imported: everything here is local, never the hub

import torch
import transformers
from inference import CONFIG, NEW_TOKENS, PROMPT_TOKENS, random_model, synthetic_tokenizer  # bench/ is on sys.path

from nanochat.common import cpu_has_fast_bf16, cpu_model, git_commit
from nanochat.cpu import kernels
from nanochat.engine import Engine, Request, SamplingParams
from nanochat.export import write_model_dir
from nanochat.gpt import GPT
from nanochat.inference import prepare

BATCHES = (1, 8)


def ours(engine, prompts):
    """Greedy completions of the prompts, all added to the engine at once (as concurrent requests)."""
    requests = [Request(prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS)) for prompt in prompts]
    engine.add(*requests)
    while not all(request.done for request in requests):
        engine.step()
    return [request.completions[0].token_ids for request in requests]


def theirs(model, prompts):
    """transformers' completions of the prompts (as its generation_config says), one batch (equal
    lengths: no padding)."""
    ids = torch.tensor(prompts)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out[:, PROMPT_TOKENS:].tolist()


def full_length(completions):
    """The completions, checked to be NEW_TOKENS long: a row that stopped early would make the
    figures unequal work."""
    assert all(len(tokens) == NEW_TOKENS for tokens in completions), [len(tokens) for tokens in completions]
    return completions


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fastest(fns, repeats):
    """Each fn's outputs (of a warm-up call) and its fastest time of `repeats` calls, the fns taking
    turns so that a change in the machine's load hits them alike."""
    outs = [fn() for fn in fns]
    times = [min(runs) for runs in zip(*([seconds(fn) for fn in fns] for _ in range(repeats)))]
    return outs, times


def agreement(a, b):
    """The fraction of positions where two lists of token rows hold the same token."""
    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)]
    return sum(x == y for x, y in pairs) / len(pairs)


def our_engine(model, tokenizer, dtype):
    """A copy of the model served as load_engine serves it, in `dtype`."""
    copy = GPT(CONFIG).eval()
    copy.load_state_dict(model.state_dict())
    copy.to(dtype)
    return Engine(copy, tokenizer, max_rows=max(BATCHES), max_len=PROMPT_TOKENS + NEW_TOKENS + 1, ops=prepare(copy))


def measure(model, tokenizer, directory, dtype, prompts, repeats):
    """Both sides in one dtype: {batchN: {ours_tok_s, transformers_tok_s, ratio, agreement}}."""
    engine = our_engine(model, tokenizer, dtype)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    assert type(hf_model).__name__ == "NanoChatForCausalLM", type(hf_model)
    special = tokenizer.special_ids
    # greedy in place of the export's sampling defaults (generate would still merge them in); our engine's stops
    hf_model.generation_config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=NEW_TOKENS, use_cache=True, pad_token_id=special["<|assistant_end|>"],
        eos_token_id=[special["<|assistant_end|>"], special["<|bos|>"]])
    result = {}
    for batch in BATCHES:
        rows = prompts[:batch]
        (our_out, hf_out), times = fastest([functools.partial(ours, engine, rows), functools.partial(theirs, hf_model, rows)], repeats)
        our_tok_s, hf_tok_s = (batch * NEW_TOKENS / t for t in times)
        same = agreement(full_length(our_out), full_length(hf_out))
        if dtype == torch.float32 and batch == 1:
            assert same == 1.0, f"fp32 batch-1 greedy tokens differ from transformers' ({same:.1%} agree)"
        result[f"batch{batch}"] = {"ours_tok_s": round(our_tok_s, 1), "transformers_tok_s": round(hf_tok_s, 1),
                                   "ratio": round(our_tok_s / hf_tok_s, 2), "agreement": round(same, 3)}
    return result


def table(result):
    lines = [f"{'dtype':<9} {'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ours/transformers':>18} {'tokens agree':>13}"]
    for dtype in result["dtypes"]:
        for batch in BATCHES:
            r = result[dtype][f"batch{batch}"]
            lines.append(f"{dtype:<9} {batch:>5} {r['ours_tok_s']:>11.1f} {r['transformers_tok_s']:>19.1f} "
                         f"{r['ratio']:>17.2f}x {r['agreement']:>12.1%}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure, the best kept (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's, "
                        "i.e. the cores this process may use)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = random_model(), synthetic_tokenizer(CONFIG.vocab_size)
    prompts = torch.randint(0, 256, (max(BATCHES), PROMPT_TOKENS), generator=torch.Generator().manual_seed(1)).tolist()
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_fast_bf16() else [])
    result = {"bench": "peer_inference", "device": "cpu", "cpu": cpu_model(), "fast_bf16": cpu_has_fast_bf16(),
              "commit": git_commit(), "load_average_1m": os.getloadavg()[0], "threads": torch.get_num_threads(),
              "transformers": transformers.__version__, "torch": torch.__version__,
              "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
              "dtypes": [str(dtype).removeprefix("torch.") for dtype in dtypes]}
    with tempfile.TemporaryDirectory(prefix="nanochat-peer-") as directory:
        write_model_dir(directory, model.state_dict(), CONFIG, tokenizer)
        for dtype in dtypes:
            result[str(dtype).removeprefix("torch.")] = measure(model, tokenizer, directory, dtype, prompts, args.repeats)
    result["cpu_kernels"] = kernels.LIBRARY is not None
    print(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
