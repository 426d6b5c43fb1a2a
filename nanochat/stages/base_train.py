"""Pretrain the GPT on the pretraining shards: distributed, checkpointed, exactly resumable.

    torchrun --nproc_per_node 2 -m nanochat.stages.base_train --run myrun --preset tiny
    torchrun --nproc_per_node 8 -m nanochat.stages.base_train --run s3://bucket/runs/x --preset d20
    python -m nanochat.stages.base_train --run myrun --preset cpu --num-steps 500

Needs the tokenizer of `tok_train` in the same run. Reads the training shards from the data cache
(waiting for any that are still downloading) or from --data. Writes under <run>/base_train/:
checkpoints/step_NNNNNN/ (every --checkpoint-every steps and at the end; the newest --keep-last
are kept), metrics.jsonl (one JSON record per logged step and per evaluation), then stage.json,
whose `checkpoint` output is the final checkpoint's manifest.

Started again with the same command, the stage resumes from the newest complete checkpoint (model,
optimizer, data position and RNG); with --deterministic the final weights are bit-identical to
those of an uninterrupted run. The training length is --num-steps, or, when that is -1,
--param-data-ratio tokens per parameter (Chinchilla: 20).
"""

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time

from nanochat import checkpoint, stage, storage
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
    a("--device-batch-size", type=int, help="rows per forward pass on each process")
    a("--total-batch-size", type=int, help="tokens per optimizer step over all processes (gradient accumulation makes up the rest)")
    a("--num-steps", type=int, help="optimizer steps; -1: from --param-data-ratio")
    a("--param-data-ratio", type=float, help="training tokens per parameter when --num-steps is -1")
    a("--matrix-lr", type=float, help="Muon learning rate of the transformer matrices")
    a("--embedding-lr", type=float, help="AdamW learning rate of the embedding (at width 768; scaled as 1/sqrt(width))")
    a("--unembedding-lr", type=float, help="AdamW learning rate of lm_head (at width 768; scaled as 1/sqrt(width))")
    a("--weight-decay", type=float, help="Muon weight decay")
    a("--warmup-ratio", type=float, help="fraction of steps warming the learning rate up")
    a("--warmdown-ratio", type=float, help="fraction of steps decaying the learning rate at the end")
    a("--eval-every", type=int, help="steps between validation bits-per-byte evaluations (-1: only at the end)")
    a("--eval-tokens", type=int, help="validation tokens per evaluation")
    a("--core-every", type=int, help="steps between CORE evaluations on a subset of each task (-1: never)")
    a("--core-max-per-task", type=int, help="examples per CORE task in those evaluations")
    a("--eval-bundle", default=None, help="directory URI of the unpacked eval bundle (default: <storage>/data/eval_bundle)")
    a("--sample-every", type=int, help="steps between printed samples (-1: only at the end)")
    a("--checkpoint-every", type=int, help="steps between checkpoints (-1: only at the end)")
    a("--keep-last", type=int, help="checkpoints kept (older ones are deleted)")
    a("--dtype", choices=["auto", "bfloat16", "float32"], help="autocast dtype; auto: bf16 where the hardware does it fast")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    a("--deterministic", action="store_true", help="deterministic kernels, for bit-identical resumes")
    a("--seed", type=int, help="seed of the weights' init")
    a("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: cuda > mps > cpu, whichever exists")
    a("--num-shards", type=int, help="training shards to read from the data cache (-1: all there are)")
    a("--data", default=None, help="a directory URI of shard_NNNNN.parquet files to read instead of the data cache")
    a("--wandb", choices=["off", "offline", "online"], help="log to Weights & Biases (offline needs no network)")
    p.set_defaults(compile=False, dtype="auto", wandb="off", seed=42, keep_last=2)
    return p


