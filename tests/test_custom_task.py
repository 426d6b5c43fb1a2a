"""Your own evaluation task: README's example tasks (one categorical, one generative), run by
chat_eval through the flow's overrides, enter stage.json and the report card's table under their
own names and stay out of ChatCORE; a task that cannot work is refused, naming what it lacks."""

import json
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from flows import launch
from nanochat import pipeline, report
from nanochat import stage as contract
from nanochat.evaluation import chatcore
from nanochat.stages import chat_eval, chat_rl
from tasks import catalog

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example():
    """The python block of README's "Your own evaluation task" section."""
    section = README.read_text().split("### Your own evaluation task", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A folder on sys.path for the modules a test writes; they are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def chat_eval_args(run, storage, tasks):
    """chat_eval_sft's arguments as the flow builds them, `tasks` given in the run's overrides."""
    overrides = {"chat_eval_sft": {"tasks": tasks, "max_problems": 3, "max_generative": 3, "max_new_tokens": 4,
                                   "device_type": "cpu"}}
    spec = launch.RunSpec(run=str(run), preset="tiny", storage=storage, overrides=overrides)
    return contract.parse_args(chat_eval.build_parser(), "chat_eval", launch.arguments(pipeline.STAGES["chat_eval_sft"], spec))


def test_your_tasks_are_evaluated_and_reported(module_dir, tiny_base_run, tiny_env, tmp_path, monkeypatch):
    """README's Capitals and Doubling beside ARC-Easy on the tiny base model (standing in for the SFT
    model): each accuracy is what the task's own `evaluate` judged."""
    (module_dir / "mytasks.py").write_text(readme_example())
    import mytasks

    verdicts = {"Capitals": [], "Doubling": []}
    for name, seen in verdicts.items():
        cls = getattr(mytasks, name)

        def judged(self, conversation, completion, evaluate=cls.evaluate, seen=seen):
            seen.append((completion, evaluate(self, conversation, completion)))
            return seen[-1][1]

        monkeypatch.setattr(cls, "evaluate", judged)
    run = tmp_path / "run"
    shutil.copytree(tiny_base_run, run)
    (run / "chat_sft").mkdir()  # the base model as the run's SFT model
    shutil.copy(run / "base_train" / "stage.json", run / "chat_sft" / "stage.json")
    for name in ("NANOCHAT_STORAGE", "NANOCHAT_DATA_MIRROR"):
        monkeypatch.setenv(name, tiny_env[name])

    chat_eval.main(chat_eval_args(run, tiny_env["NANOCHAT_STORAGE"], "ARC-Easy,mytasks:Capitals,mytasks:Doubling"))
    metrics = json.loads((run / "chat_eval_sft" / "stage.json").read_text())["metrics"]
    for name, seen in verdicts.items():
        result = metrics["tasks"][f"mytasks:{name}"]
        assert result["problems"] == len(seen) == 3
        assert result["accuracy"] == metrics[f"mytasks:{name}"] == sum(v for _, v in seen) / 3
    assert all(letter in "ABC" and len(letter) == 1 for letter, _ in verdicts["Capitals"])  # scored by letter logits
    assert all(isinstance(text, str) for text, _ in verdicts["Doubling"])  # sampled
    assert metrics["chatcore"] == chatcore.chatcore({"ARC-Easy": metrics["ARC-Easy"]}, catalog.BASELINES)

    table = report.build(str(run)).split("## Metrics", 1)[1].split("\n\n")[1]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    header, names = rows[0], [row[0] for row in rows]
    order = ["ARC-Easy", "mytasks:Capitals", "mytasks:Doubling", "ChatCORE"]
    assert [name for name in names if name in order] == order  # a row each, after the built-in tasks
    sft = header.index("SFT")
    for name in verdicts:
        row = rows[names.index(f"mytasks:{name}")]
        assert row[sft] == report.fmt(metrics[f"mytasks:{name}"])


BAD_TASKS = textwrap.dedent("""
    from tasks.common import Task


    class NotATask:
        pass


    class Unfinished(Task):
        def num_examples(self):
            return 1


    class NoSplit(Task):
        eval_type = "generative"

        def __init__(self):
            super().__init__()

        def num_examples(self):
            return 1

        def get_example(self, index):
            return {}

        def evaluate(self, conversation, completion):
            return False


    class Raises(NoSplit):
        def __init__(self, split):
            raise FileNotFoundError(f"capitals_{split}.jsonl")
""")


@pytest.mark.parametrize("spec, error", [
    ("nosuch:Task", "No module named 'nosuch'"),
    ("badtasks:Missing", "module 'badtasks' has no attribute 'Missing'"),
    ("badtasks:NotATask", "is not a Task subclass (tasks.common.Task)"),
    ("badtasks:Unfinished", "lacks what a task needs: get_example, evaluate, eval_type ('categorical' or 'generative', not None)"),
    ("badtasks:NoSplit", "takes 1 positional argument but 2 were given (a task's constructor takes the split)"),
    ("badtasks:Raises", "Raises('SPLIT') failed: FileNotFoundError: capitals_SPLIT.jsonl"),
    ("broken:Task", "importing broken failed: SyntaxError: "),
])
def test_a_task_that_cannot_work_is_refused_naming_what_it_lacks(module_dir, tmp_path, spec, error):
    """chat_eval refuses it before any work (there is no run, no model); chat_rl's --task, resolved
    by the same function, the same way."""
    (module_dir / "badtasks.py").write_text(BAD_TASKS)
    (module_dir / "broken.py").write_text("def broken(:\n")  # a module whose import fails as it runs
    args = contract.parse_args(chat_eval.build_parser(), "chat_eval",
                               ["--run", str(tmp_path / "none"), "--preset", "tiny", "--source", "sft", "-a", f"ARC-Easy,{spec}"])
    with pytest.raises(contract.StageError, match=f"^-a: '{spec}'.*{re.escape(error.replace('SPLIT', 'test'))}"):
        chat_eval.main(args)
    with pytest.raises(contract.StageError, match=f"^--task '{spec}'.*{re.escape(error.replace('SPLIT', 'train'))}"):
        chat_rl.load_task(spec, "train")


def test_a_task_without_examples_is_refused_naming_it():
    """Its accuracy would be 0 / 0: the evaluation names the task instead (it divided by zero)."""
    from tasks.common import Task

    class Empty(Task):
        eval_type = "generative"

        def num_examples(self):
            return 0

    with pytest.raises(contract.StageError, match="task Empty has no examples to evaluate"):
        chatcore.evaluate(Empty(), model=None, tokenizer=None, engine=None, device="cpu", autocast=None)


@pytest.mark.parametrize("letters, error", [(None, "a categorical task's conversation needs 'letters'"),
                                            (["(A)", "(B)"], r"its letters \['\(A\)', '\(B\)'\] do not each begin with a token")])
def test_categorical_letters_that_cannot_work_are_refused_naming_the_example(tiny_tokenizer, letters, error):
    """chat_eval compares the logits of the first token of each of a categorical conversation's
    `letters`: one built by hand without them (a KeyError), or whose letters begin alike (the first
    always won), is a StageError naming the task and example, before any model runs. A tuple or a
    string of letters serves as a list does."""
    from tasks.common import Task, mc_conversation

    class Hand(Task):
        eval_type = "categorical"

        def num_examples(self):
            return 3

        def get_example(self, index):
            conversation = mc_conversation("2 + 2?", ["3", "4"], 1)
            return {**conversation, "letters": [("A", "B"), "AB", letters][index]}

        def evaluate(self, conversation, completion):
            return completion == "B"

    with pytest.raises(contract.StageError, match=rf"task Hand \(.*\) example 2: {error}"):
        chatcore.evaluate(Hand(), model=None, tokenizer=tiny_tokenizer, engine=None, device="cpu", autocast=None)
