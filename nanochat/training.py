"""The training loop that base_train, mid_train and chat_sft share.

A `Training` owns one stage's run: compute and autocast, resuming from the newest complete
checkpoint, the step loop (gradient accumulation, LR and Muon-momentum schedules, metrics,
progress), periodic hooks (evaluations, samples) and checkpoints. The order within a step is:
optimizer step, metrics, due hooks, due checkpoint, so a checkpoint's metrics are complete; the
final checkpoint is saved before any final evaluation, so a crash there loses no training.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from nanochat import checkpoint, stage, storage
from nanochat.common import log


def add_options(p):
    """The options of every training stage."""
    a = p.add_argument
    a("--device-batch-size", type=int, help="rows per forward pass on each process")
    a("--num-steps", type=int, help="optimizer steps")
    a("--matrix-lr", type=float, help="Muon learning rate of the transformer matrices")
    a("--embedding-lr", type=float, help="AdamW learning rate of the embedding (at width 768; scaled as 1/sqrt(width))")
    a("--unembedding-lr", type=float, help="AdamW learning rate of lm_head (at width 768; scaled as 1/sqrt(width))")
    a("--weight-decay", type=float, help="Muon weight decay")
    a("--warmup-ratio", type=float, help="fraction of steps warming the learning rate up")
    a("--warmdown-ratio", type=float, help="fraction of steps decaying the learning rate at the end")
    a("--eval-every", type=int, help="steps between validation evaluations (-1: only at the end)")
    a("--checkpoint-every", type=int, help="steps between checkpoints (-1: only at the end)")
    a("--keep-last", type=int, help="checkpoints kept (older ones are deleted)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    a("--deterministic", action="store_true", help="deterministic kernels, for bit-identical resumes")
    a("--seed", type=int, help="seed of the weights' init and of sampling")
    a("--wandb", choices=["off", "offline", "online"], help="log to Weights & Biases (offline needs no network)")
    stage.add_compute_options(p)
    p.set_defaults(compile=False, wandb="off", seed=42, keep_last=2, warmup_ratio=0.0,
                   warmdown_ratio=0.2, weight_decay=0.0)


def every(period, step):
    return period > 0 and step % period == 0


@dataclasses.dataclass
class Plan:
    num_steps: int
    grad_accum: int  # forward/backward passes per optimizer step on each process
    tokens_per_step: int  # over all processes (for a conversation loader: row capacity, padding included)

    @property
    def log_every(self):
        return max(1, self.num_steps // 20)


def grad_accum(total_batch_size, device_batch_size, seq_len, world_size):
    """Passes per step so that a step sees total_batch_size tokens; a clear error if it cannot."""
    per_pass = device_batch_size * seq_len * world_size
    if total_batch_size % per_pass:
        raise stage.StageError(f"--total-batch-size {total_batch_size} is not a multiple of device batch x sequence "
                               f"x processes = {device_batch_size} x {seq_len} x {world_size}")
    return total_batch_size // per_pass


class Training:
    """One training stage's run; see the module docstring."""

    def __init__(self, args, stage_name):
        import torch

        from nanochat import common

        if args.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.args, self.stage = args, stage_name
        self.wandb = start_wandb(args)
        self.compute = common.compute_init(args.device_type, seed=args.seed)
        self.device = self.compute.device
        self.dtype = common.autocast_dtype(self.compute.device_type, args.dtype)
        self.autocast = common.autocast_context(self.compute.device_type, self.dtype)
        self.ckpt_dir = stage.stage_uri(args.run, stage_name, "checkpoints")
        self.step = 0
        self.metrics = None
        self.step_times = []  # of this process's steps
        self.earlier_train_time = 0.0  # of the steps before a resume

    @property
    def master(self):
        return self.compute.master

    def resume(self, model, optimizer):
        """Restores the newest complete checkpoint, if any; returns this rank's loader state
        (None when starting fresh)."""
        loaded = checkpoint.load_latest(self.ckpt_dir, rank=self.compute.rank, device=self.device)
        loader_state = None
        if loaded is not None:
            model_state, optim_state, meta = loaded
            if meta["world_size"] != self.compute.world_size:
                raise stage.StageError(f"the checkpoint in {self.ckpt_dir} was saved by {meta['world_size']} processes; "
                                       f"resume it with --nproc_per_node {meta['world_size']}")
            if meta["model_config"] != dataclasses.asdict(model.config):
                raise stage.StageError(f"the checkpoint in {self.ckpt_dir} has another model ({meta['model_config']}); "
                                       "use another run, or the options it was started with")
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
            self.step, loader_state = meta["step"], meta["loader_states"][self.compute.rank]
            self.earlier_train_time = meta.get("train_time_s", 0.0)
            log.info("resumed at step %d from %s", self.step, self.ckpt_dir)
        self.metrics = MetricsLog(stage.stage_uri(self.args.run, self.stage, "metrics.jsonl"), self.step, self.master)
        return loader_state

    def save(self, model, optimizer, loader, meta):
        """A checkpoint of the current step (every rank calls it); returns its directory."""
        meta = {**meta, "model_config": dataclasses.asdict(model.config), "loader_states": gather(loader.state_dict()),
                "train_time_s": self.train_time()}
        target = checkpoint.save(self.ckpt_dir, self.step, model.state_dict(), optimizer.state_dict(), meta,
                                 rank=self.compute.rank, world_size=self.compute.world_size, keep_last=self.args.keep_last)
        self.metrics.flush()
        return target

    def run(self, model, optimizer, batches, plan, hooks=(), meta=None, loss=None):
        """Trains from the current step to plan.num_steps, running each due (period, hook(step))
        and checkpoint between steps; returns the final checkpoint's directory. `loss(model,
        batch)` is the loss of one batch (default: the model's cross-entropy of (inputs, targets))."""
        import torch

        from nanochat import common
        from nanochat.optim import lr_multiplier, muon_momentum

        args = self.args
        train_model = torch.compile(model, dynamic=False) if args.compile else model
        peak = common.measure_matmul_flops(self.device, self.dtype) * self.compute.world_size
        flops_per_token = model.estimate_flops()
        bar = progress_bar(self.master, self.stage, self.step, plan.num_steps)
        while self.step < plan.num_steps:
            t0 = time.perf_counter()
            lrm = lr_multiplier(self.step, plan.num_steps, warmup_ratio=args.warmup_ratio,
                                warmdown_ratio=args.warmdown_ratio)
            optimizer.set_schedule(lrm, muon_momentum(self.step))
            loss_sum = torch.zeros((), device=self.device)
            for _ in range(plan.grad_accum):
                batch = next(batches)
                with self.autocast():
                    value = loss(train_model, batch) if loss else train_model(*batch)
                (value / plan.grad_accum).backward()
                loss_sum += value.detach()
            optimizer.step()
            model.zero_grad(set_to_none=True)
            self.step += 1
            self.step_times.append(time.perf_counter() - t0)
            record = self._record(loss_sum.item() / plan.grad_accum, lrm, plan, flops_per_token, peak)
            self.metrics.add(record, quiet=self.step % plan.log_every != 0)
            if self.wandb:
                self.wandb.log(record, step=self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:,.0f}", mfu=f"{record['mfu']:.1%}")
            if self.step < plan.num_steps:
                for period, hook in hooks:
                    if every(period, self.step):
                        hook(self.step)
                if every(args.checkpoint_every, self.step):
                    self.save(model, optimizer, batches, meta or {})
            stage.fault(self.stage, self.step)
        bar.close()
        return self.save(model, optimizer, batches, meta or {})

    def _record(self, loss, lrm, plan, flops_per_token, peak):
        recent = self.step_times[-10:]
        step_time = sum(recent) / len(recent)
        tok_per_s = plan.tokens_per_step / step_time
        return {"step": self.step, "loss": loss, "lr_multiplier": lrm, "step_time_s": step_time,
                "tok_per_s": tok_per_s, "mfu": flops_per_token * tok_per_s / peak,
                "eta_s": step_time * (plan.num_steps - self.step)}

    def train_time(self):
        """Seconds spent in training steps, over every run that led to this step."""
        return self.earlier_train_time + sum(self.step_times)

    def summary(self):
        """Metrics of the whole run for stage.json."""
        return {"steps": self.step, "train_time_s": round(self.train_time(), 2), "final_loss": self.metrics.last("loss"),
                "tok_per_s": self.metrics.last("tok_per_s"), "mfu": self.metrics.last("mfu"),
                "dtype": str(self.dtype).removeprefix("torch."), "world_size": self.compute.world_size,
                "device_type": self.compute.device_type}

    def commit(self, inputs, checkpoint_dir, metrics, started):
        """Writes metrics.jsonl, then (rank 0) stage.json with the final checkpoint and the metrics
        file as outputs: nothing the summary hashes changes after it."""
        self.metrics.flush()
        if self.master:
            outputs = {"checkpoint": storage.join(checkpoint_dir, checkpoint.MANIFEST), "metrics": self.metrics.uri}
            stage.commit(self.args.run, self.stage, self.args, inputs, outputs, {**metrics, **self.summary()}, started)

    def close(self):
        """Finishes the W&B run, if any (`stage.run_main` destroys the process group)."""
        if self.wandb:
            self.wandb.finish()


