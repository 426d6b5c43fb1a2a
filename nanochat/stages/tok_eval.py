"""Evaluate the trained tokenizer: compression (bytes per token) on the validation shard and on
sample texts of different kinds, as a table for the report.

    python -m nanochat.stages.tok_eval --run myrun --preset d20
    python -m nanochat.stages.tok_eval --run /tmp/run --preset tiny --data ../shared/data/pretrain

Reads the tokenizer tok_train committed in the same run (or --tokenizer URI) and the validation
shard: the last of the run's declared shards (without a download stage in the run, of the data
cache), or of --data. Writes <run>/tok_eval/stage.json with the table in its metrics.
"""

import time

from nanochat import dataset, shards, stage, storage
from nanochat.common import log
from nanochat.tokenizer import Tokenizer
from nanochat.training_options import COUNT

STAGE = "tok_eval"

SAMPLES = {
    "english": (
        "The committee met on Tuesday to review the proposal. After a long discussion, members agreed "
        "that the plan was sound, although several asked for clearer estimates of its cost and timeline."
    ),
    "code": (
        "def fibonacci(n: int) -> list[int]:\n    seq = [0, 1]\n    while len(seq) < n:\n"
        "        seq.append(seq[-1] + seq[-2])\n    return seq[:n]\n\nprint(fibonacci(10))\n"
    ),
    "math": "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12 = 0 gives x = 2, and f(2) = 12 - 24 + 7 = -5.",
    "numbers": "In 2023 the population was 8,045,311,447; revenue rose 12.75% to $1,204.50 per capita.",
    "non-english": "Der schnelle braune Fuchs springt über den faulen Hund. 今日は良い天気ですね。Быстрая лиса.",
}


def build_parser():
    p = stage.parser(STAGE, __doc__)
    p.add_argument("--max-docs", type=COUNT, help="validation documents to encode")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory URI (default: tok_train's in the run)")
    p.add_argument("--data", default=None,
                   help="directory URI of shard_NNNNN.parquet files (default: the run's shards, else the data cache's)")
    stage.add_source_option(p)
    return p


def compression(tokenizer, texts):
    ids = tokenizer.encode(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(x) for x in ids)
    return {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4)}


def markdown_table(rows):
    lines = ["| text | bytes | tokens | bytes/token |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['bytes']:,} | {r['tokens']:,} | {r['bytes_per_token']:.2f} |" for name, r in rows.items()]
    return "\n".join(lines)


def main(args):
    started = time.time()
    tok_dir = args.tokenizer or stage.upstream_dir(args.run, "tok_train", "tokenizer")
    try:
        tokenizer = Tokenizer.load(tok_dir)
    except FileNotFoundError as e:  # (--tokenizer names no tokenizer)
        raise stage.StageError(str(e)) from None
    try:
        if args.data:
            val_shard = shards.split_shards(shards.list_shards(args.data), "val")
        else:
            val_shard = dataset.shard_split("val", args.storage, args.source)
    except shards.ShardError as e:
        raise stage.StageError(str(e)) from None
    val_docs = []
    for text in shards.iter_texts(val_shard):
        val_docs.append(text)
        if len(val_docs) >= args.max_docs:
            break
    rows = {"validation": compression(tokenizer, val_docs)}
    rows.update({name: compression(tokenizer, [text]) for name, text in SAMPLES.items()})
    table = markdown_table(rows)
    log.info("tokenizer compression (vocab %d):\n%s", tokenizer.vocab_size, table)
    metrics = {"vocab_size": tokenizer.vocab_size, "compression": rows, "table": table}
    inputs = {"tokenizer": storage.join(tok_dir, "tokenizer.json")}
    if args.data or stage.declared_data() is None:  # a declared shard is recorded as such by commit
        inputs["val_shard"] = val_shard[0]
    return stage.commit(args.run, STAGE, args, inputs, {}, metrics, started)


if __name__ == "__main__":
    stage.run_main(main, build_parser(), STAGE)
