"""The training loop that base_train, mid_train, chat_sft and chat_rl share.

A `Training` owns one stage's training: compute and autocast, resuming from the newest complete
checkpoint, the step loop (gradient accumulation, LR and Muon-momentum schedules, metrics,
progress), periodic hooks (evaluations, samples) and checkpoints. The order within a step is:
optimizer step, metrics, due hooks, due checkpoint, so a checkpoint's metrics are complete; the
final checkpoint is saved before any final evaluation, so a crash there loses no training. Under
fp16 autocast (GPUs without bf16) a gradient scaler scales the loss, and its state is checkpointed.

Throughput counts the tokens trained on: the targets that are not -1 (padding, prompts and forced
tool output are), summed on the device over the accumulation passes and over the processes once
per step. A step's time is split into the time its batches took to come (`batch_time_s`: reading
data, or chat_rl's rollouts, which sample on the device) and the rest, forward, backward and
optimizer (`train_time_s`); `tok_per_s` and `mfu` are over the latter. The options and the plan a
stage passes in are in `nanochat/training_options.py` (torch-free, for `--help`).
"""

import collections
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanochat import checkpoint, common, flash_attention, stage, storage, training_options
from nanochat.common import log
from nanochat.gpt import reaches_back
from nanochat.optim import lr_multiplier, muon_momentum, setup_optimizers, weight_decay_multiplier


def every(period, step):
    return period > 0 and step % period == 0


