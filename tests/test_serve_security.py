"""`nanochat serve` against clients that do not belong or misbehave, on a real server on 127.0.0.1:
API keys (the official openai client, raw HTTP, the web UI in headless Chromium), the refusal to
bind a network address without a key, CORS, the per-client and per-request limits, and hostile
clients over raw sockets (malformed and invalid UTF-8 bodies, huge headers, slow bodies, clients
that leave mid-stream) while a well-behaved client keeps getting the right answers."""

import base64
import concurrent.futures
import contextlib
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest

from nanochat import chat
from nanochat.serve import main as serve
from tests.support.serving import KEY, ask, assert_openai_error, chromium_tab, openai_client, serving, streamed
from tests.support.waiting import until

pytest_plugins = ["tests.support.serving"]

ENV_KEYS = "sk-env-one, sk-env-two"  # NANOCHAT_API_KEY: more keys, comma-separated
CHAT = "/v1/chat/completions"
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def keyed_server(run):
    with serving(run, "--api-key", KEY, "--cors-origin", "http://ui.test", env={"NANOCHAT_API_KEY": ENV_KEYS}) as url:
        yield url


@pytest.fixture(scope="module")
def hostile_server(run):
    """No keys (clients are told apart by address), bodies must arrive within 2 s, no rate limit
    (the well-behaved client and the hostile ones share 127.0.0.1)."""
    with serving(run, "--body-timeout", "2", "--rate-limit", "0") as url:
        yield url


def test_openai_client_works_with_any_configured_key(keyed_server):
    for key in (KEY, "sk-env-one", "sk-env-two"):
        client = openai_client(keyed_server, key)
        assert ask(client, "Hello", max_tokens=4).choices[0].finish_reason in ("stop", "length")
        _, finishes, _ = streamed(client, "Hello", max_tokens=4)
        assert list(finishes) == [0]
        assert [m.id for m in client.models.list().data] == ["nanochat-base"]
        metrics = httpx.get(keyed_server + "/metrics", headers={"Authorization": f"Bearer {key}"})
        assert metrics.status_code == 200 and "nanochat_requests_total" in metrics.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer"}])
@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", CHAT), ("GET", "/v1/unknown"), ("GET", "/metrics"),
                                          ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json")])
def test_v1_without_a_valid_key_is_401(keyed_server, headers, method, path):
    response = httpx.request(method, keyed_server + path, headers=headers, json=HELLO if method == "POST" else None)
    error = assert_openai_error(response, 401)
    assert error["code"] == "invalid_api_key" and response.headers["WWW-Authenticate"] == "Bearer"


def test_openai_client_with_a_wrong_key_gets_authentication_error(keyed_server):
    with pytest.raises(openai.AuthenticationError):
        ask(openai_client(keyed_server, "sk-wrong"), "Hello")


def test_health_and_ui_stay_open(keyed_server):
    assert httpx.get(keyed_server + "/health").json()["status"] == "ok"
    assert "<textarea" in httpx.get(keyed_server + "/").text


