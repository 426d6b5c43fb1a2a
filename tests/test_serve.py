"""`nanochat serve` and `nanochat chat` on a real tiny model (tokenizer + 5 training steps), with
real clients: the official openai package, raw HTTP for errors, concurrent streams, headless Chromium."""

import base64
import concurrent.futures
import os
import subprocess
import sys
import threading

import httpx
import openai
import psutil
import pytest

from nanochat.chat import FREQUENCY_PENALTY
from nanochat.serve.worker import Worker
from tests.support.serving import ask, chromium_tab, openai_client, start_server, stop_server, streamed
from tests.support.waiting import until

pytest_plugins = ["tests.support.serving"]


@pytest.fixture(scope="module")
def server(run):
    proc, url = start_server(run)
    yield url
    stop_server(proc)


@pytest.fixture
def client(server):
    return openai_client(server)


def test_models_health_and_binding(server):
    models = openai.OpenAI(base_url=server + "/v1", api_key="unused").models.list()
    assert [m.id for m in models.data] == ["nanochat-base"]
    assert httpx.get(server + "/health").json()["status"] == "ok"
    port = int(server.rsplit(":", 1)[1])
    listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening == ["127.0.0.1"]


def test_openai_client_non_streaming_and_streaming_agree(client):
    response = ask(client, "Tell me a story.", temperature=0, max_tokens=12)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 12 and response.usage.prompt_tokens > 4
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    texts, finishes, usage = streamed(client, "Tell me a story.", temperature=0, max_tokens=12,
                                      stream_options={"include_usage": True})
    assert texts == {0: choice.message.content} and finishes == {0: choice.finish_reason}
    assert usage.completion_tokens == response.usage.completion_tokens


def test_n_samples_seed_and_stop(client):
    response = ask(client, "Name a color.", n=3, temperature=1.0, seed=5, max_tokens=10)
    assert [c.index for c in response.choices] == [0, 1, 2]
    again = ask(client, "Name a color.", n=3, temperature=1.0, seed=5, max_tokens=10)
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]
    texts, finishes, _ = streamed(client, "Name a color.", n=2, temperature=1.0, seed=5, max_tokens=10)
    assert sorted(texts) == sorted(finishes) == [0, 1]
    full = ask(client, "Count with me.", temperature=0, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = ask(client, "Count with me.", temperature=0, max_tokens=24, stop=[stop, "never-seen"]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.index(stop)]


def test_penalties_reach_the_engine(client):
    """frequency_penalty / presence_penalty through the openai client: the greedy reply changes, and
    a strong frequency penalty leaves fewer repeated tokens."""
    plain = ask(client, "Count with me.", temperature=0, max_tokens=24).choices[0].message.content
    penalized = [ask(client, "Count with me.", temperature=0, max_tokens=24, **{name: 2.0}).choices[0].message.content
                 for name in ("frequency_penalty", "presence_penalty")]
    assert all(text != plain for text in penalized)
    assert len(set(penalized[0])) / len(penalized[0]) > len(set(plain)) / len(plain)


def test_concurrent_streaming_clients_get_complete_answers(client):
    """Eight streams at once (they share batched decoding); each gets what it gets alone."""
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]
    alone = [ask(client, p, temperature=0, max_tokens=16).choices[0] for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: streamed(client, p, temperature=0, max_tokens=16), prompts))
    for single, (texts, finishes, _) in zip(alone, together):
        assert texts == {0: single.message.content} and finishes == {0: single.finish_reason}


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 0}, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -3}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 99}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 40_000}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}] * 65}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 500}]}, "messages"),  # longer than the context
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
])
def test_bad_requests_are_400_with_openai_errors(server, body, param):
    response = httpx.post(server + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_malformed_json_is_400(server, client):
    response = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        ask(client, "hi", temperature=-1)


def test_full_queue_is_429_and_a_disconnect_cancels(run):
    """One request at a time, one waiting: of a burst of simultaneous requests, those beyond that
    are refused with Retry-After. A streaming client that goes away cancels its request (the
    server counts it)."""
    proc, url = start_server(run, "--one-at-a-time", "--max-pending", "1")
    body = {"messages": [{"role": "user", "content": "Go on forever."}], "n": 8, "max_tokens": 256}
    try:
        with httpx.Client(timeout=120) as http, concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: http.post(url + "/v1/chat/completions", json=body), range(8)))
        refused = [r for r in responses if r.status_code == 429]
        assert refused and all(r.status_code == 200 for r in responses if r not in refused)
        assert refused[0].headers["Retry-After"] == "1" and refused[0].json()["error"]["code"] == "rate_limit_exceeded"
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as running:
                next(running.iter_lines())  # admitted; the client leaves while its 8 answers are decoding
        health = until(lambda: httpx.get(url + "/health").json(), 60, "the server to count a cancelled request",
                       done=lambda h: h["cancelled_requests"] >= 1)
        assert health["active_requests"] == 0 and health["queued_requests"] == 0
    finally:
        stop_server(proc)


