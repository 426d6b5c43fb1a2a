"""The node's slot (flows/slots.py): one GPU job at a time, freed by the kernel when its holders end,
however they end. A Prefect concurrency limit held it before, and a flow run killed outright left it
taken for every later run on a temporary server (the flow hung at "waiting for" for good). And
Ctrl-C of `python -m flows.speedrun` (`make speedrun`) ends it, its stages with it (it retried its
stages for minutes against the temporary server the same Ctrl-C had ended)."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest

from flows import slots
from tests.support.waiting import end, processes, until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a flow's task as flows.stages runs one: it holds the slot and starts a stage that inherits it
HOLDER = textwrap.dedent("""
    import subprocess, sys, time
    from flows import slots
    with slots.node_slot(lambda *a: print(a[0] % a[1:], flush=True)) as fd:
        stage = subprocess.Popen(["sleep", "120"], pass_fds=(fd,))
        print("stage", stage.pid, flush=True)
        time.sleep(120)
""")


def holder(env):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(3)]
    assert lines[1].startswith("holding the node's slot") and lines[2].startswith("stage "), lines
    return proc, psutil.Process(int(lines[2].split()[1]))


def free(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return slots.try_lock(fd)
    finally:
        os.close(fd)


def test_one_holder_at_a_time_and_a_killed_one_frees_the_slot_once_its_stage_ends(tmp_path):
    path = tmp_path / "node.lock"
    env = {**os.environ, "NANOCHAT_NODE_LOCK": str(path)}
    proc, stage = holder(env)
    assert not free(path)
    proc.send_signal(signal.SIGKILL)  # the flow process killed outright, its stage orphaned
    proc.wait()
    assert not free(path)  # the stage still runs on the GPU: it holds the slot
    stage.kill()
    stage.wait()
    assert free(path)


def test_a_waiting_task_takes_the_slot_when_the_holder_ends(tmp_path, monkeypatch):
    path = tmp_path / "node.lock"
    monkeypatch.setenv("NANOCHAT_NODE_LOCK", str(path))
    proc, stage = holder(dict(os.environ))
    said, held = [], threading.Event()

    def second_task():
        with slots.node_slot(lambda *a: said.append(a[0] % a[1:])):
            held.set()

    thread = threading.Thread(target=second_task, daemon=True)
    thread.start()
    until(lambda: said, 30, "the second task to wait")
    assert not held.wait(2 * slots.POLL_SECONDS) and said == [f"waiting for the node's slot {path} (one GPU job at a time on this node)"]
    for p in (proc, stage):
        p.kill()
        p.wait()
    assert held.wait(10 * slots.POLL_SECONDS) and said[-1] == f"holding the node's slot {path}"
    thread.join(10)


def speedrun_in_base_train(shared_data, tmp_path):
    """`python -m flows.speedrun` (what `make speedrun` runs) on the tiny preset, in a session of its
    own, once base_train (hanging by an injected fault) holds the slot: (process, lock file, storage, log)."""
    lock, storage = tmp_path / "node.lock", tmp_path / "storage"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "NANOCHAT_NODE_LOCK": str(lock), "OMP_NUM_THREADS": "1",
           "NANOCHAT_FAULT": "base_train:hang", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # its own temporary server, as `make speedrun` starts
    log = tmp_path / "speedrun.log"
    cmd = [sys.executable, "-m", "flows.speedrun", "--preset", "tiny", "--run", "r", "--storage", str(storage),
           "--data-mirror", str(shared_data)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        until(lambda: "holding the node's slot" in log.read_text() and processes(f"{storage}/runs/r --preset tiny"), 240,
              "base_train to start, holding the slot", procs=[proc])
    except BaseException:
        end(proc)
        raise
    return proc, lock, storage, log


def test_ctrl_c_of_make_speedrun_ends_it_and_its_stages_and_frees_the_slot(shared_data, tmp_path):
    proc, lock, storage, log = speedrun_in_base_train(shared_data, tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        assert proc.wait(180) == 128 + signal.SIGINT  # (alone 18-20 s; once over 60 beside the full pipeline run)
    finally:
        end(proc)
    assert "SIGINT: stopping; finished stages are kept, and the same command resumes the rest" in log.read_text()
    assert not processes(str(storage)) and free(lock)
    assert (storage / "runs" / "r" / "tok_train" / "stage.json").exists()  # kept


def test_a_flow_killed_outright_leaves_the_slot_to_its_stage_until_the_stage_ends(shared_data, tmp_path):
    """SIGKILL of the flow's process alone (the OOM killer, a lost worker): base_train's torchrun,
    started by flows.stages with the slot's descriptor, runs on and holds the slot while it does."""
    proc, lock, storage, _ = speedrun_in_base_train(shared_data, tmp_path)
    try:
        proc.kill()
        proc.wait()
        assert processes(f"{storage}/runs/r --preset tiny") and not free(lock)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of its group: torchrun, the temporary Prefect server
        for p in processes(str(storage)):  # torchrun's workers, in sessions of their own
            p.kill()
    until(lambda: not processes(str(storage)), 30, "the stage's processes to end")
    assert free(lock)


def test_a_lock_file_that_cannot_be_made_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_NODE_LOCK", str(tmp_path / "no-such-folder" / "node.lock"))
    with pytest.raises(OSError, match=f"^the node's slot {tmp_path}/no-such-folder/node.lock: No such file or directory "
                                      r"\(NANOCHAT_NODE_LOCK names the lock file\)$"):
        with slots.node_slot(print):
            pass
