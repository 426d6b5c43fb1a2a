"""Tasks by name: chat_eval's evaluation tasks with their chance baselines, and `module:Class` for a
task of your own (a Task subclass importable from PYTHONPATH, whose constructor takes the split).
The stages resolve names here and pass task objects on; nothing under nanochat/ outside the stages
imports tasks."""

import importlib

from tasks.arc import ARC
from tasks.common import Task
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

# accuracy by chance of each evaluation task (ChatCORE centers by it): a quarter for the
# four-choice tasks, 0 for the generative ones
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}

EVAL_TASKS = {"ARC-Easy": lambda: ARC("ARC-Easy"), "ARC-Challenge": lambda: ARC("ARC-Challenge"),
              "MMLU": lambda: MMLU("test"), "GSM8K": lambda: GSM8K("test"), "HumanEval": HumanEval,
              "SpellingBee": lambda: SpellingBee(size=256, split="test")}
assert EVAL_TASKS.keys() == BASELINES.keys(), "every evaluation task needs its chance baseline"


EVAL_TYPES = ("categorical", "generative")
NEEDED = ("num_examples", "get_example", "evaluate")  # the methods a Task subclass must define


class UnknownTask(ValueError):
    """A task name or `module:Class` that names no task; the message says why."""


def eval_task(name):
    """The evaluation split of the task chat_eval knows as `name` (a key of BASELINES), or of your
    own task `module:Class` (its 'test' split)."""
    if name in EVAL_TASKS:
        return EVAL_TASKS[name]()
    if ":" in name:
        return task(name, "test")
    raise UnknownTask(f"unknown task {name!r}; choose from {', '.join(EVAL_TASKS)}, or module:Class")


def task(spec, split, known=None):
    """The task `spec` names (see task_class) on `split` ('train' or 'test')."""
    cls = task_class(spec, known)
    try:
        return cls(split)
    except TypeError as e:  # most often a constructor that does not take the split
        raise UnknownTask(f"{spec!r}: {cls.__name__}({split!r}) failed: {e} (a task's constructor takes the split)") from None
    except Exception as e:  # noqa: BLE001 - the user's own code: whatever it raises, one line naming it
        raise UnknownTask(f"{spec!r}: {cls.__name__}({split!r}) failed: {type(e).__name__}: {e}") from None


def task_class(spec, known=None):
    """The Task class `spec` names: a key of `known` ({name: class}), or `module:Class` (imported),
    checked to be a Task that defines what a task needs."""
    known = known or {}
    if spec in known:
        return known[spec]
    module, _, name = spec.partition(":")
    if not (module and name):
        choices = ", ".join([*known, "module:Class"])
        raise UnknownTask(f"{spec!r} names no task; use {choices}")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UnknownTask(f"{spec!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - importing the user's module ran its code (a SyntaxError, a raise)
        raise UnknownTask(f"{spec!r}: importing {module} failed: {type(e).__name__}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise UnknownTask(f"{spec!r} is not a Task subclass (tasks.common.Task)")
    missing = [method for method in NEEDED if getattr(cls, method) is getattr(Task, method)]
    if cls.eval_type not in EVAL_TYPES:
        missing.append(f"eval_type ({' or '.join(map(repr, EVAL_TYPES))}, not {cls.eval_type!r})")
    if missing:
        raise UnknownTask(f"{spec!r} lacks what a task needs: {', '.join(missing)}")
    return cls
