"""The pipeline as one table: every stage once, in dependency order. Prefect-free and torch-free, so
the flow, the report, the CLI and the tests all derive from it without loading either.

A row names the stage's directory under the run, its program (`nanochat.stages.<module>`), how it
is launched, the stages it needs (those whose outputs it reads; `download` for every stage that
reads data, so its files.json is a declared input), which model source it produces (base, mid,
sft, rl) or evaluates, the stage whose model it trains on, and whether a run may skip it. The
report's metrics table has one row per model source, filled by the stages that produce or evaluate
it.

Skipping (`select(skip=...)`): upstream's 2026 speedrun goes from base_train straight to chat_sft
and has no RL. A run may leave out a stage marked `optional` (mid_train, chat_rl); the stage that
trained on its model then trains on the model the skipped stage would have started from (skipping
mid_train, chat_sft trains on base_train's), and the stages that evaluate its model do not run.

Done stages (`select(done=...)`): a stage imported into the run (`nanochat import`) is done for
good, so choosing a stage after it does not bring in the stages it needed: chat_sft on an imported
base model selects download, base_train (whose stage.json the flow takes as it is), mid_train and
chat_sft, and no tok_train.
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
    trains_on: str | None = None  # the stage whose final model it starts from (one of its needs)
    optional: bool = False  # a run may skip it (select's `skip`)

    def __post_init__(self):
        object.__setattr__(self, "module", self.module or self.name)

    @property
    def args(self):
        """Command-line arguments the row itself adds: a program that several rows run (chat_eval,
        for each chat model) is told which model source its row evaluates, and a training stage
        which stage's model it starts from (another one in a run that skips that stage)."""
        source = ("--source", self.evaluates) if self.name != self.module else ()
        return (*source, "--from-stage", self.trains_on) if self.trains_on else source

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
    Stage("mid_train", torchrun=True, needs=("download", "base_train"), produces="mid", trains_on="base_train",
          optional=True),
    Stage("chat_eval_mid", "chat_eval", torchrun=True, needs=("download", "mid_train"), evaluates="mid"),
    Stage("chat_sft", torchrun=True, needs=("download", "mid_train"), produces="sft", trains_on="mid_train"),
    Stage("chat_eval_sft", "chat_eval", torchrun=True, needs=("download", "chat_sft"), evaluates="sft"),
    Stage("chat_rl", torchrun=True, needs=("download", "chat_sft"), produces="rl", trains_on="chat_sft", optional=True),
    Stage("chat_eval_rl", "chat_eval", torchrun=True, needs=("download", "chat_rl"), evaluates="rl"),
)
STAGES = {s.name: s for s in PIPELINE}

# model source -> the stage that trains it, in pipeline order (base, mid, sft, rl)
SOURCES = {s.produces: s.name for s in PIPELINE if s.produces}
# the sources chat_eval evaluates (the chat models)
CHAT_SOURCES = tuple(s.evaluates for s in PIPELINE if s.module == "chat_eval")
# the stages a run may skip
SKIPPABLE = tuple(s.name for s in PIPELINE if s.optional)


class PipelineError(Exception):
    """The table names something that does not exist (a stage module, an upstream stage), or a
    selection asks for what the table cannot do (an unknown stage, skipping a stage it needs)."""


def add_model_options(p):
    """--run, --source and --storage: the model a command that loads one takes (chat, serve, export;
    checkpoint.find_checkpoint resolves them)."""
    p.add_argument("--run", required=True, help="run name or URI, or a checkpoint URI")
    p.add_argument("--source", choices=list(SOURCES), help="which stage's model (default: the newest done)")
    p.add_argument("--storage", default=None, help="storage root for run names (default: $NANOCHAT_STORAGE or "
                   "file://~/.cache/nanochat)")


def check():
    """Raises PipelineError naming every row whose module is missing, whose upstream stage is not
    an earlier row, that trains on what is not a model it needs, or that is optional without
    training on another stage's model (skipping it would leave its successors nothing to start
    from): a broken table fails before anything runs, never as a shorter DAG."""
    problems, seen = [], {}
    for s in PIPELINE:
        if importlib.util.find_spec(f"nanochat.stages.{s.module}") is None:
            problems.append(f"stage {s.name}: its module nanochat.stages.{s.module} does not exist")
        problems += [f"stage {s.name}: needs {n!r}, which is not an earlier stage" for n in s.needs if n not in seen]
        model = seen.get(s.trains_on)
        if s.trains_on and not (s.trains_on in s.needs and model and model.produces):
            problems.append(f"stage {s.name}: trains on {s.trains_on!r}, which is not a model stage it needs")
        if s.optional and not (s.produces and s.trains_on):
            problems.append(f"stage {s.name}: optional, but it does not train on another stage's model")
        seen[s.name] = s
    if problems:
        raise PipelineError("; ".join(problems))


def select(only=None, skip=None, done=()):
    """The rows to run: the table less the stages in `skip` (see `without`), then, with `only`, just
    the stages in `only` and the ones they need, except what only stages in `done` need (a done
    stage chosen or needed stays: the flow returns its stage.json)."""
    check()
    rows = without(skip or ())
    if not only:
        return rows
    if unknown := set(only) - STAGES.keys():
        raise PipelineError(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    by_name = {s.name: s for s in rows}
    if left_out := [name for name in only if name not in by_name]:
        raise PipelineError(f"stages {left_out} do not run when skipping {sorted(skip)}")
    keep, todo = set(), list(only)
    while todo:
        name = todo.pop()
        keep.add(name)
        if name not in done:
            todo += by_name[name].needs
    return [s for s in rows if s.name in keep]


def without(skip):
    """The table less the stages in `skip`: a stage that trains on a skipped stage's model trains
    on the model that stage would have started from instead, and the others that need a skipped
    stage (those evaluating its model) go too."""
    if fixed := [name for name in skip if name not in SKIPPABLE]:
        raise PipelineError(f"stages {fixed} cannot be skipped; a run may skip {', '.join(SKIPPABLE)}")
    rows, gone, start = [], set(skip), {}  # start: skipped stage -> the stage whose model replaces its model
    for s in PIPELINE:
        if s.name in skip:
            start[s.name] = start.get(s.trains_on, s.trains_on)
            continue
        if s.trains_on in start:
            model = start[s.trains_on]
            needs = tuple(dict.fromkeys(model if n == s.trains_on else n for n in s.needs))
            s = dataclasses.replace(s, trains_on=model, needs=needs)
        if gone & set(s.needs):
            gone.add(s.name)
            continue
        rows.append(s)
    return rows


def stage(name, skip=None):
    """The row of stage `name` in a run that skips `skip` (a PipelineError naming the choices if
    there is none)."""
    return select([name], skip)[-1]


def models_before(name):
    """The stages whose model stage `name` may start from: those before it that train one."""
    return [s.name for s in PIPELINE[:list(STAGES).index(name)] if s.produces]
