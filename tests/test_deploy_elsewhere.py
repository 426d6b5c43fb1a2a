"""Code reaches the worker: a deployment made from one clone runs exactly that clone's commit on a
process worker in an empty folder, although the worker's own checkout (this one, whose nanochat its
interpreter imports) is at another commit. prefect.yaml's pull steps clone the deployed commit and run
`make setup` there; the flow process imports the clone's flows and nanochat (Prefect starts it in the
clone with the clone first on PYTHONPATH), and the stages run with the clone's .venv.

One end-to-end run, slow: `make setup` in a fresh clone, then download, tok_train and base_train
(a torchrun stage) on the tiny preset.
"""

import json
import os
import subprocess
import threading
from pathlib import Path

import psutil
import pytest
from prefect.deployments import run_deployment

from tests import workers

REPO = Path(__file__).resolve().parent.parent
POOL = "elsewhere"  # not "gpu": tests/test_deployments.py's worker polls that one
STAGES = {"download", "tok_train", "base_train"}  # only=["base_train"] and what it needs


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def deployed(tmp_path):
    """A second clone of this repository and the commit deployed from it, of its own: this working
    tree's changes to tracked files (the code under test), committed there."""
    clone = tmp_path / "deployed"
    git("clone", "--quiet", str(REPO), str(clone), cwd=tmp_path)
    changes = subprocess.run(["git", "diff", "--binary", git("rev-parse", "HEAD", cwd=clone)], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["git", "apply", "--allow-empty", "--index"], input=changes, cwd=clone, check=True)
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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_worker_in_an_empty_folder_runs_the_deployed_commit(deployed, prefect_api, shared_data, tmp_path):
    clone, commit = deployed
    tmp_path = tmp_path.resolve()  # as the paths Prefect and the flow record
    assert git("rev-parse", "HEAD", cwd=REPO) != commit  # the worker's own code is another commit
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "NANOCHAT_GIT_URL": f"file://{clone}", "NANOCHAT_COMMIT": commit}
    workers.process_pool(POOL, env, template=clone / "deployments" / "gpu-pool.json")
    workers.deploy("--name", "speedrun", "--pool", POOL, env=env, cwd=clone)

    workdir = tmp_path / "worker"
    workdir.mkdir()
    with workers.process_worker(POOL, env, workdir, tmp_path / "worker.log") as worker:
        watcher = Watcher(worker.pid)
        watcher.start()
        params = {"preset": "tiny", "run_name": "elsewhere", "storage": str(tmp_path / "storage"),
                  "data_mirror": str(shared_data), "only": ["base_train"], "retries": 0,
                  "overrides": {"base_train": {"num_steps": 2, "eval_every": -1, "checkpoint_every": -1}}}  # torchrun is what counts
        # working_dir: the worker's own empty folder, so the clone is there to look at afterwards
        flow_run = run_deployment("speedrun/speedrun", parameters=params, job_variables={"working_dir": str(workdir)},
                                  timeout=780, poll_interval=2)
        watcher.done.set()
    assert flow_run.state.is_completed(), (flow_run.state, (tmp_path / "worker.log").read_text()[-5000:])

    checkout = workdir / f"nanochat-{commit}"
    assert git("rev-parse", "HEAD", cwd=checkout) == commit
    assert {(str(checkout), str(checkout))} == {(cwd, path.split(os.pathsep)[0])
                                                for cwd, path in watcher.running("prefect.engine").values()}
    stages = watcher.running("-m nanochat.stages.")
    assert {cmdline[0] for cmdline in stages} == {str(checkout / ".venv" / "bin" / "python")}
    assert {arg.removeprefix("nanochat.stages.") for cmdline in stages for arg in cmdline
            if arg.startswith("nanochat.stages.")} == STAGES
    assert any("torch.distributed.run" in cmdline for cmdline in stages)

    run = tmp_path / "storage" / "runs" / "elsewhere"
    summaries = {p.parent.name: json.loads(p.read_text()) for p in run.glob("*/stage.json")}
    assert set(summaries) == STAGES
    assert {s["code"]["commit"] for s in summaries.values()} == {commit[:12]}
