"""The stage cache's invalidation (flows/stages.py StageCache), one cell at a time.

What a stage's key is made of (an option, a preset value, a source file of the packages, .c and
.html included) and when a cached result still counts are checked on the cache's own functions, in
milliseconds. What Prefect then does is checked through a real Prefect API: a run of download and
tok_train on the tiny preset, its tok_train forced by the stage flow, then the run again after
download's output was tampered with. Each step starts where the cached results are valid, so if
the cache missed a change, the stage would be reported "Cached" instead of running.

Elsewhere: a re-run of an unchanged run is all cache hits, a stage whose directory is gone runs
again, and a stage that fails once resumes on its retry (tests/test_flows.py); the source hash
covers every file the packages load (tests/test_pipeline.py)."""

import shutil

import pytest
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.serializers import JSONSerializer

from flows import stages
from flows.launch import RunSpec
from flows.speedrun import one_stage, speedrun
from nanochat import common, pipeline, presets, storage
from tests.support.flowruns import task_states

SOURCES = ["nanochat/cpu/kernels.c", "nanochat/serve/ui.html"]  # source files that are not Python


def run_spec(tmp_path, **kwargs):
    root = storage.normalize(str(tmp_path))
    return RunSpec(run=storage.run_uri("k", root), preset="tiny", storage=root, **kwargs)


def key(tmp_path, stage="download", **spec):
    """A stage's cache key in a run under `tmp_path` (download's by default: it needs no upstream stage)."""
    return stages.StageCache().compute_key(None, {"stage": pipeline.stage(stage), "spec": run_spec(tmp_path, **spec)}, {})


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


def test_a_file_an_option_names_changed_under_the_same_name_changes_the_key(tmp_path, monkeypatch):
    """An identity file regenerated in place, a file grown in or added to a folder of your own text,
    and the source of a task of your own: each is a new key though the options read the same."""
    identity, text, module = tmp_path / "me.jsonl", tmp_path / "text", tmp_path / "mytasks.py"
    identity.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I am Quill"}]\n')
    text.mkdir()
    (text / "a.parquet").write_bytes(b"1")
    module.write_text("class Capitals: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    options = {"chat_sft": {"identity": str(identity)}, "download": {"source": str(text)},
               "chat_eval_sft": {"tasks": "ARC-Easy,mytasks:Capitals"}}
    keys = lambda: [key(tmp_path, stage, overrides=options) for stage in options]  # noqa: E731
    changes = [lambda: identity.write_text(identity.read_text().replace("Quill", "Quilt")),
               lambda: (text / "a.parquet").write_bytes(b"12"),
               lambda: (text / "b.parquet").write_bytes(b"1"),
               lambda: module.write_text("class Capitals:\n    pass\n")]
    for stage, change in zip(["chat_sft", "download", "download", "chat_eval_sft"], changes):
        before = keys()
        assert keys() == before
        change()
        after = keys()
        assert [b != a for b, a in zip(before, after)] == [s == stage for s in options], stage


def test_a_result_counts_only_while_its_stage_json_is_the_one_in_the_run(tmp_path):
    """Another option and back, or the stage run by hand, rewrites the stage's directory: a result
    cached before no longer describes it, though every output matches the stage.json now there."""
    spec, results = run_spec(tmp_path), tmp_path / "results"

    def commit(text):
        output = storage.join(spec.run, "download", "files.json")
        storage.write_text(output, text)
        summary = {"outputs": {"files": {"uri": output, "sha256": storage.sha256(output)}}}
        storage.write_json(stages.summary_uri("download", spec), summary)
        return summary

    cache = ResultStore(result_storage=LocalFileSystem(basepath=str(results)), serializer=JSONSerializer())
    cache.write(commit("{}"), key="k")  # as Prefect records a task's result
    assert stages.holds(pipeline.stage("download"), spec, str(results / "k"))
    commit('{"other": 1}')
    assert not stages.holds(pipeline.stage("download"), spec, str(results / "k"))


@pytest.fixture(scope="module")
def steps(prefect_api, shared_data, tmp_path_factory):
    """{step: {stage: state name}}: the first run of download and tok_train, tok_train forced by the
    stage flow, then the run again after download's output was tampered with."""
    root = str(tmp_path_factory.mktemp("storage"))
    where = {"run_name": "c", "storage": root, "data_mirror": str(shared_data), "retries": 0, "return_state": True}

    def states(state):
        assert state.is_completed(), state.message
        return task_states(state.state_details.flow_run_id)

    steps = {"first": states(speedrun(preset="tiny", only=["tok_train"], **where))}
    steps["forced"] = states(one_stage("tok_train", **where))  # what deployment stage/tok_train runs
    download = storage.read_json(storage.join(storage.run_uri("c", root), "download", "stage.json"))
    files = download["outputs"]["files"]["uri"]
    storage.write_bytes(files, storage.read_bytes(files) + b"\n")
    steps["tampered"] = states(speedrun(preset="tiny", only=["tok_train"], **where))
    return steps


def test_the_stage_flow_runs_a_cached_stage_again(steps):
    """The flow of the per-stage deployments runs its stage although the cache holds it."""
    assert steps["forced"]["tok_train"] == "Completed"


def test_a_tampered_output_runs_its_stage_again(steps):
    """download's files.json no longer matches the sha256 its stage.json records."""
    assert steps["tampered"]["download"] == "Completed"


def test_a_changed_upstream_stage_runs_the_stages_after_it_again(steps):
    """download ran again, so its stage.json changed: tok_train, cached by the forced run, runs again."""
    assert steps["tampered"]["tok_train"] == "Completed"
