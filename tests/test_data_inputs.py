"""Stages declare their data: in a run whose download stage is committed, every data file comes
from its files.json (never from the mirror), a file it lacks is a one-line error naming it, and each
stage records files.json and the files it read as its stage.json inputs.

The pipeline run is the whole tiny DAG of the `full_tiny_run` fixture (tests/conftest.py), whose
real HTTP mirror on 127.0.0.1 stops as soon as download has committed."""

import pytest

from nanochat import dataset, pipeline, sources, stage, storage
from tasks.common import data_file
from tests.support.flowruns import task_states
from tests.support.stagerun import stage as run_stage

SHARDS = ["pretrain/shard_00000.parquet", "pretrain/shard_00001.parquet", "pretrain/shard_00023.parquet"]
TASK_FILE = "hf/openai/gsm8k/main/train-00000-of-00001.parquet"  # read by mid_train's mixture
OPTIONAL = sources.GROUPS["mmlu_train"][0]  # registered, but fetched only with --mmlu-train
READS_DATA = [s.name for s in pipeline.PIPELINE if "download" in s.needs]


def summary(run, name):
    return storage.read_json(storage.join(run, name, "stage.json"))


@pytest.fixture(scope="module")
def pipeline_run(full_tiny_run):
    """(run URI, task states) of the shared tiny run, its mirror stopped once download committed."""
    state = full_tiny_run.state
    assert state.is_completed(), state.message
    return full_tiny_run.run, task_states(state.state_details.flow_run_id)


def test_stages_complete_with_the_mirror_gone(pipeline_run):
    _, states = pipeline_run
    assert {s.name: states[s.name] for s in pipeline.PIPELINE} == {s.name: "Completed" for s in pipeline.PIPELINE}


def test_stage_json_inputs_are_files_json_and_the_files_read(pipeline_run):
    run, _ = pipeline_run
    files_json = summary(run, "download")["outputs"]["files"]
    files = storage.read_json(files_json["uri"])

    def data_inputs(name):
        inputs = summary(run, name)["inputs"]
        assert inputs["files.json"] == files_json, name
        got = {k: v for k, v in inputs.items() if k in files}
        assert all(v == {"uri": files[k]["uri"], "sha256": files[k]["sha256"], "bytes": files[k]["bytes"]}
                   for k, v in got.items()), name
        return set(got)

    assert data_inputs("tok_train") == set(SHARDS[:2])  # training shards only
    assert data_inputs("tok_eval") == {SHARDS[2]}
    assert data_inputs("base_train") == set(SHARDS)  # the tiny preset runs no CORE while training
    assert data_inputs("base_eval") == {*SHARDS, sources.EVAL_BUNDLE}
    mid = data_inputs("mid_train")
    assert TASK_FILE in mid and "identity_conversations.jsonl" in mid and not mid & {*SHARDS, sources.EVAL_BUNDLE}
    assert TASK_FILE in data_inputs("chat_rl")
    assert all(data_inputs(name) for name in READS_DATA)  # every stage that reads data records it
    # upstream artifacts through the upstream's outputs
    tokenizer = summary(run, "tok_train")["outputs"]["tokenizer"]
    assert summary(run, "tok_eval")["inputs"]["tokenizer"] == summary(run, "base_train")["inputs"]["tokenizer"] == tokenizer


def declared_copy(run, tmp_path, drop):
    """A new run whose download stage is that of `run` with `drop` left out of files.json (and
    stage.json's record of files.json updated, as if download had committed it so)."""
    new = storage.normalize(str(tmp_path / "run"))
    files = storage.read_json(summary(run, "download")["outputs"]["files"]["uri"])
    del files[drop]
    files_uri = storage.join(new, "download", "files.json")
    storage.write_json(files_uri, files)
    committed = summary(run, "download")
    committed["outputs"]["files"] = stage.artifact(files_uri)
    storage.write_json(storage.join(new, "download", "stage.json"), committed)
    return new


def test_a_file_missing_from_files_json_fails_naming_it(pipeline_run, tiny_env, tmp_path):
    run, _ = pipeline_run
    checkpoint = summary(run, "base_train")["outputs"]["checkpoint"]["uri"].rsplit("/", 1)[0]
    new = declared_copy(run, tmp_path, TASK_FILE)
    env = {**tiny_env, "NANOCHAT_DATA_MIRROR": str(tmp_path / "no-mirror")}
    done = run_stage("nanochat.stages.mid_train", new, env, "--checkpoint", checkpoint, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert lines[-1].startswith("mid_train: error: ") and TASK_FILE in lines[-1] and "files.json" in lines[-1]
    assert not (tmp_path / "run" / "mid_train" / "stage.json").exists()


def test_declared_files_in_process(pipeline_run, tmp_path, monkeypatch):
    """fetch() resolves through files.json (a missing or changed file named), the eval bundle is
    unpacked again from the declared zip, never downloaded; a files.json changed since download
    committed is refused; a run without download fetches as before."""
    run, _ = pipeline_run
    monkeypatch.setattr(stage, "_declared", None)  # restored after the test
    monkeypatch.setenv("NANOCHAT_DATA_MIRROR", str(tmp_path / "no-mirror"))
    declared = stage.declare_data(run)
    files = declared.files
    assert data_file(TASK_FILE) == files[TASK_FILE]["uri"] and list(declared.resolved) == [TASK_FILE]
    with pytest.raises(stage.StageError, match=f"{OPTIONAL} is not declared in .*files.json"):
        dataset.fetch(OPTIONAL)

    bundle = dataset.eval_bundle_dir()
    assert bundle == files[sources.EVAL_BUNDLE]["uri"].rsplit("/", 1)[0] + "/eval_bundle"
    storage.remove(bundle, recursive=True)
    assert storage.exists(storage.join(dataset.eval_bundle_dir(), "core.yaml"))  # from the zip, not the mirror

    with pytest.raises(stage.StageError, match="declares 2"):
        dataset.pretrain_shards(3)
    train, val = dataset.pretrain_shards(-1)
    assert [train, val] == [[files[r]["uri"] for r in SHARDS[:2]], files[SHARDS[2]]["uri"]]
    assert dataset.shard_waiter() is None

    new = declared_copy(run, tmp_path, TASK_FILE)
    storage.write_json(storage.join(new, "download", "files.json"), files)  # edited after the commit
    with pytest.raises(stage.StageError, match="differs from what stage 'download' committed"):
        stage.declare_data(new)
    assert stage.declared_data() is None

    moved = tmp_path / "moved"
    storage.write_json(storage.join(new, "download", "files.json"), {**files, TASK_FILE: {**files[TASK_FILE], "uri": str(moved)}})
    storage.write_json(storage.join(new, "download", "stage.json"),
                       {**summary(new, "download"), "outputs": {"files": stage.artifact(storage.join(new, "download", "files.json"))}})
    stage.declare_data(new)
    with pytest.raises(stage.StageError, match=f"{TASK_FILE} declared in .*: it is missing"):
        data_file(TASK_FILE)

    assert stage.declare_data(storage.normalize(str(tmp_path / "alone"))) is None
    assert stage.declared_data() is None and dataset.shard_waiter() is not None

