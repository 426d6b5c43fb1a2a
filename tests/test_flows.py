"""The speedrun flow through a real Prefect API (one test harness per session) on the tiny preset,
with the real stages as child processes: two concurrent runs execute each stage once, a re-run is
all cache hits, a stage that fails once resumes on Prefect's retry from its checkpoint to the same
weights (and a NANOCHAT_FAULT with a typo is refused, not ignored), s3:// storage, the stage
launcher leaves no torchrun worker behind, one stage at a time when asked, a run that skips
mid_train (chat_sft trains on the base model), the whole DAG end to end with the report card's full
table, and never two torchrun stages at once on the node, in one run or in two. (The cache's
invalidation: tests/test_cache.py.)"""

import concurrent.futures
import dataclasses
import json
import os
import signal
import threading
from pathlib import Path

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from flows import launch, slots, stages
from flows.speedrun import speedrun, with_identity
from nanochat import pipeline, storage
from nanochat.stage import StageError, fault
from tests.support.flowruns import logs, task_runs, task_states
from tests.support.waiting import processes, until

# base_train on the tiny preset, shorter still; deterministic, so a resumed run ends in the same weights
OVERRIDES = {"base_train": {"num_steps": 4, "checkpoint_every": 2, "eval_tokens": 1024, "deterministic": True}}
# The flow tests run the stages up to base_train, so later stages do not lengthen them.
ONLY = ["tok_eval", "base_train"]
SELECTED = [s.name for s in pipeline.select(ONLY)]
ALL = [s.name for s in pipeline.PIPELINE]


def run_speedrun(root, run, shared_data, retries=0, only=ONLY, overrides=OVERRIDES, **kwargs):
    state = speedrun(preset="tiny", run_name=run, storage=str(root), data_mirror=str(shared_data),
                     overrides=overrides, retries=retries, only=only, return_state=True, **kwargs)
    return state, state.state_details.flow_run_id


def artifacts(key, flow_run_id=None):
    """The artifacts with this key (of one flow run, if given)."""
    flow_run = ArtifactFilterFlowRunId(any_=[flow_run_id]) if flow_run_id else None
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=flow_run))


def summaries(run):
    return {name: storage.read_json(storage.join(run, name, "stage.json")) for name in SELECTED}


def final_weights_sha(run):
    manifest = storage.read_json(storage.join(run, "base_train", "stage.json"))["outputs"]["checkpoint"]["uri"]
    return storage.read_json(manifest)["files"]["model.safetensors"]["sha256"]


@pytest.fixture(scope="module")
def finished(prefect_api, shared_data, tmp_path_factory):
    """Two concurrent speedruns of one run and, beside them, a run of its own one stage at a time;
    then a third run of the first (all cache hits): (run URI, first two runs, the third run with the
    stage.json of every stage and the report right after it, stage.json of every stage after the
    first two, the serial run (URI, run)). What a test reads of the run as it was is taken here: a
    test may run a stage of it again (test_missing_artifact_runs_its_stage_again)."""
    root = tmp_path_factory.mktemp("storage")
    runs = [("e2e", True), ("e2e", True), ("serial", False)]
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        *first, serial = pool.map(lambda r: run_speedrun(root, r[0], shared_data, parallel=r[1]), runs)
    after_first = summaries(storage.run_uri("e2e", str(root)))
    run = storage.run_uri("e2e", str(root))
    third = (*run_speedrun(root, "e2e", shared_data), summaries(run), storage.read_text(storage.join(run, "report.md")))
    return run, first, third, after_first, (storage.run_uri("serial", str(root)), serial)


def test_concurrent_runs_execute_each_stage_once(finished):
    run, first, *_ = finished
    for state, _ in first:
        assert state.is_completed(), state.message
    per_stage = [task_states(flow_run_id) for _, flow_run_id in first]
    for name in SELECTED:
        assert sorted(states[name] for states in per_stage) == ["Cached", "Completed"], name
    assert storage.exists(storage.join(run, "report.md"))


