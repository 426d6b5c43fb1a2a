"""Tokenizer training, side by side: our rustbpe, the upstream PyPI rustbpe and HF tokenizers.

    .venv/bin/python bench/tokenizer_train.py [--chars 100_000_000] [--vocab-size 65536]

Each trainer runs in its own process (so peak RSS is its own) on the same documents: the first
`--chars` characters of the pretraining shards, GPT-4 split pattern, byte-level. Prints a table, then
one JSON line with wall times, chars/s, peak RSS and the ratios ours/upstream and ours/HF. Upstream
rustbpe is found in .venv/upstream-rustbpe (`make dev` installs it there, apart from ours).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = REPO / ".venv" / "upstream-rustbpe"

# Runs in a child process: load the corpus, train, report. `{trainer}` is filled in below.
CHILD = r"""
import hashlib, json, resource, sys, time
import pyarrow.parquet as pq
args = json.loads(sys.argv[1])
texts, n_chars = [], 0
for shard in sorted(__import__("glob").glob(args["data"] + "/shard_*.parquet")):
    for text in pq.read_table(shard, columns=["text"]).column("text").to_pylist():
        texts.append(text)
        n_chars += len(text)
        if n_chars >= args["chars"]:
            break
    if n_chars >= args["chars"]:
        break
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
{trainer}
seconds = time.perf_counter() - t0
json.dump({"seconds": seconds, "chars": n_chars, "vocab_size": vocab_size, "ranks_sha256": ranks_sha256,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before": rss_before}, sys.stdout)
"""

RUSTBPE = """
import rustbpe
tok = rustbpe.Tokenizer()
tok.train_from_iterator(iter(texts), args["vocab_size"])
ranks = tok.get_mergeable_ranks()
vocab_size = len(ranks)
ranks_sha256 = hashlib.sha256(b"".join(t.hex().encode() + b" %d\\n" % r for t, r in ranks)).hexdigest()
"""

HF = """
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(args["pattern"]), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
])
trainer = trainers.BpeTrainer(vocab_size=args["vocab_size"], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(texts, trainer)
vocab_size = tok.get_vocab_size()
ranks_sha256 = None
"""


def run(name, trainer, args, pythonpath=None):
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    child_args = {"data": str(args.data), "chars": args.chars, "vocab_size": args.vocab_size, "pattern": args.pattern}
    print(f"training {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-c", CHILD.replace("{trainer}", trainer), json.dumps(child_args)],
                          env=env, cwd="/", capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main():
    import rustbpe

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(os.environ.get("NANOCHAT_TEST_DATA") or REPO.parent / "shared" / "data") / "pretrain"
    parser.add_argument("--data", type=Path, default=default_data, help="folder of pretraining shards (default: %(default)s)")
    parser.add_argument("--chars", type=int, default=100_000_000, help="characters to train on (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=65536, help="(default: %(default)s)")
    args = parser.parse_args()
    args.pattern = rustbpe.GPT4_PATTERN
    if not (UPSTREAM / "rustbpe").is_dir():
        sys.exit(f"upstream rustbpe is missing from {UPSTREAM}: run `make dev`")

    results = {
        "ours": run("ours (rustbpe in this repo)", RUSTBPE, args),
        "upstream": run("upstream rustbpe 0.1.0", RUSTBPE, args, pythonpath=UPSTREAM),
        "hf": run("HF tokenizers", HF, args),
    }
    print(f"\n{'trainer':<10}{'seconds':>9}{'Mchars/s':>10}{'peak RSS':>11}{'  (+ training)':>15}", file=sys.stderr)
    def gib(n):
        return f"{n / 2**30:.2f} GiB"

    for name, r in results.items():
        r["chars_per_s"] = r["chars"] / r["seconds"]
        print(f"{name:<10}{r['seconds']:>9.2f}{r['chars_per_s'] / 1e6:>10.1f}{gib(r['peak_rss']):>11}"
              f"{'+' + gib(r['peak_rss'] - r['rss_before']):>15}", file=sys.stderr)
    ours = results["ours"]
    summary = {
        "bench": "tokenizer_train",
        "chars": ours["chars"],
        "vocab_size": args.vocab_size,
        "cores": os.cpu_count(),
        **{f"{name}_seconds": round(r["seconds"], 3) for name, r in results.items()},
        **{f"{name}_chars_per_s": round(r["chars_per_s"]) for name, r in results.items()},
        **{f"{name}_peak_rss": r["peak_rss"] for name, r in results.items()},
        "speedup_vs_upstream": round(results["upstream"]["seconds"] / ours["seconds"], 2),
        "speedup_vs_hf": round(results["hf"]["seconds"] / ours["seconds"], 2),
        "rss_ratio_vs_upstream": round(ours["peak_rss"] / results["upstream"]["peak_rss"], 3),
        "identical_to_upstream": ours["ranks_sha256"] == results["upstream"]["ranks_sha256"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
