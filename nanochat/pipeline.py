"""The pipeline as one table: every stage once, in dependency order. Prefect-free and torch-free, so
the flow, the report, the CLI and the tests all derive from it without loading either.

A row names the stage's directory under the run, its program (`nanochat.stages.<module>`), how it
is launched, the stages it needs (those whose outputs it reads; `download` for every stage that
reads data, so its files.json is a declared input), and which model source it produces (base, mid,
sft, rl) or evaluates. The report's metrics table has one row per model source, filled by the
stages that produce or evaluate it.
"""

import dataclasses
import importlib.util


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # its directory under the run, and the Prefect task's name
    module: str = ""  # nanochat.stages.<module>; default: the name
    torchrun: bool = False  # launched under torchrun (else one `python -m` process)
    needs: tuple = ()  # upstream stages whose outputs it reads
    produces: str | None = None  # the model source it trains (base, mid, sft, rl)
    evaluates: str | None = None  # the model source it evaluates

    def __post_init__(self):
        object.__setattr__(self, "module", self.module or self.name)

    @property
    def args(self):
        """Command-line arguments the row itself adds: a program that several rows run (chat_eval,
        for each chat model) is told which model source its row evaluates."""
        return ("--source", self.evaluates) if self.name != self.module else ()

    @property
    def source(self):
        """The model source whose row of the report's metrics table this stage fills."""
        return self.produces or self.evaluates


PIPELINE = (
    Stage("download"),
    Stage("tok_train", needs=("download",)),
    Stage("tok_eval", needs=("download", "tok_train")),
    Stage("base_train", torchrun=True, needs=("download", "tok_train"), produces="base"),
    Stage("base_eval", torchrun=True, needs=("download", "base_train"), evaluates="base"),
    Stage("mid_train", torchrun=True, needs=("download", "base_train"), produces="mid"),
    Stage("chat_eval_mid", "chat_eval", torchrun=True, needs=("download", "mid_train"), evaluates="mid"),
    Stage("chat_sft", torchrun=True, needs=("download", "mid_train"), produces="sft"),
    Stage("chat_eval_sft", "chat_eval", torchrun=True, needs=("download", "chat_sft"), evaluates="sft"),
    Stage("chat_rl", torchrun=True, needs=("download", "chat_sft"), produces="rl"),
    Stage("chat_eval_rl", "chat_eval", torchrun=True, needs=("download", "chat_rl"), evaluates="rl"),
)
STAGES = {s.name: s for s in PIPELINE}

# model source -> the stage that trains it, in pipeline order (base, mid, sft, rl)
SOURCES = {s.produces: s.name for s in PIPELINE if s.produces}
# the sources chat_eval evaluates (the chat models)
CHAT_SOURCES = tuple(s.evaluates for s in PIPELINE if s.module == "chat_eval")


class PipelineError(Exception):
    """The table names something that does not exist (a stage module, an upstream stage)."""


def check():
    """Raises PipelineError naming every row whose module is missing or whose upstream stage is
    not an earlier row: a broken table fails before anything runs, never as a shorter DAG."""
    problems, seen = [], set()
    for s in PIPELINE:
        if importlib.util.find_spec(f"nanochat.stages.{s.module}") is None:
            problems.append(f"stage {s.name}: its module nanochat.stages.{s.module} does not exist")
        problems += [f"stage {s.name}: needs {n!r}, which is not an earlier stage" for n in s.needs if n not in seen]
        seen.add(s.name)
    if problems:
        raise PipelineError("; ".join(problems))


def select(only=None):
    """The rows to run: all of them, or just the stages in `only` and the ones they need."""
    check()
    if not only:
        return list(PIPELINE)
    if unknown := set(only) - STAGES.keys():
        raise PipelineError(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    keep, todo = set(), list(only)
    while todo:
        name = todo.pop()
        keep.add(name)
        todo += STAGES[name].needs
    return [s for s in PIPELINE if s.name in keep]


def stage(name):
    """The row of stage `name` (a PipelineError naming the choices if there is none)."""
    return select([name])[-1]
