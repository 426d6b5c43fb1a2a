"""What the serving tests share: a tiny trained run, `nanochat serve` on 127.0.0.1 in a subprocess,
the official openai client's calls, and headless Chromium driven over the DevTools protocol. A
pytest plugin (`pytest_plugins = ["tests.serving"]`), so the session's run is trained once; the test
modules also import it, before pytest could rewrite its asserts: PYTEST_DONT_REWRITE."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import pytest

from tests.s3server import free_port
from tests.stagerun import missing

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "sk-test-0123456789"  # the API key of the servers that need one


@pytest.fixture(scope="session")
def run(shared_data, tmp_path_factory):
    """A run with a trained tiny tokenizer and a 5-step base model: (storage root, run name)."""
    storage = tmp_path_factory.mktemp("serve-storage")
    env = {**os.environ, "NANOCHAT_STORAGE": str(storage)}
    for stage, extra in (("tok_train", []), ("base_train", ["--num-steps", "5"])):
        subprocess.run([sys.executable, "-m", f"nanochat.stages.{stage}", "--run", "r", "--preset", "tiny",
                        "--data", str(shared_data / "pretrain"), *extra], env=env, check=True, capture_output=True)
    return storage, "r"


def start_server(run, *options, env=None):
    """`nanochat serve` on a free port of 127.0.0.1, once it answers: (process, base URL). Its output
    goes to a file (`proc.log`): a pipe nobody reads would stall the server once full."""
    storage, name = run
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.cli", "serve", "--run", name, "--port", str(port), *options],
                            env={**os.environ, "NANOCHAT_STORAGE": str(storage), **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    while True:  # until it answers (or exits)
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read()}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def stop_server(proc):
    proc.terminate()
    proc.wait(timeout=30)
    proc.log.close()


@contextlib.contextmanager
def serving(run, *options, env=None):
    """A server for the duration of a with block: its base URL."""
    proc, url = start_server(run, *options, env=env)
    try:
        yield url
    finally:
        stop_server(proc)


def openai_client(url, api_key="unused"):
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


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


def assert_openai_error(response, status):
    """The response has this status and OpenAI's error body."""
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str) and error["message"]
    return error


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

    def open(self, url):
        """Navigates to the web UI at `url` and waits until it is ready."""
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('input')")

    def say(self, text):
        """Sends a message in the web UI and waits for the whole answer: (its text, whether an error)."""
        self.js(f"document.getElementById('input').value = {json.dumps(text)};"
                "document.getElementById('form').requestSubmit()")
        self.wait_for("[...document.querySelectorAll('.assistant')].at(-1)?.dataset.done === 'true'")
        return self.js("[...document.querySelectorAll('.assistant')].at(-1).textContent"), self.js("!!document.querySelector('.error')")


@contextlib.contextmanager
def chromium_tab(tmp_path):
    """A phone-sized tab of a headless Chromium of its own (a profile in tmp_path)."""
    if not CHROMIUM:
        missing("chromium is not installed (make dev installs it: apt-get install chromium)")
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
        yield tab
    finally:
        browser.kill()
        browser.wait()
