"""What every training stage is asked: the options they share and the plan those make (steps,
gradient accumulation). Torch-free, so that a stage's `--help` loads no torch; the loop itself is
in `nanochat/training.py`."""

import argparse
import dataclasses
import math

from nanochat import presets, stage
from nanochat.common import log


def number(kind, least, most=math.inf, also=None):
    """An argparse type: a finite `kind` (int or float) from `least` to `most`, or `also` (-1: all, or
    never), else argparse's usage error naming the option (a zero batch would divide by zero later,
    a negative rate train backwards, a negative count take nothing)."""
    def parse(text):
        value = kind(text)  # not a number: argparse says "invalid <kind> value"
        if value != also and not (math.isfinite(value) and least <= value <= most):
            raise argparse.ArgumentTypeError(f"{text}: expected " + (f"{also} or " if also is not None else "")
                                             + f"{'a number' if kind is float else 'an integer'} from {least}"
                                             + (f" to {most}" if most < math.inf else " up"))
        return value

    parse.__name__ = kind.__name__
    return parse


COUNT, RATE, FRACTION = number(int, 1), number(float, 0), number(float, 0, 1)
SIZE, COUNT_OR_ALL = number(int, 0), number(int, 1, also=-1)  # SIZE may be 0 (none); COUNT_OR_ALL -1 (all, or never)


# Options that change how a training stage runs or what it reports, never what it trains: a finished
# stage run again with other values of these (a smaller GPU's device batch, another dtype, evaluations
# more often) is the same work (training.Training.check_same_work). Every training stage's are here.
EXECUTION_OPTIONS = frozenset({
    "device_batch_size", "eval_every", "checkpoint_every", "keep_last", "compile", "deterministic", "wandb", "dtype",
    "device_type",
    "eval_tokens", "core_every", "core_max_per_task", "eval_bundle", "sample_every",  # base_train's
    "chatcore_every", "chatcore_max_problems", "chatcore_max_generative", "chatcore_max_new_tokens",  # mid_train's, chat_sft's
})


def add_options(p):
    """The options of every training stage."""
    a = p.add_argument
    a("--device-batch-size", type=COUNT, help="rows per forward pass on each process")
    a("--num-steps", type=int, help="optimizer steps")
    a("--matrix-lr", type=RATE, help="Muon learning rate of the transformer matrices")
    a("--embedding-lr", type=RATE, help="AdamW learning rate of the embedding (at width 768; scaled as 1/sqrt(width))")
    a("--unembedding-lr", type=RATE, help="AdamW learning rate of lm_head (at width 768; scaled as 1/sqrt(width))")
    a("--scalar-lr", type=RATE, help="AdamW learning rate of the per-layer scalars (--lambdas), as upstream's")
    a("--weight-decay", type=RATE, help="Muon weight decay")
    a("--optimizer-recipe", choices=["classic", "2026"],
      help="classic: Muon and AdamW as nanochat had them in 2025; 2026: NorMuon variance reduction, cautious weight "
           "decay, MuonEq, Muon+ and upstream's per-group AdamW betas and weight decays")
    a("--warmup-steps", type=number(int, 0), help="steps warming the learning rate up linearly")
    a("--warmdown-ratio", type=FRACTION, help="fraction of steps decaying the learning rate at the end")
    a("--final-lr-frac", type=FRACTION, help="the learning rate at the end of the warm-down, as a fraction of its peak")
    a("--momentum-schedule", choices=["classic", "2026"],
      help="Muon momentum: classic 0.85 -> 0.95 over 300 steps; 2026 0.85 -> 0.97 over 400 steps, then to 0.90 "
           "over the warm-down")
    a("--weight-decay-schedule", choices=["constant", "cosine"], help="Muon weight decay over training: constant, "
      "or cosine-decayed to 0")
    a("--eval-every", type=int, help="steps between validation evaluations (-1: only at the end)")
    a("--checkpoint-every", type=int, help="steps between checkpoints (-1: only at the end)")
    a("--keep-last", type=COUNT, help="checkpoints kept (older ones are deleted)")
    a("--compile", action=argparse.BooleanOptionalAction, help="compile the model with PyTorch's compiler")
    a("--deterministic", action="store_true", help="deterministic kernels, for bit-identical resumes")
    a("--seed", type=int, help="seed of the weights' init and of sampling")
    a("--wandb", choices=["off", "offline", "online"], help="log to Weights & Biases (offline needs no network)")
    stage.add_compute_options(p)
    p.set_defaults(compile=False, wandb="off", seed=42, keep_last=2, warmup_steps=0, warmdown_ratio=0.2,
                   final_lr_frac=0.0, weight_decay=0.0, scalar_lr=0.5, optimizer_recipe="classic",
                   momentum_schedule="classic", weight_decay_schedule="constant")


@dataclasses.dataclass
class Plan:
    num_steps: int
    grad_accum: int  # forward/backward passes per optimizer step on each process

    @property
    def log_every(self):
        return max(1, self.num_steps // 20)


def grad_accum(total_batch_size, device_batch_size, seq_len, world_size):
    """Passes per step so that a step sees total_batch_size tokens; a clear error if it cannot."""
    per_pass = device_batch_size * seq_len * world_size
    if total_batch_size < 1 or total_batch_size % per_pass:
        raise stage.StageError(f"--total-batch-size {total_batch_size} is not a positive multiple of device batch x sequence "
                               f"x processes = {device_batch_size} x {seq_len} x {world_size}")
    return total_batch_size // per_pass


def fit_to_gpu(args, stage_name, compute):
    """Sets args.device_batch_size for this process's GPU (fit_device_batch); a no-op off CUDA."""
    if compute.device_type == "cuda":
        import torch

        gpu_bytes = torch.cuda.get_device_properties(compute.device).total_memory
        args.device_batch_size = fit_device_batch(args.preset, stage_name, args.device_batch_size, gpu_bytes)


def fit_device_batch(preset, stage_name, device_batch_size, gpu_bytes):
    """The device batch size for this GPU. GPU presets size theirs, as upstream does, for 80 GB
    GPUs; on a smaller one the preset's value is halved until it fits (gradient accumulation keeps
    the total batch), and a GPU too small for one row is refused, naming the memory needed. An
    explicit --device-batch-size, a larger GPU, a stage the preset sizes none for (chat_rl: its
    rollouts decide) and CPU presets keep the value as it is."""
    sized = presets.get(preset, stage_name).get("device_batch_size")
    if preset not in presets.GPU_PRESETS or sized is None or device_batch_size != sized:
        return device_batch_size
    have_gb = gpu_bytes / 1e9
    need_gb = presets.SIZED_FOR_GPU_GB * 0.98  # an "80 GB" GPU reports about 79-85 GB
    fitted = device_batch_size
    while fitted > 1 and fitted / device_batch_size * need_gb > have_gb:
        fitted //= 2
    if fitted / device_batch_size * need_gb > have_gb:
        raise stage.StageError(f"preset {preset}'s {stage_name} needs about {need_gb / device_batch_size:.0f} GB of GPU memory "
                               f"per row and this GPU has {have_gb:.0f} GB: use a smaller model (--depth) or another preset")
    if fitted != device_batch_size:
        log.info("device batch size %d (preset %s's %d is sized for %d GB GPUs; this one has %.0f GB)",
                 fitted, preset, device_batch_size, presets.SIZED_FOR_GPU_GB, have_gb)
    return fitted
