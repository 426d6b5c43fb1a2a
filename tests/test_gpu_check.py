"""bench/gpu_check.py where no GPU is: without CUDA it says so and does nothing; with --device cpu it
runs the checks a CPU can (the same processes, prerequisites, deadline and output a GPU run has)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def gpu_check(tmp_path, *options, hide_gpu=False):
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), **({"CUDA_VISIBLE_DEVICES": ""} if hide_gpu else {})}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, "bench/gpu_check.py", *options], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_without_cuda_it_exits_at_once_saying_why(tmp_path):
    done = gpu_check(tmp_path, hide_gpu=True)
    assert done.returncode == 1, done.stderr
    assert "gpu_check: no CUDA device here" in done.stderr and "nothing was run" in done.stderr
    assert done.stdout == "" and list((tmp_path / "tmp").iterdir()) == []  # no table, no JSON line, no work directory


def test_on_a_cpu_a_check_runs_with_what_it_needs_and_reports_each_as_it_ends(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = gpu_check(tmp_path, "--device", "cpu", "--only", "serve", "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert summary == json.loads(done.stdout) and summary["checks"] == rows
    # serve needs bf16's model, which needs prep's shards and tokenizer
    assert [(r["key"], r["result"]) for r in rows] == [("prep", "pass"), ("bf16", "pass"), ("serve", "pass")]
    bf16 = rows[1]["figures"]
    assert bf16["dtype"] == "bfloat16" and bf16["final_loss"] < bf16["first_loss"] and bf16["tok_per_s"] > 0
    assert rows[2]["figures"]["completion_tokens"] > 0
    table = done.stderr.splitlines()
    assert table[0].split() == ["check", "result", "seconds", "figures"]
    assert [line.split()[0] for line in table[1:]] == ["shards", "base_train", "nanochat"]
    assert list((tmp_path / "tmp").glob("nanochat-gpu-check-*")) == []  # the work directory (checkpoints) is gone


def test_checks_the_deadline_leaves_out_are_named_for_a_second_run(tmp_path):
    done = gpu_check(tmp_path, "--device", "cpu", "--only", "engine", "flash", "--deadline", "0")
    assert done.returncode == 1
    rows = {r["key"]: r for r in json.loads(done.stdout)["checks"]}
    assert rows["engine"]["result"] == "not run" and "of the deadline left" in rows["engine"]["why"]
    assert rows["flash"]["result"] == "skip" and rows["flash"]["why"] == "needs CUDA"
    assert done.stderr.splitlines()[-1].endswith("again: bench/gpu_check.py --only engine")
