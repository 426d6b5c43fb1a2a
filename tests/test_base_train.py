"""base_train under real torchrun (2 processes, gloo): training, exact resume after kill -9, and
errors before any work; a checkpoint written by the code before the 2026 recipe resumes."""

import filecmp
import json
import os
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import torch

from nanochat import presets, storage
from nanochat import stage as contract
from nanochat.checkpoint import load, step_dir
from nanochat.common import measure_matmul_flops
from nanochat.optim import lr_multiplier, muon_momentum, polar_dtype, weight_decay_multiplier
from nanochat.stages import base_train as base_train_stage
from tests.support.resume import TIMES, assert_same_final_checkpoint, edit_meta, final_checkpoint, kill_after_checkpoint
from tests.support.stagerun import missing, stage

REPO = Path(__file__).resolve().parent.parent  # the checkout under test
BEFORE_THE_2026_RECIPE = "e4680cd"  # the last commit before issue 20: the classic model, AdamW state whole on every rank


@pytest.fixture
def run(tiny_tokenizer_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_tokenizer_run, run)
    return run


def base_train(run, shared_data, nproc=2, *options, check=True, fault=None, cwd=None):
    """Runs the stage, deterministic, to its end; with `fault` (a NANOCHAT_FAULT spec), in the
    background, returning the process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"NANOCHAT_FAULT": fault} if fault else {})}
    return stage("nanochat.stages.base_train", run, env, "--data", str(shared_data / "pretrain"), "--deterministic",
                 *options, nproc=nproc, check=check, background=bool(fault), cwd=cwd)


@pytest.fixture(scope="module")
def trained(tiny_tokenizer_run, shared_data, tmp_path_factory):
    """A finished 2-process deterministic tiny run."""
    run = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(tiny_tokenizer_run, run)
    base_train(run, shared_data)
    return run


def test_trains_and_resumes_bit_identical_after_kill_9(trained, run, shared_data):
    reference = trained
    summary = json.loads((reference / "base_train" / "stage.json").read_text())
    metrics = [json.loads(line) for line in (reference / "base_train" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == summary["metrics"]["steps"] == 20
    # it learns: 7.6 -> 6.0 and 2.91 bits per byte, trained in bf16 (CPUs with AMX or AVX512-BF16) or in fp32
    assert losses[-1] < losses[0] - 1.0
    assert summary["metrics"]["val_bpb"] < 4.0
    validations = [m["val_bpb"] for m in metrics if "val_bpb" in m]  # steps 0, 10, 20: no spike (backout at depth 2 made one)
    assert len(validations) == 3 and validations == sorted(validations, reverse=True), validations
    assert summary["metrics"]["world_size"] == 2
    # every pretraining target is a real token: a step trains on all total-batch-size of them
    batch = presets.get("tiny", "base_train")["total_batch_size"]
    assert {m["tokens"] for m in metrics if "loss" in m} == {batch}
    assert summary["metrics"]["tokens"] == 20 * batch
    for output in summary["outputs"].values():  # nothing changes after stage.json records it
        assert storage.sha256(output["uri"]) == output["sha256"], output["uri"]

    # Same command, killed with SIGKILL (the whole process tree) while it hangs right after the
    # checkpoint of step 10, then started again: it resumes from step 10 to the same final state.
    ckpts = run / "base_train" / "checkpoints"
    kill_after_checkpoint(base_train(run, shared_data, fault="base_train:10:hang"), ckpts, 10)
    assert not (run / "base_train" / "stage.json").exists()
    resumed = base_train(run, shared_data)
    assert "resumed at step 10" in resumed.stderr
    assert_same_final_checkpoint(run, reference, "base_train")
    # the stage's wall time is this attempt's plus the killed one's up to its checkpoint (the report's cost)
    _, _, killed = load(step_dir(storage.normalize(str(ckpts)), 10), load_optimizer=False)
    resumed_summary = json.loads((run / "base_train" / "stage.json").read_text())
    this_attempt = (datetime.fromisoformat(resumed_summary["finished_at"]) - datetime.fromisoformat(resumed_summary["started_at"]))
    assert killed["wall_time_s"] > 1 and resumed_summary["wall_time_s"] - this_attempt.total_seconds() == pytest.approx(
        killed["wall_time_s"], abs=0.01)
    resumed_metrics = [json.loads(line) for line in (run / "base_train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed_metrics if "loss" in m] == list(range(1, 21))  # no step counted twice
    assert [m["loss"] for m in resumed_metrics if "loss" in m] == losses
    assert json.loads((run / "base_train" / "stage.json").read_text())["metrics"]["tokens"] == 20 * batch
    # The kept checkpoints verify and carry each rank's loader position.
    _, _, meta = load(step_dir(storage.normalize(str(ckpts)), 20), load_optimizer=False)
    assert len(meta["loader_states"]) == 2



def test_the_presets_schedules_drive_the_optimizer(trained):
    """The tiny preset's schedules (upstream's 2026 ones), as nanochat.optim defines them, are what the
    run trained with: each step's LR multiplier (metrics.jsonl), and the Muon groups' momentum and
    weight decay as the last step set them (the final checkpoint's optimizer state)."""
    options = presets.get("tiny", "base_train")
    metrics = [json.loads(line) for line in (trained / "base_train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr_multiplier"] for m in metrics if "loss" in m] == [
        lr_multiplier(step, 20, options["warmup_steps"], options["warmdown_ratio"], options["final_lr_frac"]) for step in range(20)]
    _, optimizer, _ = load(step_dir(storage.normalize(str(trained / "base_train" / "checkpoints")), 20))
    muon = [group for group in optimizer["param_groups"] if group["kind"] == "muon"]
    momentum = muon_momentum(19, 20, options["momentum_schedule"], options["warmdown_ratio"])
    decay = weight_decay_multiplier(19, 20, options["weight_decay_schedule"])
    assert muon and momentum != 0.97 and decay < 0.01  # in the warm-down, near the cosine's end
    for group in muon:
        assert group["momentum"] == momentum and group["weight_decay"] == pytest.approx(group["initial_weight_decay"] * decay)

def test_a_checkpoint_from_before_the_running_totals_resumes(trained, run, shared_data):
    """A checkpoint saved before meta.json kept the running totals (commit 24ea7e6 and earlier)
    resumes to the same state; the log says the totals count from the resumed step, and they do."""
    shutil.rmtree(run / "base_train", ignore_errors=True)
    shutil.copytree(trained / "base_train" / "checkpoints" / "step_000010", run / "base_train" / "checkpoints" / "step_000010")
    edit_meta(run / "base_train" / "checkpoints" / "step_000010",
              lambda meta: [meta.pop(key) for key in ("tokens", "train_time_s", "batch_time_s")])

    resumed = base_train(run, shared_data)
    assert "resumed at step 10" in resumed.stderr and "the totals count from step 10" in resumed.stderr
    assert_same_final_checkpoint(run, trained, "base_train", meta_apart=(*TIMES, "tokens"))
    summary = json.loads((run / "base_train" / "stage.json").read_text())
    assert summary["metrics"]["tokens"] == 10 * presets.get("tiny", "base_train")["total_batch_size"]


@pytest.fixture
def checkout_before_the_2026_recipe(tmp_path):
    """A worktree of this repository at BEFORE_THE_2026_RECIPE, using this checkout's built tokenizer.
    Its Muon iterated in bf16 on every CPU; today's does on a CPU without bf16 units in fp32
    (optim.polar_dtype), and so does the old code here, the one line changed."""
    tree = tmp_path / "before"
    added = subprocess.run(["git", "worktree", "add", "--detach", str(tree), BEFORE_THE_2026_RECIPE], cwd=REPO,
                           capture_output=True, text=True)
    if added.returncode != 0:
        missing(f"no commit {BEFORE_THE_2026_RECIPE} to check out (a shallow clone?): {added.stderr.strip()}")
    (tree / "rustbpe" / "_native").symlink_to(REPO / "rustbpe" / "_native")
    if polar_dtype(torch.device("cpu")) == torch.float32:
        optim = tree / "nanochat" / "optim.py"
        source = optim.read_text()
        assert source.count("X = G.bfloat16()") == 1
        optim.write_text(source.replace("X = G.bfloat16()", "X = G.float()"))
    yield tree
    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)


