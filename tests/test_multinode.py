"""Multi-node launches on one machine: two "nodes" of one process each on 127.0.0.1, node 0 the real
`stage` flow through a real Prefect API, node 1 `python -m flows.node` as a second pod runs it.
Node 1 is killed mid-training; node 0's launch ends within the preset's collective timeout, Prefect
retries the stage, node 1 comes back, and the weights end bit-identical to a 2-process run on one
node. Also: every launch meets under its own rendezvous id, and a silent peer ends a collective
after the collective timeout."""

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid

import psutil
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.flow_engine import run_flow

from flows import launch
from flows.launch import RunSpec, command, rendezvous_id
from flows.speedrun import one_stage
from nanochat import pipeline, presets, storage
from tests.support.s3server import free_port
from tests.support.stagerun import stage
from tests.support.waiting import end, processes, until

BASE_TRAIN = pipeline.stage("base_train")


def rdzv_id(cmd):
    return next(arg.split("=", 1)[1] for arg in cmd if arg.startswith("--rdzv-id="))


def test_every_launch_meets_under_its_own_rendezvous_id(monkeypatch):
    monkeypatch.setenv("NANOCHAT_RDZV_ENDPOINT", "node0:29500")
    spec = RunSpec(run="file:///runs/a", preset="tiny", storage="file:///", nnodes=2)
    launches = [(BASE_TRAIN, spec, 1), (BASE_TRAIN, spec, 2), (pipeline.stage("mid_train"), spec, 1),
                (BASE_TRAIN, RunSpec(run="file:///runs/b", preset="tiny", storage="file:///", nnodes=2), 1)]
    ids = [rdzv_id(command(*launch)) for launch in launches]
    assert len(set(ids)) == len(ids)
    assert ids[0] == rendezvous_id(BASE_TRAIN, spec, 1)
    assert "--max-restarts=0" in command(BASE_TRAIN, spec)
    single = command(BASE_TRAIN, RunSpec(run="file:///runs/a", preset="tiny", storage="file:///"))
    assert "--standalone" in single and not any(arg.startswith("--rdzv") for arg in single)


# Rank 1 joins the group and then stays silent, as a node that hangs or lost its network would.
# Rank 0 then tears the group down as stage.run_main does (a timed-out gloo group left to the
# interpreter's exit may abort it).
SILENT_PEER = """
import sys, time
import torch, torch.distributed as dist
from nanochat.common import compute_cleanup, compute_init
compute = compute_init("cpu")
if compute.rank == 1:
    time.sleep(120)
start = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except RuntimeError:
    print(f"{time.monotonic() - start:.1f}", flush=True)
    compute_cleanup()
    sys.exit(3)
"""


