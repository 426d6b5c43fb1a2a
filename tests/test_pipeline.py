"""The pipeline table (nanochat/pipeline.py) and everything that derives from it: prefect.yaml's
deployments, the report's metrics table, chat_eval's and serve's --source choices, checkpoint
resolution, the flow's DAG (a row whose module is missing fails the flow before any stage runs);
and the code version that keys every stage's cache, which covers every file the packages load."""

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import flows.speedrun
from nanochat import checkpoint, pipeline, report
from nanochat.common import source_hash
from nanochat.pipeline import PipelineError, Stage

REPO = Path(__file__).resolve().parent.parent


def test_every_row_has_a_module_and_needs_only_earlier_rows():
    pipeline.check()
    seen = set()
    for row in pipeline.PIPELINE:
        assert (REPO / "nanochat" / "stages" / f"{row.module}.py").is_file(), row
        assert set(row.needs) <= seen, row
        assert row.name not in seen
        seen.add(row.name)
    assert pipeline.select() == list(pipeline.PIPELINE)


def test_select_keeps_what_the_chosen_stages_need_in_pipeline_order():
    assert [s.name for s in pipeline.select(["tok_eval"])] == ["download", "tok_train", "tok_eval"]
    assert pipeline.stage("chat_eval_sft").args == ("--source", "sft")
    with pytest.raises(PipelineError, match="unknown stages \\['nope'\\]; choose from download, tok_train, "):
        pipeline.stage("nope")


def test_skipping_a_stage_trains_the_next_on_the_model_before_and_drops_its_evaluation():
    """Upstream's 2026 shape (no mid_train, no chat_rl): chat_sft trains on base_train's model, told
    so by its arguments, and needs base_train instead; the skipped stages' evaluations go with them."""
    assert pipeline.stage("chat_sft").args == ("--from-stage", "mid_train")
    rows = {s.name: s for s in pipeline.select(skip=["mid_train", "chat_rl"])}
    assert list(rows) == ["download", "tok_train", "tok_eval", "base_train", "base_eval", "chat_sft", "chat_eval_sft"]
    assert rows["chat_sft"].needs == ("download", "base_train") and rows["chat_sft"].trains_on == "base_train"
    assert rows["chat_sft"].args == ("--from-stage", "base_train")
    rl_only = [s.name for s in pipeline.select(skip=["chat_rl"])]
    assert rl_only == [s.name for s in pipeline.PIPELINE][:-2]
    # skip and only compose: what chat_eval_sft needs, less mid_train
    assert [s.name for s in pipeline.select(["chat_eval_sft"], ["mid_train"])] == \
        ["download", "tok_train", "base_train", "chat_sft", "chat_eval_sft"]
    assert pipeline.stage("chat_rl", ["mid_train"]).args == ("--from-stage", "chat_sft")  # the rest stays as it was
    assert pipeline.SKIPPABLE == ("mid_train", "chat_rl")
    # a trainer's --from-stage: the table's stage by default, any earlier model stage by choice
    from nanochat.stages import chat_rl, chat_sft

    for module, default, choices in ((chat_sft, "mid_train", ["base_train", "mid_train"]),
                                     (chat_rl, "chat_sft", ["base_train", "mid_train", "chat_sft"])):
        [option] = [a for a in module.build_parser()._actions if a.dest == "from_stage"]
        assert (option.default, option.choices) == (default, choices)


def test_stages_imported_into_a_run_are_done_and_bring_in_nothing():
    """select(done=...): the flow passes the run's imported stages (nanochat import). A chosen stage
    after one runs on it: SFT on an imported base model needs no tokenizer training or pretraining;
    an evaluation of an imported chat model, nothing but its data. A done stage chosen or needed is
    kept (the flow returns its stage.json), and without `only` the whole table stays."""
    def names(rows):
        return [s.name for s in rows]

    assert names(pipeline.select(["chat_sft"], done={"base_train"})) == ["download", "base_train", "mid_train", "chat_sft"]
    assert names(pipeline.select(["chat_sft"], ["mid_train"], done={"base_train"})) == ["download", "base_train", "chat_sft"]
    assert names(pipeline.select(["chat_eval_sft", "chat_rl"], done={"chat_sft"})) == \
        ["download", "chat_sft", "chat_eval_sft", "chat_rl"]
    assert names(pipeline.select(["chat_eval_sft", "tok_eval"], done={"chat_sft"})) == \
        ["download", "tok_train", "tok_eval", "chat_sft", "chat_eval_sft"]
    assert pipeline.select(done={"base_train"}) == list(pipeline.PIPELINE)


