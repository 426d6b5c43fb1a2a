"""`nanochat serve` and `nanochat chat` on a real tiny model (tokenizer + 5 training steps), with
real clients: the official openai package, raw HTTP for errors, concurrent streams, headless Chromium."""

import base64
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.stagerun import missing

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def run(shared_data, tmp_path_factory):
    """A run with a trained tiny tokenizer and a 5-step base model: (storage root, run name)."""
    storage = tmp_path_factory.mktemp("serve-storage")
    env = {**os.environ, "NANOCHAT_STORAGE": str(storage)}
    for stage, extra in (("tok_train", []), ("base_train", ["--num-steps", "5"])):
        subprocess.run([sys.executable, "-m", f"nanochat.stages.{stage}", "--run", "r", "--preset", "tiny",
                        "--data", str(shared_data / "pretrain"), *extra], env=env, check=True, capture_output=True)
    return storage, "r"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run, *options):
    storage, name = run
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.cli", "serve", "--run", name, "--port", str(port), *options],
                            env={**os.environ, "NANOCHAT_STORAGE": str(storage)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    while True:  # until it answers (or exits)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def stop_server(proc):
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(run):
    proc, url = start_server(run)
    yield url
    stop_server(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def ask(client, content, **kw):
    return client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": content}], **kw)


def streamed(client, content, **kw):
    """(texts by choice index, finish reasons by index, usage) of a streaming request."""
    texts, finishes, usage = {}, {}, None
    for chunk in ask(client, content, stream=True, **kw):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, usage


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
        while httpx.get(url + "/health").json()["cancelled_requests"] < 1:
            time.sleep(0.1)
        health = httpx.get(url + "/health").json()
        assert health["active_requests"] == 0 and health["queued_requests"] == 0
    finally:
        stop_server(proc)


def test_chat_cli_one_shot_and_interactive(run):
    storage, name = run
    env = {**os.environ, "NANOCHAT_STORAGE": str(storage)}
    cli = [sys.executable, "-m", "nanochat.cli", "chat", "--run", name, "--max-tokens", "8", "--temperature", "0"]
    one_shot = subprocess.run([*cli, "-p", "Hello"], env=env, capture_output=True, text=True, check=True)
    assert one_shot.stdout.strip()
    session = subprocess.run(cli, input="Hello\n/clear\nAgain\n/quit\n", env=env, capture_output=True, text=True, check=True)
    assert session.stdout.count("nanochat> ") == 2 and session.stdout.startswith("you> ")
    missing = subprocess.run([*cli, "--source", "rl", "-p", "x"], env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "chat_rl" in missing.stderr


def chromium_available():
    if CHROMIUM:
        return True
    missing("chromium is not installed (make dev installs it: apt-get install chromium)")


class DevTools:
    """A minimal Chrome DevTools Protocol client over the page's websocket."""

    def __init__(self, ws_url):
        from websockets.sync.client import connect

        self.ws, self.next_id = connect(ws_url, max_size=2**26), 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression):
        return self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)["result"].get("value")

    def wait_for(self, expression, timeout=60):
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)


def test_web_ui_in_headless_chromium(server, tmp_path):
    """On a phone-sized screen: send a message, see the answer stream in, regenerate it; the page
    never scrolls sideways. Leaves a screenshot in the test's tmp dir."""
    chromium_available()
    profile = tmp_path / "profile"
    browser = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                                f"--user-data-dir={profile}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (profile / "DevToolsActivePort").exists() or len((profile / "DevToolsActivePort").read_text().split()) < 2:
            assert browser.poll() is None, "chromium exited"
            time.sleep(0.1)
        port = (profile / "DevToolsActivePort").read_text().split()[0]
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json").json() if t["type"] == "page")
        tab = DevTools(page["webSocketDebuggerUrl"])
        tab.call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2, mobile=True)
        tab.call("Page.enable")
        tab.call("Page.navigate", url=server + "/")
        tab.wait_for("document.readyState === 'complete' && !!document.getElementById('input')")
        tab.js("document.getElementById('input').value = 'Hello there!';"
               "document.getElementById('form').requestSubmit()")
        tab.wait_for("document.querySelector('.assistant')?.dataset.done === 'true'")
        first = tab.js("document.querySelector('.assistant').textContent")
        assert first and not tab.js("!!document.querySelector('.error')")
        assert tab.js("document.querySelector('.user').textContent") == "Hello there!"
        tab.js("document.getElementById('regenerate').click()")
        tab.wait_for("document.querySelectorAll('.assistant').length === 1 && document.querySelector('.assistant').dataset.done === 'true'")
        assert tab.js("document.querySelectorAll('.msg').length") == 2
        assert tab.js("document.documentElement.scrollWidth <= window.innerWidth")
        shot = tab.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "ui.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.kill()
        browser.wait()
