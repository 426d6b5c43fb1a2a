"""The presets are consistent: every training stage's batch splits into whole passes on the number
of processes the preset is meant for, and every stage's defaults are options it has."""

import importlib

import pytest

from nanochat import presets
from nanochat.stage import parse_args

PROCESSES = {"tiny": (1, 2), "cpu": (1, 2), "d20": (8,), "d26": (8,), "d32": (8,)}


@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_batches_split_into_whole_passes(preset):
    base = presets.get(preset, "base_train")
    for world in PROCESSES[preset]:
        assert base["total_batch_size"] % (base["device_batch_size"] * base["max_seq_len"] * world) == 0
        for name in ("mid_train", "chat_sft"):
            cfg = presets.get(preset, name)
            row = (cfg["max_seq_len"] or base["max_seq_len"]) + 1
            assert cfg["total_batch_size"] % (cfg["device_batch_size"] * row * world) == 0, name
        assert presets.get(preset, "chat_rl")["examples_per_step"] % world == 0


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


@pytest.mark.parametrize("preset", ["d20", "d26", "d32"])
def test_gpu_presets_compile_the_fixed_shape_stages(preset):
    """As upstream: pretraining and packed midtraining rows have one shape, so they compile; SFT
    rows are padded per batch (a compile per length) and stay eager, as do the CPU presets."""
    assert presets.get(preset, "base_train")["compile"] and presets.get(preset, "mid_train")["compile"]
    assert "compile" not in presets.get(preset, "chat_sft")
    assert not any(presets.get(p, s).get("compile") for p in ("tiny", "cpu") for s in ("base_train", "mid_train"))
