"""base_train under real torchrun (2 processes, gloo): training, exact resume after kill -9, and
errors before any work."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import psutil
import pytest

from nanochat import storage
from nanochat.checkpoint import list_steps, load, step_dir

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


@pytest.fixture(scope="module")
def tokenizer_run(shared_data, tmp_path_factory):
    """A run directory holding a trained tiny tokenizer (tok_train done)."""
    run = tmp_path_factory.mktemp("tok") / "run"
    subprocess.run([sys.executable, "-m", "nanochat.stages.tok_train", "--run", str(run), "--preset", "tiny",
                    "--data", str(shared_data / "pretrain")], check=True, capture_output=True)
    return run


@pytest.fixture
def run(tokenizer_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tokenizer_run, run)
    return run


def base_train(run, shared_data, nproc=2, *options, check=True, fault=None):
    """Runs the stage to its end; with `fault` (a NANOCHAT_FAULT spec), starts it in the background
    and returns the Popen."""
    # `--` ends torchrun's options: its parser would take `--run` for an abbreviation of `--run-path`.
    cmd = [*TORCHRUN, str(nproc), "-m", "nanochat.stages.base_train", "--", "--run", str(run), "--preset", "tiny",
           "--data", str(shared_data / "pretrain"), "--deterministic", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env["NANOCHAT_FAULT"] = fault
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"base_train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def final_weights_sha(run):
    summary = json.loads((run / "base_train" / "stage.json").read_text())
    manifest = json.loads(open(summary["outputs"]["checkpoint"]["uri"].removeprefix("file://")).read())
    return manifest["files"]["model.safetensors"]["sha256"], summary


@pytest.fixture(scope="module")
def trained(tokenizer_run, shared_data, tmp_path_factory):
    """A finished 2-process deterministic tiny run."""
    run = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(tokenizer_run, run)
    base_train(run, shared_data)
    return run


def test_trains_and_resumes_bit_identical_after_kill_9(trained, run, shared_data):
    reference = trained
    reference_sha, summary = final_weights_sha(reference)
    metrics = [json.loads(line) for line in (reference / "base_train" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == summary["metrics"]["steps"] == 20
    assert losses[-1] < losses[0] - 1.0  # it learns
    assert summary["metrics"]["val_bpb"] < 4.0
    assert summary["metrics"]["world_size"] == 2
    for output in summary["outputs"].values():  # nothing changes after stage.json records it
        assert storage.sha256(output["uri"]) == output["sha256"], output["uri"]

    # Same command, killed with SIGKILL (the whole process group) while it hangs right after the
    # checkpoint of step 10, then started again: it resumes from step 10.
    proc = base_train(run, shared_data, fault="base_train:10:hang")
    ckpts = storage.normalize(str(run / "base_train" / "checkpoints"))
    deadline = time.time() + 300
    while not (storage.exists(ckpts) and (10, True) in list_steps(ckpts)):
        assert proc.poll() is None and time.time() < deadline, "the faulty run did not reach its checkpoint"
        time.sleep(0.5)
    time.sleep(1)
    # torchrun starts each worker in a session of its own: kill the whole tree, as a crash would.
    tree = psutil.Process(proc.pid)
    procs = [tree, *tree.children(recursive=True)]
    assert len(procs) >= 3  # torchrun and its 2 workers
    for p in procs:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    assert not psutil.wait_procs(procs, timeout=30)[1]
    assert not (run / "base_train" / "stage.json").exists()

    resumed = base_train(run, shared_data)
    assert "resumed at step 10" in resumed.stderr
    resumed_sha, _ = final_weights_sha(run)
    assert resumed_sha == reference_sha
    resumed_metrics = [json.loads(line) for line in (run / "base_train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed_metrics if "loss" in m] == list(range(1, 21))  # no step counted twice
    # The kept checkpoints verify and carry each rank's loader position.
    _, _, meta = load(step_dir(ckpts, 20), load_optimizer=False)
    assert len(meta["loader_states"]) == 2


@pytest.fixture(scope="module")
def bundle(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    with zipfile.ZipFile(shared_data / "eval_bundle.zip") as z:
        z.extractall(root)
    return root / "eval_bundle"


def test_periodic_core_and_resume_with_another_world_size_is_refused(run, shared_data, bundle):
    base_train(run, shared_data, 2, "--num-steps", "2", "--checkpoint-every", "1", "--core-every", "1",
               "--core-max-per-task", "1", "--eval-bundle", str(bundle))
    records = [json.loads(line) for line in (run / "base_train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "core" in r] == [1]
    (run / "base_train" / "stage.json").unlink()
    done = base_train(run, shared_data, 1, "--num-steps", "4", check=False)
    assert done.returncode != 0
    assert "resume it with --nproc_per_node 2" in done.stderr


def test_bad_batch_size_fails_before_work(run, shared_data):
    done = base_train(run, shared_data, 1, "--total-batch-size", "1000", check=False)
    assert done.returncode == 1
    assert "--total-batch-size 1000 is not a multiple of" in done.stderr
    assert not (run / "base_train" / "checkpoints").exists()


def test_needs_the_tokenizer(shared_data, tmp_path):
    done = base_train(tmp_path / "empty", shared_data, 1, check=False)
    assert done.returncode == 1
    assert "stage 'tok_train' has not completed" in done.stderr


def test_base_eval(trained, shared_data, bundle):
    cmd = [*TORCHRUN, "2", "-m", "nanochat.stages.base_eval", "--", "--run", str(trained), "--preset", "tiny",
           "--data", str(shared_data / "pretrain"), "--eval-bundle", str(bundle), "--max-per-task", "3"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((trained / "base_eval" / "stage.json").read_text())["metrics"]
    train_bpb = json.loads((trained / "base_train" / "stage.json").read_text())["metrics"]["val_bpb"]
    assert abs(metrics["val_bpb"] - train_bpb) < 0.2 * train_bpb
    assert metrics["val_bpb"] < metrics["unigram_val_bpb"] < 8  # it learned more than token frequencies
    tasks = metrics["core_tasks"]
    assert len(tasks) == 18 and sorted(metrics["core_tasks_absent"]) == ["coqa", "hellaswag", "hellaswag_zeroshot", "squad"]
    assert all(t["examples"] == 3 and t["accuracy"] in (0, 1 / 3, 2 / 3, 1) for t in tasks.values())
    assert metrics["core"] == pytest.approx(sum(t["centered"] for t in tasks.values()) / 18)


def test_missing_eval_bundle_fails_before_training(run, shared_data, tmp_path):
    done = base_train(run, shared_data, 1, "--core-every", "5", "--eval-bundle", str(tmp_path / "nowhere"), check=False)
    assert done.returncode == 1 and "eval bundle" in done.stderr and "core.yaml" in done.stderr
    assert not (run / "base_train" / "checkpoints").exists()
