"""Pretrain the GPT on the pretraining shards: distributed, checkpointed, exactly resumable.

    torchrun --nproc_per_node 2 -m nanochat.stages.base_train -- --run myrun --preset tiny
    torchrun --nproc_per_node 8 -m nanochat.stages.base_train -- --run s3://bucket/runs/x --preset d20
    python -m nanochat.stages.base_train --run myrun --preset cpu --num-steps 500

Needs the tokenizer of `tok_train` in the same run. Reads the training shards the run's download
declared, or, without a download stage in the run, from the data cache (waiting for any that are
still downloading), or from --data. Writes under <run>/base_train/:
checkpoints/step_NNNNNN/ (every --checkpoint-every steps and at the end; the newest --keep-last
are kept), metrics.jsonl (one JSON record per step and per evaluation), then stage.json,
whose `checkpoint` output is the final checkpoint's manifest.

Started again with the same command, the stage resumes from the newest complete checkpoint (model,
optimizer, data position and RNG); with --deterministic its final checkpoint (weights, each
process's optimizer and RNG state) is bit-identical to that of an uninterrupted run. The training
length is --num-steps, or, when that is -1, --param-data-ratio tokens per parameter (Chinchilla: 20).
"""

import itertools
import time

from nanochat import stage, training_options
from nanochat.common import log

STAGE = "base_train"
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:"]


def build_parser():
    p = stage.parser(STAGE, __doc__)
    a = p.add_argument
    a("--depth", type=int, help="transformer layers; the width is 64 x depth, rounded to whole heads")
    a("--head-dim", type=int, help="attention head size")
    a("--n-kv-head", type=int, help="key/value heads (GQA); default: one per query head")
    a("--max-seq-len", type=int, help="tokens per training row")
    a("--total-batch-size", type=int, help="tokens per optimizer step over all processes (gradient accumulation makes up the rest)")
    a("--param-data-ratio", type=float, help="training tokens per parameter when --num-steps is -1")
    a("--eval-tokens", type=int, help="validation tokens per evaluation")
    a("--core-every", type=int, help="steps between CORE evaluations on a subset of each task (-1: never)")
    a("--core-max-per-task", type=int, help="examples per CORE task in those evaluations")
    a("--eval-bundle", default=None, help="directory URI of the unpacked eval bundle (default: the run's, else the data cache's)")
    a("--sample-every", type=int, help="steps between printed samples (-1: only at the end)")
    a("--num-shards", type=int, help="training shards to read, the first of the run's (else of the data cache's); -1: all")
    a("--data", default=None, help="a directory URI of shard_NNNNN.parquet files to read instead of the data cache")
    training_options.add_options(p)
    return p


def main(args):
    import torch

    from nanochat import training
    from nanochat.evaluation import core
    from nanochat.evaluation.bpb import bits_per_byte, model_losses
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.optim import setup_optimizers
    from nanochat.tokenizer import Tokenizer

    started = time.time()
    tokenizer_uri = stage.upstream_output(args.run, "tok_train", "tokenizer")
    tokenizer = Tokenizer.load(tokenizer_uri.rsplit("/", 1)[0])
    trainer = training.Training(args, STAGE)
    device, autocast = trainer.device, trainer.autocast

    config = GPTConfig.from_depth(args.depth, tokenizer.vocab_size, args.max_seq_len, head_dim=args.head_dim,
                                  n_kv_head=args.n_kv_head)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizer = setup_optimizers(model, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                 matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    plan = training_plan(args, model, trainer.compute.world_size)
    batches = train_loader(args, tokenizer, device, trainer.resume(model, optimizer))
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int64, device=device)
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * trainer.compute.world_size))

    def evaluate(step):
        batches = itertools.islice(val_loader(args, tokenizer, device), eval_steps)
        bpb = bits_per_byte(batches, token_bytes, model=model_losses(model, autocast))["model"]
        trainer.metrics.add({"step": step, "val_bpb": bpb})
        log.info("step %d/%d: validation %.4f bits per byte", step, plan.num_steps, bpb)
        return bpb

    # a missing eval bundle fails now, not in the middle of the run
    try:
        core_tasks = core.load_bundle(args.eval_bundle, args.storage)[0] if args.core_every > 0 else []
    except core.BundleError as e:
        raise stage.StageError(str(e)) from None

    def evaluate_core(step):
        result = core.core_metric(model, tokenizer, core_tasks, device, autocast, config.sequence_len,
                                  args.core_max_per_task, trainer.compute.rank, trainer.compute.world_size)
        trainer.metrics.add({"step": step, "core": result["core"]})

    def samples(step):
        if trainer.master:
            print_samples(model, tokenizer)

    log.info("model: %s, %.1fM parameters, %s autocast; %d steps of %s tokens (%d x %d x %d ranks x %d accumulation)",
             config, model.num_params() / 1e6, str(trainer.dtype).removeprefix("torch."), plan.num_steps,
             f"{args.total_batch_size:,}", args.device_batch_size, args.max_seq_len, trainer.compute.world_size,
             plan.grad_accum)
    if trainer.step == 0 and args.eval_every > 0:
        evaluate(0)
    hooks = [(args.eval_every, evaluate), (args.core_every, evaluate_core), (args.sample_every, samples)]
    final = trainer.train(model, optimizer, batches, plan, hooks, meta={"tokenizer": tokenizer_uri})
    val_bpb = evaluate(trainer.step)
    metrics = {"val_bpb": val_bpb, "parameters": model.num_params(),
               "flops_per_token": model.estimate_flops(),
               "samples": print_samples(model, tokenizer) if trainer.master else None}
    trainer.commit({"tokenizer": tokenizer_uri}, final, metrics, started)
    log.info("done: validation %.4f bits per byte after %d steps; checkpoint %s", val_bpb, plan.num_steps, final)
    trainer.close()


def training_plan(args, model, world_size):
    """Steps and gradient accumulation, checked before any work."""
    accum = training_options.grad_accum(args.total_batch_size, args.device_batch_size, args.max_seq_len, world_size)
    num_steps = args.num_steps
    if num_steps == -1:
        scaling_params = model.num_params() - model.transformer.wte.weight.numel()
        num_steps = max(1, round(args.param_data_ratio * scaling_params / args.total_batch_size))
    if num_steps < 1:
        raise stage.StageError(f"--num-steps must be -1 or positive, got {num_steps}")
    return training_options.Plan(num_steps, accum)


def train_loader(args, tokenizer, device, state):
    from nanochat.dataloader import pretrain_loader

    return pretrain_loader(tokenizer, args.device_batch_size, args.max_seq_len, "train", args.data, args.num_shards,
                           args.storage, device, state)


def val_loader(args, tokenizer, device):
    from nanochat.dataloader import pretrain_loader

    return pretrain_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val", args.data, args.num_shards,
                           args.storage, device)


def print_samples(model, tokenizer, max_tokens=16):
    """Greedy continuations of a few prompts (by the engine, with its KV cache), logged and returned."""
    from nanochat.engine import Engine, SamplingParams

    engine, params = Engine(model, tokenizer, max_rows=1), SamplingParams(temperature=0, max_tokens=max_tokens)
    samples = [prompt + engine.generate(tokenizer.encode(prompt, prepend="<|bos|>"), params).completions[0].text
               for prompt in SAMPLE_PROMPTS]
    for sample in samples:
        log.info("sample: %r", sample)
    return samples


if __name__ == "__main__":
    stage.run_main(main, build_parser(), STAGE)
