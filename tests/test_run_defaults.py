"""Defaults a run on a cluster depends on: a stage stops at its preset's timeout, a re-run of one
stage takes the run's own preset and overrides, run names say preset and run, multi-node runs and
remote pools refuse the worker's local disk, GPU presets run one process per GPU, and `make
server` listens beyond loopback only with an auth string. (One GPU job at a time per node is
tests/test_flows.py's, on its concurrent runs and the whole DAG.)"""

import base64
import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows import speedrun as speedrun_module
from flows.speedrun import default_nproc, one_stage, speedrun
from nanochat import presets, storage
from tests.support.s3server import free_port
from tests.support.waiting import end, processes, until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_stage_past_its_timeout_fails_and_leaves_no_process(prefect_api, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_FAULT", "download:hang")
    monkeypatch.setitem(presets.LIMITS["tiny"]["stage_timeout_s"], "download", 3)
    started = time.monotonic()
    state = speedrun(preset="tiny", run_name="slow", storage=str(tmp_path), data_mirror=str(shared_data), retries=0,
                     only=["download"], return_state=True)
    assert state.is_failed() and "stage download ran past its timeout of 3 s (preset tiny)" in state.message
    assert time.monotonic() - started < 60
    assert not processes(str(tmp_path / "runs" / "slow"))


@pytest.fixture(scope="module")
def recorded(prefect_api, shared_data, tmp_path_factory):
    """A run that downloads one shard (an override), and the state of its flow run."""
    root = tmp_path_factory.mktemp("storage")
    state = speedrun(preset="tiny", run_name="rec", storage=str(root), data_mirror=str(shared_data), retries=0,
                     only=["download"], overrides={"download": {"num_shards": 1}}, return_state=True)
    assert state.is_completed(), state.message
    return root, state


def test_a_stage_rerun_takes_the_runs_preset_and_overrides(recorded, shared_data):
    root, _ = recorded
    run = storage.run_uri("rec", str(root))
    assert storage.read_json(storage.join(run, "run.json")) == {
        "preset": "tiny", "nproc_per_node": 1, "nnodes": 1, "overrides": {"download": {"num_shards": 1}}}
    before = storage.read_json(storage.join(run, "download", "stage.json"))
    summary = one_stage("download", run_name="rec", storage=str(root), data_mirror=str(shared_data), retries=0)
    assert summary["config"]["num_shards"] == 1 and summary["config"]["preset"] == "tiny"
    assert summary["finished_at"] > before["finished_at"]  # it ran again (the stage flow bypasses the cache)


def test_a_stage_rerun_without_a_recorded_run_needs_a_preset(prefect_api, tmp_path):
    state = one_stage("download", run_name="never", storage=str(tmp_path), retries=0, return_state=True)
    assert state.is_failed() and "run.json does not exist (the speedrun flow writes it, `nanochat import --preset` records " \
        "one): give the preset" in state.message


def test_run_names_say_preset_and_run_and_tags_say_stage(recorded, shared_data):
    root, state = recorded
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert flow_run.name == "speedrun-tiny-rec"
    assert {r.name: set(r.tags) for r in task_runs}["download"] == {"stage:download"}
    stage_state = one_stage("download", run_name="rec", storage=str(root), data_mirror=str(shared_data), retries=0,
                            return_state=True)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(stage_state.state_details.flow_run_id).name == "download-rec"


def test_runs_elsewhere_refuse_the_workers_local_disk(prefect_api, tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_STORAGE", raising=False)
    state = speedrun(preset="tiny", run_name="far", nnodes=2, retries=0, only=["download"], return_state=True)
    assert state.is_failed() and "a run on 2 nodes needs storage every node reaches" in state.message
    state = speedrun(preset="tiny", run_name="far", stage_deployments=True, retries=0, only=["download"], return_state=True)
    assert state.is_failed() and "a run on stage deployments needs storage every node reaches" in state.message
    monkeypatch.setattr(speedrun_module, "work_pool_type", lambda: "kubernetes")
    state = one_stage("download", run_name="far", preset="tiny", retries=0, return_state=True)
    assert state.is_failed() and "a run on a kubernetes work pool needs storage every node reaches" in state.message


def test_gpu_presets_run_one_process_per_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert default_nproc("d20") == 8
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="preset d32 runs one process per GPU and this node has none"):
        default_nproc("d32")
    assert (default_nproc("cpu"), default_nproc("tiny")) == (2, 1)
    dry = subprocess.run(["make", "-n", "speedrun", "PRESET=d20"], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=60)
    assert "--preset 'd20'" in dry.stdout and "--nproc-per-node" not in dry.stdout  # the flow decides


def test_make_server_beyond_loopback_needs_an_auth_string(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    refused = subprocess.run(["make", "server", "HOST=0.0.0.0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "needs PREFECT_SERVER_API_AUTH_STRING" in refused.stderr
    port = free_port()
    env = {**env, "PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_API_AUTH_STRING": "admin:s3cret"}
    server = subprocess.Popen(["make", "server", "HOST=0.0.0.0", f"PORT={port}"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        health = f"http://127.0.0.1:{port}/api/health"
        assert until(lambda: status(health), 120, f"{health} to answer", procs=[server]) == 200  # probes stay open
        version = f"http://127.0.0.1:{port}/api/admin/version"
        assert status(version) == 401 and status(version, auth="admin:wrong") == 401
        assert status(version, auth="admin:s3cret") == 200
    finally:
        end(server)


def status(url, auth=None):
    """The HTTP status of GET `url`; None while nothing listens there."""
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # refused, or reset while the server starts
        return None


def test_make_deploy_refuses_what_workers_would_not_find(tmp_path):
    """Workers clone the commit `make deploy` records from GIT_URL: a file not committed (a new task
    module too) or a commit that GIT_URL has on no branch is refused before anything is deployed."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", REPO, str(clone)], check=True)  # origin: this repository

    def deploy():  # this checkout's Makefile; its checks come first, setup (-o: taken as done) is never run
        return subprocess.run(["make", "-f", f"{REPO}/Makefile", "-o", "setup", "deploy", f"VENV={REPO}/.venv",
                               "PREFECT_API=http://127.0.0.1:9/api"],
                              cwd=clone, capture_output=True, text=True, timeout=60)

    (clone / "tasks" / "mytasks.py").write_text("# a task module of one's own, not added yet\n")
    refused = deploy()
    assert refused.returncode == 2 and "make deploy: changes that are not committed" in refused.stderr
    assert "?? tasks/mytasks.py" in refused.stderr
    subprocess.run(["git", "add", "tasks/mytasks.py"], cwd=clone, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "mine"], cwd=clone, check=True)
    refused = deploy()
    assert refused.returncode == 2 and f"make deploy: HEAD is on no branch or tag of {REPO}" in refused.stderr
    subprocess.run(["git", "reset", "--hard", "-q", "HEAD~1"], cwd=clone, check=True)  # back on what origin has
    passed = deploy()
    assert "make deploy:" not in passed.stderr and "prefect" in passed.stdout  # on to Prefect (unreachable here)