def main(args):
    import torch

    from nanochat import common
    from nanochat.evaluation.loss import bits_per_byte, model_losses
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.optim import setup_optimizers
    from nanochat.tokenizer import Tokenizer

    started = time.time()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    wandb = start_wandb(args)
    tokenizer_uri = stage.read_summary(args.run, "tok_train")["outputs"]["tokenizer"]["uri"]
    tokenizer = Tokenizer.load(stage.stage_uri(args.run, "tok_train", "tokenizer"))
    compute = common.compute_init(args.device_type, seed=args.seed)
    device = compute.device
    dtype = common.autocast_dtype(compute.device_type) if args.dtype == "auto" else getattr(torch, args.dtype)
    autocast = common.autocast_context(compute.device_type, dtype)

    config = GPTConfig.from_depth(args.depth, tokenizer.vocab_size, args.max_seq_len, head_dim=args.head_dim,
                                  n_kv_head=args.n_kv_head)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizer = setup_optimizers(model, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                 matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    plan = training_plan(args, model, compute.world_size)

    ckpt_dir = stage.stage_uri(args.run, STAGE, "checkpoints")
    step, loader_state = resume(ckpt_dir, model, optimizer, config, compute)
    train_batches = train_loader(args, tokenizer, device, loader_state)
    metrics = MetricsLog(stage.stage_uri(args.run, STAGE, "metrics.jsonl"), step, compute.master)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int64, device=device)
    train_model = torch.compile(model, dynamic=False) if args.compile else model

    def evaluate():
        batches = itertools.islice(val_loader(args, tokenizer, device), plan["eval_steps"])
        model.eval()
        bpb = bits_per_byte(model_losses(train_model, autocast), batches, token_bytes)
        model.train()
        metrics.add({"step": step, "val_bpb": bpb})
        log.info("step %d/%d: validation %.4f bits per byte", step, plan["num_steps"], bpb)
        return bpb

    core_tasks = []

    def evaluate_core():
        from nanochat.evaluation import core
        from nanochat.stages.base_eval import eval_bundle

        if not core_tasks:
            core_tasks.extend(core.load_tasks(args.eval_bundle or eval_bundle(args.storage))[0])
        model.eval()
        result = core.core_metric(model, tokenizer, core_tasks, device, autocast, config.sequence_len,
                                  args.core_max_per_task, compute.rank, compute.world_size)
        model.train()
        metrics.add({"step": step, "core": result["core"]})

    def save():
        loader_states = gather(train_batches.state_dict())
        meta = {"model_config": dataclasses.asdict(config), "loader_states": loader_states,
                "plan": plan, "tokenizer": tokenizer_uri}
        target = checkpoint.save(ckpt_dir, step, model.state_dict(), optimizer.state_dict(), meta,
                                 rank=compute.rank, world_size=compute.world_size, keep_last=args.keep_last)
        metrics.flush()
        return target

    peak = common.measure_matmul_flops(device, dtype) * compute.world_size
    flops_per_token = model.estimate_flops()
    log.info("model: %s, %.1fM parameters, %s autocast; %d steps of %s tokens (%d x %d x %d ranks x %d accumulation)",
             config, model.num_params() / 1e6, str(dtype).removeprefix("torch."), plan["num_steps"],
             f"{plan['tokens_per_step']:,}", args.device_batch_size, args.max_seq_len, compute.world_size,
             plan["grad_accum"])
    if step > 0:
        log.info("resumed at step %d from %s", step, ckpt_dir)

    if step == 0 and args.eval_every > 0:
        evaluate()
    bar = progress_bar(compute.master, step, plan["num_steps"])
    step_times = []
    while step < plan["num_steps"]:
        t0 = time.perf_counter()
        lr_multiplier, momentum = schedule(args, step, plan["num_steps"])
        optimizer.set_schedule(lr_multiplier, momentum)
        loss_sum = torch.zeros((), device=device)
        for _ in range(plan["grad_accum"]):
            inputs, targets = next(train_batches)
            with autocast():
                loss = train_model(inputs, targets)
            (loss / plan["grad_accum"]).backward()
            loss_sum += loss.detach()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        step += 1
        step_times.append(time.perf_counter() - t0)
        record = step_record(step, loss_sum.item() / plan["grad_accum"], lr_multiplier, step_times, plan,
                             flops_per_token, peak)
        metrics.add(record, quiet=step % plan["log_every"] != 0)
        if wandb:
            wandb.log(record, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:,.0f}", mfu=f"{record['mfu']:.1%}")
        # Evaluations then the checkpoint, so that the metrics of a checkpoint's steps are complete.
        if step < plan["num_steps"]:
            if every(args.eval_every, step):
                evaluate()
            if every(args.core_every, step):
                evaluate_core()
            if every(args.sample_every, step) and compute.master:
                print_samples(model, tokenizer, autocast, device)
            if every(args.checkpoint_every, step):
                save()
        stage.fault(STAGE, step)
    bar.close()

    final = save()  # before the final evaluations: a crash there loses no training
    val_bpb = evaluate()
    samples = print_samples(model, tokenizer, autocast, device) if compute.master else None
    metrics.flush()
    if compute.master:
        train_time = sum(step_times)
        summary_metrics = {
            "val_bpb": val_bpb,
            "steps": plan["num_steps"],
            "tokens": plan["num_steps"] * plan["tokens_per_step"],
            "parameters": model.num_params(),
            "flops_per_token": flops_per_token,
            "train_time_s": round(train_time, 2),
            "final_loss": metrics.last("loss"),
            "tok_per_s": metrics.last("tok_per_s"),
            "mfu": metrics.last("mfu"),
            "dtype": str(dtype).removeprefix("torch."),
            "world_size": compute.world_size,
            "device_type": compute.device_type,
            "samples": samples,
        }
        inputs = {"tokenizer": tokenizer_uri}
        outputs = {"checkpoint": storage.join(final, checkpoint.MANIFEST), "metrics": metrics.uri}
        stage.commit(args.run, STAGE, args, inputs, outputs, summary_metrics, started)
        log.info("done: validation %.4f bits per byte after %d steps; checkpoint %s", val_bpb, plan["num_steps"], final)
    if wandb:
        wandb.finish()
    common.compute_cleanup()