def test_the_worker_builds_its_engine_on_its_own_thread():
    """The engine is built on the thread that decodes with it (one OpenMP thread team on CPU, see
    Worker), and what the factory raises comes out of the constructor."""
    built_on = []
    worker = Worker(lambda: built_on.append(threading.current_thread()) or "engine", max_pending=1)
    try:
        assert worker.engine == "engine" and built_on == [worker.thread]
    finally:
        worker.stop()

    def missing_checkpoint():
        raise FileNotFoundError("no checkpoint here")

    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        Worker(missing_checkpoint, max_pending=1)


def test_chat_cli_one_shot_and_interactive(run, client):
    storage, name = run
    env = {**os.environ, "NANOCHAT_STORAGE": str(storage)}
    cli = [sys.executable, "-m", "nanochat.cli", "chat", "--run", name, "--max-tokens", "8", "--temperature", "0"]
    one_shot = subprocess.run([*cli, "-p", "Hello"], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert one_shot.stdout.strip()
    # the CLI's default frequency penalty: its greedy answer is the API's with that penalty, not without
    longer = subprocess.run([*cli, "--max-tokens", "24", "-p", "Count with me."], env=env, capture_output=True,
                            text=True, check=True, timeout=120)
    with_penalty, without = (ask(client, "Count with me.", temperature=0, max_tokens=24, frequency_penalty=penalty)
                             .choices[0].message.content for penalty in (FREQUENCY_PENALTY, 0))
    assert longer.stdout == with_penalty + "\n" and with_penalty != without
    session = subprocess.run(cli, input="Hello\n/clear\nAgain\n/quit\n", env=env, capture_output=True, text=True, check=True,
                             timeout=120)
    assert session.stdout.count("nanochat> ") == 2 and session.stdout.startswith("you> ")
    missing = subprocess.run([*cli, "--source", "rl", "-p", "x"], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "chat_rl" in missing.stderr



def test_web_ui_in_headless_chromium(server, tmp_path):
    """On a phone-sized screen: send a message, see the answer stream in, regenerate it; the page
    never scrolls sideways. Leaves a screenshot in the test's tmp dir."""
    with chromium_tab(tmp_path) as tab:
        tab.open(server + "/")
        first, error = tab.say("Hello there!")
        assert first and not error
        assert tab.js("document.querySelector('.user').textContent") == "Hello there!"
        tab.js("document.getElementById('regenerate').click()")
        tab.wait_for("document.querySelectorAll('.assistant').length === 1 && document.querySelector('.assistant').dataset.done === 'true'")
        assert tab.js("document.querySelectorAll('.msg').length") == 2
        assert tab.js("document.documentElement.scrollWidth <= window.innerWidth")
        shot = tab.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "ui.png").write_bytes(base64.b64decode(shot))
