"""Download the data: pretraining shards, the CORE eval bundle and the task files, into the data
cache (<storage>/data/), from the real sources or a mirror.

    python -m nanochat.stages.download --run myrun --preset d20
    python -m nanochat.stages.download --run myrun --preset d20 -n 8 &   # train while it downloads
    python -m nanochat.stages.download --run myrun --preset d20 --source climbmix
    python -m nanochat.stages.download --run /tmp/run --preset tiny --data-mirror ../shared/data
    python -m nanochat.stages.download --run myrun --preset cpu --source s3://bucket/my-texts/

`--source` picks the pretraining corpus (nanochat/sources.py: fineweb-edu, the default, or climbmix),
or, as a path or URI (anything with a "/"), a folder of your own `.parquet` files with a string
column `text`, the last in name order validation: checked and declared where they are, not copied.
The stages after this one read the shards it declares, so the whole run, tokenizer included,
trains on them. `-n` training shards (-1: all), or with `--min-chars` only the first of those that
hold that many characters of text (counted as they arrive: one shard, then as many as the count so
far says are missing), plus the validation shard, which is fetched first;
then the eval bundle (also extracted to <storage>/data/eval_bundle/) and the task files, and with
`--mmlu-train` MMLU's auxiliary_train split (100k questions; chat_sft's `--mmlu-weight`). Files
already in the cache are not fetched again. Writes <run>/download/files.json (relpath, URI, bytes,
sha256 of every file), then stage.json.
"""

import argparse
import time

from nanochat import dataset, shards, sources, stage, storage
from nanochat.common import log
from nanochat.training_options import COUNT, SIZE

STAGE = "download"


def build_parser():
    p = stage.parser(STAGE, __doc__)
    p.add_argument("--source", default=sources.DEFAULT_CORPUS,
                   help=f"pretraining corpus, one of: {', '.join(sorted(sources.CORPORA))}; or a folder (path or URI, "
                        "with a '/') of your own .parquet files with a `text` column, the last one validation")
    p.add_argument("-n", "--num-shards", type=int, help="training shards to fetch (-1: all); the validation shard comes too")
    p.add_argument("--min-chars", type=COUNT, default=None,
                   help="fetch only the first of those training shards that hold this many characters of text "
                        "(default: no limit, all -n of them); your own text's files are taken the same way")
    p.add_argument("--data-mirror", default=None,
                   help="mirror root laid out like ../shared/data (default: $NANOCHAT_DATA_MIRROR, else the real sources)")
    p.add_argument("--workers", type=COUNT, default=4, help="files fetched at once")
    p.add_argument("--retries", type=SIZE, default=5, help="consecutive failed attempts without progress before giving up on a file")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a connection counts as failed")
    p.add_argument("--verify", action="store_true", help="re-hash the files already cached and re-fetch any that do not match")
    p.add_argument("--mmlu-train", action=argparse.BooleanOptionalAction, default=False,
                   help="also fetch MMLU's auxiliary_train split (100k multiple-choice questions), which chat_sft trains "
                        "on with --mmlu-weight, as upstream's does (the GPU presets)")
    return p


def main(args):
    started = time.time()
    if args.timeout <= 0:
        raise stage.StageError(f"--timeout must be above 0 seconds, not {args.timeout}")
    downloader = dataset.Downloader(args.storage, args.data_mirror, workers=args.workers, retries=args.retries,
                                    timeout=args.timeout, verify=args.verify)
    early = []  # entries of the shards fetched before the rest (--min-chars), whose bytes count as fetched

    def counted(entries):
        early.extend(entries)
        return entries

    try:
        sources.check_mirror(args.data_mirror)
        if sources.is_own_text(args.source):  # declared where it is: nothing to fetch
            own = dataset.own_text(args.source, args.num_shards, args.min_chars)
            pretraining, text = [], f"your text in {args.source}: {len(own) - 1} training files + the validation file"
        else:
            corpus = sources.corpus(args.source)
            train, val = sources.pretrain_plan(args.num_shards, args.data_mirror, corpus.name)
            if args.min_chars is not None:
                early += downloader.download([corpus.relpath(val)])
                train = dataset.enough_text(train, args.min_chars, lambda batch: [
                    shards.check_texts(e["uri"]) for e in counted(downloader.download([corpus.relpath(i) for i in batch]))])
            own, pretraining = [], [corpus.relpath(i) for i in [val, *train]]
            text = f"{len(train)} {corpus.name} training shards + the validation shard, fetched"
    except (sources.SourceError, shards.ShardError, dataset.DownloadError) as e:
        raise stage.StageError(str(e)) from None
    tasks = sources.GROUPS["tasks"] + (sources.GROUPS["mmlu_train"] if args.mmlu_train else [])
    relpaths = pretraining + sources.GROUPS["eval"] + tasks
    log.info("pretraining on %s; the eval bundle and %d task files from %s", text, len(tasks),
             sources.mirror_root(args.data_mirror) or "the real sources")
    try:
        entries = own + downloader.download(relpaths)
    except dataset.DownloadError as e:
        raise stage.StageError(str(e)) from None
    bundle = dataset.extract_zip(downloader.cache_uri(sources.EVAL_BUNDLE), downloader.data_root)

    files = {e["relpath"]: {k: e[k] for k in ("uri", "url", "bytes", "sha256")} for e in entries}
    files_uri = stage.stage_uri(args.run, STAGE, "files.json")
    storage.write_json(files_uri, files)
    metrics = {
        "files": len(entries),
        "train_shards": len(own or pretraining) - 1,
        "bytes": sum(e["bytes"] for e in entries),
        "fetched_bytes": sum(e["fetched"] for e in [*early, *entries]),
        "eval_bundle_files": len(bundle),
        "data_root": downloader.data_root,
    }
    log.info("%d files (%s bytes, %s fetched now) in %s", metrics["files"], f"{metrics['bytes']:,}",
             f"{metrics['fetched_bytes']:,}", downloader.data_root)
    return stage.commit(args.run, STAGE, args, {}, {"files": files_uri}, metrics, started)


if __name__ == "__main__":
    stage.run_main(main, build_parser(), STAGE)
