"""A stage given input it cannot use ends with one line naming it, never a traceback: a run or
storage of no known scheme, or a number out of its range (usage errors, exit 2), a checkpoint,
tokenizer, shard folder or data mirror that is not there or cannot be read (exit 1). Each stage
process is real; none gets as far as training."""

import os
import subprocess
import sys

import pytest

from nanochat import training_options
from nanochat.export import ExportError, export
from nanochat.stage import StageError


def run_stage(tmp_path, stage, *options, **env):
    """The stage's process on run "run" of the tiny preset in storage tmp_path (a later --run wins)."""
    argv = [sys.executable, "-m", f"nanochat.stages.{stage}", "--run", "run", "--preset", "tiny", *options]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "NANOCHAT_STORAGE": str(tmp_path), **env})


@pytest.mark.parametrize("stage, options, code, line", [
    ("tok_train", ["--storage", "bogus://foo"], 2,
     "python -m nanochat.stages.tok_train: error: bogus://foo: unsupported storage scheme 'bogus'"),
    ("tok_train", ["--run", ""], 2, "python -m nanochat.stages.tok_train: error: invalid run name ''"),
    ("tok_eval", ["--tokenizer", "/nonexistent"], 1, "tok_eval: error: no tokenizer at /nonexistent (tokenizer.json missing)"),
    ("base_eval", ["--checkpoint", "/nonexistent"], 1, "base_eval: error: /nonexistent: no manifest.json (an incomplete checkpoint)"),
    ("tok_train", ["--data", "/nonexistent/dir"], 1, "tok_train: error: "),
    ("download", ["--data-mirror", "bogus://x"], 1, "download: error: data mirror bogus://x: unsupported storage scheme 'bogus'"),
    ("mid_train", ["--identity", "/nonexistent.jsonl"], 1, "mid_train: error: --identity /nonexistent.jsonl: no such file"),
])
def test_input_a_stage_cannot_use_is_one_line(tmp_path, shared_data, stage, options, code, line):
    done = run_stage(tmp_path, stage, *options, NANOCHAT_DATA_MIRROR=str(shared_data))
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == code and last.startswith(line), done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("stage, option, value, expected", [
    ("tok_train", "--max-chars", "-1", "an integer from 1 up"),
    ("tok_train", "--doc-cap", "0", "an integer from 1 up"),
    ("tok_eval", "--max-docs", "-3", "an integer from 1 up"),
    ("base_eval", "--eval-tokens", "-5", "an integer from 1 up"),
    ("base_eval", "--max-per-task", "0", "-1 or an integer from 1 up"),
    ("chat_eval", "--batch-size", "0", "an integer from 1 up"),
    ("chat_eval", "--temperature", "-1", "a number from 0 up"),
    ("chat_rl", "--num-samples", "0", "an integer from 1 up"),
    ("chat_sft", "--init-lr-frac", "-1", "a number from 0 up"),
    ("chat_sft", "--spelling-size", "-5", "an integer from 0 up"),
    ("mid_train", "--chatcore-every", "0", "-1 or an integer from 1 up"),
    ("mid_train", "--identity-weight", "-1", "a number from 0 up"),
])
def test_a_number_out_of_range_is_a_usage_error_naming_the_option(tmp_path, stage, option, value, expected):
    """Refused as the options are read (exit 2), before anything runs: values that would train on
    nothing, divide by zero or crash later (a zero batch, a negative count or rate)."""
    done = run_stage(tmp_path, stage, *(["--source", "sft"] if stage == "chat_eval" else []), f"{option}={value}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: argument {option}: {value}: expected {expected}" in done.stderr, done.stderr[-500:]


def test_a_total_batch_of_zero_is_refused():
    with pytest.raises(StageError, match=r"^--total-batch-size 0 is not a positive multiple of device batch"):
        training_options.grad_accum(0, 4, 64, 1)


def test_export_to_a_uri_of_no_known_scheme_is_refused_before_anything_is_read(tmp_path):
    """export() refuses it itself (the command prints the one line), before looking for the run."""
    with pytest.raises(ExportError, match=r"^--to bogus://x: unsupported storage scheme 'bogus'"):
        export(str(tmp_path / "no-such-run"), "bogus://x")
