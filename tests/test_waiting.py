"""The tests' helpers give up: a server that never answers, a browser that never comes up and a
command that never ends are errors that say what was waited for, within their deadline, and leave
no process behind (nor their children's). Each stand-in starts a child of its own, and everything it
starts carries a tag in its environment (flows.launch's, found the same way)."""

import os
import sys
import uuid

import pytest

from flows import launch
from tests.support import serving, waiting

# A stand-in that never names a port, never listens, never writes a port file, never ends: it sleeps, and so does its child.
NEVER = "sleep 600 & exec sleep 600"


@pytest.fixture
def tag(monkeypatch):
    """A fresh tag in this process's environment, so that every process the test starts carries it."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv(launch.LAUNCH_TAG, tag)
    return tag


def left(tag):
    """The processes started under `tag` that are still alive."""
    return [p for p in launch.tagged(tag) if p.pid != os.getpid()]


def test_a_server_that_never_names_its_port_is_ended_with_an_error(tag):
    with pytest.raises(RuntimeError, match=r"waited 0.5 s for the server to name its port"):
        serving.start_listening(["sh", "-c", NEVER], dict(os.environ), timeout=0.5)
    assert left(tag) == []


def test_a_server_that_never_answers_is_ended_with_an_error(tag):
    names_port_1 = f"echo 'nanochat: serving /a/model on http://127.0.0.1:1 (no API key)'; {NEVER}"  # nothing listens on port 1
    with pytest.raises(RuntimeError, match=r"waited [0-9.]+ s for http://127.0.0.1:1/health to answer 200"):
        serving.start_listening(["sh", "-c", names_port_1], dict(os.environ), timeout=2)
    assert left(tag) == []


def test_a_server_that_exits_is_an_error_with_its_output(tag):
    crash = [sys.executable, "-c", "import sys; sys.exit('no model here')"]
    with pytest.raises(RuntimeError, match="exited \\(1\\) while waiting for the server to name its port.*\n.*no model here"):
        serving.start_listening(crash, dict(os.environ), timeout=60)
    assert left(tag) == []


def test_a_browser_that_never_comes_up_is_ended_with_an_error(tag, tmp_path, monkeypatch):
    stand_in = tmp_path / "chromium"
    stand_in.write_text(f"#!/bin/sh\n{NEVER}\n")
    stand_in.chmod(0o755)
    monkeypatch.setattr(serving, "CHROMIUM", str(stand_in))
    with pytest.raises(TimeoutError, match="waited 0.5 s for Chromium's DevToolsActivePort"):
        with serving.chromium_tab(tmp_path, timeout=0.5):
            pass
    assert left(tag) == []


def test_a_command_past_its_deadline_is_ended_with_its_children(tag):
    with pytest.raises(TimeoutError, match="still running after 0.5 s"):
        waiting.run(["sh", "-c", NEVER], timeout=0.5)
    assert left(tag) == []