def gather(obj):
    """[obj of every rank] (just [obj] without torch.distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def progress_bar(enabled, desc, step, num_steps):
    from tqdm import tqdm

    return tqdm(total=num_steps, initial=step, unit="step", desc=desc, disable=not enabled, file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)


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
                      config={k: v for k, v in vars(args).items() if k != "storage"})


def finetune_parser(stage_name, doc):
    """The parser of a stage that continues training a checkpoint on conversations."""
    p = stage.parser(stage_name, doc)
    a = p.add_argument
    a("--spelling-size", type=int, help="SpellingBee examples in the mixture")
    a("--checkpoint", default=None, help="checkpoint directory URI to start from (default: the upstream stage's final one)")
    a("--total-batch-size", type=int, help="row tokens (T+1 capacity, padding included) per optimizer step over all processes")
    a("--max-seq-len", type=int, help="tokens per row (default: the model's training length)")
    a("--eval-conversations", type=int, help="held-out conversations for the validation loss")
    a("--identity", default=None, help="a JSONL file of your own identity/personality conversations, replacing "
      "nanochat's identity conversations")
    a("--identity-weight", type=weight, help="how many times the identity conversations are repeated in the mixture")
    a("--smoltalk-weight", type=weight, help="how many times each SmolTalk conversation is in the mixture "
      "(a fraction: a fixed random share)")
    a("--smoltalk-max-chars", type=positive, help="leave out SmolTalk conversations longer than this many characters "
      "(a small model imitates long replies by never ending its own)")
    a("--gsm8k-weight", type=weight, help="how many times each GSM8K problem is in the mixture (a fraction: a fixed "
      "random share)")
    add_options(p)
    return p


def weight(text):
    """argparse type of a mixture weight: a finite number >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"a weight is a number >= 0, got {text}")
    return value