def training_plan(args, model, world_size):
    """Steps, gradient accumulation and evaluation sizes, checked before any work."""
    rows_per_pass = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % rows_per_pass:
        raise stage.StageError(f"--total-batch-size {args.total_batch_size} is not a multiple of device batch x sequence "
                               f"x processes = {args.device_batch_size} x {args.max_seq_len} x {world_size}")
    num_steps = args.num_steps
    if num_steps == -1:
        scaling_params = model.num_params() - model.transformer.wte.weight.numel()
        num_steps = max(1, round(args.param_data_ratio * scaling_params / args.total_batch_size))
    if num_steps < 1:
        raise stage.StageError(f"--num-steps must be -1 or positive, got {num_steps}")
    return {
        "num_steps": num_steps,
        "grad_accum": args.total_batch_size // rows_per_pass,
        "tokens_per_step": args.total_batch_size,
        "eval_steps": max(1, args.eval_tokens // rows_per_pass),
        "log_every": max(1, num_steps // 20),
    }


def every(period, step):
    return period > 0 and step % period == 0


def schedule(args, step, num_steps):
    from nanochat.optim import lr_multiplier, muon_momentum

    return (lr_multiplier(step, num_steps, warmup_ratio=args.warmup_ratio, warmdown_ratio=args.warmdown_ratio),
            muon_momentum(step))


def resume(ckpt_dir, model, optimizer, config, compute):
    """Restores the newest complete checkpoint, if any: (step, this rank's loader state)."""
    loaded = checkpoint.load_latest(ckpt_dir, rank=compute.rank, device=compute.device)
    if loaded is None:
        return 0, None
    model_state, optim_state, meta = loaded
    if meta["world_size"] != compute.world_size:
        raise stage.StageError(f"the checkpoint in {ckpt_dir} was saved by {meta['world_size']} processes; "
                               f"resume it with --nproc_per_node {meta['world_size']}")
    if meta["model_config"] != dataclasses.asdict(config):
        raise stage.StageError(f"the checkpoint in {ckpt_dir} has another model ({meta['model_config']}); "
                               "use another run, or the options it was started with")
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)
    return meta["step"], meta["loader_states"][compute.rank]


def train_loader(args, tokenizer, device, state):
    from nanochat.dataloader import pretrain_loader

    return pretrain_loader(tokenizer, args.device_batch_size, args.max_seq_len, "train", args.data, args.num_shards,
                           args.storage, device, state)


def val_loader(args, tokenizer, device):
    from nanochat.dataloader import pretrain_loader

    return pretrain_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val", args.data, args.num_shards,
                           args.storage, device)


