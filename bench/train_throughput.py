"""Training throughput of the GPT: forward + backward + optimizer step, in tokens/s and MFU.

    .venv/bin/python bench/train_throughput.py [--modes fp32,bf16,fp32+compile,bf16+compile] [--steps 8]
    .venv/bin/python bench/train_throughput.py --preset cpu --modes fp32,bf16
    .venv/bin/python bench/train_throughput.py --preset cpu --modes bf16,bf16+classic --steps 30
    .venv/bin/python bench/train_throughput.py --preset cpu --modes fp32,fp32+malloc-defaults

The upstream-equivalent CPU config: depth 4 (width 256, 2 heads of 128), vocabulary 65,536, sequence
512, batch 4 x 512, the real MuonAdamW; with --preset, that preset's base_train model (its sizes and
model options) and device batch instead (cpu: depth 4, heads of 64, vocabulary 8,192, batch 8 x 512).
A mode with "+classic" trains the same sizes with the classic model options: the step cost of the
2026 options against the model they replace, in one run. Every mode keeps freed memory as the
stages do (common.keep_freed_memory), but one with "+malloc-defaults", which shows what that saves. Each mode runs in its
own process, so its peak RSS is its own: random tokens, --warmup steps (compilation included),
then the median of --steps step times. The matmul peak of the mode's dtype
(nanochat.common.measure_matmul_flops) is measured in the same process before and after the steps,
the higher counting; MFU = GPT.estimate_flops() x tokens/s / peak. Prints a table, then one JSON
line; the reference is upstream nanochat's fp32 throughput on this machine class (~610 tokens/s
eager, ~860 compiled; issue 4), which this repo does not contain.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

UPSTREAM_TOK_PER_S = {"eager": 610, "compiled": 860}
DEPTH, VOCAB, SEQ_LEN, BATCH = 4, 65536, 512, 4


def preset_model(preset, vocab_size=None, classic=False):
    """(GPTConfig, device batch) of a preset's base_train, with its tokenizer's vocabulary size
    unless `vocab_size` is given; with `classic`, the classic model options instead of its own."""
    from nanochat import presets
    from nanochat.gpt import GPTConfig

    train = presets.get(preset, "base_train")
    vocab_size = vocab_size or presets.get(preset, "tok_train")["vocab_size"]
    options = presets.CLASSIC_MODEL if classic else {name: train[name] for name in presets.CLASSIC_MODEL}
    config = GPTConfig.from_depth(train["depth"], vocab_size, train["max_seq_len"], head_dim=train["head_dim"],
                                  n_kv_head=train["n_kv_head"], **options)
    return config, train["device_batch_size"]


def run_mode(mode, steps, warmup, config=None, batch=BATCH):
    """Measures one mode ('fp32' or 'bf16', '+compile' optional) in this process, on the model of
    `config` (default: the upstream-equivalent one) and `batch` rows; returns a dict."""
    import torch

    from nanochat.common import autocast_context, keep_freed_memory, measure_matmul_flops
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.optim import setup_optimizers

    if "+malloc-defaults" not in mode:  # as a stage's compute_init does on the CPU
        keep_freed_memory()
    dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float32
    device = torch.device("cpu")
    autocast = autocast_context(device.type, dtype)
    torch.manual_seed(0)
    config = config or GPTConfig.from_depth(DEPTH, VOCAB, SEQ_LEN)
    model = GPT(config)
    optimizer = setup_optimizers(model)
    train_model = torch.compile(model, dynamic=False) if "+compile" in mode else model
    tokens = torch.randint(0, config.vocab_size, (batch, config.sequence_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        with autocast():
            loss = train_model(inputs, targets)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    peak = measure_matmul_flops(device, dtype)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = max(peak, measure_matmul_flops(device, dtype))
    tok_per_s = batch * config.sequence_len / statistics.median(times)
    return {
        "mode": mode,
        "tok_per_s": round(tok_per_s, 1),
        "mfu": round(model.estimate_flops() * tok_per_s / peak, 4),
        "peak_tflops": round(peak / 1e12, 4),
        "step_ms_median": round(1000 * statistics.median(times), 1),
        "step_ms_min": round(1000 * min(times), 1),
        "warmup_s": round(warmup_s, 1),
        "loss": round(loss, 4),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "threads": torch.get_num_threads(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="fp32,bf16,fp32+compile,bf16+compile", help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--preset", help="measure this preset's base_train model (default: the upstream-equivalent one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one mode, in this process
    args = parser.parse_args()
    if args.child:
        classic = "+classic" in args.child
        config, batch = preset_model(args.preset, classic=classic) if args.preset else (None, BATCH)
        print(json.dumps(run_mode(args.child, args.steps, args.warmup, config, batch)))
        return
    config, batch = preset_model(args.preset) if args.preset else (None, BATCH)

    from nanochat.common import git_commit

    results = []
    for mode in args.modes.split(","):
        print(f"{mode} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
               *(["--preset", args.preset] if args.preset else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{mode} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'mode':<22}{'tok/s':>8}{'MFU':>8}{'peak TFLOP/s':>14}{'ms/step':>9}{'RSS GiB':>9}", file=sys.stderr)
    for r in results:
        print(f"{r['mode']:<22}{r['tok_per_s']:>8,.0f}{r['mfu']:>8.1%}{r['peak_tflops']:>14.3f}{r['step_ms_median']:>9.0f}"
              f"{r['peak_rss_gib']:>9.2f}", file=sys.stderr)
    best = max(results, key=lambda r: r["tok_per_s"])
    out = {"bench": "train_throughput", "device": "cpu", "commit": git_commit(),
           "modes": results, "best": best["mode"], "best_tok_per_s": best["tok_per_s"]}
    if args.preset:  # upstream has no such model: no reference
        out["config"] = {"preset": args.preset, "depth": config.n_layer, "width": config.n_embd,
                         "vocab_size": config.vocab_size, "sequence_len": config.sequence_len, "batch": batch}
    else:
        out["config"] = {"depth": DEPTH, "vocab_size": VOCAB, "sequence_len": SEQ_LEN, "batch": BATCH}
        out["reference_upstream_fp32_tok_per_s"] = UPSTREAM_TOK_PER_S
        out["ratio_best_vs_upstream_compiled"] = round(best["tok_per_s"] / UPSTREAM_TOK_PER_S["compiled"], 2)
    by_mode = {r["mode"]: r["tok_per_s"] for r in results}
    for variant in ("+classic", "+malloc-defaults"):  # each mode against its variant measured in this run
        ratios = {mode: round(tok / by_mode[mode + variant], 3) for mode, tok in by_mode.items() if mode + variant in by_mode}
        if ratios:
            out[f"ratio_vs_{variant[1:].replace('-', '_')}"] = ratios
    print(json.dumps(out))


if __name__ == "__main__":
    main()