def positive(text):
    """argparse type of a count: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def conversation_mixture(args, seed, extra=()):
    """The fixed shuffled mixture of mid_train and chat_sft, as the options of finetune_parser set
    it: SmolTalk, the `extra` tasks (once each), GSM8K, SpellingBee and the identity conversations
    (nanochat's, or the user's --identity file instead)."""
    from tasks.customjson import CustomJSON
    from tasks.gsm8k import GSM8K
    from tasks.mixtures import TaskMixture
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SpellingBee

    weighted = [(SmolTalk(split="train", max_chars=args.smoltalk_max_chars), args.smoltalk_weight),
                *((task, 1) for task in extra), (GSM8K(split="train"), args.gsm8k_weight),
                (SpellingBee(size=args.spelling_size), 1), (CustomJSON(path=args.identity), args.identity_weight)]
    tasks, weights = zip(*weighted)
    return TaskMixture(tasks, weights=weights, seed=seed)


def finetune(args, stage_name, upstream, mode, train_task):
    """Trains the `upstream` stage's model on the conversations of `train_task` (mode 'pack' or
    'pad', see ConversationLoader), evaluating bits per byte of the assistant tokens on SmolTalk's
    test split; commits the stage with its final checkpoint."""
    import itertools

    import torch
    from tasks.smoltalk import SmolTalk

    from nanochat.dataloader import ConversationLoader
    from nanochat.evaluation.loss import bits_per_byte, model_losses
    from nanochat.optim import setup_optimizers

    from tasks.common import TaskDataError

    started = time.time()
    source = args.checkpoint or stage.upstream_checkpoint(args.run, upstream)
    val_task = SmolTalk(split="test", stop=args.eval_conversations)
    try:
        n_conversations = len(train_task)  # loads and checks every file of the mixture
    except (TaskDataError, OSError) as e:
        raise stage.StageError(str(e)) from None
    run = Training(args, stage_name)
    model, tokenizer, meta = checkpoint.load_model(source, run.device)
    model.train()
    T = args.max_seq_len or model.config.sequence_len
    accum = grad_accum(args.total_batch_size, args.device_batch_size, T + 1, run.compute.world_size)
    plan = Plan(args.num_steps, accum, args.total_batch_size)
    optimizer = setup_optimizers(model, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                 matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    state = run.resume(model, optimizer)
    batches = ConversationLoader(tokenizer, train_task, args.device_batch_size, T, mode=mode, device=run.device,
                                 state=state)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int64, device=run.device)

    def evaluate(step):
        val = ConversationLoader(tokenizer, val_task, args.device_batch_size, T, mode="pad", epochs=1, device=run.device)
        bpb = bits_per_byte(itertools.islice(val, len(val_task)), token_bytes, model=model_losses(model, run.autocast))["model"]
        run.metrics.add({"step": step, "val_bpb": bpb})
        log.info("step %d/%d: validation %.4f bits per byte of assistant text", step, plan.num_steps, bpb)
        return bpb

    log.info("%s from %s: %d steps of %d x %d-token rows x %d processes x %d accumulation, %d conversations (%s)",
             stage_name, source, plan.num_steps, args.device_batch_size, T + 1, run.compute.world_size, accum,
             n_conversations, mode)
    if run.step == 0 and args.eval_every > 0:
        evaluate(0)
    final = run.run(model, optimizer, batches, plan, [(args.eval_every, evaluate)], meta={"tokenizer": meta["tokenizer"]})
    val_bpb = evaluate(run.step)
    metrics = {"val_bpb": val_bpb, "conversations": n_conversations, "epochs_started": batches.epoch + 1}
    run.commit({"checkpoint": storage.join(source, checkpoint.MANIFEST)}, final, metrics, started)
    log.info("done: validation %.4f bits per byte of assistant text; checkpoint %s", val_bpb, final)
    run.close()
