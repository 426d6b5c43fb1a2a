"""A stage given input it cannot use ends with one line naming it, never a traceback: a run or
storage of no known scheme (a usage error, exit 2), a checkpoint, tokenizer, shard folder or data
mirror that is not there or cannot be read (exit 1). Each stage process is real; none gets as far
as training."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("stage, options, code, line", [
    ("tok_train", ["--storage", "bogus://foo"], 2,
     "python -m nanochat.stages.tok_train: error: bogus://foo: unsupported storage scheme 'bogus'"),
    ("tok_train", ["--run", ""], 2, "python -m nanochat.stages.tok_train: error: invalid run name ''"),
    ("tok_eval", ["--tokenizer", "/nonexistent"], 1, "tok_eval: error: no tokenizer at /nonexistent (tokenizer.json missing)"),
    ("base_eval", ["--checkpoint", "/nonexistent"], 1, "base_eval: error: /nonexistent: no manifest.json (an incomplete checkpoint)"),
    ("tok_train", ["--data", "/nonexistent/dir"], 1, "tok_train: error: "),
    ("download", ["--data-mirror", "bogus://x"], 1, "download: error: data mirror bogus://x: unsupported storage scheme 'bogus'"),
])
def test_input_a_stage_cannot_use_is_one_line(tmp_path, shared_data, stage, options, code, line):
    argv = ["--run", "run", "--preset", "tiny", *options]  # a later --run wins
    env = {**os.environ, "NANOCHAT_STORAGE": str(tmp_path), "NANOCHAT_DATA_MIRROR": str(shared_data)}
    done = subprocess.run([sys.executable, "-m", f"nanochat.stages.{stage}", *argv], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == code and last.startswith(line), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
