"""Distributed overhead of base_train: 2 processes x 1 thread (torchrun, gloo) against 1 process x 2
threads, the same stage, preset and batch, on this machine's 2 cores.

    .venv/bin/python bench/train_distributed.py [--preset cpu] [--steps 30]

Runs the real stage (tokenizer first, then base_train twice) in a temporary run directory and
takes the median tokens/s of the steps after --warmup. Prints a table, then one JSON line.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def stage(module, run, preset, data, *options, nproc=None, threads=None):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", module, "--"] \
        if nproc else [sys.executable, "-m", module]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or 1)}
    cmd = [*prefix, "--run", str(run), "--preset", preset, "--data", str(data), *options]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def median_tok_per_s(run, warmup):
    lines = (run / "base_train" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines]
    return statistics.median(r["tok_per_s"] for r in steps if "loss" in r and r["step"] > warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(os.environ.get("NANOCHAT_TEST_DATA") or REPO.parent / "shared" / "data") / "pretrain"
    parser.add_argument("--data", type=Path, default=default_data, help="folder of pretraining shards (default: %(default)s)")
    parser.add_argument("--preset", default="cpu", help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median (default: %(default)s)")
    args = parser.parse_args()

    quiet = ["--eval-every", "-1", "--core-every", "-1", "--sample-every", "-1", "--checkpoint-every", "-1",
             "--num-steps", str(args.steps)]
    with tempfile.TemporaryDirectory(prefix="nanochat-bench-") as tmp:
        tokenizer_run = Path(tmp) / "tok"
        stage("nanochat.stages.tok_train", tokenizer_run, args.preset, args.data)
        results = {}
        for name, kw in {"2 processes x 1 thread": {"nproc": 2, "threads": 1},
                         "1 process x 2 threads": {"threads": 2}}.items():
            run = Path(tmp) / name.replace(" ", "_")
            shutil.copytree(tokenizer_run, run)
            print(f"training: {name} ...", file=sys.stderr, flush=True)
            stage("nanochat.stages.base_train", run, args.preset, args.data, *quiet, **kw)
            results[name] = median_tok_per_s(run, args.warmup)
    two_procs, one_proc = results.values()
    for name, tok_s in results.items():
        print(f"{name:<24}{tok_s:>10,.0f} tok/s", file=sys.stderr)
    print(json.dumps({"bench": "train_distributed", "preset": args.preset, "steps": args.steps,
                      "tok_per_s_2proc_1thread": round(two_procs), "tok_per_s_1proc_2threads": round(one_proc),
                      "distributed_overhead": round(1 - two_procs / one_proc, 3)}))


if __name__ == "__main__":
    main()
