"""Every node of a multi-node flow run but the first: a Kubernetes Job's pods with an index above 0,
or a test's stand-in for a second machine. Node 0 runs the flow run itself; this follows that flow
run on the Prefect API and, while one of its torchrun stages is running there, runs the same
command (`launch.command` with the task run's attempt), so the nodes meet under one rendezvous id.
Single-process stages run on node 0 only.

    PREFECT__FLOW_RUN_ID=<id> PREFECT_API_URL=<api> NANOCHAT_RDZV_ENDPOINT=<node 0>:29500 python -m flows.node

A task run is running before node 0 starts torchrun (it waits for its node's slot, flows/slots.py),
so each running attempt is followed on a thread of its own, and joined again if this node's launch
fails while node 0 still runs it; the launch ends as soon as node 0 has left that attempt. Exits
once the flow run is final: 0 if it completed, 1 otherwise.
"""

import argparse
import os
import shlex
import sys
import threading
import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows import launch
from flows.speedrun import run_stage_row, spec_from_parameters
from nanochat import pipeline, storage

POLL_S = 1.0
REJOIN_S = 5.0
TORCHRUN = {stage.name: stage for stage in pipeline.PIPELINE if stage.torchrun}


class Left(Exception):
    """Node 0 has left the attempt (it failed, was retried, or the flow run ended)."""


def running(client, flow_run_id):
    """{stage: attempt} of the flow run's torchrun stages running now; {} once the flow run is final."""
    if client.read_flow_run(flow_run_id).state.is_final():
        return {}
    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {t.name: t.run_count for t in task_runs if t.name in TORCHRUN and t.state and t.state.is_running()}


def say(line):
    print(line, flush=True)


def follow(flow_run_id, spec, name, attempt):
    """This node's part of one attempt of a stage: launched until it succeeds or node 0 leaves it.
    Its row is the run's (run.json, which node 0 wrote before any stage ran): in a run that skips a
    stage, the next one starts from the model before on every node."""
    cmd = launch.command(run_stage_row(spec.run, name), spec, attempt)

    with get_client(sync_client=True) as client:
        def check():
            if running(client, flow_run_id).get(name) != attempt:
                raise Left(f"{name} attempt {attempt} is over on node 0")

        try:
            while True:  # until node 0 leaves the attempt (it stops the stage at its timeout)
                check()
                say(f"$ {storage.redact(shlex.join(cmd))}")
                code, _ = launch.launch(cmd, launch.child_env(spec, attempt), say, tick=check)
                say(f"{name} attempt {attempt} exited with code {code}")
                if code == 0:
                    return
                time.sleep(REJOIN_S)
        except Left as e:
            say(str(e))


def main():
    argparse.ArgumentParser(prog="python -m flows.node", description=__doc__.splitlines()[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1]).parse_args()
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not flow_run_id:
        sys.exit("python -m flows.node: PREFECT__FLOW_RUN_ID is not set (a worker sets it in every node's environment)")
    followers = {}
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        spec = spec_from_parameters(client.read_flow(flow_run.flow_id).name, flow_run.parameters)
        # No deadline of its own: node 0 ends the flow run (every stage within its timeout), and a
        # node 0 lost without a word takes this node with it, a pod of the same Kubernetes Job,
        # which fails when pod 0 does (backoffLimit 0) and then terminates its other pods.
        while not flow_run.state.is_final():
            for key in running(client, flow_run_id).items():
                if key not in followers:
                    followers[key] = threading.Thread(target=follow, args=(flow_run_id, spec, *key), daemon=True)
                    followers[key].start()
            time.sleep(POLL_S)
            flow_run = client.read_flow_run(flow_run_id)
    for thread in followers.values():
        thread.join()  # bounded: each sees node 0 leave within a second (launch's tick), then ends its tree
    say(f"flow run {flow_run.name}: {flow_run.state.name}")
    return 0 if flow_run.state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
