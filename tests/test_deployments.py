"""prefect.yaml and deployments/: the templates parse and resolve; the DAG sends its torchrun stages
to their deployments, whose runs a process worker on pool "gpu" picks up; cancelling a run leaves no
stage process behind. (That
prefect.yaml has one deployment per pipeline row is tests/test_pipeline.py's.)"""

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.deployments import run_deployment
from prefect.states import Cancelling
from prefect.workers.process import ProcessJobConfiguration

from flows import launch
from flows.speedrun import speedrun
from tests.support import workers
from tests.support.waiting import processes, until

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENTS = REPO / "deployments"


def defaults(template):
    return {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}


def test_process_pool_template_resolves(prefect_api):
    template = yaml.safe_load((DEPLOYMENTS / "gpu-pool.json").read_text())
    config = asyncio.run(ProcessJobConfiguration.from_template_and_values(template, defaults(template)))
    assert config.env["OMP_NUM_THREADS"] == "1" and config.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_slurm_example_is_valid_bash():
    subprocess.run(["bash", "-n", str(DEPLOYMENTS / "slurm" / "worker.sbatch")], check=True, timeout=30)


def in_this_checkout(tmp):
    """prefect.yaml's deployments on pool "gpu", their flows run in this checkout (Prefect's own pull
    step without one) rather than in a clone of the deployed commit: these tests run the working
    tree's code; the clone is tests/test_deploy_elsewhere.py's."""
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    # speedrun/speedrun is left out: the session's full_tiny_run deploys it to a pool of its own, maybe
    # at this very moment (tests/support/deployed.py), and these tests run the stage deployments
    config["deployments"] = [d for d in config["deployments"]
                             if d.get("work_pool", {}).get("name") == "gpu" and d["name"] != "speedrun"]
    for deployment in config["deployments"]:
        deployment["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def worker(prefect_api, tmp_path_factory):
    """Pool "gpu" from deployments/gpu-pool.json, prefect.yaml's deployments on it deployed with the
    real CLI, and a process worker polling every second."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    tmp = tmp_path_factory.mktemp("worker")
    workers.process_pool("gpu", env)
    workers.deploy("--all", "--prefect-file", str(in_this_checkout(tmp)), env=env, cwd=REPO)
    with workers.process_worker("gpu", env, REPO, tmp / "worker.log"):
        yield


def flow_run_state(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def test_the_dag_sends_its_torchrun_stages_to_their_deployments(worker, shared_data, tmp_path):
    """stage_deployments=True: base_train runs as a flow run of deployment stage/base_train, which the
    process worker picks up (on a Kubernetes pool it would be a Job), with the run's nodes and
    processes as job variables; download and tok_train run in the DAG's own process."""
    overrides = {"base_train": {"num_steps": 2, "eval_every": -1, "checkpoint_every": -1}}
    state = speedrun(preset="tiny", run_name="sent", storage=str(tmp_path), data_mirror=str(shared_data), retries=0,
                     only=["base_train"], overrides=overrides, stage_deployments=True, return_state=True)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        sent = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[
            f"{name}-sent" for name in ("download", "tok_train", "base_train")])))
        [deployment] = [client.read_deployment(r.deployment_id) for r in sent]
    [flow_run] = sent
    assert flow_run.name == "base_train-sent" and flow_run.state.is_completed() and deployment.name == "base_train"
    assert flow_run.job_variables == {"nnodes": 1, "nproc_per_node": 1}
    assert flow_run.parameters["overrides"] == overrides and flow_run.parameters["preset"] == "tiny"
    assert flow_run.parent_task_run_id is not None  # a subflow of the DAG's base_train task
    assert (tmp_path / "runs" / "sent" / "base_train" / "stage.json").is_file()


def test_cancelled_run_leaves_no_stage_process(worker, shared_data, tmp_path):
    """A torchrun stage hangs (its workers in sessions of their own); cancelling the flow run ends
    the whole tree."""
    params = {"run_name": "cancelled", "preset": "tiny", "storage": str(tmp_path), "data_mirror": str(shared_data),
              "nproc_per_node": 2}
    flow_run = run_deployment("stage/base_train", parameters=params, timeout=0,
                              job_variables={"env": {"NANOCHAT_FAULT": "base_train:hang"}})
    marker = str(tmp_path / "runs" / "cancelled")
    try:
        until(lambda: len(processes(marker)) >= 3 or flow_run_state(flow_run.id).is_final(), 180,
              "torchrun and its two workers to hang")
        assert not flow_run_state(flow_run.id).is_final(), flow_run_state(flow_run.id)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        final = until(lambda: flow_run_state(flow_run.id), 240, "the cancelled flow run to end", done=lambda s: s.is_final())
        assert final.is_cancelled(), final
        until(lambda: processes(marker), 30, "the stage's processes to end", done=lambda left: not left)
    finally:
        launch.kill_tree(processes(marker), grace=1)  # a hung stage would hold the node's slot for good
