"""Pretraining loader throughput: tokens/s of packed (B, T) batches with the project's tokenizer.

    .venv/bin/python bench/dataloader.py [--data ../shared/data/pretrain] [--threads 2] [--tokenizer URI]

Trains a tokenizer of the cpu preset's vocabulary size on the first `--train-chars` characters of
the shards (or loads `--tokenizer`), then times `--batches` batches of the PretrainLoader after
one warm-up batch. The loader must outrun training by a wide margin (target: >= 20x the cpu
preset's training tokens/s), so the script also times a few training steps of the cpu preset's
model and batch in this process (all cores, the preset's autocast dtype) and prints the ratio.
Prints one JSON line.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

from nanochat import presets, shards, storage
from nanochat.common import git_commit
from nanochat.dataloader import PretrainLoader
from nanochat.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


def train_tokens_per_s(vocab_size):
    """Tokens/s of training steps of the cpu preset's model and batch, in its autocast dtype."""
    import torch
    from train_throughput import preset_model, run_mode  # bench/ is on sys.path: this file runs as a script

    from nanochat.common import autocast_dtype

    config, batch = preset_model("cpu", vocab_size)
    mode = "bf16" if autocast_dtype("cpu") == torch.bfloat16 else "fp32"
    return run_mode(mode, steps=6, warmup=2, config=config, batch=batch)["tok_per_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("NANOCHAT_TEST_DATA", str(REPO.parent / "shared" / "data")) + "/pretrain")
    p.add_argument("--tokenizer", default=None, help="a saved tokenizer directory URI (default: train one)")
    p.add_argument("--train-chars", type=int, default=20_000_000)
    p.add_argument("-B", type=int, default=32)
    p.add_argument("-T", type=int, default=512)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    data = storage.normalize(args.data)
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        train = shards.split_shards(shards.list_shards(data), "train")
        vocab_size = presets.get("cpu", "tok_train")["vocab_size"]
        tok = Tokenizer.train(shards.iter_texts(train, max_chars=args.train_chars, doc_cap=10_000), vocab_size)

    loader = PretrainLoader(tok, args.B, args.T, data, threads=args.threads)
    next(loader)  # warm-up: opens the first shard
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    seconds = time.perf_counter() - t0
    tokens = args.batches * args.B * args.T
    train_tok_s = train_tokens_per_s(tok.vocab_size)
    print(json.dumps({
        "bench": "dataloader",
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "commit": git_commit(),
        "tokens_per_s": round(tokens / seconds),
        "cpu_preset_train_tokens_per_s": round(train_tok_s),
        "ratio_to_training": round(tokens / seconds / train_tok_s, 1),
        "threads": args.threads,
        "B": args.B,
        "T": args.T,
        "vocab_size": tok.vocab_size,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "crop_fraction": round(loader.crop_fraction(), 4),
    }))


if __name__ == "__main__":
    main()