def test_only_optional_stages_may_be_skipped(tmp_path):
    """Skipping a stage the rest cannot do without, or asking for a stage that a skip leaves out, is
    a PipelineError naming the choices, from the flows before any stage runs and from the command line
    (make speedrun SKIP=...) before any flow starts."""
    for skip in (["chat_sft"], ["base_train"], ["chat_eval_mid"], ["nope"]):
        with pytest.raises(PipelineError, match=re.escape(f"stages {skip} cannot be skipped; a run may skip mid_train, chat_rl")):
            pipeline.select(skip=skip)
    with pytest.raises(PipelineError, match=re.escape("stages ['chat_eval_mid'] do not run when skipping ['mid_train']")):
        pipeline.select(["chat_eval_mid"], ["mid_train"])
    with pytest.raises(PipelineError, match="cannot be skipped"):
        flows.speedrun.speedrun.fn(preset="tiny", run_name="r", storage=str(tmp_path), retries=0, skip=["chat_sft"])
    assert list(tmp_path.iterdir()) == []
    # the stage flow re-runs a stage as the run ran it: one it skipped is refused
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"preset": "tiny", "skip": ["mid_train"]}))
    with pytest.raises(PipelineError, match=re.escape("stages ['mid_train'] do not run when skipping ['mid_train']")):
        flows.speedrun.one_stage.fn("mid_train", run_name="r", storage=str(tmp_path), retries=0)
    assert flows.speedrun.run_stage_row(str(run), "chat_sft").args == ("--from-stage", "base_train")
    dry = subprocess.run(["make", "-n", "speedrun", "SKIP=mid_train,chat_rl"], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60)
    assert " --skip 'mid_train,chat_rl'" in dry.stdout
    # every value one shell word, whatever it holds
    dry = subprocess.run(["make", "-n", "speedrun", "RUN=it's a;run"], cwd=REPO, capture_output=True, text=True, check=True, timeout=60)
    words = shlex.split(" ".join(line.rstrip("\\") for line in dry.stdout.splitlines() if not line.startswith("#")))
    assert words[words.index("--run") + 1] == "it's a;run"
    assert flows.speedrun.build_parser().parse_args(["--skip", "mid_train,chat_rl"]).skip == ["mid_train", "chat_rl"]
    with pytest.raises(SystemExit):
        flows.speedrun.build_parser().parse_args(["--skip", "mid_train,chat_sft"])


def test_prefect_yaml_has_the_speedrun_and_one_stage_deployment_per_row_in_order():
    """On pool gpu; and the same flow on the Slurm pool (the Kubernetes file is tests/test_kubernetes.py's)."""
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    slurm = [d for d in deployments if d["work_pool"]["name"] == "gpu-slurm"]
    assert [(d["name"], d["entrypoint"]) for d in slurm] == [("slurm", "flows/speedrun.py:speedrun")]
    deployments = [d for d in deployments if d not in slurm]
    assert all(d["work_pool"]["name"] == "gpu" for d in deployments)
    [speedrun] = [d for d in deployments if d["name"] == "speedrun"]
    assert speedrun["entrypoint"] == "flows/speedrun.py:speedrun"
    per_stage = [d for d in deployments if d is not speedrun]
    assert all(d["entrypoint"] == "flows/speedrun.py:one_stage" for d in per_stage)
    assert [(d["name"], d["parameters"]) for d in per_stage] == [(s.name, {"name": s.name}) for s in pipeline.PIPELINE]
    assert flows.speedrun.speedrun.name == "speedrun" and flows.speedrun.one_stage.name == "stage"


def test_the_report_and_the_source_options_take_their_sources_from_the_table():
    from nanochat.serve import build_parser as serve_parser
    from nanochat.stages.chat_eval import build_parser as chat_eval_parser

    assert list(pipeline.SOURCES) == ["base", "mid", "sft", "rl"]
    assert set(pipeline.CHAT_SOURCES) <= set(pipeline.SOURCES)
    assert list(report.ROWS) == [s.upper() for s in pipeline.SOURCES]
    for source, stages in report.ROWS.items():
        assert stages[0] == pipeline.SOURCES[source.lower()]
        assert {pipeline.stage(name).source for name in stages} == {source.lower()}
    choices = {a.dest: a.choices for a in chat_eval_parser()._actions}
    assert list(choices["source"]) == list(pipeline.CHAT_SOURCES)
    choices = {a.dest: a.choices for a in serve_parser()._actions}
    assert list(choices["source"]) == list(pipeline.SOURCES)