class Training:
    """One training stage's run; see the module docstring."""

    def __init__(self, args, stage_name):
        if args.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.args, self.stage = args, stage_name
        self.wandb = start_wandb(args)
        self.compute = common.compute_init(args.device_type, seed=args.seed)
        self.device = self.compute.device
        training_options.fit_to_gpu(args, stage_name, self.compute)
        self.dtype = common.autocast_dtype(self.compute.device_type, args.dtype)
        self.autocast = common.autocast_context(self.compute.device_type, self.dtype)
        # fp16's narrow exponent range needs loss scaling (bf16 and fp32 have fp32's range)
        self.scaler = torch.amp.GradScaler(self.compute.device_type) if self.dtype == torch.float16 else None
        self.ckpt_dir = stage.stage_uri(args.run, stage_name, "checkpoints")
        self.step = 0
        self.rng = None  # the resumed checkpoint's RNG state, restored when training starts
        self.metrics = None
        self.recent_step_times = collections.deque(maxlen=10)  # of this process's steps, for the ETA
        # over every run that led to the current step (kept in checkpoints)
        self.totals = {"tokens": 0, "train_time_s": 0.0, "batch_time_s": 0.0}
        # the wall time of the attempts before this one, up to the checkpoint this one resumed from
        self.started, self.earlier_wall_s = time.time(), 0.0

    @property
    def master(self):
        return self.compute.master

    def optimizer(self, model, lr_scale=1.0, weight_decay=None):
        """The MuonAdamW of the stage's options, its learning rates times lr_scale (and its Muon
        weight decay `weight_decay` if given)."""
        a = self.args
        return setup_optimizers(model, unembedding_lr=a.unembedding_lr * lr_scale, embedding_lr=a.embedding_lr * lr_scale,
                                matrix_lr=a.matrix_lr * lr_scale, scalar_lr=a.scalar_lr * lr_scale,
                                weight_decay=a.weight_decay if weight_decay is None else weight_decay,
                                recipe=a.optimizer_recipe)

    def resume(self, model, optimizer):
        """Restores the newest complete checkpoint, if any; returns this rank's loader state
        (None when starting fresh)."""
        loaded = checkpoint.load_latest(self.ckpt_dir, rank=self.compute.rank, device=self.device)
        loader_state = None
        if loaded is not None:
            model_state, optim_state, meta = loaded
            try:
                saved = dataclasses.asdict(checkpoint.model_config(meta, checkpoint.step_dir(self.ckpt_dir, meta["step"])))
            except checkpoint.CheckpointError as e:
                raise stage.StageError(str(e)) from None
            if differences := config_differences(saved, dataclasses.asdict(model.config)):
                raise stage.StageError(f"the checkpoint in {self.ckpt_dir} is of another model ({differences}); "
                                       "use another run, or the options it was started with")
            if meta["world_size"] != self.compute.world_size:
                raise stage.StageError(f"the checkpoint in {self.ckpt_dir} was saved by {meta['world_size']} processes; "
                                       f"resume it with --nproc_per_node {meta['world_size']}")
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
            if self.scaler is not None and "grad_scaler" in meta:
                self.scaler.load_state_dict(meta["grad_scaler"])
            self.rng = checkpoint.rng_state()  # as load_latest restored it
            self.step, loader_state = meta["step"], meta["loader_states"][self.compute.rank]
            self.totals.update({k: meta[k] for k in self.totals if k in meta})
            self.earlier_wall_s = meta.get("wall_time_s", 0.0)
            log.info("resumed at step %d from %s", self.step, self.ckpt_dir)
            if missing := [k for k in self.totals if k not in meta]:  # a checkpoint from before they were kept
                log.warning("the checkpoint has no running %s: the totals count from step %d", ", ".join(missing), self.step)
        self.metrics = MetricsLog(stage.stage_uri(self.args.run, self.stage, "metrics.jsonl"), self.step, self.master)
        return loader_state

    def save(self, model, optimizer, loader, meta):
        """A checkpoint of the current step (every rank calls it); returns its directory. The metrics
        are written first, so a run killed once the checkpoint exists resumes with all its steps' records."""
        self.metrics.flush()
        meta = {**meta, "model_config": dataclasses.asdict(model.config), "loader_states": gather(loader.state_dict()),
                **self.totals, "wall_time_s": self.earlier_wall_s + time.time() - self.started}
        if self.scaler is not None:
            meta["grad_scaler"] = self.scaler.state_dict()
        return checkpoint.save(self.ckpt_dir, self.step, model.state_dict(), optimizer.state_dict(), meta,
                               rank=self.compute.rank, world_size=self.compute.world_size, keep_last=self.args.keep_last)

    def train(self, model, optimizer, batches, plan, hooks=(), meta=None, loss=None):
        """Trains from the current step to plan.num_steps, running each due (period, hook(step))
        and checkpoint between steps; returns the final checkpoint's directory. `batches` yields
        (inputs, targets, ...) with targets -1 where nothing is trained; `loss(model, batch)` is
        the loss of one batch (default: the model's cross-entropy of (inputs, targets))."""
        args = self.args
        self.check_same_work(plan)
        windows = [w for w in model.config.windows if not reaches_back(w, model.config.sequence_len)]
        if self.master and windows and self.device.type == "cuda" and flash_attention.for_device(self.device) is None:
            if args.compile:
                log.info("no flash attention for this GPU: the sliding-window layers attend with FlexAttention")
            else:
                log.warning("no flash attention for this GPU (FA3 on Hopper, FA2 on Ampere or newer; nanochat installs "
                            "neither) and no --compile for FlexAttention: the sliding-window layers attend with SDPA "
                            "and a mask, computing every key")
        train_model = torch.compile(model, dynamic=False) if args.compile else model
        # MFU per token/s: training FLOPs per token over the matmul peak of all processes, measured now
        peak = common.measure_matmul_flops(self.device, self.dtype)
        log.info("matmul peak %.3g TFLOP/s per process in %s (MFU's denominator)", peak / 1e12, str(self.dtype).removeprefix("torch."))
        mfu_per_tok_s = model.estimate_flops() / (peak * self.compute.world_size)
        bar = progress_bar(self.master, self.stage, self.step, plan.num_steps)
        if self.rng is not None:  # what the stage drew since resuming (the matmul peak's inputs, say), an
            checkpoint.set_rng_state(self.rng)  # uninterrupted run drew before its first step
        while self.step < plan.num_steps:
            started = time.perf_counter()
            lrm = lr_multiplier(self.step, plan.num_steps, warmup_steps=args.warmup_steps,
                                warmdown_ratio=args.warmdown_ratio, final_lr_frac=args.final_lr_frac)
            optimizer.set_schedule(lrm, muon_momentum(self.step, plan.num_steps, args.momentum_schedule, args.warmdown_ratio),
                                   weight_decay_multiplier(self.step, plan.num_steps, args.weight_decay_schedule))
            loss_sum = torch.zeros((), device=self.device)
            tokens = torch.zeros((), dtype=torch.long, device=self.device)
            batch_time = 0.0
            for _ in range(plan.grad_accum):
                t = time.perf_counter()
                batch = next(batches)
                batch_time += time.perf_counter() - t
                with self.autocast():
                    value = loss(train_model, batch) if loss else train_model(*batch)
                self.scaled(value / plan.grad_accum).backward()
                loss_sum += value.detach()
                tokens += (batch[1] != -1).sum()
            self.optimizer_step(optimizer)
            model.zero_grad(set_to_none=True)
            common.sum_over_ranks(tokens)
            step_loss, step_tokens = loss_sum.item() / plan.grad_accum, tokens.item()  # waits for the device
            self.step += 1
            record = self._record(step_loss, lrm, step_tokens, time.perf_counter() - started, batch_time, mfu_per_tok_s, plan)
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

    def check_same_work(self, plan):
        """A finished stage run again by hand with other options would resume checkpoints trained
        under the old ones (or train nothing at all) and record the new ones as its own: a StageError
        naming them. More --num-steps alone trains on. (The flow clears the folder of other work
        first: flows.stages.clear_other_work.) Not compared: options that one of the two versions of
        the code lacks (new code runs a finished stage again), and those of how it runs, not what it
        trains (training_options.EXECUTION_OPTIONS: a finished stage on a smaller GPU fits another
        device batch)."""
        uri = stage.stage_uri(self.args.run, self.stage, stage.SUMMARY)
        if self.step == 0 or not storage.exists(uri):
            return
        try:
            before = stage.checked_summary(uri).get("config", {})
        except stage.SummaryError:  # damaged: this run replaces it
            return
        now = stage.recorded_config(self.args)
        ignored = training_options.EXECUTION_OPTIONS | ({"num_steps"} if self.step < plan.num_steps else set())
        if changed := [f"{k}: {before[k]!r} then, {now[k]!r} now" for k in sorted(before.keys() & now.keys())
                       if before[k] != now[k] and k not in ignored]:
            raise stage.StageError(f"{self.stage} is done in {storage.redact(self.args.run)} (step {self.step}) with other options "
                                   f"({'; '.join(changed)}): its checkpoints hold that work, not this; use another run, or "
                                   f"remove {storage.redact(stage.stage_uri(self.args.run, self.stage))} to train it again")

    def scaled(self, loss):
        """The loss to differentiate: under fp16, multiplied by the gradient scaler's scale."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def optimizer_step(self, optimizer):
        """optimizer.step(), or under fp16 the scaler's step: gradients unscaled, and the step skipped
        (the scale halved) on every rank if any rank's gradients overflowed. The optimizer averages
        gradients over the ranks itself, after this, so the ranks must agree on skipping first."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.unscale_(optimizer)
        if dist.is_initialized():
            for found_inf in self.scaler._found_inf_per_device(optimizer).values():  # as upstream does
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        self.scaler.step(optimizer)
        self.scaler.update()

    def _record(self, loss, lrm, tokens, step_time, batch_time, mfu_per_tok_s, plan):
        """The metrics record of the step just done; adds it to the totals."""
        train_time = step_time - batch_time
        self.totals["tokens"] += tokens
        self.totals["train_time_s"] += train_time
        self.totals["batch_time_s"] += batch_time
        self.recent_step_times.append(step_time)
        tok_per_s = tokens / train_time
        eta = statistics.fmean(self.recent_step_times) * (plan.num_steps - self.step)
        return {"step": self.step, "loss": loss, "lr_multiplier": lrm, "tokens": tokens, "step_time_s": step_time,
                "batch_time_s": batch_time, "train_time_s": train_time, "tok_per_s": tok_per_s,
                "mfu": tok_per_s * mfu_per_tok_s, "eta_s": eta}

    def summary(self):
        """Metrics of the whole run for stage.json: totals over every step, and tok_per_s and mfu
        as the medians of the steps' (the first steps compile and warm up)."""
        steps = [r for r in self.metrics.records if "tok_per_s" in r]
        return {"steps": self.step, "tokens": self.totals["tokens"],
                "train_time_s": round(self.totals["train_time_s"], 2),
                "batch_time_s": round(self.totals["batch_time_s"], 2), "final_loss": self.metrics.last("loss"),
                "tok_per_s": statistics.median(r["tok_per_s"] for r in steps) if steps else None,
                "mfu": statistics.median(r["mfu"] for r in steps) if steps else None,
                "dtype": str(self.dtype).removeprefix("torch."), "world_size": self.compute.world_size,
                "device_type": self.compute.device_type}

    def commit(self, inputs, checkpoint_dir, metrics, started):
        """Writes metrics.jsonl, then (rank 0) stage.json with the final checkpoint and the metrics
        file as outputs: nothing the summary hashes changes after it. Returns the metrics."""
        self.metrics.flush()
        metrics = {**metrics, **self.summary()}
        if self.master:
            outputs = {"checkpoint": storage.join(checkpoint_dir, checkpoint.MANIFEST), "metrics": self.metrics.uri}
            stage.commit(self.args.run, self.stage, self.args, inputs, outputs, metrics, started, earlier_wall_s=self.earlier_wall_s)
        return metrics

    def close(self):
        """Finishes the W&B run, if any (`stage.run_main` destroys the process group)."""
        if self.wandb:
            self.wandb.finish()


