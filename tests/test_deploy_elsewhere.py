"""Code reaches the worker: a deployment made from one clone runs exactly that clone's commit on a
process worker in an empty folder, although the worker's own checkout (this one, whose nanochat its
interpreter imports) is at another commit. prefect.yaml's pull steps clone the deployed commit and run
`make setup` there; the flow process imports the clone's flows and nanochat (Prefect starts it in the
clone with the clone first on PYTHONPATH), and the stages run with the clone's .venv.

The run is the whole tiny DAG of the `full_tiny_run` fixture (tests/conftest.py, tests/support/deployed.py).
"""

import os

from nanochat import pipeline, storage
from tests.support.deployed import REPO, git


def test_worker_in_an_empty_folder_runs_the_deployed_commit(full_tiny_run):
    tiny = full_tiny_run
    assert tiny.state.is_completed(), tiny.state.message
    assert git("rev-parse", "HEAD", cwd=REPO) != tiny.commit  # the worker's own code is another commit
    assert git("rev-parse", "HEAD", cwd=tiny.checkout) == tiny.commit
    assert {(str(tiny.checkout), str(tiny.checkout))} == {(cwd, path.split(os.pathsep)[0])
                                                          for cwd, path in tiny.watcher.running("prefect.engine").values()}
    stages = tiny.watcher.running("-m nanochat.stages.")
    assert {cmdline[0] for cmdline in stages} == {str(tiny.checkout / ".venv" / "bin" / "python")}
    modules = {row.name: row.module for row in pipeline.PIPELINE}
    assert {arg.removeprefix("nanochat.stages.") for cmdline in stages for arg in cmdline
            if arg.startswith("nanochat.stages.")} == set(modules.values())
    assert any("torch.distributed.run" in cmdline for cmdline in stages)

    summaries = {row.name: storage.read_json(storage.join(tiny.run, row.name, "stage.json")) for row in pipeline.PIPELINE}
    assert {s["code"]["commit"] for s in summaries.values()} == {tiny.commit[:12]}