def test_find_checkpoint_takes_the_newest_source_done_in_the_table(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=" or ".join(reversed(pipeline.SOURCES.values()))):
        checkpoint.find_checkpoint(str(run))
    for source, name in pipeline.SOURCES.items():
        (run / name).mkdir(parents=True)
        manifest = f"file://{run}/{name}/checkpoints/final/manifest.json"
        (run / name / "stage.json").write_text(json.dumps({"outputs": {"checkpoint": {"uri": manifest}}}))
        assert checkpoint.find_checkpoint(str(run)) == (manifest.rsplit("/", 1)[0], source)
    for source, name in pipeline.SOURCES.items():
        assert checkpoint.find_checkpoint(str(run), source)[0].endswith(f"/{name}/checkpoints/final")
    final = run / "chat_sft" / "checkpoints" / "final"  # a checkpoint URI is one model: a source cannot pick another
    final.mkdir(parents=True)
    (final / "manifest.json").write_text("{}")
    assert checkpoint.find_checkpoint(str(final)) == (f"file://{final}", None)
    with pytest.raises(ValueError, match="is a checkpoint, which is one model: a source .base. picks a stage of a run"):
        checkpoint.find_checkpoint(str(final), "base")


def test_a_row_whose_module_is_missing_fails_the_flow_before_any_stage_runs(tmp_path, monkeypatch):
    table = pipeline.PIPELINE
    monkeypatch.setattr(pipeline, "PIPELINE", tuple(dataclasses.replace(s, optional=s.name == "base_eval") for s in table))
    with pytest.raises(PipelineError, match="stage base_eval: optional, but it does not train on another stage's model"):
        pipeline.select()
    monkeypatch.setattr(pipeline, "PIPELINE", (*table, Stage("ghost", needs=("download",))))
    with pytest.raises(PipelineError, match="stage ghost: its module nanochat.stages.ghost does not exist"):
        pipeline.select()
    # .fn: the flow's body without a Prefect server; it fails before building a task
    with pytest.raises(PipelineError, match="nanochat.stages.ghost"):
        flows.speedrun.speedrun.fn(preset="tiny", run_name="r", storage=str(tmp_path), retries=0)
    with pytest.raises(PipelineError, match="nanochat.stages.ghost"):
        flows.speedrun.one_stage.fn("tok_train", preset="tiny", run_name="r", storage=str(tmp_path), retries=0)
    assert list(tmp_path.iterdir()) == []  # no stage directory, no run


# The code version

def shipped():
    """The packages' files as git tracks them (what a clone has and every build starts from): an
    oracle apart from the walk that source_hash makes."""
    out = subprocess.run(["git", "ls-files", "-z", "nanochat", "tasks", "rustbpe"], cwd=REPO, capture_output=True,
                         check=True)
    return [relative for relative in out.stdout.decode().split("\0") if relative]


def test_the_source_hash_covers_every_file_the_packages_load(tmp_path):
    for relative in shipped():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / relative, tmp_path / relative)
    before = source_hash(root=tmp_path)
    others = [tmp_path / relative for relative in shipped() if not relative.endswith(".py")]
    assert {".c", ".html", ".rs", ".toml"} <= {p.suffix for p in others}
    for path in [*others, tmp_path / "nanochat" / "pipeline.py", tmp_path / "tasks" / "arc.py"]:
        data = path.read_bytes()
        path.write_bytes(data + b"\n")
        assert source_hash(root=tmp_path) != before, path.relative_to(tmp_path)
        path.write_bytes(data)
    assert source_hash(root=tmp_path) == before

    for new, text in [(tmp_path / "nanochat" / "serve" / "favicon.svg", "<svg/>"),  # a data file that did not exist
                      (tmp_path / "tasks" / "mytasks.py", "# a task of one's own (README: Your own evaluation task)")]:
        new.write_text(text)
        assert source_hash(root=tmp_path) != before, new.relative_to(tmp_path)
        new.unlink()

    for built in ("nanochat/__pycache__/gpt.cpython-311.pyc", "rustbpe/_native/lib_native.so", "rustbpe/target/release/x"):
        (tmp_path / built).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / built).write_bytes(b"machine-specific")
    assert source_hash(root=tmp_path) == before  # builds and caches differ between machines