def test_rerun_is_all_cache_hits_and_publishes_the_report(finished):
    _, first, (state, flow_run_id, after_third, report), after_first, _ = finished
    assert state.is_completed(), state.message
    states = task_states(flow_run_id)
    assert {name: states[name] for name in SELECTED} == {name: "Cached" for name in SELECTED}
    assert after_third == after_first  # nothing ran again
    assert state.result() == after_first["base_train"]["outputs"]["checkpoint"]["uri"]  # the final checkpoint
    assert "data:image/png;base64," in report  # loss curve
    # one progress artifact, of the first runs' one that trained (the API is the session's: other
    # tests' flow runs train too)
    progress = [a.data for _, flow_run in [*first, (state, flow_run_id)] for a in artifacts("progress-base-train", flow_run)]
    assert progress == [100.0]
    card = artifacts("report-card", flow_run_id)[0].data
    assert card == report and "## Stages" in card
    table = artifacts("stage-outputs", flow_run_id)[0].data
    assert all(name in table for name in SELECTED)


@pytest.fixture(scope="module")
def rerun(finished, prefect_api, shared_data):
    """The finished run again, with the directory of its last stage gone, and chat_sft added to it
    as a run that skips mid_train runs it (0 steps: what it starts from is the point), in one flow
    run: (its state, its flow run id)."""
    run, *_ = finished
    storage.remove(storage.join(run, SELECTED[-1]), recursive=True)
    overrides = {**OVERRIDES, "chat_sft": {"num_steps": 0}}
    return run_speedrun(storage.local_path(run).rsplit("/runs/", 1)[0], "e2e", shared_data, only=[*ONLY, "chat_sft"],
                        skip=["mid_train"], overrides=overrides)


def test_missing_artifact_runs_its_stage_again(finished, rerun):
    run, _, _, after_first, _ = finished
    state, flow_run_id = rerun
    last = SELECTED[-1]  # no stage of SELECTED depends on it, so the others stay cache hits
    assert state.is_completed(), state.message
    states = task_states(flow_run_id)
    assert states[last] == "Completed"
    assert all(states[name] == "Cached" for name in SELECTED if name != last)
    assert storage.read_json(storage.join(run, last, "stage.json"))["outputs"].keys() == after_first[last]["outputs"].keys()


def test_skipping_mid_train_trains_chat_sft_on_the_base_model(finished, rerun):
    """skip=["mid_train"]: mid_train and its evaluation never run, and chat_sft trains on base_train's
    final model, which is the final artifact; run.json records the skip; the report card has no MID
    column."""
    run, *_ = finished
    state, flow_run_id = rerun
    assert state.is_completed(), state.message
    states = task_states(flow_run_id)
    assert states["chat_sft"] == "Completed" and "mid_train" not in states and "chat_eval_mid" not in states
    assert not storage.exists(storage.join(run, "mid_train"))
    sft = storage.read_json(storage.join(run, "chat_sft", "stage.json"))
    base = storage.read_json(storage.join(run, "base_train", "stage.json"))
    assert sft["config"]["from_stage"] == "base_train" and sft["inputs"]["checkpoint"] == base["outputs"]["checkpoint"]
    assert state.result() == sft["outputs"]["checkpoint"]["uri"]
    assert storage.read_json(storage.join(run, "run.json"))["skip"] == ["mid_train"]  # the stage flow's and other nodes' rows
    header = next(line for line in storage.read_text(storage.join(run, "report.md")).splitlines() if line.startswith("| metric"))
    assert "SFT" in header and "MID" not in header


def test_a_stage_trained_on_another_model_has_another_cache_key(tmp_path):
    """chat_sft from base_train (mid_train skipped) and from mid_train: other arguments and other
    upstream stage.json, so one is never a cache hit for the other."""
    spec = launch.RunSpec(run=storage.normalize(str(tmp_path / "run")), preset="tiny", storage=storage.normalize(str(tmp_path)))
    for name in ("download", "base_train", "mid_train"):
        (tmp_path / "run" / name).mkdir(parents=True)
        (tmp_path / "run" / name / "stage.json").write_text(json.dumps({"stage": name}))

    def key(stage):
        return stages.StageCache().compute_key(None, {"stage": stage, "spec": spec}, {})

    from_mid, from_base = pipeline.stage("chat_sft"), pipeline.stage("chat_sft", ["mid_train"])
    assert key(from_mid) != key(from_base)
    assert key(dataclasses.replace(from_base, needs=from_mid.needs)) != key(from_base)  # the upstream stage.json counts too


