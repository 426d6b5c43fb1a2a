"""mid_train and chat_sft on a tiny base model: validation on assistant text improves, each step's
token count is the assistant tokens it trained on (padding and prompts left out), ChatCORE is measured
during training, chat_sft trains on the base model when told to (a run that skips mid_train), the
optimizer can start from the upstream stage's, the user's identity conversations replace nanochat's in
the mixture, and a crashed or killed run resumes to the state an uninterrupted one ends in."""

import json
import math
import shutil

import pytest
import torch

from nanochat import checkpoint, presets, training_options
from nanochat import stage as contract
from nanochat.dataloader import ConversationLoader
from nanochat.optim import setup_optimizers
from nanochat.stages import _finetune, chat_sft
from nanochat.stages import mid_train as mid_train_stage
from tasks import catalog
from tasks.gsm8k import GSM8K
from tasks.smoltalk import SmolTalk
from tests.support.mirrors import task_mirror
from tests.support.resume import assert_same_final_checkpoint, final_checkpoint, kill_after_checkpoint
from tests.support.stagerun import stage


def summary(run, name):
    return json.loads((run / name / "stage.json").read_text())


def records(run, name, key):
    """The metrics records of `name` that hold `key`."""
    lines = (run / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def steps(run, name):
    """The metrics records of the training steps."""
    return records(run, name, "loss")


def losses(run, name):
    return [r["loss"] for r in steps(run, name)]


def loader_batches(run, module, upstream, mode, world_size, num_steps):
    """The batches of a fine-tuning stage's steps, apart from the training loop: per step, the
    (inputs, targets) each rank's loader gives it (the stage's mixture, the upstream model's tokenizer
    and row length, the preset's batch sizes), every rank's in one list."""
    args = contract.parse_args(module.build_parser(), module.STAGE, ["--run", str(run), "--preset", "tiny"])
    model, tokenizer, _ = checkpoint.load_model(contract.upstream_checkpoint(args.run, upstream))
    T = args.max_seq_len or model.config.sequence_len
    accum = training_options.grad_accum(args.total_batch_size, args.device_batch_size, T + 1, world_size)
    task = module.mixture(args)
    per_step = [[] for _ in range(num_steps)]
    for rank in range(world_size):
        loader = ConversationLoader(tokenizer, task, args.device_batch_size, T, mode=mode, rank=rank, world_size=world_size)
        for step in range(num_steps):
            per_step[step] += [next(loader) for _ in range(accum)]
    return per_step


def trained_tokens(per_step):
    """The oracle of a stage's token counts: per step, the targets of its batches that are not -1."""
    return [sum(int((targets != -1).sum()) for _, targets in batches) for batches in per_step]


def mean_loss(run, name, batches):
    """The mean loss (nats per target token, in fp32) of `name`'s final model over `batches`."""
    model, _, _ = checkpoint.load_model(contract.upstream_checkpoint(str(run), name))
    with torch.no_grad():
        return sum(model(inputs, targets).item() for inputs, targets in batches) / len(batches)


def mid_train(run, env, fault=None):
    """mid_train with the preset's 10 steps on 2 processes, deterministic; with `fault` (a NANOCHAT_FAULT
    spec), in the background, returning the process."""
    env = {**env, **({"NANOCHAT_FAULT": fault} if fault else {})}
    return stage("nanochat.stages.mid_train", run, env, "--deterministic", nproc=2, background=bool(fault))


@pytest.fixture(scope="module")
def mid_run(tiny_base_run, tiny_env, tmp_path_factory):
    """tiny_base_run with mid_train done (see mid_train)."""
    run = tmp_path_factory.mktemp("mid") / "run"
    shutil.copytree(tiny_base_run, run)
    mid_train(run, tiny_env)
    return run


CHATCORE = ["--chatcore-every", "5", "--chatcore-max-problems", "4", "--chatcore-max-generative", "2",
            "--chatcore-max-new-tokens", "8"]


@pytest.fixture(scope="module")
def sft_run(mid_run, tiny_env, tmp_path_factory):
    """mid_run with chat_sft done: one process, deterministic, the preset's 10 steps, packed rows,
    ChatCORE measured at step 5."""
    run = tmp_path_factory.mktemp("sft") / "run"
    shutil.copytree(mid_run, run)
    stage("nanochat.stages.chat_sft", run, tiny_env, "--deterministic", "--rows", "pack", *CHATCORE)
    return run


def test_mid_then_sft_learn_the_assistant_turns(sft_run, tiny_env, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    for name in ("NANOCHAT_STORAGE", "NANOCHAT_DATA_MIRROR"):
        monkeypatch.setenv(name, tiny_env[name])
    assert len(losses(run, "mid_train")) == 10
    assert summary(run, "mid_train")["metrics"]["world_size"] == 2
    batches = loader_batches(run, mid_train_stage, "base_train", "pack", 2, 12)
    # It learns the assistant turns (the chat format first): on the batches of the two steps after its
    # last, which it never trained on, its loss is far below the base model's (by 1.5 nats per token,
    # trained in bf16 or in fp32).
    unseen = [*batches[10], *batches[11]]
    assert mean_loss(run, "mid_train", unseen) < mean_loss(run, "base_train", unseen) - 1.0
    # the tokens trained on: packed rows' assistant tokens, summed over both processes
    oracle = trained_tokens(batches[:10])
    assert [r["tokens"] for r in steps(run, "mid_train")] == oracle
    assert summary(run, "mid_train")["metrics"]["tokens"] == sum(oracle)
    sft = summary(run, "chat_sft")
    assert sft["inputs"]["checkpoint"]["uri"].startswith(summary(run, "mid_train")["outputs"]["checkpoint"]["uri"].rsplit("/", 1)[0])
    assert sft["metrics"]["steps"] == 10 and sft["metrics"]["val_bpb"] > 0
    # packed rows: the prompts and padding are not counted (a step's rows hold fewer trained tokens than their capacity)
    oracle = trained_tokens(loader_batches(run, chat_sft, "mid_train", "pack", 1, 10))
    sft_steps = steps(run, "chat_sft")
    assert [r["tokens"] for r in sft_steps] == oracle and sft["metrics"]["tokens"] == sum(oracle)
    assert sum(oracle) < 10 * presets.get("tiny", "chat_sft")["total_batch_size"]
    for r in sft_steps:
        assert r["tok_per_s"] == pytest.approx(r["tokens"] / r["train_time_s"])
        assert r["step_time_s"] == pytest.approx(r["batch_time_s"] + r["train_time_s"])
    # ChatCORE during training, at step 5 (as base_train's CORE: between steps): each of chat_eval's tasks
    # scored, the score their accuracies centered by chance; stage.json leaves ChatCORE to chat_eval
    [measured] = records(run, "chat_sft", "chatcore")
    accuracies = {t: measured[f"chatcore/{t}"] for t in catalog.BASELINES}
    assert measured["step"] == 5 and all(0 <= a <= 1 for a in accuracies.values())
    centered = [(a - catalog.BASELINES[t]) / (1 - catalog.BASELINES[t]) for t, a in accuracies.items()]
    assert measured["chatcore"] == pytest.approx(sum(centered) / len(centered))
    assert "chatcore" not in sft["metrics"]
    # chat_eval on 2 processes: every task scored on its 4 problems, ChatCORE from the accuracies
    stage("nanochat.stages.chat_eval", run, tiny_env, "--source", "sft", "-a", "ARC-Easy,MMLU,GSM8K,SpellingBee", nproc=2)
    metrics = summary(run, "chat_eval_sft")["metrics"]
    assert {t: r["problems"] for t, r in metrics["tasks"].items()} == {"ARC-Easy": 4, "MMLU": 4, "GSM8K": 4, "SpellingBee": 4}
    expected = (metrics["ARC-Easy"] - 0.25) / 0.75 + (metrics["MMLU"] - 0.25) / 0.75 + metrics["GSM8K"] + metrics["SpellingBee"]
    assert metrics["chatcore"] == pytest.approx(expected / 4)
    bad = stage("nanochat.stages.chat_eval", run, tiny_env, "--source", "sft", "-a", "Jeopardy", check=False)
    assert bad.returncode == 1 and "-a: unknown task 'Jeopardy'; choose from ARC-Easy" in bad.stderr


def assert_same_state(got, want):
    """Two nested optimizer states hold the same values, tensors bit for bit."""
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same_state(got[key], want[key])
    else:
        assert got == want


def test_sft_from_the_base_model_with_identity_conversations_and_warm_start(tiny_base_run, tiny_env, shared_data, tmp_path,
                                                                            monkeypatch):
    """chat_sft on a run without mid_train, as a run that skips it passes it (--from-stage base_train):
    it trains on base_train's final model. The user's identity conversations replace nanochat's in the
    mixture, --identity-weight epochs of them; with --warm-start-optimizer the optimizer starts from
    base_train's final state (a run of 0 steps checkpoints it as it started) under chat_sft's own
    learning rates, as upstream's 2026 chat_sft starts."""
    run = tmp_path / "run"
    shutil.copytree(tiny_base_run, run)
    for name in ("NANOCHAT_STORAGE", "NANOCHAT_DATA_MIRROR"):
        monkeypatch.setenv(name, tiny_env[name])
    args = contract.parse_args(chat_sft.build_parser(), chat_sft.STAGE, ["--run", str(run), "--preset", "tiny"])
    plain = len(chat_sft.mixture(args))
    identity = tmp_path / "me.jsonl"
    conversation = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Tinybot."}]
    identity.write_text("\n".join(json.dumps(conversation) for _ in range(7)) + "\n")
    halves = {name: getattr(args, name) / 2 for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")}
    stage("nanochat.stages.chat_sft", run, tiny_env, "--from-stage", "base_train", "--num-steps", "0", "--identity",
          str(identity), "--identity-weight", "3", "--warm-start-optimizer",
          *(f"--{name.replace('_', '-')}={value}" for name, value in halves.items()))
    sft = summary(run, "chat_sft")
    assert sft["config"]["from_stage"] == "base_train"
    assert sft["inputs"]["checkpoint"] == summary(run, "base_train")["outputs"]["checkpoint"]  # base_train's final model
    nanochats = sum(1 for _ in open(shared_data / "identity_conversations.jsonl"))
    assert sft["metrics"]["conversations"] == plain - args.identity_weight * nanochats + 21  # yours replace them
    _, base, _ = checkpoint.load(str(final_checkpoint(run, "base_train")))
    _, tuned, _ = checkpoint.load(str(final_checkpoint(run, "chat_sft")))
    assert sft["metrics"]["steps"] == 0 and base["state"]
    assert_same_state(tuned["state"], base["state"])
    model, _, _ = checkpoint.load_model(str(final_checkpoint(run, "chat_sft")))
    own = setup_optimizers(model, **halves, recipe=args.optimizer_recipe).state_dict()["param_groups"]
    rates = [[group["initial_lr"] for group in groups] for groups in (tuned["param_groups"], own, base["param_groups"])]
    assert rates[0] == rates[1] != rates[2]  # (the smear and backout gates' rate is fixed: the same in both)
    assert all(group["lr"] == group["initial_lr"] for group in tuned["param_groups"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps([{"role": "assistant", "content": "hi"}]) + "\n")
    done = stage("nanochat.stages.mid_train", run, tiny_env, "--num-steps", "1", "--identity", str(bad), check=False)
    assert done.returncode != 0 and "bad.jsonl" in done.stderr


def test_sft_trains_one_pass_over_a_mixture_with_mmlu_at_a_fraction_of_the_rates(tiny_base_run, tiny_env, shared_data,
                                                                                  tmp_path, monkeypatch):
    """chat_sft as the GPU presets run upstream's 2026 recipe, on 2 processes: --num-steps -1 trains
    the steps of one pass over the mixture (the busiest process's batches, 2 to a step), MMLU's
    auxiliary_train is in the mixture --mmlu-weight times, and every group's learning rate, the fixed
    ones of the gates too, is --init-lr-frac of what the options give."""
    mirror = task_mirror(shared_data, tmp_path / "mirror", mmlu_questions=40)
    env = {**tiny_env, "NANOCHAT_DATA_MIRROR": str(mirror), "NANOCHAT_STORAGE": str(tmp_path / "storage")}
    for name in ("NANOCHAT_STORAGE", "NANOCHAT_DATA_MIRROR"):
        monkeypatch.setenv(name, env[name])
    run = tmp_path / "run"
    shutil.copytree(tiny_base_run, run)
    small = ["--from-stage", "base_train", "--smoltalk-weight", "0.01", "--gsm8k-weight", "0.002", "--spelling-size", "8",
             "--identity-weight", "0.1", "--total-batch-size", "2064"]
    options = [*small, "--num-steps", "-1", "--mmlu-weight", "2", "--init-lr-frac", "0.8"]
    stage("nanochat.stages.chat_sft", run, env, "--deterministic", *options, nproc=2)

    args = contract.parse_args(chat_sft.build_parser(), chat_sft.STAGE, ["--run", str(run), "--preset", "tiny", *options])
    task = chat_sft.mixture(args)
    without = chat_sft.mixture(contract.parse_args(chat_sft.build_parser(), chat_sft.STAGE,
                                                   ["--run", str(run), "--preset", "tiny", *small]))
    assert len(task) == len(without) + 2 * 40
    model, tokenizer, _ = checkpoint.load_model(contract.upstream_checkpoint(str(run), "base_train"))
    T = model.config.sequence_len
    accum = training_options.grad_accum(args.total_batch_size, args.device_batch_size, T + 1, 2)
    batches = max(sum(1 for _ in ConversationLoader(tokenizer, task, args.device_batch_size, T, rank=rank, world_size=2,
                                                    epochs=1)) for rank in range(2))
    metrics = summary(run, "chat_sft")["metrics"]
    assert accum == 2 and metrics["steps"] == len(losses(run, "chat_sft")) == math.ceil(batches / accum) > 1
    assert metrics["conversations"] == len(task)

    _, tuned, _ = checkpoint.load(str(final_checkpoint(run, "chat_sft")))
    rates = {name: getattr(args, name) for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")}
    full = setup_optimizers(model, **rates, recipe=args.optimizer_recipe).state_dict()["param_groups"]
    assert [g["initial_lr"] for g in tuned["param_groups"]] == [0.8 * g["initial_lr"] for g in full]
    bad = stage("nanochat.stages.chat_sft", run, env, *small, "--num-steps", "-2", check=False)
    assert bad.returncode != 0 and "--num-steps must be -1 (one pass over the mixture) or >= 0, got -2" in bad.stderr


def test_warm_start_needs_the_upstreams_processes(mid_run):
    """Each process takes its own rank's optimizer state, so a warm start from a checkpoint of 2 processes
    is refused to 1, naming both."""
    source = contract.upstream_checkpoint(str(mid_run), "mid_train")
    model, _, _ = checkpoint.load_model(source)
    optimizer = setup_optimizers(model)
    with pytest.raises(contract.StageError, match=r"holds the optimizer state of 2 processes and this stage runs 1; "
                                                  r"run it with --nproc_per_node 2"):
        _finetune.warm_start(optimizer, source, rank=0, world_size=1)


def test_task_weights_and_smoltalk_length_limit(shared_data, tmp_path, monkeypatch):
    """The mixture options: counts per task follow the weights (a fraction takes a fixed share),
    --smoltalk-max-chars leaves the longer conversations out, a negative weight is refused."""
    monkeypatch.setenv("NANOCHAT_DATA_MIRROR", f"file://{shared_data}")
    monkeypatch.setenv("NANOCHAT_STORAGE", str(tmp_path))

    def mixture(*options):
        p = chat_sft.build_parser()
        return chat_sft.mixture(contract.parse_args(p, chat_sft.STAGE, ["--run", "r", "--preset", "tiny", *options]))

    nanochats = sum(1 for _ in open(shared_data / "identity_conversations.jsonl"))
    smoltalk, short, gsm8k = len(SmolTalk("train")), len(SmolTalk("train", max_chars=1000)), len(GSM8K("train"))
    assert 0 < short < smoltalk  # test_tasks checks which ones the limit leaves out
    plain = mixture("--identity-weight", "1", "--spelling-size", "10")
    assert len(plain) == smoltalk + gsm8k + 10 + nanochats
    weighted = mixture("--identity-weight", "2", "--spelling-size", "10", "--smoltalk-weight", "2",
                       "--smoltalk-max-chars", "1000", "--gsm8k-weight", "0.1")
    assert len(weighted) == 2 * short + round(0.1 * gsm8k) + 10 + 2 * nanochats
    with pytest.raises(SystemExit):
        mixture("--gsm8k-weight", "-1")
    with pytest.raises(SystemExit):
        mixture("--smoltalk-weight", "inf")


def test_killed_mid_train_resumes_bit_identical(mid_run, tiny_base_run, tiny_env, tmp_path):
    """Killed with SIGKILL after its checkpoint of step 5 and started again, mid_train ends in the state
    an uninterrupted run ends in: weights, each rank's optimizer, RNG and loader state."""
    run = tmp_path / "run"
    shutil.copytree(tiny_base_run, run)
    kill_after_checkpoint(mid_train(run, tiny_env, fault="mid_train:5:hang"), run / "mid_train" / "checkpoints", 5)
    resumed = mid_train(run, tiny_env)
    assert "resumed at step 5" in resumed.stderr
    assert_same_final_checkpoint(run, mid_run, "mid_train")
    assert losses(run, "mid_train") == losses(mid_run, "mid_train")  # each step once, as it was


def test_crashed_sft_resumes_to_the_same_state(sft_run, mid_run, tiny_env, tmp_path):
    """The reference measured ChatCORE at step 5 and the crashed run does not: the same final state
    also shows that measuring it leaves training as it was."""
    runs = {"reference": sft_run, "crashed": tmp_path / "run"}
    shutil.copytree(mid_run, runs["crashed"])
    crashed = stage("nanochat.stages.chat_sft", runs["crashed"], {**tiny_env, "NANOCHAT_FAULT": "chat_sft:7"}, "--deterministic",
                    check=False)
    assert crashed.returncode == 3 and not (runs["crashed"] / "chat_sft" / "stage.json").exists()
    resumed = stage("nanochat.stages.chat_sft", runs["crashed"], tiny_env, "--deterministic")
    assert "resumed at step 5" in resumed.stderr
    assert_same_final_checkpoint(runs["crashed"], runs["reference"], "chat_sft")
    assert losses(runs["crashed"], "chat_sft") == losses(runs["reference"], "chat_sft")
    # the tokens the steps before the crash trained on are counted once (kept in the checkpoint)
    assert summary(runs["crashed"], "chat_sft")["metrics"]["tokens"] == summary(runs["reference"], "chat_sft")["metrics"]["tokens"]
    # the training time counts the steps before the crash too (kept in the checkpoint)
    before_crash = json.loads((runs["crashed"] / "chat_sft" / "checkpoints" / "step_000005" / "meta.json").read_text())
    total = summary(runs["crashed"], "chat_sft")["metrics"]["train_time_s"]
    assert 0 < before_crash["train_time_s"] < total
