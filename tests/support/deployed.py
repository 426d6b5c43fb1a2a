"""A run as a user on a cluster makes one: deployed from a second clone of this repository, at a
commit of its own, and picked up by a process worker in an empty folder, which clones that commit
and runs `make setup` there (prefect.yaml's pull steps).

    tiny = full_tiny_run(api, data, tmp, timeout)  # the whole tiny DAG so, a TinyRun
    tiny.watcher.running("-m nanochat.stages.")  # {command line: (cwd, PYTHONPATH)} of the stages it ran
"""

import contextlib
import dataclasses
import os
import subprocess
import threading
from pathlib import Path

import psutil
from prefect.deployments import run_deployment

from nanochat import storage
from tests.support import workers
from tests.support.httpserver import serve

REPO = Path(__file__).resolve().parents[2]
POOL = "elsewhere"  # not "gpu": tests/test_deployments.py's worker polls that one


def git(*args, cwd, env=None):
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def working_tree_diff():
    """This working tree against HEAD, new files that git does not ignore included (the code under
    test, committed or not), as a binary patch; the repository's own index is left alone."""
    index = Path(git("rev-parse", "--absolute-git-dir", cwd=REPO)) / f"nanochat-test-index-{os.getpid()}"
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    try:
        git("read-tree", "HEAD", cwd=REPO, env=env)
        git("add", "--all", cwd=REPO, env=env)
        return subprocess.run(["git", "diff", "--cached", "--binary", "HEAD"], cwd=REPO, env=env, check=True,
                              capture_output=True).stdout
    finally:
        index.unlink(missing_ok=True)


def deployed_clone(clone):
    """A second clone of this repository at `clone`, with this working tree committed there as a
    commit of its own: (clone, that commit)."""
    git("clone", "--quiet", str(REPO), str(clone), cwd=clone.parent)
    subprocess.run(["git", "apply", "--allow-empty", "--index"], input=working_tree_diff(), cwd=clone, check=True)
    git("-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "--quiet", "--allow-empty",
        "-m", "the deployed commit", cwd=clone)
    return clone, git("rev-parse", "HEAD", cwd=clone)


class Watcher(threading.Thread):
    """Records what each process under the worker runs: its command line, working directory and
    PYTHONPATH (the flow engine execs in place of Prefect's workspace supervisor, so a pid is
    looked at again until its command line stops changing)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.root, self.seen, self.done = psutil.Process(pid), {}, threading.Event()

    def run(self):
        while not self.done.wait(0.1):
            for p in self.root.children(recursive=True):
                try:
                    cmdline = tuple(p.cmdline())
                    if (p.pid, cmdline) not in self.seen:
                        self.seen[p.pid, cmdline] = (p.cwd(), p.environ().get("PYTHONPATH", ""))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue

    def running(self, marker):
        return {cmdline: where for (_, cmdline), where in self.seen.items() if marker in " ".join(cmdline)}


@contextlib.contextmanager
def worker_elsewhere(clone, commit, api, tmp):
    """speedrun/speedrun deployed from `clone` on a process pool of its own, and a process worker
    polling it from an empty folder: yields (that folder, the watcher of the worker's processes)."""
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "NANOCHAT_GIT_URL": f"file://{clone}", "NANOCHAT_COMMIT": commit}
    workers.process_pool(POOL, env, template=clone / "deployments" / "gpu-pool.json")
    workers.deploy("--name", "speedrun", "--pool", POOL, env=env, cwd=clone)
    workdir = tmp / "worker"
    workdir.mkdir()
    with workers.process_worker(POOL, env, workdir, tmp / "worker.log") as worker:
        watcher = Watcher(worker.pid)
        watcher.start()
        try:
            yield workdir, watcher
        finally:
            watcher.done.set()


@dataclasses.dataclass
class TinyRun:
    run: str  # its URI
    state: object  # the flow run's final state
    commit: str  # the commit deployed
    checkout: Path  # the worker's clone of it
    watcher: Watcher  # what ran under the worker


def full_tiny_run(api, data, tmp, timeout):
    """The whole tiny DAG, download to chat_eval_rl, deployed from a clone of this working tree and run
    by a worker elsewhere. Its data mirror is a real HTTP server on 127.0.0.1, stopped the moment
    download commits and still configured after that, so every later stage proves it reads its data
    through the run's files.json."""
    tmp = tmp.resolve()  # as the paths Prefect and the flow record
    clone, commit = deployed_clone(tmp / "deployed")
    root = str(tmp / "storage")
    run = storage.run_uri("full", root)
    committed = storage.local_path(storage.join(run, "download", "stage.json"))
    finished = threading.Event()
    with serve(data) as server, worker_elsewhere(clone, commit, api, tmp) as (workdir, watcher):

        def stop_after_download():
            while not os.path.exists(committed):
                if finished.wait(0.02):
                    return
            server.shutdown()
            server.server_close()

        stopper = threading.Thread(target=stop_after_download, daemon=True)
        stopper.start()
        params = {"preset": "tiny", "run_name": "full", "storage": root, "data_mirror": server.url, "retries": 0}
        flow_run = run_deployment("speedrun/speedrun", parameters=params, job_variables={"working_dir": str(workdir)},
                                  timeout=timeout, poll_interval=2)
        finished.set()
        stopper.join(timeout=5)
    assert os.path.exists(committed), f"download never committed: {flow_run.state}\n{(tmp / 'worker.log').read_text()[-5000:]}"
    return TinyRun(run, flow_run.state, commit, workdir / f"nanochat-{commit}", watcher)