def test_failed_stage_resumes_from_its_checkpoint(finished, prefect_api, shared_data, tmp_path, monkeypatch):
    """base_train crashes right after step 3 in its first attempt only (step 2 is checkpointed):
    Prefect's retry, in the same flow run, resumes it from that checkpoint to the weights of a run
    that never failed."""
    reference, *_ = finished
    monkeypatch.setenv("NANOCHAT_FAULT", "base_train:3@1")
    monkeypatch.setattr(stages, "RETRY_DELAY_S", 0)  # the retry starts at once, not after 10 s
    state, flow_run_id = run_speedrun(tmp_path, "r", shared_data, retries=1, only=["base_train"])
    assert state.is_completed(), state.message
    assert task_runs(flow_run_id)["base_train"].run_count == 2
    lines = logs(flow_run_id)
    assert any("stage base_train exited with code" in line for line in lines)
    assert any("injected fault at step 3" in line for line in lines)
    assert any("resumed at step 2" in line for line in lines)
    assert final_weights_sha(storage.run_uri("r", str(tmp_path))) == final_weights_sha(reference)  # as if it never failed


@pytest.mark.parametrize("spec", ["tok_eval:abc", "tok_eval@x", "@1", "tok_eval:", "tok_eval@0", "tok_eval:hang:3",
                                  "tok_evl", "chat_eval_mid"])
def test_a_fault_spec_with_a_typo_is_refused(monkeypatch, spec):
    """A malformed NANOCHAT_FAULT or an unknown stage would otherwise inject nothing, and a test of
    failure and resume would pass without any failure."""
    monkeypatch.setenv("NANOCHAT_FAULT", spec)
    with pytest.raises(StageError, match=r"NANOCHAT_FAULT=.*expected <stage>\[:<step>\]\[:hang\]\[@<attempt>\], "
                                         r"<stage> one of .*chat_eval, .*tok_eval"):
        fault("download")  # not the stage named: the old parser returned without injecting


def test_s3_storage(prefect_api, shared_data, s3_root):
    state, _ = run_speedrun(s3_root, "s3run", shared_data)
    assert state.is_completed(), state.message
    run = storage.run_uri("s3run", s3_root)
    assert run.startswith("s3://")
    for name, summary in summaries(run).items():
        assert all(o["uri"].startswith("s3://") for o in summary["outputs"].values()), name
    assert "## Stages" in storage.read_text(storage.join(run, "report.md"))
    state, flow_run_id = run_speedrun(s3_root, "s3run", shared_data)  # results are cached on s3 too
    assert state.is_completed(), state.message
    assert all(task_states(flow_run_id)[name] == "Cached" for name in SELECTED)


def test_every_stage_end_to_end_fills_the_report_table(full_tiny_run):
    """The whole tiny DAG, download to chat_eval_rl (its mirror gone once download committed, see
    the fixture): every stage completes and the report card's table has a BASE, MID, SFT and RL
    column, each with its metrics."""
    run, state = full_tiny_run.run, full_tiny_run.state
    assert state.is_completed(), state.message
    states = task_states(state.state_details.flow_run_id)
    assert {name: states[name] for name in ALL} == {name: "Completed" for name in ALL}
    card = storage.read_text(storage.join(run, "report.md"))
    table = {line.split(" | ")[0].removeprefix("| "): line.strip("| ").split(" | ")[1:]
             for line in card.splitlines() if line.startswith("| ")}
    assert table["metric"] == ["BASE", "MID", "SFT", "RL"]
    assert table["CORE"][0] != "-" and table["val bpb"][0] != "-"
    for task in ("ARC-Easy", "MMLU", "GSM8K", "SpellingBee", "ChatCORE"):
        assert "-" not in table[task][1:], task
    assert table["pass@k"][3] != "-"


def torchrun_spans(*runs):
    """(start, end, run/stage) of every torchrun stage done in the runs, from their stage.json."""
    spans = []
    for run in runs:
        for row in pipeline.PIPELINE:
            uri = storage.join(run, row.name, "stage.json")
            if row.torchrun and storage.exists(uri):
                summary = storage.read_json(uri)
                spans.append((summary["started_at"], summary["finished_at"], f"{run}/{row.name}"))
    return sorted(spans)


def assert_one_at_a_time(spans):
    for (_, end, name), (start, _, later) in zip(spans, spans[1:]):
        assert end <= start, f"{name} ended at {end}, after {later} started at {start}"


