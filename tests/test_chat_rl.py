"""chat_rl raises the reward on a task a tiny model can learn: the answer's first character must be
one of a set that starts out with about a third of the model's probability. Killed with SIGKILL and
started again, it ends in the uninterrupted run's state. Its metrics count the sampled tokens it
trained on and keep sampling time apart; it samples under the training autocast."""

import contextlib
import json
import os
import shutil
import textwrap

import pytest
import torch

from nanochat import checkpoint, gpt
from nanochat import stage as contract
from nanochat.engine import Engine, SamplingParams
from nanochat.rollouts import Rollouts, sampled_mask
from nanochat.stages import chat_rl
from nanochat.tokenizer import Tokenizer
from tasks.common import Task
from tests.support.resume import assert_same_final_checkpoint, final_checkpoint, kill_after_checkpoint
from tests.support.stagerun import stage

PROMPT = [{"role": "user", "content": "Say something."}]


class Vowel(Task):
    """`--task tests.test_chat_rl:Vowel`: answers that start with a vowel are right."""

    eval_type = "generative"

    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)

    def num_examples(self):
        return 8

    def get_example(self, index):
        return {"messages": [*PROMPT, {"role": "assistant", "content": "a"}]}

    def evaluate(self, conversation, completion):
        return completion[:1] in "aeiou"


def first_char_mass(checkpoint_dir, chars):
    """Probability that the model's answer starts with one of `chars` (top-50 sampling at T=1)."""
    model, tokenizer, _ = checkpoint.load_model(checkpoint_dir)
    ids = torch.tensor([tokenizer.render_for_completion(PROMPT)])
    with torch.no_grad():
        logits = model(ids)[0, -1]
    top = torch.topk(logits, 50)
    probs = torch.softmax(top.values, -1)
    firsts = [tokenizer.decode([t])[:1] for t in top.indices.tolist()]
    return sum(p for p, f in zip(probs.tolist(), firsts) if f in chars), dict(zip(firsts, probs.tolist()))


