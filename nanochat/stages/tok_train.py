"""Train the BPE tokenizer on the pretraining shards (all but the last, which is validation).

    python -m nanochat.stages.tok_train --run myrun --preset d20
    python -m nanochat.stages.tok_train --run myrun --preset tiny --vocab-size 4096
    python -m nanochat.stages.tok_train --run /tmp/run --preset tiny --data ../shared/data/pretrain

Reads the run's shards (those download declared in files.json; without a download stage in the
run, those of the data cache, <storage>/data/pretrain) unless --data names another directory URI.
Writes <run>/tok_train/tokenizer/{ranks.tiktoken,tokenizer.json}, then stage.json. A run whose
base_train trained on the tokenizer here keeps it: a different one is refused (a new run takes it).
"""

import hashlib
import sys
import time

from tqdm import tqdm

from nanochat import dataset, shards, stage, storage
from nanochat.common import log
from nanochat.tokenizer import META_FILE, Tokenizer
from nanochat.training_options import COUNT

STAGE = "tok_train"


def build_parser():
    p = stage.parser(STAGE, __doc__)
    p.add_argument("--vocab-size", type=COUNT, help="vocabulary size including the special tokens")
    p.add_argument("--max-chars", type=COUNT, help="train on at most this many characters")
    p.add_argument("--doc-cap", type=COUNT, help="cut each document to this many characters")
    p.add_argument("--data", default=None,
                   help="directory URI of shard_NNNNN.parquet files (default: the run's shards, else the data cache's)")
    stage.add_source_option(p)
    return p


def main(args):
    started = time.time()
    if args.vocab_size < 256 + 9:
        raise stage.StageError(f"--vocab-size {args.vocab_size} is too small (minimum 265: 256 bytes + 9 special tokens)")
    try:
        if args.data:
            train_shards = shards.split_shards(shards.list_shards(args.data), "train")
        else:
            train_shards = dataset.shard_split("train", args.storage, args.source)
    except shards.ShardError as e:
        raise stage.StageError(str(e)) from None
    log.info("training a %d-token tokenizer on up to %s chars from %d shards in %s",
             args.vocab_size, f"{args.max_chars:,}", len(train_shards), train_shards[0].rsplit("/", 1)[0])

    counted = {"docs": 0, "chars": 0}
    bar = tqdm(total=args.max_chars, unit="char", unit_scale=True, desc="tokenizer", file=sys.stderr, mininterval=1.0)

    def texts():
        for text in shards.iter_texts(train_shards, max_chars=args.max_chars, doc_cap=args.doc_cap):
            counted["docs"] += 1
            counted["chars"] += len(text)
            bar.update(len(text))
            yield text

    t0 = time.time()
    tokenizer = Tokenizer.train(texts(), args.vocab_size)
    train_time = time.time() - t0
    bar.close()
    check_replacement(args.run, tokenizer)
    out = tokenizer.save(stage.stage_uri(args.run, STAGE, "tokenizer"))
    metrics = {
        "vocab_size": tokenizer.vocab_size,
        "docs": counted["docs"],
        "chars": counted["chars"],
        "train_time_s": round(train_time, 3),
        "chars_per_s": round(counted["chars"] / max(train_time, 1e-9)),
    }
    log.info("trained %d tokens on %s chars in %.1fs", tokenizer.vocab_size, f"{counted['chars']:,}", train_time)
    return stage.commit(args.run, STAGE, args, {}, out, metrics, started)


def check_replacement(run, tokenizer):
    """A StageError if base_train trained the run's model on the tokenizer this stage wrote before and
    `tokenizer` differs from it: replacing it would leave every model of the run reading its ids as
    other text (checkpoint.load_tokenizer would refuse them). The same tokenizer again (the same text
    and settings) is written as before."""
    uri = stage.stage_uri(run, STAGE, "tokenizer", META_FILE)
    if not (storage.exists(uri) and storage.exists(stage.stage_uri(run, "base_train", stage.SUMMARY))):
        return
    trained_on = stage.read_summary(run, "base_train")["inputs"].get("tokenizer", {}).get("uri")
    if trained_on != uri:  # an imported base model brought its own
        return
    if storage.read_json(uri)["ranks_sha256"] != hashlib.sha256(tokenizer.ranks_file()).hexdigest():
        raise stage.StageError(f"run {run}: base_train trained on the tokenizer at {storage.redact(uri)}, and this one differs "
                               "(other text or settings): replacing it would leave the run's models unreadable. Train it in a "
                               "new run, or remove the run's training stages first")


if __name__ == "__main__":
    stage.run_main(main, build_parser(), STAGE)
