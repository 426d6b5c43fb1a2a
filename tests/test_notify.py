"""flows/notify.py against the session's real Prefect server: a stage run that crashes (fault
injection, in a subprocess) yields exactly one POST to a webhook receiver on 127.0.0.1, naming the
run and its state; running `python -m flows.notify` again leaves one automation."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

from flows import notify
from tests.support.waiting import end, until

REPO = Path(__file__).resolve().parent.parent


class Hook(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.arrived:
            self.server.posts.append((self.path, self.headers.get("Content-Type"), body))
            self.server.arrived.notify_all()
        self.send_response(204)
        self.end_headers()


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1 recording every POST as (path, content type, body)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"
        self.posts = []
        self.arrived = threading.Condition()

    def wait_for(self, count, timeout):
        """The POSTs once `count` have arrived, or all of them at the timeout."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.posts) >= count, timeout=timeout)
            return list(self.posts)


@pytest.fixture
def receiver():
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(prefect_api, receiver, tmp_path):
    return {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "NANOCHAT_WEBHOOK_URL": receiver.url}


def notify_cli(env, *args):
    return subprocess.run([sys.executable, "-m", "flows.notify", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=120).stdout


def automations():
    with get_client(sync_client=True) as client:
        return client.read_automations_by_name(notify.NAME)


@pytest.fixture
def installed(env):
    """The automation, installed by the CLI; removed afterwards, so that other tests' failing runs
    post nowhere."""
    assert "automation" in notify_cli(env)
    yield
    notify.remove()


def run_doomed_stage(env, fault, run_name, storage, log):
    """Runs the `stage` flow for download in a subprocess under NANOCHAT_FAULT=`fault`, its output in
    `log`: a crash fails the stage and so the flow run; a hang is ended by SIGTERM to the flow's
    process, which crashes it."""
    code = ("from flows.speedrun import one_stage\n"
            f"one_stage('download', run_name={run_name!r}, preset='tiny', storage={storage!r}, retries=0)")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], env={**env, "NANOCHAT_FAULT": fault, "PYTHONUNBUFFERED": "1"}, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        until(lambda: "injected fault at start" in log.read_text() or proc.poll() is not None, 120,
              f"the stage flow to meet its fault {fault}")
        if "injected fault at start (hang)" in log.read_text():
            proc.terminate()
        code = proc.wait(timeout=60)
    finally:
        end(proc)
    assert code != 0 and "injected fault at start" in log.read_text(), log.read_text()


@pytest.mark.parametrize("fault, state", [("download", "Failed"), ("download:hang", "Crashed")])
def test_failed_or_crashed_run_posts_once_naming_the_run_and_state(installed, env, receiver, tmp_path, fault, state):
    run_doomed_stage(env, fault, "doomed", str(tmp_path), tmp_path / "flow.log")
    ended = time.monotonic()
    posts = receiver.wait_for(1, timeout=60)
    assert posts, "no POST within 60 s of the failure"
    print(f"POST {time.monotonic() - ended:.1f} s after the flow run's process ended")
    assert receiver.wait_for(2, timeout=2) == posts[:1], "a second POST"
    path, content_type, body = posts[0]
    assert path == "/hook" and content_type == "application/json"
    body = json.loads(body)
    assert body["flow"] == "stage" and body["stage"] == "download" and body["state"] == state
    assert body["run_name"] == "doomed" and body["preset"] == "tiny" and "doomed" in body["flow_run"]
    assert f"'{body['flow_run']}' of doomed is {state}" in body["text"]
    if state == "Failed":
        assert "exited with code 3" in body["message"]


@flow(name="speedrun", retries=1, retry_delay_seconds=0)
def flaky(run_name: str, fails: int):
    """Stands in for the speedrun flow: raises in its first `fails` attempts."""
    if flow_run.run_count <= fails:
        raise RuntimeError(f"attempt {flow_run.run_count} of {run_name} fails")


def test_a_retried_run_posts_only_when_it_gives_up(installed, receiver):
    flaky(run_name="recovers", fails=1)
    with pytest.raises(RuntimeError):
        flaky(run_name="gives-up", fails=2)
    posts = receiver.wait_for(1, timeout=60)
    assert receiver.wait_for(2, timeout=2) == posts[:1], "a second POST"
    body = json.loads(posts[0][2])
    assert body["flow"] == "speedrun" and body["run_name"] == "gives-up" and body["state"] == "Failed"
    assert "attempt 2 of gives-up fails" in body["message"]


def test_install_is_idempotent_and_needs_the_url(env):
    first, second = notify_cli(env), notify_cli(env)
    assert "updated" in second, (first, second)
    assert len(automations()) == 1
    unset = {k: v for k, v in env.items() if k != "NANOCHAT_WEBHOOK_URL"}
    assert "not set" in notify_cli(unset) and len(automations()) == 1
    assert "removed 1" in notify_cli(env, "--remove") and automations() == []