def step_losses(run):
    lines = (run / "chat_rl" / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_sampled_mask_leaves_out_tool_output():
    # 5 = <|output_start|>, 6 = <|output_end|>: what lies between was forced, not sampled
    assert sampled_mask([1, 2, 5, 3, 4, 6, 7], 5, 6) == [1, 1, 0, 0, 0, 0, 1]


class Lengths(Vowel):
    """An answer's reward is its length in characters (one question's samples get different rewards),
    each one kept in `given`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.given = []

    def reward(self, conversation, completion):
        self.given.append(float(len(completion)))
        return self.given[-1]


def test_advantages_are_the_rewards_less_their_questions_mean():
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    task = Lengths()
    rollouts = Rollouts(Engine(model.eval(), tokenizer, max_len=64), tokenizer, task, SamplingParams(max_tokens=8), num_samples=6,
                        rank=0, world_size=1, device=torch.device("cpu"), seed=0, autocast=contextlib.nullcontext)
    _, _, advantages = next(rollouts)
    rewards = torch.tensor(task.given)
    assert len(rewards) == 6 and len(set(task.given)) > 1, task.given
    assert torch.allclose(advantages, rewards - rewards.mean())


@pytest.fixture(scope="module")
def first_char_task(tiny_base_run, tiny_env, tmp_path_factory):
    """A task tiny_base_run's model can learn, `firstchar:FirstChar`: the answer's first character must
    be one of the most likely ones, which together start out with about a third of its probability.
    Returns (base checkpoint, those characters, the environment that imports the task)."""
    source = json.loads((tiny_base_run / "base_train" / "stage.json").read_text())["outputs"]["checkpoint"]["uri"].rsplit("/", 1)[0]
    _, by_char = first_char_mass(source, set())
    chars, mass = set(), 0.0
    for char, p in sorted(by_char.items(), key=lambda kv: -kv[1]):
        if mass >= 0.3:
            break
        chars.add(char)
        mass += p
    module = tmp_path_factory.mktemp("task")
    (module / "firstchar.py").write_text(textwrap.dedent(f"""
        from tasks.common import Task

        class FirstChar(Task):
            eval_type = "generative"

            def __init__(self, split="train", **kwargs):
                super().__init__(**kwargs)

            def num_examples(self):
                return 64

            def get_example(self, index):
                return {{"messages": [*{PROMPT!r}, {{"role": "assistant", "content": "x"}}]}}

            def evaluate(self, conversation, completion):
                return completion[:1] in {sorted(chars)!r}
    """))
    return source, chars, {**tiny_env, "PYTHONPATH": f"{module}{os.pathsep}{tiny_env.get('PYTHONPATH', '')}"}


def learn_first_char(run, first_char_task, fault=None):
    """chat_rl on FirstChar from the base model: 2 processes, deterministic, 12 steps (a checkpoint every
    2); with `fault` (a NANOCHAT_FAULT spec), in the background, returning the process."""
    source, _, env = first_char_task
    return stage("nanochat.stages.chat_rl", run, {**env, **({"NANOCHAT_FAULT": fault} if fault else {})},
                 "--checkpoint", source, "--task", "firstchar:FirstChar", "--num-steps", "12", "--examples-per-step", "2",
                 "--num-samples", "8", "--max-new-tokens", "2", "--matrix-lr", "0.02", "--embedding-lr", "0.2",
                 "--unembedding-lr", "0.01", "--warmdown-ratio", "0", "--eval-examples", "2", "--deterministic",
                 nproc=2, background=bool(fault))


@pytest.fixture(scope="module")
def rl_run(tiny_base_run, first_char_task, tmp_path_factory):
    """tiny_base_run with chat_rl done on FirstChar (learn_first_char)."""
    run = tmp_path_factory.mktemp("rl") / "run"
    shutil.copytree(tiny_base_run, run)
    learn_first_char(run, first_char_task)
    return run


def test_rl_raises_the_reward_of_a_learnable_task(rl_run, first_char_task):
    source, chars, _ = first_char_task
    before, _ = first_char_mass(source, chars)
    after, _ = first_char_mass(str(final_checkpoint(rl_run, "chat_rl")), chars)
    assert after > before + 0.2, (before, after, sorted(chars))  # 0.35 -> 1.0, trained in bf16 or in fp32


def test_killed_chat_rl_resumes_bit_identical(rl_run, tiny_base_run, first_char_task, tmp_path):
    """Killed with SIGKILL after its checkpoint of step 6 and started again, chat_rl ends in the state
    an uninterrupted run ends in: weights, each rank's optimizer and RNG state, and rollout position."""
    run = tmp_path / "run"
    shutil.copytree(tiny_base_run, run)
    kill_after_checkpoint(learn_first_char(run, first_char_task, fault="chat_rl:6:hang"), run / "chat_rl" / "checkpoints", 6)
    resumed = learn_first_char(run, first_char_task)
    assert "resumed at step 6" in resumed.stderr
    assert_same_final_checkpoint(run, rl_run, "chat_rl")
    assert step_losses(run) == step_losses(rl_run) and len(step_losses(run)) == 12


def test_unknown_task_is_a_clear_error(tmp_path):
    """Before any work (in this process: run_main makes a StageError the stage's one error line)."""
    argv = ["--run", str(tmp_path), "--preset", "tiny", "--checkpoint", str(tmp_path), "--task", "nosuch:Task"]
    with pytest.raises(contract.StageError, match="--task 'nosuch:Task'"):
        chat_rl.main(contract.parse_args(chat_rl.build_parser(), chat_rl.STAGE, argv))


def test_metrics_count_the_sampled_tokens_and_rollouts_autocast_as_training(tiny_base_run, tiny_env, tmp_path,
                                                                            monkeypatch):
    """In one process, --dtype bfloat16: each step's `tokens` is the number of tokens the engine
    sampled for that step's questions (counted from the completions, apart from the targets the
    rollouts build and the loop counts); sampling time is reported apart from training time; the
    engine's forwards, like the training ones, autocast to bf16."""
    run = tmp_path / "run"
    shutil.copytree(tiny_base_run, run)
    for name in ("NANOCHAT_STORAGE", "NANOCHAT_DATA_MIRROR"):
        monkeypatch.setenv(name, tiny_env[name])
    source = json.loads((run / "base_train" / "stage.json").read_text())["outputs"]["checkpoint"]["uri"].rsplit("/", 1)[0]
    sampled, generate = [], Engine.generate

    def counting_generate(self, prompt_ids, params=None, n=1, on_event=None):
        request = generate(self, prompt_ids, params, n, on_event)
        special = self.tokenizer.special_ids
        sampled.append(sum(sum(sampled_mask(c.token_ids, special["<|output_start|>"], special["<|output_end|>"]))
                           for c in request.completions))
        return request

    forwards, forward = [], gpt.GPT.forward

    def autocast_spy(self, *args, **kwargs):
        forwards.append((kwargs.get("kv_cache") is not None, torch.is_autocast_enabled("cpu"),
                         torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", counting_generate)
    monkeypatch.setattr(gpt.GPT, "forward", autocast_spy)
    args = contract.parse_args(chat_rl.build_parser(), chat_rl.STAGE,
                               ["--run", str(run), "--preset", "tiny", "--checkpoint", source,
                                "--task", "tests.test_chat_rl:Vowel", "--num-steps", "2", "--examples-per-step", "2",
                                "--num-samples", "3", "--max-new-tokens", "4", "--eval-examples", "1",
                                "--checkpoint-every", "-1", "--dtype", "bfloat16", "--device-type", "cpu"])
    metrics = chat_rl.main(args)

    assert len(sampled) == 2 * 2 + 1  # 2 steps of 2 questions, then pass@k on 1
    records = [r for r in map(json.loads, (run / "chat_rl" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["tokens"] for r in records] == [sampled[0] + sampled[1], sampled[2] + sampled[3]]
    for r in records:
        assert r["batch_time_s"] > 0 and r["train_time_s"] > 0
        assert r["step_time_s"] == pytest.approx(r["batch_time_s"] + r["train_time_s"])
        assert r["tok_per_s"] == pytest.approx(r["tokens"] / r["train_time_s"])
    assert metrics["tokens"] == sum(sampled[:4])
    for total in ("batch_time_s", "train_time_s"):
        assert metrics[total] == pytest.approx(sum(r[total] for r in records), abs=0.01)
    assert metrics["dtype"] == "bfloat16"
    assert {(True, True, torch.bfloat16), (False, True, torch.bfloat16)} == set(forwards)  # sampling and training