def gather(obj):
    """[obj of every rank] (just [obj] without torch.distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def step_record(step, loss, lr_multiplier, step_times, plan, flops_per_token, peak):
    recent = step_times[-10:]
    step_time = sum(recent) / len(recent)
    tok_per_s = plan["tokens_per_step"] / step_time
    return {"step": step, "loss": loss, "lr_multiplier": lr_multiplier, "step_time_s": step_time,
            "tok_per_s": tok_per_s, "mfu": flops_per_token * tok_per_s / peak,
            "eta_s": step_time * (plan["num_steps"] - step)}


def progress_bar(enabled, step, num_steps):
    from tqdm import tqdm

    return tqdm(total=num_steps, initial=step, unit="step", desc=STAGE, disable=not enabled, file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)


def print_samples(model, tokenizer, autocast, device, max_tokens=16):
    """Greedy continuations of a few prompts, logged and returned."""
    import torch

    samples = []
    model.eval()
    with torch.no_grad():
        for prompt in SAMPLE_PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt, prepend="<|bos|>")], device=device)
            for _ in range(max_tokens):
                with autocast():
                    logits = model(ids[:, -model.config.sequence_len:])
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            samples.append(tokenizer.decode(ids[0, 1:].tolist()))
    model.train()
    for s in samples:
        log.info("sample: %r", s)
    return samples


class MetricsLog:
    """metrics.jsonl of the stage, rewritten whole (atomically) on flush. On resume, records after
    the resumed step are dropped, so a retried step is never counted twice."""

    def __init__(self, uri, resumed_step, enabled):
        self.uri, self.enabled = uri, enabled
        self.records = []
        if enabled and resumed_step > 0 and storage.exists(uri):
            records = [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]
            self.records = [r for r in records if r["step"] <= resumed_step]
        self.last_flush = time.time()

    def add(self, record, quiet=False):
        if not self.enabled:
            return
        self.records.append(record)
        if not quiet:
            log.info("step %d: %s", record["step"], ", ".join(f"{k} {fmt(v)}" for k, v in record.items() if k != "step"))
        if time.time() - self.last_flush > 30:
            self.flush()

    def last(self, key):
        return next((r[key] for r in reversed(self.records) if key in r), None)

    def flush(self):
        if self.enabled:
            storage.write_text(self.uri, "".join(json.dumps(r) + "\n" for r in self.records))
            self.last_flush = time.time()


def fmt(value):
    return f"{value:.4g}" if isinstance(value, float) and not math.isnan(value) else str(value)


def start_wandb(args):
    """A Weights & Biases run on rank 0 when asked for (never required)."""
    from nanochat.common import is_rank0

    if args.wandb == "off" or not is_rank0():
        return None
    try:
        import wandb
    except ImportError:
        raise stage.StageError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="nanochat", name=args.run.rstrip("/").rsplit("/", 1)[-1], mode=args.wandb,
                      config={k: v for k, v in vars(args).items() if k not in ("storage",)})


if __name__ == "__main__":
    stage.run_main(main, build_parser(), STAGE)
