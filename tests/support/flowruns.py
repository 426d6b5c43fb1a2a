"""What a flow run did, read back from the Prefect API: its task runs, their states, its logs."""

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId


def task_runs(flow_run_id):
    """{task run name: task run} of one flow run."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def task_states(flow_run_id):
    """{task run name: state name} of one flow run ("Cached" for a cache hit)."""
    return {name: r.state.name for name, r in task_runs(flow_run_id).items()}


def logs(flow_run_id):
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