def test_the_parallel_dag_never_runs_two_torchrun_stages_at_once(full_tiny_run):
    """base_eval and mid_train are both ready once base_train is done (and each chat_eval beside the
    next training stage), but they hold the node's one slot in turn."""
    spans = torchrun_spans(full_tiny_run.run)
    assert len(spans) == sum(row.torchrun for row in pipeline.PIPELINE)
    assert_one_at_a_time(spans)


def test_two_runs_submitted_together_never_share_the_node(finished):
    """Two runs of their own (not one run twice, which the cache lock serializes): their base_train
    stages take the node's slot in turn, while their tokenizer stages run side by side."""
    run, first, _, _, (serial_run, serial) = finished
    spans = torchrun_spans(run, serial_run)  # with the skip test's chat_sft if it ran first
    assert len([span for span in spans if span[2].endswith("/base_train")]) == 2
    assert_one_at_a_time(spans)
    # each base_train that ran took the slot: one of the two e2e runs' (the other was a cache hit) and serial's
    waited = [line for _, flow_run_id in (*first, serial) for line in logs(flow_run_id)
              if line == f"holding the node's slot {slots.lock_path()}"]
    assert len(waited) == 2


def test_launcher_streams_output_and_leaves_no_torchrun_worker(tmp_path, monkeypatch):
    """torchrun's workers run in sessions of their own: even when the torchrun agent is killed
    outright, the launcher kills them."""
    monkeypatch.setenv("NANOCHAT_FAULT", "base_train:hang")
    spec = launch.RunSpec(run=storage.normalize(str(tmp_path / "run")), preset="tiny",
                          storage=storage.normalize(str(tmp_path)), nproc_per_node=2)
    stage = pipeline.stage("base_train")
    lines, result = [], {}
    thread = threading.Thread(target=lambda: result.update(out=launch.launch(
        launch.command(stage, spec), launch.child_env(spec), lines.append, grace=5.0)), daemon=True)
    thread.start()
    try:
        until(lambda: sum(line.count("injected fault") for line in lines) == 2 or not thread.is_alive(), 120,
              "both ranks' injected hang")
        assert thread.is_alive(), "\n".join(lines)  # the launch hangs, as both ranks do
        agent = next(p for p in psutil.Process().children() if "torch.distributed.run" in " ".join(p.cmdline()))
        workers = agent.children(recursive=True)
        assert len(workers) == 2 and all(os.getsid(w.pid) != os.getsid(agent.pid) for w in workers)
        agent.send_signal(signal.SIGKILL)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the launcher did not return once its torchrun was killed"
    finally:  # whatever failed, nothing of the hung launch outlives the test
        for p in processes(spec.run.removeprefix("file://")):
            p.kill()
    assert result["out"][0] == -signal.SIGKILL
    assert "injected fault" in result["out"][1]
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


def test_identity_goes_to_mid_train_and_chat_sft():
    overrides = {"base_train": {"num_steps": 3}, "mid_train": {"num_steps": 2}}
    got = with_identity(overrides, "s3://b/me.jsonl", 4.0)
    assert got == {"base_train": {"num_steps": 3}, "mid_train": {"num_steps": 2, "identity": "s3://b/me.jsonl", "identity_weight": 4.0},
                   "chat_sft": {"identity": "s3://b/me.jsonl", "identity_weight": 4.0}}
    assert overrides["mid_train"] == {"num_steps": 2}  # the caller's dict is left alone
    assert with_identity(None, None, None) == {}


def test_one_stage_at_a_time(finished):
    """parallel=False (the cpu preset's way): no stage starts before the one before it has ended,
    tok_eval and base_train included, which would otherwise run side by side. The cached results
    are JSON, never pickles that a run directory from elsewhere could use to run code."""
    *_, (run, (state, flow_run_id)) = finished
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    spans = sorted((r.start_time, r.end_time, r.name) for r in runs if r.name in SELECTED)
    assert [name for _, _, name in spans] == SELECTED
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(spans, spans[1:]))
    cached = list(Path(storage.local_path(storage.join(run, "prefect-results"))).iterdir())
    assert cached and all(json.loads(p.read_text())["metadata"]["serializer"]["type"] == "json" for p in cached)