def test_cors_only_for_configured_origins(keyed_server, hostile_server):
    """A preflight from a --cors-origin is allowed POST with the Authorization and Content-Type
    headers (no credentials); answers, refusals too, carry the origin; another origin, or a server
    without --cors-origin, gets no CORS headers."""
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(keyed_server + CHAT, headers={"Origin": "http://ui.test", **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://ui.test"
    assert {m.strip() for m in allowed.headers["access-control-allow-methods"].split(",")} == {"GET", "POST"}
    assert {h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")} >= {"authorization", "content-type"}
    assert "access-control-allow-credentials" not in allowed.headers
    answered = httpx.get(keyed_server + "/v1/models", headers={"Origin": "http://ui.test", "Authorization": f"Bearer {KEY}"})
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "http://ui.test"
    refused = httpx.post(keyed_server + CHAT, json=HELLO, headers={"Origin": "http://ui.test"})  # no key
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://ui.test"
    other = httpx.options(keyed_server + CHAT, headers={"Origin": "http://evil.test", **preflight})
    assert "access-control-allow-origin" not in other.headers
    for url in (keyed_server, hostile_server):  # another origin; CORS off, the default
        response = httpx.get(url + "/v1/models", headers={"Origin": "http://evil.test" if url == keyed_server else "http://ui.test",
                                                          "Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_web_ui_asks_for_the_key_and_keeps_it(keyed_server, tmp_path):
    """The first message gets the key field shown (the page still fits a phone: screenshot in the
    test's tmp dir); with the key typed in, Regenerate answers; the key is still there after a reload."""
    with chromium_tab(tmp_path) as tab:
        tab.open(keyed_server + "/")
        assert tab.js("document.getElementById('key').hidden")
        tab.js("document.getElementById('max_tokens').value = '16'")  # short answers: the test's time
        text, error = tab.say("Hello there!")
        assert error and "API key" in text and not tab.js("document.getElementById('key').hidden")
        assert tab.js("document.documentElement.scrollWidth <= window.innerWidth")
        (tmp_path / "ui-key.png").write_bytes(base64.b64decode(tab.call("Page.captureScreenshot", format="png")["data"]))
        tab.js(f"document.getElementById('key').value = {json.dumps(KEY)};"
               "document.getElementById('key').dispatchEvent(new Event('change'))")
        tab.js("document.getElementById('regenerate').click()")
        tab.wait_for("document.querySelector('.assistant')?.dataset.done === 'true'")
        assert tab.js("document.querySelectorAll('.assistant').length") == 1 and not tab.js("!!document.querySelector('.error')")
        tab.open(keyed_server + "/")
        assert tab.js("document.getElementById('key').value") == KEY
        tab.js("document.getElementById('max_tokens').value = '16'")
        text, error = tab.say("Hello again!")
        assert text and not error


def test_network_host_without_a_key_is_refused(run):
    storage, name = run
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "nanochat.cli", "serve", "--run", name, "--host", "0.0.0.0"],
                          env={**env, "NANOCHAT_STORAGE": str(storage)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "without an API key" in done.stderr and "--insecure" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_bad_fastpaths_switch_is_refused_at_start(run, monkeypatch, capsys):
    """NANOCHAT_CPU_FASTPATHS is read at each model load, in the workers once serving: a bad value
    stops `nanochat serve` before it says it is serving, and `nanochat chat` before it answers, each
    with one line naming the variable."""
    monkeypatch.setenv("NANOCHAT_STORAGE", str(run[0]))
    monkeypatch.setenv("NANOCHAT_CPU_FASTPATHS", "yes")
    with pytest.raises(SystemExit) as refusal:
        serve(["--run", run[1]])
    message = str(refusal.value)
    assert "NANOCHAT_CPU_FASTPATHS='yes'" in message and len(message.splitlines()) == 1
    assert capsys.readouterr().out == ""
    assert chat.main(["--run", run[1], "-p", "hi"]) == 1  # `nanochat chat` alike, before it answers
    out, err = capsys.readouterr()
    assert out == "" and "NANOCHAT_CPU_FASTPATHS='yes'" in err and len(err.splitlines()) == 1


RATE = 20  # the limits server's requests a minute per key


def test_limits_per_key_body_and_request(run):
    """Each limit set to a value other than its default, and crossed: requests in progress and
    requests per minute are counted per key (another key is not affected), the rate limit's 429
    says exactly when the next request may go; bodies over the size limit are refused before
    parsing, also when chunked; a request's messages, their length, its stop strings and its n (over
    the engine's rows) are refused one past their limits and served at them."""
    keys = ["sk-a", "sk-b", "sk-c", "sk-d"]
    options = [a for k in keys for a in ("--api-key", k)]
    with serving(run, *options, "--max-concurrent", "2", "--rate-limit", str(RATE), "--max-body-bytes", "4096",
                 "--max-messages", "3", "--max-message-chars", "100", "--max-stop", "1", "--max-rows", "2") as url:
        def get(key):
            return httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})

        with contextlib.ExitStack() as stack:  # two requests of sk-a in progress: their bodies never end
            for _ in range(2):
                stack.enter_context(raw_socket(url)).sendall(request_head("POST", CHAT, 100, f"Authorization: Bearer {keys[0]}") + b"{")
            busy = until(lambda: get(keys[0]), 30, "sk-a to be refused", done=lambda r: r.status_code != 200)
            error = assert_openai_error(busy, 429)
            assert error["code"] == "rate_limit_exceeded" and busy.headers["Retry-After"] == "1"
            assert get(keys[1]).status_code == 200
        assert until(lambda: get(keys[0]), 30, "sk-a to be served again",
                     done=lambda r: r.status_code != 429).status_code == 200  # both left

        # a burst of RATE, then one every 60 / RATE s: the first refusal's Retry-After is the wait
        # until the bucket, full at the first request, holds a token again
        first_sent = time.monotonic()
        answers = [get(keys[2])]
        first_answered = time.monotonic()
        while answers[-1].status_code == 200 and len(answers) <= 2 * RATE:
            last_sent = time.monotonic()
            answers.append(get(keys[2]))
        assert all(r.status_code == 200 for r in answers[:RATE]) and answers[-1].status_code == 429, answers
        refused_at = time.monotonic()

        def retry_after(elapsed):  # the server's seconds between the first request and the refused one
            tokens = RATE - (len(answers) - 1) + elapsed * RATE / 60
            return math.ceil((1 - tokens) * 60 / RATE)

        assert retry_after(refused_at - first_sent) <= int(answers[-1].headers["Retry-After"]) <= retry_after(last_sent - first_answered)
        assert get(keys[1]).status_code == 200

        auth = {"Authorization": f"Bearer {keys[1]}", "Content-Type": "application/json"}
        too_big = b"{" + b" " * 5000  # not even JSON: refused on its size
        assert_openai_error(httpx.post(url + CHAT, content=too_big, headers=auth), 413)
        chunked = httpx.post(url + CHAT, content=iter([too_big[:3000], too_big[3000:]]), headers=auth)
        assert "content-length" not in chunked.request.headers and assert_openai_error(chunked, 413)["code"] == "request_too_large"

        def chat(messages, **body):
            return httpx.post(url + CHAT, json={"messages": messages, "max_tokens": 1, **body}, timeout=60,
                              headers={"Authorization": f"Bearer {keys[3]}"})

        hi = {"role": "user", "content": "hi"}
        for messages, stop, param in (([hi] * 4, None, "messages"), ([{"role": "user", "content": "x" * 101}], None,
                                      "messages.0.content"), ([hi], ["a", "b"], "stop")):
            assert assert_openai_error(chat(messages, stop=stop), 400)["param"] == param
        rows = assert_openai_error(chat([hi], n=3), 400)  # more samples than the engine's rows
        assert rows["param"] == "n" and rows["message"] == "n=3 is more than the 2 rows this engine decodes at once"
        at_the_limits = chat([hi] * 3, stop=["a"]), chat([{"role": "user", "content": "x" * 100}]), chat([hi], n=2)
        assert [r.status_code for r in at_the_limits] == [200, 200, 200], [r.text for r in at_the_limits]


def test_wall_time_limit_keeps_the_text_and_ends_the_stream(slow_server):
    """--max-seconds cuts a request whose steps are slowed past it (100 tokens take twice the limit):
    each completion ends with finish_reason "length" and keeps what was generated (the start of the
    same seeded answer, which 4 tokens give in time), streaming as a finish chunk per choice, the
    usage, then [DONE]. Meanwhile an idle keep-alive connection is closed by the server."""
    client = openai_client(slow_server)
    seeded = {"temperature": 1.0, "seed": 3, "n": 2}
    starts = [c.message.content for c in ask(client, "Tell me a long story.", max_tokens=4, **seeded).choices]
    assert all(starts), starts
    with raw_socket(slow_server) as idle, concurrent.futures.ThreadPoolExecutor(2) as pool:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # keep-alive, HTTP/1.1's default
        assert read_response(idle)[0] == 200
        whole = pool.submit(ask, client, "Tell me a long story.", max_tokens=100, **seeded)
        events = [json.loads(e) if e != "[DONE]" else e for e in stream_events(
            slow_server, {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 100, "stream": True,
                          "stream_options": {"include_usage": True}, **seeded})]
        response = whole.result()
        idle.settimeout(60)
        assert idle.recv(1) == b"", "the idle connection is still open"
    assert [c.finish_reason for c in response.choices] == ["length"] * 2
    assert all(c.message.content.startswith(start) for c, start in zip(response.choices, starts)), (response.choices, starts)
    assert 8 <= response.usage.completion_tokens < 200
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and 8 <= events[-2]["usage"]["completion_tokens"] < 200
    texts, finishes = {0: "", 1: ""}, {}
    for event in events[:-2]:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                assert choice["delta"] == {} and choice["index"] not in finishes
                finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {0: "length", 1: "length"} and all(texts[i].startswith(start) for i, start in enumerate(starts)), texts


def test_a_non_streaming_client_that_leaves_cancels_its_request(slow_server):
    """A client waiting for a whole answer that closes its connection cancels its request (the
    server counts it) long before the request would end (cut by --max-seconds, which is no cancel)."""
    before = httpx.get(slow_server + "/health").json()["cancelled_requests"]
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 100}).encode()
    with raw_socket(slow_server) as sock:
        sock.sendall(request_head("POST", CHAT, len(body)) + body)
        until(lambda: httpx.get(slow_server + "/health").json()["active_requests"], 30, "the request to be decoding")
    health = until(lambda: httpx.get(slow_server + "/health").json(), 30, "the request to be cancelled",
                   done=lambda h: h["cancelled_requests"] > before)
    assert health["active_requests"] == 0


def test_insecure_serves_the_network_and_tells_clients_apart_by_address(slow_server):
    """--insecure: a server on every interface without a key; its clients are their IP addresses, so
    that two requests in progress from 127.0.0.1 (--max-concurrent 2: bodies that never end) leave
    127.0.0.2 served."""
    port = int(slow_server.rsplit(":", 1)[1])
    assert [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port] == ["0.0.0.0"]
    with contextlib.ExitStack() as stack, httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
        for _ in range(2):
            stack.enter_context(raw_socket(slow_server)).sendall(request_head("POST", CHAT, 100) + b"{")
        busy = until(lambda: httpx.get(slow_server + "/v1/models"), 30, "127.0.0.1 to be refused",
                     done=lambda r: r.status_code != 200)
        assert assert_openai_error(busy, 429)["code"] == "rate_limit_exceeded"
        assert other.get(slow_server + "/v1/models").status_code == 200


def test_extreme_sampling_values(hostile_server):
    """A temperature that would overflow the logits is greedy; seeds are int64 (all n of them fit)."""
    client = openai_client(hostile_server)
    greedy = ask(client, "Hello", temperature=0, max_tokens=8).choices[0].message.content
    assert ask(client, "Hello", temperature=1e-300, max_tokens=8).choices[0].message.content == greedy
    assert len(ask(client, "Hello", seed=2**63 - 1, n=8, max_tokens=4).choices) == 8
    for seed in (2**63, -2**63 - 1):
        assert assert_openai_error(httpx.post(hostile_server + CHAT, json={**HELLO, "seed": seed}), 400)["param"] == "seed"


# hostile clients, over raw sockets


@contextlib.contextmanager
def raw_socket(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        yield sock


def request_head(method, path, length=None, *headers):
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock):
    """One response (with a Content-Length) from a connection that stays open: (status, body)."""
    received = b""
    while True:
        head, found, body = received.partition(b"\r\n\r\n")
        if found and len(body) >= int(re.search(rb"^content-length: *(\d+)", head, re.I | re.M).group(1)):
            return int(head.split()[1]), body
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed in the middle of a response: {received[:200]}"
        received += chunk


def stream_events(url, body):
    """The data of a streamed answer's events, in order."""
    with httpx.stream("POST", url + CHAT, json=body, timeout=60) as response:
        assert response.status_code == 200
        return [line.removeprefix("data: ") for line in response.iter_lines() if line]


def exchange(url, data):
    """Sends bytes on a fresh connection and reads until the server closes it: (status or None if it
    just closed or reset the connection, body)."""
    received = b""
    with raw_socket(url) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    if not received:
        return None, b""
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@contextlib.contextmanager
def well_behaved_client(url):
    """A client asking one question over and over in a thread for the duration of the block (at least
    once); on leaving, every answer (text, finish reason) must be the one it got before. Seeded
    sampling: the same answer in any batch."""
    client = openai_client(url)

    def answer():
        choice = ask(client, "What is 2 plus 2?", temperature=1.0, seed=7, max_tokens=8).choices[0]
        return choice.message.content, choice.finish_reason

    expected, answers, stop = answer(), [], threading.Event()

    def keep_asking():
        while not (stop.is_set() and answers):
            try:
                answers.append(answer())
            except Exception as e:  # recorded, to fail the test below
                answers.append(repr(e))

    thread = threading.Thread(target=keep_asking, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=120)  # a question takes at most the client's timeout
    assert not thread.is_alive(), "the well-behaved client is still waiting for an answer"
    assert answers == [expected] * len(answers), answers


def test_malformed_and_invalid_utf8_bodies_are_400(hostile_server):
    with well_behaved_client(hostile_server):
        for body in (b"{not json", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', b"\xc3\x28",
                     b"[" * 100_000, b'{"messages": 1e999999}', b"null", b'"\\ud800"'):
            status, answer = exchange(hostile_server, request_head("POST", CHAT, len(body)) + body)
            assert status == 400 and json.loads(answer)["error"]["type"] == "invalid_request_error", (body[:20], answer)


def test_huge_headers_and_garbage_get_an_error_or_a_closed_connection(hostile_server):
    """Headers over 16 KiB get 431 (the guard, when they arrive in one read) or 400 (h11, when they
    arrive over several), never a silent close; garbage and ambiguous framing get 400 or a close."""
    with well_behaved_client(hostile_server):
        over = [request_head("GET", "/health", None, "X-Big: " + "a" * 17_000),
                request_head("GET", "/health", None, "X-Big: " + "a" * 100_000),
                request_head("GET", "/health", None, *[f"X-H{i}: {i}" for i in range(5000)])]
        statuses = [exchange(hostile_server, data)[0] for data in over]
        assert all(status in (400, 431) for status in statuses), statuses
        ambiguous = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        negative = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"
        for data in (b"\x00\xff garbage\r\n\r\n", ambiguous, negative):
            status, _ = exchange(hostile_server, data)
            assert status in (None, 400), (data[:60], status)
    assert httpx.get(hostile_server + "/health").status_code == 200


def test_slow_bodies_do_not_block_others_and_time_out(hostile_server):
    """Twenty clients trickle their bodies; the server answers others meanwhile, and each slow one
    gets 408 once its body is late."""
    with contextlib.ExitStack() as stack, well_behaved_client(hostile_server):
        slow = [stack.enter_context(raw_socket(hostile_server)) for _ in range(20)]
        for sock in slow:
            sock.sendall(request_head("POST", CHAT, 1000) + b'{"mess')
        for sock in slow:
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            assert received.startswith(b"HTTP/1.1 408 "), received[:100]


def test_clients_that_leave_mid_stream_or_mid_body(hostile_server):
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a story."}], "stream": True, "n": 4,
                       "max_tokens": 100}).encode()
    with well_behaved_client(hostile_server):
        for _ in range(10):
            with raw_socket(hostile_server) as sock:
                sock.sendall(request_head("POST", CHAT, len(body)) + body)
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            with raw_socket(hostile_server) as sock:
                sock.sendall(request_head("POST", CHAT, len(body)) + body[:10])
    until(lambda: httpx.get(hostile_server + "/health").json(), 30, "the server to be idle",
          done=lambda h: not h["active_requests"] and not h["queued_requests"])
