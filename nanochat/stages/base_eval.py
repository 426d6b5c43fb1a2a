"""Evaluate the base model: validation bits per byte and the CORE metric.

    torchrun --nproc_per_node 8 -m nanochat.stages.base_eval -- --run myrun --preset d20
    python -m nanochat.stages.base_eval --run myrun --preset tiny --max-per-task 20

Reads the final checkpoint of base_train in the same run (or --checkpoint DIR), the validation
shard and the CORE eval bundle: those the run's download declared (without a download stage in the
run, those of the data cache, fetched first if they are not there), or --data and --eval-bundle DIR.
Examples are spread over the processes. Writes <run>/base_eval/stage.json: val_bpb (and that of a
unigram model of the training tokens, the baseline to beat), CORE, per task the accuracy, the
centered accuracy and the random baseline, and which tasks of core.yaml the bundle lacks.
"""

import itertools
import time

from nanochat import stage, storage, training_options
from nanochat.common import log
from nanochat.training_options import COUNT, COUNT_OR_ALL

STAGE = "base_eval"


def build_parser():
    p = stage.parser(STAGE, __doc__)
    a = p.add_argument
    a("--max-per-task", type=COUNT_OR_ALL, help="examples per CORE task (a fixed random subset; -1: all)")
    a("--eval-tokens", type=COUNT, help="validation tokens for bits per byte")
    a("--unigram-tokens", type=COUNT, help="training tokens counted for the unigram baseline of bits per byte")
    a("--device-batch-size", type=COUNT, help="rows per forward pass for bits per byte")
    a("--checkpoint", default=None, help="checkpoint directory URI (default: base_train's final checkpoint)")
    a("--eval-bundle", default=None, help="directory URI of the unpacked eval bundle (default: the run's, else the data cache's)")
    a("--data", default=None, help="a directory URI of shard_NNNNN.parquet files (the last is validation)")
    a("--num-shards", type=COUNT_OR_ALL, help="training shards for the unigram baseline (the first of the run's, else of the data cache)")
    stage.add_source_option(p)
    stage.add_compute_options(p)
    return p


def main(args):
    import torch

    from nanochat import checkpoint, common
    from nanochat.dataloader import pretrain_loader
    from nanochat.evaluation import core
    from nanochat.evaluation.bpb import bits_per_byte, model_losses, token_counts, unigram_losses

    started = time.time()
    target = args.checkpoint or stage.upstream_checkpoint(args.run, "base_train")
    try:
        tasks, missing, bundle = core.load_bundle(args.eval_bundle, args.storage)
    except core.BundleError as e:
        raise stage.StageError(str(e)) from None
    compute = common.compute_init(args.device_type)
    device = compute.device
    training_options.fit_to_gpu(args, STAGE, compute)
    model, tokenizer, _ = checkpoint.load_model(target, device)
    dtype = common.autocast_dtype(compute.device_type, args.dtype)
    autocast = common.autocast_context(compute.device_type, dtype)
    max_len = model.config.sequence_len

    B, T = args.device_batch_size, max_len
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), device=device)

    def batches(split, tokens):
        loader = pretrain_loader(tokenizer, B, T, split, args.data, args.num_shards, args.storage, device, source=args.source)
        return itertools.islice(loader, max(1, tokens // (B * T * compute.world_size)))

    counts = token_counts(batches("train", args.unigram_tokens), tokenizer.vocab_size, device)
    bpb = bits_per_byte(batches("val", args.eval_tokens), token_bytes, model=model_losses(model, autocast),
                        unigram=unigram_losses(counts))
    val_bpb, unigram_bpb = bpb["model"], bpb["unigram"]
    log.info("validation: %.4f bits per byte (unigram baseline: %.4f)", val_bpb, unigram_bpb)

    def progress(label, result):
        log.info("CORE %-34s accuracy %.3f  centered %+.3f  (%d examples)", label, result["accuracy"],
                 result["centered"], result["examples"])

    log.info("CORE on %d tasks (absent from the bundle: %s), %s examples each", len(tasks), ", ".join(missing) or "none",
             "all" if args.max_per_task < 0 else f"at most {args.max_per_task}")
    results = core.core_metric(model, tokenizer, tasks, device, autocast, max_len, args.max_per_task, compute.rank,
                               compute.world_size, progress=progress if compute.master else None)
    log.info("CORE %.4f over %d tasks; validation %.4f bits per byte", results["core"], len(tasks), val_bpb)
    if compute.master:
        metrics = {"val_bpb": val_bpb, "unigram_val_bpb": unigram_bpb, "core": results["core"], "core_tasks": results["tasks"],
                   "core_tasks_absent": missing, "max_per_task": args.max_per_task}
        inputs = {"checkpoint": storage.join(target, checkpoint.MANIFEST), "eval_bundle": storage.join(bundle, "core.yaml")}
        stage.commit(args.run, STAGE, args, inputs, {}, metrics, started)


if __name__ == "__main__":
    stage.run_main(main, build_parser(), STAGE)
