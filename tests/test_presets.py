"""The presets are consistent: every training stage's batch splits into whole passes on the number
of processes the preset is meant for, and every stage's defaults are options it has."""

import importlib

import pytest

from nanochat import pipeline, presets, stage, training_options
from nanochat.stage import StageError, parse_args

PROCESSES = {"tiny": (1, 2), "cpu": (1, 2), "d20": (8,), "d24": (8,), "d26": (8,), "d32": (8,)}


def base_train_model(preset, *options):
    """(base_train's arguments, its model on the meta device) under `preset` and `options`, for a
    model of the preset's vocabulary."""
    import torch

    from nanochat.gpt import GPT
    from nanochat.stages import base_train

    args = parse_args(base_train.build_parser(), "base_train", ["--run", "/tmp/x", "--preset", preset, *options])
    vocab = presets.get(preset, "tok_train")["vocab_size"]
    with torch.device("meta"):
        return args, GPT(base_train.model_config(args, vocab))


def base_train_horizon(preset, *options):
    """The base_train horizon of `preset` (its total batch resolved when the preset leaves it to
    the depth)."""
    from nanochat.stages import base_train

    return base_train.training_horizon(*base_train_model(preset, *options))


def test_a_flops_target_is_the_steps_that_spend_it():
    """--target-flops F: F / (the model's FLOPs per token x the tokens of a step) steps, rounded."""
    _, model = base_train_model("d20", "--num-steps", "-1", "--target-flops", "1e19")
    horizon = base_train_horizon("d20", "--num-steps", "-1", "--target-flops", "1e19")
    assert horizon.num_steps == round(1e19 / (model.estimate_flops() * horizon.total_batch_size)) > 1
    assert horizon.num_steps != base_train_horizon("d20").num_steps  # not the preset's ratio


@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_batches_split_into_whole_passes(preset):
    base = presets.get(preset, "base_train")
    total_batch = base_train_horizon(preset).total_batch_size
    for world in PROCESSES[preset]:
        assert total_batch % (base["device_batch_size"] * base["max_seq_len"] * world) == 0
        for name in ("mid_train", "chat_sft"):
            cfg = presets.get(preset, name)
            row = (cfg["max_seq_len"] or base["max_seq_len"]) + 1
            assert cfg["total_batch_size"] % (cfg["device_batch_size"] * row * world) == 0, name
        assert presets.get(preset, "chat_rl")["examples_per_step"] % world == 0


def test_d24_is_upstreams_speedrun():
    """runs/speedrun.sh at 92d63d4 (depth 24, ratio 8, FP8, vocabulary 32,768), as scripts/base_train.py
    sizes it: 5,568 steps of 1,048,576 tokens, learning rates times sqrt(2), weight decay 0.28 scaled to
    0.0597; chat_sft as scripts/chat_sft.py runs after it."""
    horizon = base_train_horizon("d24")
    assert (horizon.total_batch_size, horizon.num_steps) == (2**20, 5568)
    assert horizon.lr_scale == pytest.approx(2**0.5) and horizon.weight_decay == pytest.approx(0.0597, abs=5e-5)
    base, sft = presets.get("d24", "base_train"), presets.get("d24", "chat_sft")
    assert (base["fp8"], base["param_data_ratio"], presets.get("d24", "tok_train")["vocab_size"]) == (True, 8.0, 32768)
    assert {k: sft[k] for k in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")} == \
        {k: base[k] for k in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")}  # inherited, unscaled
    assert (sft["init_lr_frac"], sft["warmdown_ratio"], sft["weight_decay"], sft["num_steps"]) == (0.8, 0.5, 0.0, -1)
    assert (sft["mmlu_weight"], sft["gsm8k_weight"], sft["smoltalk_weight"]) == (3, 4, 1)
    assert presets.get("d24", "download")["mmlu_train"]  # the file the mixture's MMLU reads


@pytest.mark.parametrize("preset", sorted(presets.GPU_PRESETS))
def test_gpu_chat_sft_inherits_pretrainings_batch(preset):
    """As upstream's chat_sft: the device batch and the total batch of pretraining (automatic at the
    depth), the rows one token longer (T + 1), so the same passes and accumulation."""
    base, sft = presets.get(preset, "base_train"), presets.get(preset, "chat_sft")
    batch = base_train_horizon(preset).total_batch_size
    assert sft["device_batch_size"] == base["device_batch_size"]
    assert sft["total_batch_size"] == batch // base["max_seq_len"] * (base["max_seq_len"] + 1)


@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_every_default_is_an_option(preset):
    for stage_name in presets.PRESETS[preset]:
        module = importlib.import_module(f"nanochat.stages.{stage_name}")
        options = {a.dest for a in module.build_parser()._actions}
        assert set(presets.get(preset, stage_name)) <= options, stage_name


