"""One GPU job at a time per node: every torchrun stage holds its node's slot, an exclusive lock
(flock) on a file in the node's temporary directory, while its processes run. Stages of one run
(base_eval beside mid_train) and of runs on one node, whichever Prefect server or worker started
them, never share its accelerators; CPU-only stages (download, the tokenizer's, the report) run
beside them. A node is what shares the temporary directory: a machine, or a container.

The kernel frees the lock once no process holds it: a flow run killed outright (Ctrl-C, SIGKILL, a
lost worker) frees it, but the stage it started, whose launcher (torchrun, which waits for its
workers) inherits it, keeps it while it still runs.
(A Prefect global concurrency limit held the slot before: a killed run left it taken for good, as
a temporary server never revokes an expired lease.) NANOCHAT_NODE_LOCK names another lock file.
"""

import contextlib
import fcntl
import os
import tempfile
import time

LOCK_FILE = "nanochat-node.lock"
POLL_SECONDS = 1.0  # a waiting task looks again this often (a blocking flock could not be cancelled)


def lock_path():
    return os.environ.get("NANOCHAT_NODE_LOCK") or os.path.join(tempfile.gettempdir(), LOCK_FILE)


@contextlib.contextmanager
def node_slot(log):
    """Holds this node's slot for the block, waiting for it if taken; yields the lock's file
    descriptor, for the stage's processes to inherit (launch's `keep_fds`)."""
    path = lock_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # read-only: another user's lock file serves too
    except OSError as e:
        raise OSError(f"the node's slot {path}: {e.strerror} (NANOCHAT_NODE_LOCK names the lock file)") from None
    try:
        with contextlib.suppress(PermissionError):  # runs of other users on the node take turns as well
            os.fchmod(fd, 0o666)
        log("waiting for the node's slot %s (one GPU job at a time on this node)", path)
        started, said = time.monotonic(), False
        while not try_lock(fd):
            if not said and time.monotonic() - started > 10 * POLL_SECONDS:
                log("%s is held by another GPU job on this node (`fuser %s` names its processes)", path, path)
                said = True
            time.sleep(POLL_SECONDS)
        log("holding the node's slot %s", path)
        yield fd
    finally:
        os.close(fd)  # frees the lock, unless the stage's processes still hold it


def try_lock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
