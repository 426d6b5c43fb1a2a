"""The Slurm example for real: on a one-node cluster on 127.0.0.1 (tests/support/slurmcluster.py), the worker
of deployments/slurm/worker.sbatch, submitted with sbatch, picks up a tiny speedrun deployed on pool
gpu-slurm, and its torchrun stage runs as a step of the worker's job, through srun."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from tests.support import workers
from tests.support.slurmcluster import DAEMONS, slurm_cluster
from tests.support.stagerun import missing

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cluster(tmp_path):
    if os.geteuid() != 0:  # (and make dev installs Slurm as root only)
        missing("the Slurm test runs slurmctld and slurmd as root (as CI does)")
    if not all(shutil.which(name) for name in (*DAEMONS, "sbatch", "srun")):
        missing("Slurm is not installed (make dev installs it: apt-get install slurm-wlm)")
    with slurm_cluster(tmp_path / "slurm") as cluster:
        yield cluster


def test_sbatch_worker_runs_a_deployed_speedrun_with_torchrun_under_srun(cluster, prefect_api, shared_data, tmp_path):
    env = {**os.environ, **cluster.env, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    workers.process_pool("gpu-slurm", env)
    workers.deploy("--name", "slurm", env=env, cwd=REPO)
    worker_log = tmp_path / "worker.log"
    job = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", f"--output={worker_log}",
                          "deployments/slurm/worker.sbatch"], env=env, cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    storage = tmp_path / "storage"
    params = {"preset": "tiny", "storage": str(storage), "data_mirror": str(shared_data), "only": ["base_train"],
              "overrides": {"base_train": {"num_steps": 2, "eval_every": -1, "checkpoint_every": -1}}}  # torchrun is what counts
    flow_run = run_deployment("speedrun/slurm", parameters=params, timeout=0)
    state, torchrun = watch(flow_run.id, marker=str(storage))
    cluster.run("scancel", job)
    assert state.is_completed(), f"{state.message}\n{worker_log.read_text()[-3000:]}"
    assert (storage / "runs" / "speedrun-tiny" / "base_train" / "stage.json").is_file()
    # base_train's torchrun was started by slurmstepd in the worker's job; download and tok_train,
    # single processes, were not steps
    assert torchrun["parent"] == "slurmstepd" and torchrun["SLURM_JOB_ID"] == job, torchrun
    assert cluster.steps_launched(job) == [f"{job}.{torchrun['SLURM_STEP_ID']}"]


def watch(flow_run_id, marker, timeout=150):
    """Waits for the flow run to end, looking meanwhile for the torchrun of its stages (a process
    whose command line holds `marker`): (final state, where that torchrun came from)."""
    seen = {}
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            seen = seen or torchrun_origin(marker)
            state = client.read_flow_run(flow_run_id).state
            if state.is_final():
                return state, seen
            time.sleep(0.2)
    raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout} s")


def torchrun_origin(marker):
    """{parent: its parent's name, and the Slurm job and step in its environment} of the first
    torchrun agent running with `marker` in its command line; {} when none is."""
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if cmdline[1:3] == ["-m", "torch.distributed.run"] and marker in " ".join(cmdline):
            try:
                environ = p.environ()
                return {"parent": p.parent().name(), **{k: environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_STEP_ID")}}
            except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                continue
    return {}
