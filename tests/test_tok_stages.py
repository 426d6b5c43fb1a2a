"""tok_train and tok_eval run as real subprocesses on the tiny preset, per the stage contract."""

import json
import subprocess
import sys

from nanochat import storage
from nanochat.tokenizer import Tokenizer


def run_stage(name, *args, env=None):
    return subprocess.run([sys.executable, "-m", f"nanochat.stages.{name}", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_tok_train_then_eval(shared_data, tmp_path):
    run = str(tmp_path / "run")
    data = str(shared_data / "pretrain")
    train = run_stage("tok_train", "--run", run, "--preset", "tiny", "--max-chars", "2000000", "--data", data)
    assert train.returncode == 0, train.stderr
    summary = json.loads((tmp_path / "run" / "tok_train" / "stage.json").read_text())
    assert summary["config"]["vocab_size"] == 2048 and summary["config"]["max_chars"] == 2_000_000
    assert summary["metrics"]["chars"] >= 2_000_000 and summary["metrics"]["vocab_size"] == 2048
    for out in summary["outputs"].values():  # the recorded sha256 is the bytes on disk
        assert storage.sha256(out["uri"]) == out["sha256"]
    assert summary["code"]["source_sha256"]
    tok = Tokenizer.load(storage.normalize(str(tmp_path / "run" / "tok_train" / "tokenizer")))
    assert tok.vocab_size == 2048

    ev = run_stage("tok_eval", "--run", run, "--preset", "tiny", "--data", data)
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads((tmp_path / "run" / "tok_eval" / "stage.json").read_text())["metrics"]
    # a 2k-token BPE compresses English well past 1 byte/token, but not past ~5
    assert 2.5 < metrics["compression"]["validation"]["bytes_per_token"] < 5
    assert "| validation |" in metrics["table"]

    # a damaged stage.json is named by the stage that reads it
    summary_file = tmp_path / "run" / "tok_train" / "stage.json"
    kept = summary_file.read_text()
    summary_file.write_text("{}")
    damaged = run_stage("tok_eval", "--run", run, "--preset", "tiny", "--data", data)
    assert damaged.returncode == 1 and damaged.stderr.strip().splitlines()[-1] == (
        f"tok_eval: error: file://{summary_file}: not a stage summary (no 'outputs' object): run the stage again, or remove its folder")
    summary_file.write_text(kept)

    # once base_train trained on the tokenizer, another one is refused and the first one kept
    tokenizer_json = tmp_path / "run" / "tok_train" / "tokenizer" / "tokenizer.json"
    (tmp_path / "run" / "base_train").mkdir()
    base_summary = {"inputs": {"tokenizer": {"uri": f"file://{tokenizer_json}"}}, "outputs": {}}  # as base_train commits it
    (tmp_path / "run" / "base_train" / "stage.json").write_text(json.dumps(base_summary))
    before = tokenizer_json.read_bytes()
    other = run_stage("tok_train", "--run", run, "--preset", "tiny", "--max-chars", "2000000", "--data", data, "--vocab-size", "1024")
    assert other.returncode == 1 and "base_train trained on the tokenizer at" in other.stderr.strip().splitlines()[-1]
    assert tokenizer_json.read_bytes() == before
    again = run_stage("tok_train", "--run", run, "--preset", "tiny", "--max-chars", "2000000", "--data", data)
    assert again.returncode == 0, again.stderr  # the same text and settings: the same tokenizer
    assert tokenizer_json.read_bytes() == before


def test_bad_arguments_fail_before_work_with_one_line(tmp_path, shared_data):
    run = str(tmp_path / "run")
    small = run_stage("tok_train", "--run", run, "--preset", "tiny", "--vocab-size", "100", "--data", str(shared_data / "pretrain"))
    assert small.returncode == 1 and "--vocab-size 100 is too small" in small.stderr.strip().splitlines()[-1]
    nodata = run_stage("tok_train", "--run", run, "--preset", "tiny", "--data", str(tmp_path / "nothing"))
    assert nodata.returncode == 1 and "no shard_NNNNN.parquet files" in nodata.stderr.strip().splitlines()[-1]
    early = run_stage("tok_eval", "--run", run, "--preset", "tiny")
    assert early.returncode == 1 and "'tok_train' has not completed" in early.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "tok_train" / "stage.json").exists()
    unknown = run_stage("tok_train", "--run", run, "--preset", "huge")
    assert unknown.returncode == 2 and "invalid choice: 'huge'" in unknown.stderr
