"""CORE evaluation on the real eval bundle: task loading, prompts, and the scoring arithmetic checked
with stand-in models whose answers are known (an oracle that sees the next token, and its opposite)."""

import contextlib

import pytest
import torch

from nanochat.evaluation import core


@pytest.fixture(scope="module")
def tasks(eval_bundle):
    tasks, absent = core.load_tasks(str(eval_bundle))
    return {t["label"]: t for t in tasks}, absent


class Oracle(torch.nn.Module):
    """A stand-in model that cheats: its logits put all the mass on the true next token (it reads
    the input one step ahead) in the rows `right_rows` (all: None) at the positions that predict
    tokens `right_from` onwards, and on a wrong token everywhere else."""

    def __init__(self, vocab_size, right_rows=None, right_from=0):
        super().__init__()
        self.vocab_size, self.right_rows, self.right_from = vocab_size, right_rows, right_from

    def forward(self, ids):
        truth = torch.roll(ids, -1, dims=1)
        right = torch.zeros_like(ids, dtype=torch.bool)
        right[:, max(0, self.right_from - 1):] = True
        if self.right_rows is not None:
            right[[i for i in range(len(ids)) if i not in self.right_rows]] = False
        nxt = torch.where(right, truth, (truth + 1) % self.vocab_size)
        return torch.nn.functional.one_hot(nxt, self.vocab_size).float() * 50


def test_loads_the_tasks_present_and_names_the_absent(tasks):
    present, absent = tasks
    assert len(present) == 18
    assert sorted(absent) == ["coqa", "hellaswag", "hellaswag_zeroshot", "squad"]
    assert {t["type"] for t in present.values()} == set(core.TASK_TYPES)
    assert present["arc_easy"]["baseline"] == 0.25 and present["jeopardy"]["baseline"] == 0.0
    assert present["copa"]["num_fewshot"] == 0 and present["arc_easy"]["delimiter"] == "\nAnswer: "


def test_prompts(tasks):
    present, _ = tasks
    arc = present["arc_easy"]
    item = arc["examples"][5]
    prompts = core.render_prompts(arc, 5)
    assert len(prompts) == len(item["choices"])
    for prompt, choice in zip(prompts, item["choices"]):
        assert prompt.endswith(f"{item['query']}\nAnswer: {choice}")
        assert prompt.count("\n\n") == 10  # ten solved examples before it
    assert core.render_prompts(arc, 5) == prompts  # the few-shot draw is seeded per example
    assert item not in core.fewshot_examples(arc, 5)
    without, full = core.render_prompts(present["lambada_openai"], 3)
    assert full.startswith(without) and full.endswith(" " + present["lambada_openai"]["examples"][3]["continuation"])


CPU = torch.device("cpu")


@pytest.mark.parametrize("label", ["arc_easy", "copa", "winograd", "winogrande", "boolq"])
def test_choice_scoring_picks_the_lowest_loss(tasks, tiny_tokenizer, label):
    task = tasks[0][label]
    for i in range(8):
        gold = task["examples"][i]["gold"]
        for picked in {0, gold, 1}:
            model = Oracle(tiny_tokenizer.vocab_size, right_rows={picked})
            assert core.evaluate_example(model, tiny_tokenizer, task, i, CPU, contextlib.nullcontext, 4096) == (picked == gold)


class WrongBy(torch.nn.Module):
    """A stand-in model wrong everywhere, by a margin of each row's own: its logits put `margins[row]`
    on a wrong next token, so each token of the row costs about that much loss."""

    def __init__(self, vocab_size, margins):
        super().__init__()
        self.vocab_size, self.margins = vocab_size, torch.tensor(margins)

    def forward(self, ids):
        wrong = (torch.roll(ids, -1, dims=1) + 1) % self.vocab_size
        return torch.nn.functional.one_hot(wrong, self.vocab_size).float() * self.margins[:, None, None]


def test_a_choice_wins_by_its_mean_loss_per_token_not_its_total(tiny_tokenizer):
    """The long choice costs less per token, the one-token choice less in all: the long one wins (a
    total would favour short answers, whatever they say)."""
    choices = ["Red", "a colour between blue and green, like the sea on a clear day"]
    task = {"type": "multiple_choice", "delimiter": " ", "num_fewshot": 0,
            "examples": [{"query": "Name a colour.", "choices": choices, "gold": 1}]}
    short, long = (len(tiny_tokenizer.encode(" " + choice)) for choice in choices)
    assert 30 * long > 40 * short  # the totals: the short choice would win on them
    model = WrongBy(tiny_tokenizer.vocab_size, [40.0, 30.0])
    assert core.evaluate_example(model, tiny_tokenizer, task, 0, CPU, contextlib.nullcontext, 4096)

@pytest.mark.parametrize("label", ["lambada_openai", "jeopardy", "bigbench_operators"])
def test_language_modeling_needs_exactly_the_continuation(tasks, tiny_tokenizer, label):
    task = tasks[0][label]
    for i in range(5):
        without, _ = core.render_prompts(task, i)
        start = len(tiny_tokenizer.encode(without, prepend="<|bos|>"))  # the first continuation token
        right = core.evaluate_example(Oracle(tiny_tokenizer.vocab_size, right_from=start), tiny_tokenizer, task, i, CPU,
                                      contextlib.nullcontext, 4096)
        first_wrong = core.evaluate_example(Oracle(tiny_tokenizer.vocab_size, right_from=start + 1), tiny_tokenizer, task, i, CPU,
                                            contextlib.nullcontext, 4096)
        assert (right, first_wrong) == (True, False)


def test_task_accuracy_counts_and_centering(tasks, tiny_tokenizer):
    present, _ = tasks
    task = present["lambada_openai"]
    acc = core.evaluate_task(Oracle(tiny_tokenizer.vocab_size), tiny_tokenizer, task, torch.device("cpu"), contextlib.nullcontext,
                             4096, max_examples=6)
    assert acc == 1.0
    assert core.centered(0.25, 0.25) == 0.0 and core.centered(1.0, 0.25) == 1.0


def test_bad_bundle_rows(tmp_path):
    (tmp_path / "eval_data").mkdir()
    (tmp_path / "core.yaml").write_text("icl_tasks:\n- label: copa\n  dataset_uri: copa.jsonl\n  num_fewshot: [0]\n"
                                        "  icl_task_type: multiple_choice\n")
    (tmp_path / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ncopa,50\n")
    (tmp_path / "eval_data" / "copa.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q"}\n')
    with pytest.raises(core.BundleError, match=r"copa.jsonl: line 2: missing choices, gold"):
        core.load_tasks(str(tmp_path))
