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
process's optimizer and RNG state) is bit-identical to that of an uninterrupted run.

The training horizon, as upstream nanochat sets it (scripts/base_train.py, 2026): --num-steps, else
(-1) --target-flops of training, else --param-data-ratio tokens per scaling parameter (the block
matrices and lm_head; Chinchilla: 20). --total-batch-size -1 picks the batch from the horizon by the
Power Lines rule (B ~ D^0.383, https://arxiv.org/abs/2505.13738) from upstream's d12 reference of
524,288 tokens; --batch-lr-scaling scales the learning rates by sqrt(B / 524,288) and the Muon
weight decay by sqrt(B / 524,288) x (D_ref / D), upstream's rule for a constant T_epoch
(https://arxiv.org/abs/2405.13698), where D is this run's training tokens and D_ref d12's at the
same ratio.
"""

import argparse
import dataclasses
import itertools
import math
import time

from nanochat import stage, training_options
from nanochat.common import log

STAGE = "base_train"
MODEL_OPTIONS = ("window_pattern", "value_embeds", "lambdas", "smear", "backout", "qk_scale", "rope_base", "init")
REF_DEPTH = 12  # upstream tunes at d12 and transfers to other depths
BATCH_REF = 2**19  # upstream's measured best batch at d12, in tokens
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:"]


def build_parser():
    p = stage.parser(STAGE, __doc__)
    a = p.add_argument
    a("--depth", type=training_options.COUNT, help="transformer layers; the width is 64 x depth, rounded to whole heads")
    a("--head-dim", type=training_options.COUNT, help="attention head size")
    a("--n-kv-head", type=training_options.COUNT, help="key/value heads (GQA); default: one per query head")
    a("--max-seq-len", type=training_options.COUNT, help="tokens per training row")
    a("--window-pattern", help="attention windows tiled over the layers: L the whole context, S a quarter of it "
      "(rounded up to 128); the last layer is always L (upstream: SSSL)")
    a("--value-embeds", action=argparse.BooleanOptionalAction, help="value embeddings on alternating layers, gated")
    a("--lambdas", action=argparse.BooleanOptionalAction, help="learnable per-layer residual and input-embedding scales")
    a("--smear", action=argparse.BooleanOptionalAction, help="a gate mixing the previous token's embedding into each token's")
    a("--backout", action=argparse.BooleanOptionalAction, help="subtract a learned share of the middle layer's residual "
      "before the last norm")
    a("--qk-scale", type=float, help="queries and keys multiplied by this after QK-norm (upstream: 1.2)")
    a("--rope-base", type=float, help="rotary embedding base (upstream: 100000)")
    a("--init", choices=["classic", "2026"], help="weight initialisation: nanochat's of 2025, or upstream's of 2026")
    a("--fp8", action=argparse.BooleanOptionalAction, help="FP8 matmuls in training (GPUs with FP8: H100 and later)")
    a("--total-batch-size", type=int, help="tokens per optimizer step over all processes (gradient accumulation makes "
      "up the rest); -1: from the training horizon (the module's help)")
    a("--batch-lr-scaling", action=argparse.BooleanOptionalAction, help="scale the learning rates and the weight "
      "decay with the batch size and the horizon, as upstream (the module's help)")
    a("--target-flops", type=float, help="training FLOPs when --num-steps is -1 (-1: use --param-data-ratio)")
    a("--param-data-ratio", type=float, help="training tokens per scaling parameter (block matrices and lm_head) "
      "when --num-steps and --target-flops are -1")
    a("--eval-tokens", type=training_options.COUNT, help="validation tokens per evaluation")
    a("--core-every", type=int, help="steps between CORE evaluations on a subset of each task (-1: never)")
    a("--core-max-per-task", type=int, help="examples per CORE task in those evaluations")
    a("--eval-bundle", default=None, help="directory URI of the unpacked eval bundle (default: the run's, else the data cache's)")
    a("--sample-every", type=int, help="steps between printed samples (-1: only at the end)")
    a("--num-shards", type=int, help="training shards to read, the first of the run's (else of the data cache's); -1: all")
    a("--data", default=None, help="a directory URI of shard_NNNNN.parquet files to read instead of the data cache")
    stage.add_source_option(p)
    training_options.add_options(p)
    return p


def main(args):
    import torch

    from nanochat import checkpoint, fp8, training
    from nanochat.evaluation import core
    from nanochat.evaluation.bpb import bits_per_byte, model_losses
    from nanochat.gpt import GPT
    from nanochat.tokenizer import Tokenizer

    started = time.time()
    tokenizer_uri = stage.upstream_output(args.run, "tok_train", "tokenizer")
    tokenizer = Tokenizer.load(tokenizer_uri.rsplit("/", 1)[0])
    trainer = training.Training(args, STAGE)
    device, autocast = trainer.device, trainer.autocast

    config = model_config(args, tokenizer.vocab_size)
    if config.backout and config.backout_layer == config.n_layer - 1:
        raise stage.StageError(f"--backout needs depth 3 or more: at depth {config.n_layer} the middle layer is the last, "
                               "whose output backout would only scale before the final norm, flipping its sign (and "
                               "the loss up) whenever backout_lambda passes 1; use --no-backout")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if args.fp8:  # before compiling; evaluations and samples run with the FP8 layers as plain ones
        try:
            fp8.convert(model)
        except ValueError as e:
            raise stage.StageError(f"{e} (--no-fp8 trains without it)") from None
    horizon = training_horizon(args, model)
    plan = training_options.Plan(horizon.num_steps, training_options.grad_accum(
        horizon.total_batch_size, args.device_batch_size, args.max_seq_len, trainer.compute.world_size))
    optimizer = trainer.optimizer(model, horizon.lr_scale, horizon.weight_decay)
    batches = train_loader(args, tokenizer, device, trainer.resume(model, optimizer))
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int64, device=device)
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * trainer.compute.world_size))

    def evaluate(step):
        batches = itertools.islice(val_loader(args, tokenizer, device), eval_steps)
        with fp8.disabled(model):
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
        with fp8.disabled(model):
            result = core.core_metric(model, tokenizer, core_tasks, device, autocast, config.sequence_len,
                                      args.core_max_per_task, trainer.compute.rank, trainer.compute.world_size)
        trainer.metrics.add({"step": step, "core": result["core"]})

    def samples(step):
        if trainer.master:
            with fp8.disabled(model):
                print_samples(model, tokenizer)

    log.info("model: %s, %.1fM parameters, %s autocast; %d steps of %s tokens (%d x %d x %d ranks x %d accumulation), "
             "%.1f tokens per scaling parameter; learning rates x %.3g, Muon weight decay %.4g",
             config, model.num_params() / 1e6, str(trainer.dtype).removeprefix("torch."), plan.num_steps,
             f"{horizon.total_batch_size:,}", args.device_batch_size, args.max_seq_len, trainer.compute.world_size,
             plan.grad_accum, horizon.tokens_per_param, horizon.lr_scale, horizon.weight_decay)
    if trainer.step == 0 and args.eval_every > 0:
        evaluate(0)
    hooks = [(args.eval_every, evaluate), (args.core_every, evaluate_core), (args.sample_every, samples)]
    final = trainer.train(model, optimizer, batches, plan, hooks, meta=checkpoint.tokenizer_meta(tokenizer_uri))
    val_bpb = evaluate(trainer.step)
    with fp8.disabled(model):
        samples_text = print_samples(model, tokenizer) if trainer.master else None
    metrics = {"val_bpb": val_bpb, "parameters": model.num_params(), "scaling_parameters": model.scaling_params(),
               "total_batch_size": horizon.total_batch_size, "tokens_per_param": horizon.tokens_per_param,
               "flops_per_token": model.estimate_flops(),
               "samples": samples_text}
    trainer.commit({"tokenizer": tokenizer_uri}, final, metrics, started)
    log.info("done: validation %.4f bits per byte after %d steps; checkpoint %s", val_bpb, plan.num_steps, final)
    trainer.close()


def model_config(args, vocab_size, depth=None):
    """The GPTConfig the options ask for (at `depth` instead of --depth if given)."""
    from nanochat.gpt import GPTConfig

    try:
        return GPTConfig.from_depth(depth or args.depth, vocab_size, args.max_seq_len, head_dim=args.head_dim,
                                    n_kv_head=args.n_kv_head, **{name: getattr(args, name) for name in MODEL_OPTIONS})
    except ValueError as e:  # e.g. a window pattern of other letters, a qk_scale of 0
        raise stage.StageError(f"the model the options ask for: {e}") from None


@dataclasses.dataclass
class Horizon:
    total_batch_size: int
    num_steps: int
    tokens_per_param: float
    lr_scale: float  # the learning rates' multiplier
    weight_decay: float  # the Muon weight decay


def training_horizon(args, model):
    """Batch size, steps, learning-rate scale and weight decay (the module's docstring), checked
    before any work."""
    import torch

    from nanochat.gpt import GPT

    with torch.device("meta"):  # upstream's reference model: d12, otherwise as this one
        ref_params = GPT(model_config(args, model.config.vocab_size, REF_DEPTH)).scaling_params()
    params = model.scaling_params()
    batch = args.total_batch_size
    if batch == -1:
        if args.param_data_ratio <= 0:
            raise stage.StageError("--total-batch-size -1 needs a --param-data-ratio")
        batch = 2 ** round(math.log2(BATCH_REF * (params / ref_params) ** 0.383))
    if args.num_steps != -1:
        num_steps = args.num_steps
    elif args.target_flops > 0:
        num_steps = max(1, round(args.target_flops / (model.estimate_flops() * batch)))
    elif args.param_data_ratio > 0:
        num_steps = max(1, round(args.param_data_ratio * params / batch))
    else:
        raise stage.StageError("no training horizon: give --num-steps, --target-flops or --param-data-ratio")
    if num_steps < 1:
        raise stage.StageError(f"--num-steps must be -1 or positive, got {num_steps}")
    lr_scale, weight_decay = 1.0, args.weight_decay
    if args.batch_lr_scaling:
        if args.param_data_ratio <= 0:
            raise stage.StageError("--batch-lr-scaling needs a --param-data-ratio (it sets the reference horizon)")
        lr_scale = (batch / BATCH_REF) ** 0.5
        weight_decay *= lr_scale * (args.param_data_ratio * ref_params) / (batch * num_steps)
    return Horizon(batch, num_steps, batch * num_steps / params, lr_scale, weight_decay)


def train_loader(args, tokenizer, device, state):
    from nanochat.dataloader import pretrain_loader

    return pretrain_loader(tokenizer, args.device_batch_size, args.max_seq_len, "train", args.data, args.num_shards,
                           args.storage, device, state, source=args.source)


def val_loader(args, tokenizer, device):
    from nanochat.dataloader import pretrain_loader

    return pretrain_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val", args.data, args.num_shards,
                           args.storage, device, source=args.source)


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
