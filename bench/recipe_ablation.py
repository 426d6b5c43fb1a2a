"""The recipe ablation: upstream's 2026 recipe against our classic one, group by group, at the cpu
preset's scale and a fixed training budget per arm.

    .venv/bin/python bench/recipe_ablation.py [--minutes 10] [--arms all] [--jobs 2] [--storage DIR]

Arms: `classic` (the recipe of late 2025) and `full` (all four groups of presets.RECIPE_GROUPS:
model, optimizer, schedules, horizon), each with two seeds, and `full-<group>`, the full recipe
with that group back at its classic values. Every arm trains the cpu preset's model (its depth,
width, context, data and tokenizer) with base_train for the same budget: --minutes on 2 cores,
counted as CPU time / 2 (one single-threaded process per arm, --jobs side by side, so other
work on the machine barely moves the figure). Each arm's steps are set from its own cost per
step, measured by two short runs (5 and 45 steps; their CPU-time difference over 40 steps) of
each distinct model, optimizer recipe and batch, so an option that slows a step pays for it in
steps. One evaluation at the end, on the same validation text as every arm.

A group wins if taking it out costs more bits per byte than the spread between the seeds (the
larger of classic's and full's). Arms such as `full-horizon-model` take several groups out: with a
group that loses, the others are measured without it too, each against the arm one group shorter
(full-horizon-model against full-horizon). Runs again with the same --storage reuse the arms that
finished, so it can run in pieces. Prints the table (also written to OUT.md with OUT.json), then
one JSON line.
"""

import argparse
import collections
import concurrent.futures
import json
import shutil
import tempfile
import threading
from pathlib import Path

from cpu_sweep import DATA, ROOT, stage  # bench/ is on sys.path: this file runs as a script

from nanochat import presets

SEEDS = (42, 43)
EVAL_TOKENS = 262_144  # the cpu preset's base_eval: four times base_train's, for a steadier figure
CALIBRATION_STEPS = (5, 45)  # 40 steps apart: a 10-step difference was off by up to 40%
CALIBRATING = collections.defaultdict(threading.Lock)  # per cost key: arms of one cost share a calibration


CLASSIC_BATCH = 8192  # the cpu preset's total batch before the 2026 recipe (docs/cpu-preset.md)


def recipe_groups():
    """presets.RECIPE_GROUPS, the classic horizon at the cpu preset's scale."""
    groups = {name: (dict(classic), new) for name, (classic, new) in presets.RECIPE_GROUPS.items()}
    groups["horizon"][0]["total_batch_size"] = CLASSIC_BATCH
    return groups


def arm(name):
    """(options, seed) of arm `name`: classic-s<seed>, full-s<seed>, or full-<group>[-<group>...],
    the full recipe with those groups back at their classic values (seed 42); each `@option=value`
    after it sets one option (a variant of that arm: full-horizon-optimizer@matrix_lr=0.04)."""
    base, *overrides = name.split("@")
    options, seed = group_arm(base)
    for override in overrides:
        key, _, value = override.partition("=")
        if key not in options or not value:
            raise SystemExit(f"arm {name!r}: {override!r} is not option=value of a recipe option ({', '.join(options)})")
        kind = type(options[key])
        options = {**options, key: value.lower() in ("1", "true") if kind is bool else kind(value)}
    return options, seed


def group_arm(name):
    groups = recipe_groups()
    full = {k: v for _, new in groups.values() for k, v in new.items()}
    kind, _, rest = name.partition("-")
    if kind in ("classic", "full") and rest in {f"s{seed}" for seed in SEEDS}:
        options = full if kind == "full" else {k: v for old, _ in groups.values() for k, v in old.items()}
        return options, int(rest[1:])
    if kind == "full" and rest and all(g in groups for g in rest.split("-")):
        return {**full, **{k: v for g in rest.split("-") for k, v in groups[g][0].items()}}, SEEDS[0]
    raise SystemExit(f"unknown arm {name!r}: classic-s<seed>, full-s<seed> (seeds {SEEDS}) or full-<group>[-<group>...] "
                     f"(groups: {', '.join(groups)})")


def arms():
    """The default arms: classic and full with each seed, and full less each group."""
    names = [f"{kind}-s{seed}" for kind in ("classic", "full") for seed in SEEDS]
    return names + [f"full-{group}" for group in presets.RECIPE_GROUPS]


def base_train(run, storage, options, seed, steps, eval_tokens):
    """A base_train run of its own (sharing the tokenizer) from scratch; (stage.json, CPU seconds)."""
    runs = Path(storage) / "runs"
    shutil.rmtree(runs / run, ignore_errors=True)
    shutil.copytree(runs / "tokenizer" / "tok_train", runs / run / "tok_train")
    summary, _, cpu = stage("base_train", run, storage, *presets.flags(options), "--seed", seed, "--num-steps", steps,
                            "--eval-every", -1, "--checkpoint-every", -1, "--sample-every", -1, "--core-every", -1,
                            "--eval-tokens", eval_tokens, "--data", DATA / "pretrain", threads=1)
    return summary, cpu


def cost_key(options):
    """What a step's cost depends on: the model, the optimizer's recipe and the batch (not the
    schedules, learning rates or seed)."""
    model_options = presets.RECIPE_GROUPS["model"][1]
    return json.dumps({k: v for k, v in sorted(options.items())
                       if k in model_options or k in ("optimizer_recipe", "total_batch_size")})