def test_a_checkpoint_from_before_the_2026_recipe_resumes_as_classic(run, shared_data, tmp_path,
                                                                       checkout_before_the_2026_recipe):
    """A step-10 checkpoint of the code before the 2026 recipe (2 processes, each saving the whole
    AdamW state; a model config and optimizer groups without the new fields) resumes under today's
    code with the classic options to the same weights as the old code's own 20 steps."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    base_train(old, shared_data, cwd=checkout_before_the_2026_recipe)  # its tiny preset: the classic recipe
    shutil.copytree(old / "base_train" / "checkpoints" / "step_000010", run / "base_train" / "checkpoints" / "step_000010")
    classic = {k: v for group in ("model", "optimizer", "schedules") for k, v in presets.RECIPE_GROUPS[group][0].items()}
    resumed = base_train(run, shared_data, 2, *presets.flags(classic))
    assert "resumed at step 10" in resumed.stderr
    weights = [final_checkpoint(r, "base_train") / "model.safetensors" for r in (run, old)]
    assert filecmp.cmp(*weights, shallow=False), "the resumed weights differ from the old code's"  # (== on the bytes: a diff for minutes)


def test_fp16_trains_with_a_loss_scaler_whose_state_resumes(run, shared_data, tmp_path):
    """--dtype float16 (what GPUs without bf16 get by default) scales the loss, and its scaler's state
    is checkpointed and resumed: a step-2 checkpoint whose scale is set to 8 resumes at scale 8."""
    # a quarter of the tiny preset's batch and its validation tokens: fp16 without fp16 units multiplies slowly
    options = ("--dtype", "float16", "--num-steps", "4", "--checkpoint-every", "2", "--eval-every", "-1",
               "--device-batch-size", "2", "--total-batch-size", "256", "--eval-tokens", "1024")
    reference = tmp_path / "reference"
    shutil.copytree(run, reference)
    base_train(reference, shared_data, 1, *options)
    assert json.loads((reference / "base_train" / "stage.json").read_text())["metrics"]["dtype"] == "float16"
    scaler = final_meta(reference)["grad_scaler"]
    assert scaler["scale"] >= 2**10 and scaler["_growth_tracker"] >= 1  # the loss was scaled; steps counted

    step2 = run / "base_train" / "checkpoints" / "step_000002"
    shutil.copytree(reference / "base_train" / "checkpoints" / "step_000002", step2)
    edit_meta(step2, lambda meta: meta["grad_scaler"].update(scale=8.0))
    assert "resumed at step 2" in base_train(run, shared_data, 1, *options).stderr
    assert final_meta(run)["grad_scaler"]["scale"] == 8.0  # no overflow at a scale this small


def final_meta(run):
    return json.loads((final_checkpoint(run, "base_train") / "meta.json").read_text())


def test_periodic_core_and_resume_with_another_model_or_world_size_is_refused(run, shared_data, eval_bundle):
    base_train(run, shared_data, 2, "--num-steps", "2", "--checkpoint-every", "1", "--core-every", "1",
               "--core-max-per-task", "1", "--eval-bundle", str(eval_bundle))
    records = [json.loads(line) for line in (run / "base_train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "core" in r] == [1]
    (run / "base_train" / "stage.json").unlink()
    # (in this process: the stage's error line is the StageError's message)
    argv = ["--run", str(run), "--preset", "tiny", "--data", str(shared_data / "pretrain"), "--depth", "1"]
    with pytest.raises(contract.StageError, match=r"is of another model \(n_embd: 128 in the checkpoint, 64 now; "
                       r"n_head: 2 in the checkpoint, 1 now; n_layer: 2 in the checkpoint, 1 now\); use another run"):
        base_train_stage.main(contract.parse_args(base_train_stage.build_parser(), "base_train", argv))
    done = base_train(run, shared_data, 1, "--num-steps", "4", check=False)
    assert done.returncode != 0
    assert "resume it with --nproc_per_node 2" in done.stderr


def test_a_finished_stage_run_again_by_hand_with_other_options_is_refused(tiny_base_run, shared_data, tmp_path):
    """It would resume checkpoints trained under the old options (its final one: train no step) and
    record the new ones as its own (the flow clears such a folder itself; a stage run by hand names the
    options instead); more --num-steps alone trains on."""
    run = tmp_path / "run"
    shutil.copytree(tiny_base_run, run)
    summary = run / "base_train" / "stage.json"
    before = json.loads(summary.read_text())
    argv = ["--run", str(run), "--preset", "tiny", "--data", str(shared_data / "pretrain"), "--num-steps", "6", "--eval-every", "-1"]

    def base_train_again(*options):
        return base_train_stage.main(contract.parse_args(base_train_stage.build_parser(), "base_train", [*argv, *options]))

    with pytest.raises(contract.StageError, match=rf"^base_train is done in file://{run} \(step 6\) with other options \(matrix_lr: "
                                                  r"\S+ then, 0.05 now\): its checkpoints hold that work, not this; use another run"):
        base_train_again("--matrix-lr", "0.05")
    with pytest.raises(contract.StageError, match=r"with other options \(matrix_lr: \S+ then, 0.05 now\)"):
        base_train_again("--matrix-lr", "0.05", "--num-steps", "8")  # more steps, but under other options
    assert json.loads(summary.read_text()) == before
    # the same work (a stage.json of older code: an option it lacked, one since removed), committed
    # again, as the flow does after a code change
    older = {k: v for k, v in before["config"].items() if k != "smear"}
    summary.write_text(json.dumps({**before, "config": {**older, "an_option_since_removed": 1}}))
    base_train_again()
    assert json.loads(summary.read_text())["config"] == before["config"]
    # other options of how it runs, not what it trains (a smaller GPU fits another device batch): the same work
    base_train_again("--device-batch-size", "1", "--dtype", "float32", "--keep-last", "1", "--sample-every", "-1")
    assert json.loads(summary.read_text())["config"]["device_batch_size"] == 1
    base_train_again("--num-steps", "8")  # more steps: it trains on to them
    assert json.loads(summary.read_text())["metrics"]["steps"] == 8


def refusal(run, shared_data, *options):
    """The StageError base_train stops with on `options`, before any checkpoint. It runs in this
    process: what a StageError becomes (exit status 1, one `<stage>: error:` line) is the stage
    contract's, held by other stages' tests (e.g. tests/test_data_inputs.py)."""
    argv = ["--run", str(run), "--preset", "tiny", "--data", str(shared_data / "pretrain"), *options]
    with pytest.raises(contract.StageError) as refused:
        base_train_stage.main(contract.parse_args(base_train_stage.build_parser(), "base_train", argv))
    assert not (run / "base_train" / "checkpoints").exists()
    return str(refused.value)


def test_bad_batch_size_fails_before_work(run, shared_data):
    assert "--total-batch-size 1000 is not a positive multiple of" in refusal(run, shared_data, "--total-batch-size", "1000")


def test_backout_at_depth_2_is_refused(run, shared_data):
    """At depth 2 the middle layer is the last: backout would only scale its output before the final
    norm, and flip its sign when backout_lambda passes 1 (GPTConfig.backout_layer)."""
    message = refusal(run, shared_data, "--backout")
    assert message.startswith("--backout needs depth 3 or more: at depth 2 ") and message.endswith("; use --no-backout")


def multiplies(fn):
    with torch.profiler.profile() as profile:
        result = fn()
    return result, sum(event.count for event in profile.key_averages() if event.key == "aten::mm")


@pytest.mark.parametrize("seconds", [0.0, 0.05])
def test_peak_flops_take_one_multiply_when_it_outlasts_the_measurement(seconds):
    """MFU's peak on a CPU: a multiply slower than the measurement's `seconds` (fp16 without fp16 units
    takes seconds, at every stage start) is the measurement, not a warm-up before more."""
    flops, count = multiplies(lambda: measure_matmul_flops(torch.device("cpu"), torch.float32, n=64, seconds=seconds))
    assert flops > 0
    assert count == 1 if seconds == 0.0 else count > 2


def test_needs_the_tokenizer(shared_data, tmp_path):
    assert "stage 'tok_train' has not completed" in refusal(tmp_path / "empty", shared_data)


def test_base_eval(trained, shared_data, eval_bundle):
    stage("nanochat.stages.base_eval", trained, {**os.environ, "OMP_NUM_THREADS": "1"}, "--data", str(shared_data / "pretrain"),
          "--eval-bundle", str(eval_bundle), "--max-per-task", "3", nproc=2)
    metrics = json.loads((trained / "base_eval" / "stage.json").read_text())["metrics"]
    train_bpb = json.loads((trained / "base_train" / "stage.json").read_text())["metrics"]["val_bpb"]
    assert abs(metrics["val_bpb"] - train_bpb) < 0.2 * train_bpb
    assert metrics["val_bpb"] < metrics["unigram_val_bpb"] < 8  # it learned more than token frequencies
    tasks = metrics["core_tasks"]
    assert len(tasks) == 18 and sorted(metrics["core_tasks_absent"]) == ["coqa", "hellaswag", "hellaswag_zeroshot", "squad"]
    assert all(t["examples"] == 3 and t["accuracy"] in (0, 1 / 3, 2 / 3, 1) for t in tasks.values())
    assert metrics["core"] == pytest.approx(sum(t["centered"] for t in tasks.values()) / 18)


def test_missing_eval_bundle_fails_before_training(run, shared_data, tmp_path):
    message = refusal(run, shared_data, "--core-every", "5", "--eval-bundle", str(tmp_path / "nowhere"))
    assert "eval bundle" in message and "core.yaml" in message


def test_wandb_offline_logs_without_a_network(run, shared_data, tmp_path):
    env = {**os.environ, "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    stage("nanochat.stages.base_train", run, env, "--data", str(shared_data / "pretrain"), "--num-steps", "2",
          "--eval-every", "-1", "--wandb", "offline")
    logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    assert b"lr_multiplier" in logs[0].read_bytes()  # the step records reached the run's log


def test_metrics_log_resumed_keeps_one_record_per_measurement_and_names_a_damaged_line(tmp_path):
    """A finished stage run again resumes at its last step and evaluates once more: that evaluation
    replaces the one at that step instead of repeating it (the report would count it twice), and the
    step records stay. A line of metrics.jsonl that is not a record stops the resume, naming the file
    and line."""
    from nanochat.training import MetricsLog

    uri = storage.normalize(str(tmp_path / "metrics.jsonl"))
    first = MetricsLog(uri, 0, True)
    for step in (1, 2, 3):
        first.add({"step": step, "loss": 5.0 - step}, quiet=True)
    first.add({"step": 3, "val_bpb": 2.5}, quiet=True)
    first.flush()
    again = MetricsLog(uri, 3, True)
    again.add({"step": 3, "val_bpb": 2.4}, quiet=True)
    again.flush()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}, {"step": 3, "loss": 2.0}, {"step": 3, "val_bpb": 2.4}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n{"step": 2, "lo\n')
    with pytest.raises(contract.StageError, match=r"metrics.jsonl: line 2 is not JSON"):
        MetricsLog(uri, 2, True)