def config_differences(saved, wanted):
    """'field: X in the checkpoint, Y now' for each field where two model configs differ, joined by '; '."""
    return "; ".join(f"{k}: {saved.get(k)} in the checkpoint, {wanted.get(k)} now"
                     for k in sorted(saved.keys() | wanted.keys()) if saved.get(k) != wanted.get(k))


def gather(obj):
    """[obj of every rank] (just [obj] without torch.distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def progress_bar(enabled, desc, step, num_steps):
    return tqdm(total=num_steps, initial=step, unit="step", desc=desc, disable=not enabled, file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)


class MetricsLog:
    """metrics.jsonl of the stage, rewritten whole (atomically) on flush. On resume, records after
    the resumed step are dropped, so a retried step is never counted twice; a measurement made again
    at a step (the final evaluation of a finished stage run again) replaces the one there."""

    def __init__(self, uri, resumed_step, enabled):
        self.uri, self.enabled = uri, enabled
        self.records = []
        if enabled and resumed_step > 0 and storage.exists(uri):
            self.records = [r for r in read_records(uri) if r["step"] <= resumed_step]
        self.last_flush = time.time()

    def add(self, record, quiet=False):
        if not self.enabled:
            return
        for i in range(len(self.records) - 1, -1, -1):  # the records of this step are the last ones
            if self.records[i]["step"] != record["step"]:
                break
            if self.records[i].keys() == record.keys():
                del self.records[i]
                break
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


def read_records(uri):
    """The records of a metrics.jsonl (written whole, so every line is one); a StageError naming the
    file and line where one is not a JSON object with a step."""
    records = []
    for number, line in enumerate(storage.read_text(uri).splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise stage.StageError(f"{storage.redact(uri)}: line {number} is not JSON ({e}): restore the file, or remove the "
                                   "stage's folder to train it again") from None
        if record is not None and not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            raise stage.StageError(f"{storage.redact(uri)}: line {number} is not a record with a step")
        records += [record] if record is not None else []
    return records


def fmt(value):
    return f"{value:.4g}" if isinstance(value, float) and not math.isnan(value) else str(value)


def start_wandb(args):
    """A Weights & Biases run on rank 0 when asked for (never required)."""
    if args.wandb == "off" or not common.is_rank0():
        return None
    try:
        import wandb
    except ImportError:
        raise stage.StageError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="nanochat", name=args.run.rstrip("/").rsplit("/", 1)[-1], mode=args.wandb,
                      config={k: v for k, v in vars(args).items() if k != "storage"})
