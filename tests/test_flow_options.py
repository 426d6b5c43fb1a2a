"""What the speedrun flow's parameters become before any stage runs: a run's overrides reach each
stage as the options its own parser takes (False turning off what the preset turns on); an unknown
preset, an override for a stage the pipeline lacks, or a skip of a stage the run holds is refused
at once; and a stage's folder holds only the work the flow runs it for."""

import dataclasses
import json
import logging

import pytest

from flows import stages
from flows.launch import RunSpec, arguments
from flows.speedrun import build_parser, check_skip, main, plan, run_spec
from nanochat import pipeline, stage, storage
from nanochat.stages import base_train


def test_overrides_reach_the_stage_as_its_own_options():
    """The cpu preset trains value embeddings: {"value_embeds": False} is --no-value-embeds, which the
    stage parses as off (it used to be dropped, and the run.json said off while the stage trained
    them); a plain flag's False is its default, and None is no option at all."""
    overrides = {"value_embeds": False, "num_steps": 4, "deterministic": False, "compile": True, "seed": None}
    spec = RunSpec(run="file:///runs/x", preset="cpu", storage="file:///", overrides={"base_train": overrides})
    argv = arguments(pipeline.STAGES["base_train"], spec)
    args = stage.parse_args(base_train.build_parser(), "base_train", argv)
    assert (args.value_embeds, args.num_steps, args.deterministic, args.compile, args.seed) == (False, 4, False, True, 42)
    assert "--no-value-embeds" in argv and "--no-deterministic" not in argv


def test_an_unknown_preset_or_override_stage_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nosuch'; choose from cpu, d20"):
        run_spec("nosuch", "r", str(tmp_path), None, None, 1, {})
    with pytest.raises(ValueError, match="overrides for 'base_trian', which the pipeline has no stage of"):
        run_spec("tiny", "r", str(tmp_path), None, None, 1, {"base_trian": {"num_steps": 1}})
    for misspelt in ("num_stepz", "run"):  # (the run is the flow's own)
        with pytest.raises(ValueError, match=f"^overrides for base_train: it has no option '{misspelt}'; its options: .*, num_steps, "):
            run_spec("tiny", "r", str(tmp_path), None, None, 1, {"base_train": {"num_steps": 1, misspelt: 12}})
    run_spec("tiny", "r", str(tmp_path), None, None, 1, {"base_train": {"num_steps": 1, "value_embeds": False}})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--preset", "nosuch"])
    assert not list(tmp_path.iterdir())  # nothing recorded


@pytest.mark.parametrize("nproc_per_node, nnodes, identity_weight, error", [
    (None, 0, None, "nnodes 0 and nproc_per_node None: each must be at least 1"),
    (0, 1, None, "nnodes 1 and nproc_per_node 0: each must be at least 1"),
    (None, 1, -1.0, "identity_weight -1.0: epochs of your conversations, a number from 0 up"),
])
def test_counts_and_weights_out_of_range_are_refused_before_anything_runs(tmp_path, nproc_per_node, nnodes, identity_weight, error):
    """As deployment parameters (`prefect deployment run ... -p nnodes=0`), which no parser reads: the
    flow refuses them at once (a stage would fail, the identity weight only after base_train)."""
    with pytest.raises(ValueError, match="^" + error.replace("(", r"\(") + "$"):
        plan("tiny", "r", str(tmp_path), None, nproc_per_node, nnodes, {}, None, None, identity_weight, False, ())
    assert not list(tmp_path.iterdir())


def test_a_skip_that_leaves_out_a_finished_stage_of_the_run_is_refused(tmp_path):
    """A run that trained mid_train, run again skipping it, would keep it beside a chat_sft trained
    without it (nanochat chat would take chat_rl's model, trained after the old chat_sft)."""
    run = storage.normalize(str(tmp_path / "run"))
    check_skip(run, ["mid_train"])  # nothing held
    (tmp_path / "run" / "mid_train").mkdir(parents=True)
    (tmp_path / "run" / "mid_train" / "stage.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds mid_train, which skip=\['mid_train'\] leaves out"):
        check_skip(run, ["mid_train"])
    check_skip(run, ["chat_rl"])