def cost_per_step(name, storage, options):
    """CPU seconds per training step of these options (from two short runs; cached by cost_key)."""
    key = cost_key(options)
    cache = Path(storage) / "calibration.json"
    with CALIBRATING[key]:
        known = json.loads(cache.read_text()) if cache.exists() else {}
        if key not in known:
            lo, hi = (base_train(f"calibrate-{name}-{n}", storage, options, SEEDS[0], n, 4096)[1]
                      for n in CALIBRATION_STEPS)
            with CALIBRATING["file"]:
                known = json.loads(cache.read_text()) if cache.exists() else {}
                known[key] = (hi - lo) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
                cache.write_text(json.dumps(known, indent=1))
        return known[key]


def measure(name, options, seed, storage, minutes):
    done = Path(storage) / "runs" / name / "ablation.json"
    if done.exists():  # finished by an earlier invocation
        return json.loads(done.read_text())
    per_step = cost_per_step(name.removesuffix(f"-s{seed}"), storage, options)
    steps = max(1, round(minutes * 60 * 2 / per_step))
    summary, cpu = base_train(name, storage, options, seed, steps, EVAL_TOKENS)
    m = summary["metrics"]
    row = {"arm": name, "seed": seed, "steps": steps, "tokens": m["tokens"], "val_bpb": m["val_bpb"],
           "minutes_2cores": cpu / 2 / 60, "cpu_s_per_step": per_step, "parameters": m["parameters"]}
    done.write_text(json.dumps(row))
    print(json.dumps(row), flush=True)
    return row


def reference(name):
    """The arm that `name` takes one more group out of: full-horizon-model's is full-horizon, and
    full-<group>'s is full (its seeds' mean)."""
    return name.rpartition("-")[0]


def verdicts(rows):
    """Each group's cost when taken out of the full recipe (or out of an arm that already took
    others out), against the seeds' spread."""
    bpb = {r["arm"]: r["val_bpb"] for r in rows}
    seeds = {kind: [bpb[f"{kind}-s{s}"] for s in SEEDS if f"{kind}-s{s}" in bpb] for kind in ("classic", "full")}
    spreads = [max(v) - min(v) for v in seeds.values() if len(v) == len(SEEDS)]
    spread = max(spreads) if spreads else None
    if seeds["full"]:
        bpb["full"] = sum(seeds["full"]) / len(seeds["full"])
    out = {"spread": spread, "removals": {}, "variants": {}}
    for name in sorted(bpb):
        base = name.partition("@")[0]
        if base != name and base in bpb and spread is not None:
            gain = bpb[base] - bpb[name]
            out["variants"][name] = {"of": base, "gain": gain, "wins": gain > spread}
            continue
        seed_arm = name in {f"full-s{s}" for s in SEEDS}
        if not name.startswith("full-") or seed_arm or reference(name) not in bpb or spread is None:
            continue
        cost = bpb[name] - bpb[reference(name)]
        out["removals"][name] = {"group": name.rpartition("-")[2], "from": reference(name),
                                 "cost_of_removing": cost, "wins": cost > spread}
    return out


def table(rows, result, minutes):
    lines = [f"Budget: {minutes:g} minutes of base_train per arm on 2 cores (CPU time / 2), the cpu preset's model.", "",
             "| arm | seed | steps | tokens | val bpb | 2-core min | CPU s/step |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["arm"]):
        lines.append(f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['tokens'] / 1e6:.1f}M | {r['val_bpb']:.4f} | "
                     f"{r['minutes_2cores']:.1f} | {r['cpu_s_per_step']:.2f} |")
    if result["spread"] is not None:
        lines += ["", f"Spread between seeds: {result['spread']:.4f} bpb.", "",
                  "| group taken out | of | val bpb cost | wins |", "|---|---|---|---|"]
        for v in result["removals"].values():
            lines.append(f"| {v['group']} | {v['from']} | {v['cost_of_removing']:+.4f} | {'yes' if v['wins'] else 'no'} |")
        if result["variants"]:
            lines += ["", "| variant | of | val bpb gain | wins |", "|---|---|---|---|"]
            for name, v in result["variants"].items():
                lines.append(f"| {name} | {v['of']} | {v['gain']:+.4f} | {'yes' if v['wins'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="base_train budget per arm, in minutes on 2 cores")
    p.add_argument("--arms", default="all", help="comma-separated arm names (all: " + ", ".join(arms()) + "); "
                   "full-<group>-<group> takes several groups out")
    p.add_argument("--jobs", type=int, default=2, help="arms side by side, one thread each")
    p.add_argument("--storage", default=None, help="storage root kept between pieces (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "docs" / "recipe-ablation"), help="writes OUT.md and OUT.json")
    args = p.parse_args()
    chosen = arms() if args.arms == "all" else args.arms.split(",")
    table_arms = {name: arm(name) for name in chosen}
    storage = args.storage or tempfile.mkdtemp(prefix="nanochat-ablation-")
    if not (Path(storage) / "runs" / "tokenizer" / "tok_train" / "stage.json").exists():
        stage("tok_train", "tokenizer", storage, "--data", DATA / "pretrain")
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda a: measure(a, *table_arms[a], storage, args.minutes), chosen))
    rows = [json.loads(f.read_text()) for f in sorted((Path(storage) / "runs").glob("*/ablation.json"))]
    result = verdicts(rows)
    text = table(rows, result, args.minutes)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps({"rows": rows, **result}, indent=1) + "\n")
    print("\n" + text)
    print(json.dumps({"bench": "recipe_ablation", "rows": rows, **result}))


if __name__ == "__main__":
    main()
