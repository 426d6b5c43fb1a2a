"""Two commits' CPU serving figures side by side: bench/inference.py and bench/serve_load.py of each,
interleaved (old, new, old, new, ...) on this machine, so drift in the machine's speed hits both.

    python bench/compare.py 24ea7e6 HEAD --repeats 5

Each commit is checked out with `git worktree` into a temporary directory and its benchmarks run
with that tree first on PYTHONPATH (this venv's packages, that commit's code). Prints one JSON line:
per figure (inference batch 1 and 8 ratios, the serving ratio) each commit's runs, their medians,
and new median / old median.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from nanochat.common import cpu_model

REPO = Path(__file__).resolve().parent.parent
# name: (script, its arguments, where the figure is in its JSON line). The ratios are the figures;
# the tok/s beside them show whether a change of ratio came from ours or from the reference.
FIGURES = {
    **{f"inference_batch{b}{suffix}": ("bench/inference.py", [], (f"batch{b}", key))
       for b in (1, 8) for suffix, key in (("", "ratio"), ("_ours_tok_s", "ours_tok_s"), ("_reference_tok_s", "reference_tok_s"))},
    "serve_load": ("bench/serve_load.py", ["--repeats", "1"], ("ratio",)),
    "serve_load_batched_tok_s": ("bench/serve_load.py", ["--repeats", "1"], ("batched", "tok_s")),
}


def checkout(rev, root):
    """A worktree of `rev` under `root`; its path. It borrows this checkout's built rustbpe
    extension (a build output git does not track; the benchmarks only load it)."""
    path = Path(root) / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    (path / "rustbpe" / "_native").symlink_to(REPO / "rustbpe" / "_native")
    return path


def run_bench(tree, script, args):
    """The JSON line a benchmark script of `tree` prints."""
    env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'bench'}"}
    out = subprocess.run([sys.executable, str(tree / script), *args], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def pick(result, path):
    for key in path:
        result = result[key]
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="the reference commit")
    p.add_argument("new", help="the commit measured against it")
    p.add_argument("--repeats", type=int, default=5, help="runs of each benchmark per commit, interleaved")
    args = p.parse_args()
    runs = {figure: {args.old: [], args.new: []} for figure in FIGURES}
    with tempfile.TemporaryDirectory(prefix="nanochat-compare-") as root:
        trees = {rev: checkout(rev, root) for rev in (args.old, args.new)}
        try:
            for i in range(args.repeats):
                for rev, tree in trees.items():
                    results = {}
                    for figure, (script, script_args, path) in FIGURES.items():
                        if script not in results:
                            results[script] = run_bench(tree, script, script_args)
                        runs[figure][rev].append(pick(results[script], path))
                    print(f"repeat {i + 1}/{args.repeats} {rev}: " + ", ".join(f"{f} {runs[f][rev][-1]}" for f in FIGURES),
                          file=sys.stderr, flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    summary = {"bench": "compare", "cpu": cpu_model(), "old": args.old, "new": args.new, "repeats": args.repeats}
    for figure, by_rev in runs.items():
        old, new = statistics.median(by_rev[args.old]), statistics.median(by_rev[args.new])
        summary[figure] = {"old_runs": by_rev[args.old], "new_runs": by_rev[args.new], "old_median": old,
                           "new_median": new, "new_over_old": round(new / old, 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