def test_the_command_refuses_in_one_line_before_a_prefect_server_starts(tmp_path):
    """What the flow refuses before any stage runs, `make speedrun` says in one line, before a Prefect
    server starts: an identity file that is not there (mid_train found out, after base_train, in a
    torchrun traceback), a skip of a stage the run holds (a Prefect traceback and a runpy one)."""
    argv = ["--preset", "tiny", "--run", "r", "--storage", str(tmp_path)]
    missing = tmp_path / "nothere.jsonl"
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--identity", str(missing)])
    assert refused.value.code == (f"python -m flows.speedrun: identity {missing}: no such file (your conversations "
                                  "for mid_train and chat_sft)")
    (tmp_path / "runs" / "r" / "mid_train").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "mid_train" / "stage.json").write_text("{}")
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--skip", "mid_train"])
    said = refused.value.code
    assert said.startswith("python -m flows.speedrun: run file://") and "which skip=['mid_train'] leaves out" in said
    assert sorted(p.name for p in (tmp_path / "runs" / "r").iterdir()) == ["mid_train"]  # no run.json recorded


def test_storage_it_cannot_reach_is_one_line_before_anything_runs(s3_endpoint, tmp_path, monkeypatch):
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(SystemExit) as refused:
        main(["--preset", "tiny", "--run", "r", "--storage", "s3://bucket/x"])
    assert refused.value.code.startswith("python -m flows.speedrun: storage s3://bucket/x: cannot reach it (NoCredentialsError")
    s3fs.S3FileSystem.clear_instance_cache()


def test_the_flow_clears_a_stage_folder_of_other_work_before_it_runs(tmp_path):
    """A finished stage asked for other work (an override changed, or what its upstream stage made) is
    trained again from nothing: its folder, whose checkpoints it would otherwise resume and train
    none, goes first. The same work keeps it (a retry resumes), and so does an upstream stage
    committed again with the same model (its meta.json and manifest differ, its weights do not)."""
    root = storage.normalize(str(tmp_path))
    spec = RunSpec(run=storage.run_uri("r", root), preset="tiny", storage=root)
    mid = pipeline.STAGES["mid_train"]
    base = tmp_path / "runs" / "r" / "base_train"
    manifest = base / "checkpoints" / "step_000010" / "manifest.json"

    def commit_base(weights, meta):
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"files": {"model.safetensors": {"sha256": weights}, "meta.json": {"sha256": meta}}}))
        (base / "stage.json").write_text(json.dumps({"outputs": {"checkpoint": {"uri": f"file://{manifest}", "sha256": meta},
                                                                 "metrics": {"uri": "file:///m", "sha256": meta}}}))

    def run_with(spec):
        stages.clear_other_work(mid, spec, logging.getLogger("test"))
        checkpoint = tmp_path / "runs" / "r" / "mid_train" / "checkpoints" / "step_000010"
        resumable = checkpoint.exists()
        checkpoint.mkdir(parents=True, exist_ok=True)  # what the stage leaves
        return resumable

    commit_base("w1", "m1")
    assert not run_with(spec)
    assert run_with(spec)  # the same work: a retry resumes
    commit_base("w1", "m2")
    assert run_with(spec)  # base_train committed again with the same weights
    assert not run_with(dataclasses.replace(spec, overrides={"mid_train": {"matrix_lr": 0.5}}))  # another option
    assert run_with(dataclasses.replace(spec, overrides={"mid_train": {"matrix_lr": 0.5}}))
    commit_base("w2", "m3")
    assert not run_with(dataclasses.replace(spec, overrides={"mid_train": {"matrix_lr": 0.5}}))  # another base model