def test_a_silent_peer_ends_a_collective_after_the_collective_timeout(tiny_env):
    env = {**tiny_env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "NANOCHAT_COLLECTIVE_TIMEOUT_S": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", SILENT_PEER], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, text=True) for r in range(2)]
    try:
        out, _ = ranks[0].communicate(timeout=60)
        assert ranks[0].returncode == 3
        assert 2.0 <= float(out) < 10.0
    finally:
        for p in ranks:
            p.kill()
            p.communicate()


def start_node(flow_run_id, api, env, log, **extra):
    """Node 1: `python -m flows.node` for the flow run, in a session of its own (a second machine)."""
    env = {**env, "PREFECT__FLOW_RUN_ID": str(flow_run_id), "PREFECT_API_URL": api, **extra}
    return subprocess.Popen([sys.executable, "-m", "flows.node"], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def tree(pid):
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def ended(process):
    """Exited (a zombie: waiting on it here would take its exit code from the launcher)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_nodes(nodes, flow, name):
    """Ends node 1's processes, and every launch of run `name` until node 0's flow has given up (its
    retry would otherwise wait for node 1 at the rendezvous): nothing of a failed test lives on."""
    for node in nodes:
        end(node)

    def flow_ended():
        launch.kill_tree(processes(name), grace=1)
        return not flow.is_alive()

    until(flow_ended, 120, "node 0's flow run to give up")


def final_weights_sha(run):
    manifest = storage.read_json(storage.join(run, "base_train", "stage.json"))["outputs"]["checkpoint"]["uri"]
    return storage.read_json(manifest)["files"]["model.safetensors"]["sha256"]


def test_two_nodes_lose_one_and_end_as_one_node_would(prefect_api, tiny_env, tmp_path, monkeypatch):
    root = tiny_env["NANOCHAT_STORAGE"]
    name = f"two-nodes-{uuid.uuid4().hex[:8]}"
    run = storage.run_uri(name, root)
    stage("nanochat.stages.download", run, tiny_env)
    stage("nanochat.stages.tok_train", run, tiny_env)
    reference = tmp_path / "reference"
    shutil.copytree(storage.local_path(run), reference)
    stage("nanochat.stages.base_train", reference, tiny_env, "--deterministic", nproc=2)

    env = {**tiny_env, "NANOCHAT_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}
    for name in ("NANOCHAT_RDZV_ENDPOINT", "OMP_NUM_THREADS", "NANOCHAT_STORAGE"):
        monkeypatch.setenv(name, env[name])
    parameters = {"name": "base_train", "run_name": run, "preset": "tiny", "storage": root, "nnodes": 2,
                  "nproc_per_node": 1, "overrides": {"base_train": {"deterministic": True}}, "retries": 1}
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(one_stage, parameters=parameters)
    node0 = {}
    flow = threading.Thread(target=lambda: node0.update(state=run_flow(one_stage, flow_run, parameters, return_type="state")),
                            daemon=True)  # a failed test must not keep the session from exiting
    flow.start()
    nodes = []
    try:
        # node 1 stops after step 10 (checkpointed); node 0 waits in step 11's gradient all-reduce
        first_log, second_log = tmp_path / "node1-first.log", tmp_path / "node1-second.log"
        node1 = start_node(flow_run.id, prefect_api, env, first_log, NANOCHAT_FAULT="base_train:10:hang")
        nodes.append(node1)
        until(lambda: "injected fault at step 10" in first_log.read_text(), 120, "the fault on node 1", procs=[node1])
        lost = {p.pid for p in tree(node1.pid)}
        survivors = [p for p in tree(psutil.Process().pid) if p.pid not in lost and "torch.distributed.run" in p.cmdline()]
        assert survivors, "node 0 runs no torchrun"
        for p in tree(node1.pid):
            p.kill()
        killed = time.monotonic()
        node1.wait()
        bound = presets.collective_timeout("tiny") + 10  # the collective timeout, and torchrun's teardown
        until(lambda: all(map(ended, survivors)), bound, "the end of node 0's launch")
        detected = time.monotonic() - killed
        print(f"node 0's launch ended {detected:.1f} s after node 1 was killed")

        node1 = start_node(flow_run.id, prefect_api, env, second_log)  # the pod restarted
        nodes.append(node1)
        until(lambda: not flow.is_alive(), 300, "node 0's flow run to end")
        assert node1.wait(timeout=60) == 0, second_log.read_text()[-3000:]
    finally:
        stop_nodes(nodes, flow, name)
    state = node0["state"]
    assert state.is_completed(), state.message
    assert final_weights_sha(run) == final_weights_sha(f"file://{reference}")

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        logs = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))]
    assert [(t.name, t.run_count, t.state.name) for t in task_runs] == [("base_train", 2, "Completed")]
    assert any("stage base_train exited with code 1" in line for line in logs)  # attempt 1 failed as a stage
    assert any("resumed at step 10" in line for line in logs)
    # both nodes ran the same command in each attempt, one rendezvous id per attempt
    node0_commands = [line.removeprefix("$ ") for line in logs if line.startswith("$ ")]
    node1_commands = [line.removeprefix("$ ") for log in (first_log, second_log)
                      for line in log.read_text().splitlines() if line.startswith("$ ")]
    assert len(node0_commands) == 2 and set(node1_commands) == set(node0_commands)
    assert len({rdzv_id(cmd.split()) for cmd in node0_commands}) == 2


def test_the_node_follower_explains_itself_and_says_what_it_lacks():
    """`python -m flows.node --help` prints its usage and what it is for; run bare, outside a worker,
    it names the variable it needs in one line."""
    helped = subprocess.run([sys.executable, "-m", "flows.node", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: python -m flows.node")
    assert "Every node of a multi-node flow run but the first" in helped.stdout
    env = {k: v for k, v in os.environ.items() if k != "PREFECT__FLOW_RUN_ID"}
    bare = subprocess.run([sys.executable, "-m", "flows.node"], capture_output=True, text=True, timeout=120, env=env)
    assert bare.returncode == 1 and bare.stderr.strip().splitlines() == [
        "python -m flows.node: PREFECT__FLOW_RUN_ID is not set (a worker sets it in every node's environment)"]
