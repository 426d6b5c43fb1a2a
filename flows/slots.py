"""One GPU job at a time per node: every torchrun stage holds its host's slot, a Prefect global
concurrency limit of one named after the host, while it runs. Stages of one run (base_eval beside
mid_train) and of runs submitted together never share a node's accelerators; CPU-only stages
(download, the tokenizer's, the report) run beside them. Hosts have slots of their own, so N
single-node workers on one pool still run N stages at once.

The slot is a lease the holder renews: a flow run killed outright frees it when the lease expires.
"""

import socket
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound


def slot_name(host=None):
    return f"nanochat-node-{host or socket.gethostname()}"


def ensure_slot(name):
    """Creates the limit (one slot) unless it exists, so `make speedrun` on a temporary server is
    covered as well as a deployment's server. A limit someone widened is left as it is."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass


@contextmanager
def node_slot(log):
    """Holds this host's slot for the duration of the block, waiting for it if taken."""
    name = slot_name()
    ensure_slot(name)
    log("waiting for %s (one GPU job at a time on this node)", name)
    with concurrency(name, occupy=1, strict=True):
        log("holding %s", name)
        yield
