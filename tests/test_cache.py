"""The stage cache's invalidation (flows/stages.py StageCache), one cell at a time.

What a stage's key is made of (an option, a preset value, a source file of the packages, .c and
.html included) is checked on the key itself, in milliseconds. What the run's files and Prefect
decide is checked through a real Prefect API: one run of download and tok_train on the tiny preset,
run again after each change. Each change comes on top of a state where the run's cached results are
valid, so if the cache missed it, the stage would be reported "Cached" instead of running.

Elsewhere: a re-run of an unchanged run is all cache hits, a stage whose directory is gone runs
again, and a stage that fails once resumes on its retry (tests/test_flows.py); the source hash
covers every file the packages load (tests/test_pipeline.py)."""

import os
import shutil

import pytest

from flows.launch import RunSpec
from flows.speedrun import one_stage, speedrun
from flows.stages import StageCache
from nanochat import common, pipeline, presets, storage
from tests.flowruns import task_states
from tests.stagerun import stage as run_by_hand

SOURCES = ["nanochat/cpu/kernels.c", "nanochat/serve/ui.html"]  # source files that are not Python


def key(tmp_path, **spec):
    """download's cache key in a run under `tmp_path` (download needs no upstream stage)."""
    root = storage.normalize(str(tmp_path))
    spec = RunSpec(run=storage.run_uri("k", root), preset="tiny", storage=root, **spec)
    return StageCache().compute_key(None, {"stage": pipeline.stage("download"), "spec": spec}, {})


def test_a_changed_option_changes_the_key(tmp_path):
    assert key(tmp_path) == key(tmp_path)
    assert key(tmp_path, overrides={"download": {"num_shards": 1}}) != key(tmp_path)


def test_a_changed_preset_value_changes_the_key(tmp_path, monkeypatch):
    before = key(tmp_path)
    monkeypatch.setitem(presets.PRESETS["tiny"], "download", {"num_shards": 1})
    assert key(tmp_path) != before


def test_a_changed_source_file_changes_the_key(tmp_path, monkeypatch):
    """The key's code version hashes the sources under common.REPO_ROOT, here a copy of them."""
    before = key(tmp_path)
    copy = tmp_path / "sources"
    for package in ("nanochat", "tasks", "rustbpe"):
        for path in common.source_files(common.REPO_ROOT / package):
            (copy / path.relative_to(common.REPO_ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy / path.relative_to(common.REPO_ROOT))
    monkeypatch.setattr(common, "REPO_ROOT", copy)
    assert key(tmp_path) == before
    for source in SOURCES:  # each on top of the last
        keys = key(tmp_path)
        (copy / source).write_bytes((copy / source).read_bytes() + b"\n")
        assert key(tmp_path) != keys, source


@pytest.fixture(scope="module")
def steps(prefect_api, shared_data, tmp_path_factory):
    """{step: {stage: state name}}: the first run, then a run after each change."""
    root = str(tmp_path_factory.mktemp("storage"))
    run = storage.run_uri("c", root)
    where = {"run_name": "c", "storage": root, "data_mirror": str(shared_data), "retries": 0, "return_state": True}

    def states(state):
        assert state.is_completed(), state.message
        return task_states(state.state_details.flow_run_id)

    steps = {"first": states(speedrun(preset="tiny", only=["tok_train"], **where))}
    files = storage.read_json(storage.join(run, "download", "stage.json"))["outputs"]["files"]["uri"]
    storage.write_bytes(files, storage.read_bytes(files) + b"\n")
    steps["tampered"] = states(speedrun(preset="tiny", only=["download"], **where))
    steps["forced"] = states(one_stage("download", **where))  # what deployment stage/download runs
    run_by_hand("nanochat.stages.download", run, os.environ, "--storage", root, "--data-mirror", str(shared_data),
                "--num-shards", "1")
    steps["after a run by hand"] = states(speedrun(preset="tiny", only=["tok_train"], **where))
    return steps


def test_a_tampered_output_runs_its_stage_again(steps):
    """download's files.json no longer matches the sha256 its stage.json records."""
    assert steps["tampered"]["download"] == "Completed"


def test_the_stage_flow_runs_a_cached_stage_again(steps):
    """The flow of the per-stage deployments runs its stage although the cache holds it."""
    assert steps["forced"]["download"] == "Completed"


def test_a_stage_rewritten_since_it_was_cached_runs_again(steps):
    """download run by hand with another option since: its cached result no longer describes what
    the run holds, though every output matches the stage.json now there."""
    assert steps["after a run by hand"]["download"] == "Completed"


def test_a_changed_upstream_stage_runs_the_stages_after_it_again(steps):
    """download ran again, so its stage.json changed: tok_train runs again."""
    assert steps["after a run by hand"]["tok_train"] == "Completed"