def test_parse_args_takes_preset_defaults_and_overrides():
    from nanochat.stages import base_train

    args = parse_args(base_train.build_parser(), "base_train", ["--run", "/tmp/x", "--preset", "tiny", "--num-steps", "3"])
    assert (args.num_steps, args.depth, args.run) == (3, presets.get("tiny", "base_train")["depth"], "file:///tmp/x")


@pytest.mark.parametrize("preset", sorted(presets.GPU_PRESETS))
def test_gpu_presets_compile_the_fixed_shape_stages(preset):
    """As upstream: pretraining rows and packed conversation rows have one shape, so those stages
    compile on GPU presets; rows padded per batch (a compile per length) never do, nor do the CPU
    presets."""
    for name in ("base_train", "mid_train", "chat_sft"):
        assert presets.get(preset, name)["compile"], name
    for p in presets.PRESETS:
        for name in ("mid_train", "chat_sft"):
            assert not (presets.get(p, name).get("compile") and presets.get(p, name).get("rows") == "pad"), (p, name)
    assert not any(presets.get(p, s).get("compile") for p in ("tiny", "cpu") for s in ("base_train", "mid_train", "chat_sft"))


@pytest.mark.parametrize("preset", sorted(presets.GPU_PRESETS))
def test_gpu_batches_fit_smaller_gpus_and_still_split_into_whole_passes(preset):
    """A GPU preset's device batch on a 40 GB and a 24 GB GPU: halved to fit, and the total batch
    still splits into whole passes on 8 GPUs; an explicit value and an 80 GB GPU keep theirs."""
    for name in ("base_train", "mid_train"):
        cfg, base = presets.get(preset, name), presets.get(preset, "base_train")
        row = cfg.get("max_seq_len") or base["max_seq_len"] + (name == "mid_train")
        sized = cfg["device_batch_size"]
        assert training_options.fit_device_batch(preset, name, sized, 85.0e9) == sized  # an H100's 79 GiB
        for gb, at_most in ((42.5e9, sized // 2), (25.4e9, sized // 4)):
            fitted = training_options.fit_device_batch(preset, name, sized, gb)
            total_batch = base_train_horizon(preset).total_batch_size if name == "base_train" else cfg["total_batch_size"]
            assert 1 <= fitted <= at_most and total_batch % (fitted * row * 8) == 0
        assert training_options.fit_device_batch(preset, name, sized + 1, 25.4e9) == sized + 1


@pytest.mark.parametrize("preset", sorted(presets.GPU_PRESETS))
def test_every_training_stage_of_a_gpu_preset_gets_a_device_batch_on_a_small_gpu(preset):
    """Each training stage's device batch as Training sets it on a 24 GB GPU: what its preset sizes
    halved to fit, or the stage's own choice where the preset sizes none (chat_rl's rollouts)."""
    for name in ("base_train", "mid_train", "chat_sft", "chat_rl"):
        sized = presets.get(preset, name).get("device_batch_size")
        fitted = training_options.fit_device_batch(preset, name, sized, 25.4e9)
        assert fitted is None if sized is None else 1 <= fitted <= sized, (name, sized, fitted)
    assert presets.get(preset, "chat_rl").get("device_batch_size") is None  # (the case above is real)


def test_a_gpu_too_small_for_one_row_is_refused_naming_the_memory():
    with pytest.raises(StageError, match=r"needs about 10 GB of GPU memory per row and this GPU has 5 GB"):
        training_options.fit_device_batch("d32", "base_train", 8, 5e9)
    assert training_options.fit_device_batch("tiny", "base_train", 4, 1e9) == 4  # CPU presets: as given


@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_every_stage_has_a_timeout_and_a_collective_timeout(preset):
    for row in pipeline.PIPELINE:
        assert presets.stage_timeout(preset, row.module) >= 600
    assert 10 <= presets.collective_timeout(preset) <= 1800  # under torch's 30-minute gloo default
    # as README says: 60 s on tiny, 15 min on the GPU presets; a d20 base_train gets 12 h
    if preset == "tiny" or preset.startswith("d"):
        assert presets.collective_timeout(preset) == (60 if preset == "tiny" else 15 * 60)
    if preset == "d20":
        assert presets.stage_timeout(preset, "base_train") == 12 * 3600


def test_a_stages_help_gives_each_options_value_under_each_preset_and_otherwise():
    """--help shows what a run would use: the presets' values of an option, and its own default where
    a preset leaves it (the 2026 chat_sft's learning-rate fraction, the seed no preset sets)."""
    p = importlib.import_module("nanochat.stages.chat_sft").build_parser()
    stage.show_preset_defaults(p, "chat_sft")
    text = " ".join(p.format_help().split())
    assert "[d20: 0.8, d24: 0.8, d26: 0.8, d32: 0.8, otherwise: 1.0]" in text
    assert "seed of the weights' init and of sampling [default: 42]" in text
