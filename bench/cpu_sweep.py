"""The cpu preset's sweep: validation bits per byte against training time, for model sizes x token budgets.

    .venv/bin/python bench/cpu_sweep.py [--depths 2,3,4] [--tokens 2e6,4e6] [--jobs 2] [--storage DIR]

Trains the tokenizer once (the cpu preset's), then base_train for every (depth, tokens) pair as the
cpu preset would, except for the depth and the number of steps (tokens / total batch size), with one
evaluation at the end. Each run is one process on one thread, --jobs of them side by side. The time
axis is the run's CPU time (user + system, start-up and the final evaluation included) divided by
2: the wall time of the preset's two single-threaded processes on 2 cores, which other work on the
machine barely disturbs (wall time is recorded too). Writes OUT.json and the plot OUT.png (bits per
byte against minutes, one line per depth), prints a table, then one JSON line.
Run again with the same --storage, it reuses the runs that finished. docs/cpu-preset.md explains
the choice made from it.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def stage(name, run, storage, *options, threads=None):
    """Runs a stage of the cpu preset to completion; returns (stage.json, wall seconds, CPU seconds)."""
    cmd = [sys.executable, "-m", f"nanochat.stages.{name}", "--run", run, "--preset", "cpu", "--storage", storage,
           *map(str, options)]
    env = {**os.environ, "NANOCHAT_DATA_MIRROR": str(DATA), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} of {run} failed: {cmd}")
    summary = json.loads((Path(storage) / "runs" / run / name / "stage.json").read_text())
    return summary, wall, usage.ru_utime + usage.ru_stime


def train(depth, tokens, storage):
    """base_train at `depth` for `tokens` tokens in a run of its own, sharing the tokenizer."""
    from nanochat import presets

    batch = presets.get("cpu", "base_train")["total_batch_size"]
    steps = max(1, round(tokens / batch))
    run = f"sweep-d{depth}-{tokens / 1e6:g}M"
    runs = Path(storage) / "runs"
    measured = runs / run / "sweep.json"
    if measured.exists():  # finished by an earlier invocation
        return json.loads(measured.read_text())
    shutil.rmtree(runs / run, ignore_errors=True)  # an interrupted run's CPU time is lost: from scratch
    shutil.copytree(runs / "tokenizer" / "tok_train", runs / run / "tok_train", dirs_exist_ok=True)
    summary, wall, cpu = stage("base_train", run, storage, "--depth", depth, "--num-steps", steps, "--eval-every", steps,
                               "--checkpoint-every", steps, "--sample-every", -1, "--core-every", -1,
                               "--data", DATA / "pretrain", threads=1)
    m = summary["metrics"]
    row = {"depth": depth, "tokens": steps * batch, "steps": steps, "parameters": m["parameters"],
            "val_bpb": m["val_bpb"], "minutes_2cores": cpu / 2 / 60, "cpu_s": cpu, "wall_s": wall,
            "tok_per_s_1thread": m["tok_per_s"]}
    measured.write_text(json.dumps(row))
    print(json.dumps(row), flush=True)
    return row


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for depth in sorted({r["depth"] for r in rows}):
        points = sorted((r["minutes_2cores"], r["val_bpb"], r["tokens"]) for r in rows if r["depth"] == depth)
        params = next(r["parameters"] for r in rows if r["depth"] == depth)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"d{depth} ({params / 1e6:.1f}M params)")
        for minutes, bpb, tokens in points:
            ax.annotate(f"{tokens / 1e6:.0f}M tok", (minutes, bpb), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("training time on 2 cores (minutes: CPU time / 2)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("cpu preset sweep: base_train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="2,3,4", help="model depths (width 64 x depth)")
    p.add_argument("--tokens", default="2e6,4e6", help="training token budgets")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    p.add_argument("--storage", default=None, help="storage root kept for inspection (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "docs" / "cpu-sweep"), help="writes OUT.json and OUT.png")
    args = p.parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="nanochat-sweep-")
    if not (Path(storage) / "runs" / "tokenizer" / "tok_train" / "stage.json").exists():
        stage("tok_train", "tokenizer", storage, "--data", DATA / "pretrain")
    pairs = [(depth, tokens) for depth in map(int, args.depths.split(",")) for tokens in map(float, args.tokens.split(","))]
    pairs.sort(key=lambda pair: -pair[0] * pair[1])  # the longest first, so the last job does not run alone
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        rows = sorted(pool.map(lambda pair: train(*pair, storage), pairs), key=lambda r: (r["depth"], r["tokens"]))
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.out + ".png")
    print(f"\n{'depth':>5} {'params':>8} {'tokens':>8} {'val bpb':>8} {'2-core min':>10} {'wall min':>9}")
    for r in rows:
        print(f"{r['depth']:>5} {r['parameters'] / 1e6:>7.1f}M {r['tokens'] / 1e6:>7.1f}M {r['val_bpb']:>8.4f} "
              f"{r['minutes_2cores']:>10.1f} {r['wall_s'] / 60:>9.1f}")
    print(json.dumps({"bench": "cpu_sweep", "runs": rows}))


if __name__ == "__main__":
    main()
