"""What the serving tests share: a tiny trained run, `nanochat serve` on 127.0.0.1 in a subprocess
(and one slowed down, `slow_server`), the official openai client's calls, and headless Chromium
driven over the DevTools protocol. A
pytest plugin (`pytest_plugins = ["tests.support.serving"]`), so the session's run is trained once; the test
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

from nanochat.serve import SERVING_ON
from nanochat.serve.worker import STEP_DELAY
from tests.support.stagerun import missing
from tests.support.waiting import end, until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "sk-test-0123456789"  # the API key of the servers that need one
SLOW_STEP, SLOW_MAX_SECONDS = 0.1, 5  # slow_server's: 50 tokens, at most, before a request is cut


@pytest.fixture(scope="session")
def run(tiny_base_run):
    """The suite's trained tiny run: (storage root, run name)."""
    return tiny_base_run.parent.parent, tiny_base_run.name


@pytest.fixture(scope="session")
def slow_server(run):
    """A server whose engine sleeps SLOW_STEP s after each step (the worker's test-only delay), so
    that an answer takes seconds: a test sees it grow, stops it, or has it cut by --max-seconds
    mid-way, whatever the machine's speed. It listens on every interface without a key (--insecure),
    and takes at most 2 requests in progress per client (its address, as it has no key)."""
    options = ["--host", "0.0.0.0", "--insecure", "--max-seconds", str(SLOW_MAX_SECONDS), "--max-concurrent", "2"]
    with serving(run, *options, env={STEP_DELAY: str(SLOW_STEP), "NANOCHAT_API_KEY": ""}) as url:
        yield url


def start_server(run, *options, env=None, timeout=120):
    """`nanochat serve` on 127.0.0.1, once it answers: (process, base URL). It binds a free port
    itself (--port 0) and names it: a port picked here first could be taken by another process (the
    other test worker's server, say) before the server binds it, or answer in its place."""
    storage, name = run
    cmd = [sys.executable, "-m", "nanochat.cli", "serve", "--run", name, "--port", "0", *options]
    return start_listening(cmd, {**os.environ, "NANOCHAT_STORAGE": str(storage), **(env or {})}, timeout)


def start_listening(cmd, env, timeout):
    """Starts a server, reads the port it names ("nanochat: serving ... on http://HOST:PORT", as
    `nanochat serve` says) and waits until GET /health on 127.0.0.1:PORT answers 200: (process,
    base URL). Its output goes to a file (`proc.log`, read with `output`): a pipe nobody reads would
    stall the server once full. A server that exits first, or does not answer within `timeout` s, is
    ended and the error carries its output."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    deadline = time.monotonic() + timeout
    try:
        port = until(lambda: SERVING_ON.search(output(proc)), timeout, "the server to name its port", procs=[proc]).group(1)
        if port == "0":
            raise RuntimeError("the server named port 0, not the port it took")
        url = f"http://127.0.0.1:{port}"
        until(lambda: healthy(url), max(0.0, deadline - time.monotonic()), f"{url}/health to answer 200", procs=[proc])
    except BaseException as e:
        text = output(proc)
        stop_server(proc)
        if not isinstance(e, Exception):  # pytest-timeout, Ctrl-C
            raise
        raise RuntimeError(f"{e}; the server's output:\n{text[-3000:]}") from e
    return proc, url


def output(proc):
    """What a server of start_listening has written so far. Read at an offset, as the server's own
    writes move the file's shared position: a seek here would make the server write over its log."""
    return os.pread(proc.log.fileno(), 1 << 24, 0).decode(errors="replace")


def healthy(url):
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.TransportError:
        return False


def stop_server(proc):
    end(proc)
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
    """The official client, without retries, and with a minute per request rather than its ten."""
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)


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

    CALL_TIMEOUT = 60  # seconds Chromium has to answer one call

    def __init__(self, ws_url):
        from websockets.sync.client import connect

        self.ws, self.next_id = connect(ws_url, max_size=2**26, open_timeout=30), 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.CALL_TIMEOUT
        while True:  # events come and go until our answer does
            try:
                message = json.loads(self.ws.recv(timeout=max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                raise TimeoutError(f"no answer from Chromium to {method} in {self.CALL_TIMEOUT} s") from None
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression):
        return self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)["result"].get("value")

    def wait_for(self, expression, timeout=60):
        until(lambda: self.js(expression), timeout, f"{expression} in the page")

    def open(self, url):
        """Navigates to the web UI at `url` and waits until it is ready."""
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('input')")

    def press_enter(self, shift=False):
        """Enter (with Shift: Shift+Enter) pressed and released in the focused element, as a keyboard does."""
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      text="\r" if kind == "keyDown" else "", modifiers=8 if shift else 0)

    def say(self, text):
        """Sends a message in the web UI and waits for the whole answer: (its text, whether an error)."""
        self.js(f"document.getElementById('input').value = {json.dumps(text)};"
                "document.getElementById('form').requestSubmit()")
        self.wait_for("[...document.querySelectorAll('.assistant')].at(-1)?.dataset.done === 'true'")
        return self.js("[...document.querySelectorAll('.assistant')].at(-1).textContent"), self.js("!!document.querySelector('.error')")


@contextlib.contextmanager
def chromium_tab(tmp_path, timeout=60):
    """A phone-sized tab of a headless Chromium of its own (a profile in tmp_path), which has
    `timeout` s to come up; Chromium and every process it started end with the block."""
    if not CHROMIUM:
        missing("chromium is not installed (make dev installs it: apt-get install chromium)")
    profile = tmp_path / "profile"
    browser = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                                f"--user-data-dir={profile}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = until(lambda: devtools_port(profile), timeout, f"Chromium's DevToolsActivePort in {profile}", procs=[browser])
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json").json() if t["type"] == "page")
        tab = DevTools(page["webSocketDebuggerUrl"])
        tab.call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2, mobile=True)
        tab.call("Page.enable")
        yield tab
    finally:
        end(browser)


def devtools_port(profile):
    """The port Chromium's DevTools listen on, once it has written both lines of DevToolsActivePort."""
    path = profile / "DevToolsActivePort"
    lines = path.read_text().split() if path.exists() else []
    return lines[0] if len(lines) >= 2 else None
