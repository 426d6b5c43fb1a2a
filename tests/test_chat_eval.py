"""Chat evaluation plumbing: categorical scoring reads the answer letters' logits at the answer
position (checked with stand-in models that always say one letter), ChatCORE's centering, and both
kinds of task evaluated under the stage's autocast."""

import contextlib
import json
import shutil

import pytest
import torch

from nanochat import gpt
from nanochat import stage as contract
from nanochat.evaluation import chatcore
from nanochat.stages import chat_eval
from tasks import catalog


class SaysLetter(torch.nn.Module):
    """A stand-in model whose logits favour one token everywhere, except that the other letters
    get even more mass at every position but the last of each row: a scorer that reads any other
    position than the answer's would see another letter win."""

    def __init__(self, tokenizer, letter, config):
        super().__init__()
        self.config = config
        self.favourite = tokenizer.encode(letter)[0]
        self.others = [tokenizer.encode(x)[0] for x in "ABCDE" if x != letter]
        self.vocab_size = tokenizer.vocab_size
        self.bos = tokenizer.bos_token_id

    def forward(self, ids, positions=None):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        logits[..., self.favourite] = 5.0
        lengths = (ids != self.bos).sum(1)  # prompts start with one BOS, then padding is BOS
        for row, n in enumerate(lengths.tolist()):
            logits[row, :n, self.others] = 10.0  # every position but the answer's (the last, n)
        return logits if positions is None else logits[torch.arange(len(ids)), positions]


@pytest.fixture
def cached_tasks(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_MIRROR", str(shared_data))
    monkeypatch.setenv("NANOCHAT_STORAGE", str(tmp_path))


def test_categorical_reads_the_letter_logits_at_the_answer(tiny_tokenizer, cached_tasks):
    task = catalog.eval_task("ARC-Easy")
    indices = list(range(30))
    config = type("Config", (), {"sequence_len": 4096})
    golds = [task[i]["messages"][-1]["content"] for i in indices]
    total = 0
    for letter in "ABCD":
        model = SaysLetter(tiny_tokenizer, letter, config)
        correct = chatcore.categorical_correct(model, tiny_tokenizer, task, indices, "cpu", contextlib.nullcontext, batch_size=7)
        assert correct == golds.count(letter)
        total += correct
    assert total == sum(g in "ABCD" for g in golds) > 0


def test_chatcore_centers_by_chance():
    assert chatcore.chatcore({"ARC-Easy": 0.25, "GSM8K": 0.0}, catalog.BASELINES) == 0.0
    assert chatcore.chatcore({"MMLU": 1.0, "HumanEval": 0.5}, catalog.BASELINES) == pytest.approx(0.75)


def test_unknown_task_names_the_choices(tmp_path):
    with pytest.raises(catalog.UnknownTask, match="Jeopardy.*ARC-Easy"):
        catalog.eval_task("Jeopardy")
    # an empty list, refused before any work (no model, no run; an unknown name: test_chat_train.py)
    args = contract.parse_args(chat_eval.build_parser(), "chat_eval",
                               ["--run", str(tmp_path / "none"), "--preset", "tiny", "--source", "sft", "-a", " , "])
    with pytest.raises(contract.StageError, match="^-a: unknown task ''; choose from ARC-Easy"):
        chat_eval.main(args)


def autocast_spy(monkeypatch):
    """Records, for every forward of a GPT, whether it decoded with the engine's KV cache and the
    CPU autocast state it ran under."""
    calls, forward = [], gpt.GPT.forward

    def spy(self, *args, **kwargs):
        calls.append((kwargs.get("kv_cache") is not None, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(gpt.GPT, "forward", spy)
    return calls


def test_both_kinds_of_task_run_under_the_stage_autocast(tiny_base_run, tiny_env, tmp_path, monkeypatch):
    """--dtype bfloat16: the categorical forwards and the engine's generative ones all autocast to
    bf16 (the precision training used), on the tiny base model standing in for an SFT model."""
    run = tmp_path / "run"
    shutil.copytree(tiny_base_run, run)
    for name in ("NANOCHAT_STORAGE", "NANOCHAT_DATA_MIRROR"):
        monkeypatch.setenv(name, tiny_env[name])
    base = json.loads((run / "base_train" / "stage.json").read_text())["outputs"]["checkpoint"]["uri"].rsplit("/", 1)[0]
    monkeypatch.setattr(contract, "upstream_checkpoint", lambda *_: base)
    calls = autocast_spy(monkeypatch)
    args = contract.parse_args(chat_eval.build_parser(), "chat_eval",
                               ["--run", str(run), "--preset", "tiny", "--source", "sft", "-a", "ARC-Easy,SpellingBee",
                                "--max-problems", "2", "--max-generative", "2", "--max-new-tokens", "3",
                                "--dtype", "bfloat16", "--device-type", "cpu"])
    metrics = chat_eval.main(args)
    assert metrics["dtype"] == "bfloat16" and metrics["tasks"]["SpellingBee"]["problems"] == 2
    decoding = [c for c in calls if c[0]]
    assert decoding and len(decoding) < len(calls)  # both kinds ran
    assert set(calls) == {(True, True, torch.bfloat16), (False, True, torch.bfloat16)}
