"""`nanochat serve` and `nanochat chat` on a real tiny model (tokenizer + 5 training steps), with
real clients: the official openai package, raw HTTP for errors, concurrent streams, headless Chromium."""

import base64
import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from nanochat.chat import GENERATION
from nanochat.serve import LIMITS, build_parser
from nanochat.serve.app import CHAT_FIELDS, ChatCompletionRequest, parameter_table
from nanochat.serve.worker import STEP_DELAY, Worker
from tests.support.resume import edit_meta
from tests.support.serving import (
    ask,
    assert_openai_error,
    chromium_tab,
    healthy,
    openai_client,
    output,
    start_server,
    stop_server,
    streamed,
)
from tests.support.waiting import until

pytest_plugins = ["tests.support.serving"]

README = Path(__file__).resolve().parent.parent / "README.md"
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def served(run):
    """(the server process, its URL); its output (the access log) is in proc.log."""
    proc, url = start_server(run)
    yield proc, url
    stop_server(proc)


@pytest.fixture(scope="module")
def server(served):
    return served[1]


@pytest.fixture
def client(server):
    return openai_client(server)


def test_help_states_every_options_default():
    """`nanochat serve --help` shows each default (--port's 8000 among them), as the README says."""
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and not action.required:  # not --help, flags or --run
            assert "default" in (action.help or ""), f"{action.option_strings[0]}: its help states no default"
    assert "(default: 8000)" in " ".join(parser.format_help().split())
    for bad in (["--max-rows", "0"], ["--max-n", "-1"], ["--body-timeout", "-1"], ["--port", "70000"], ["--devices", "0"]):
        with pytest.raises(SystemExit):  # argparse's usage error, naming the option (a traceback at startup, or a server
            parser.parse_args(["--run", "r", *bad])  # that never answers)
    assert parser.parse_args(["--run", "r", "--rate-limit", "0"]).rate_limit == 0  # no rate limit


def test_readme_limits_table_states_the_defaults():
    """Each row of README's limits table gives its options' defaults (a number each, in order)."""
    table = README.read_text().split("| option | default | over it |", 1)[1].split("\n\n", 1)[0]
    defaults = {action.option_strings[0]: action.default for action in build_parser()._actions if action.option_strings}
    stated = {}
    for row in table.strip().splitlines()[1:]:
        options, values = row.split("|")[1:3]
        options = re.findall(r"`(--[\w-]+)`", options)
        stated.update(zip(options, map(float, re.findall(r"\d+(?:\.\d+)?", values)[:len(options)])))
    assert set(stated) == {"--" + f.name.replace("_", "-") for f in LIMITS}
    assert {o: defaults[o] for o in stated} == stated


def test_models_health_and_binding(server, client):
    models = openai.OpenAI(base_url=server + "/v1", api_key="unused").models.list()
    assert [m.id for m in models.data] == ["nanochat-base"]
    assert client.models.retrieve("nanochat-base").id == client.models.retrieve("nanochat").id == "nanochat-base"
    for response in (httpx.get(server + "/v1/models/gpt-4o"),
                     httpx.post(server + "/v1/chat/completions", json={**HELLO, "model": "gpt-4o"})):
        error = assert_openai_error(response, 404)
        assert error["code"] == "model_not_found" and "gpt-4o" in error["message"] and "nanochat-base" in error["message"]
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


def test_event_streams_pass_proxies_and_carry_usage_last(server):
    """No caching or buffering by a proxy; with include_usage, `usage` is null on every chunk but the last."""
    body = {**HELLO, "stream": True, "n": 2, "max_tokens": 6, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1) and len(chunks) > 4
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_chat_logprobs_streaming_and_not(client):
    """logprobs / top_logprobs: one entry per generated token, the greedy token the most likely one,
    the same numbers streamed."""
    response = ask(client, "Tell me a story.", temperature=0, frequency_penalty=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace") == entry.token
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    streamed_entries = [e for chunk in ask(client, "Tell me a story.", temperature=0, frequency_penalty=0, max_tokens=8, logprobs=True,
                                           top_logprobs=3, stream=True)
                        for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [e.model_dump() for e in streamed_entries] == [e.model_dump() for e in content]
    assert ask(client, "Tell me a story.", max_tokens=2).choices[0].logprobs is None


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
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"42": 5}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"]}, "modalities"),
    ({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -3}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 99}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "3"}, "max_tokens"),  # strict JSON types, as OpenAI
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2.0}, "n"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 40_000}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}] * 65}, "messages"),
    ({"messages": [{"role": "assistant", "content": "yo"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
])
def test_bad_requests_are_400_with_openai_errors(server, body, param):
    response = httpx.post(server + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_max_completion_tokens_wins_over_max_tokens(server):
    """What today's openai client sends, alone or beside the older field."""
    def tokens(**fields):
        body = {"messages": [{"role": "user", "content": "Count with me."}], "seed": 1, **fields}
        usage = httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()["usage"]
        return usage["completion_tokens"]

    assert tokens(max_completion_tokens=5) == tokens(max_tokens=1, max_completion_tokens=5) == 5
    assert tokens(max_tokens=5, max_completion_tokens=2) == 2


def test_an_image_part_is_refused_by_name(server):
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]}
    error = assert_openai_error(httpx.post(server + "/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages.0.content" and "'image_url' are not supported" in error["message"], error


def user_message_of(tokenizer, length):
    """A user message whose chat prompt is `length` tokens."""
    for words in range(length):
        for tail in ("", "a", "ab", "."):
            message = {"role": "user", "content": "word " * words + tail}
            if len(tokenizer.render_for_completion([message])) == length:
                return message
    raise AssertionError(f"no prompt of {length} tokens")


def test_context_overflow_names_its_code(server, tiny_tokenizer):
    """A prompt that fills the context is answered (its one next token), one token more is refused
    with OpenAI's code, as the engine decides (and as /v1/completions does)."""
    context = httpx.get(server + "/tokenizer_info").json()["model_max_length"]
    full = {"messages": [user_message_of(tiny_tokenizer, context)], "max_tokens": 4}
    answer = httpx.post(server + "/v1/chat/completions", json=full, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == context and answer.json()["usage"]["completion_tokens"] <= 1
    over = {"messages": [user_message_of(tiny_tokenizer, context + 1)]}
    error = assert_openai_error(httpx.post(server + "/v1/chat/completions", json=over), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"


def test_metadata_is_ignored_and_null_is_not_given(server):
    """Metadata and the values of refused fields that ask for nothing are accepted; null is the same
    as leaving a field out (the model's defaults then apply: the same seeded answer)."""
    nulls = {name: None for name, p in CHAT_FIELDS.items() if name not in ("messages", "seed", "max_tokens")}
    harmless = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "tools": [],
                "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {}, "modalities": ["text"],
                "parallel_tool_calls": False}
    answers = [httpx.post(server + "/v1/chat/completions", json={**HELLO, "seed": 3, "max_tokens": 8, **extra}, timeout=60)
               for extra in ({}, nulls, harmless)]
    assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
    assert len({r.json()["choices"][0]["message"]["content"] for r in answers}) == 1


def test_conversation_shapes(client):
    """A later system message and turns in a row are joined as documented (the same greedy answer as
    the joined conversation); a final assistant message is continued (prefill)."""
    def greedy(messages):
        return client.chat.completions.create(model="nanochat", messages=messages, temperature=0, frequency_penalty=0,
                                              max_tokens=12).choices[0].message.content  # the penalty counts the reply's own tokens

    shaped = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "there"}, {"role": "assistant", "content": "Yo."},
              {"role": "developer", "content": "Be kind."}, {"role": "user", "content": "Tell me a story."}]
    joined = [{"role": "user", "content": "Hi\n\nthere"}, {"role": "assistant", "content": "Yo."},
              {"role": "user", "content": "Be kind.\n\nTell me a story."}]
    answer = greedy(joined)
    assert greedy(shaped) == answer
    cut = answer.index(" ", len(answer) // 2)  # a word boundary, where tokens start
    assert greedy([*joined, {"role": "assistant", "content": answer[:cut]}]).startswith(answer[cut:])  # 12 more tokens


def test_metrics_and_access_log(served):
    """/metrics in Prometheus' text format counts what was served; the log has one line per request,
    without its text."""
    proc, url = served
    secret = "Zebra-7d1f-secret"
    ask(openai_client(url), f"Say {secret}", max_tokens=4)

    def samples():
        lines = httpx.get(url + "/metrics").text.splitlines()
        return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}

    metrics = until(samples, 30, "/metrics to count the request", done=lambda m: m.get('nanochat_requests_total{status="200"}'))
    assert metrics["nanochat_prompt_tokens_total"] > 0 and metrics["nanochat_completion_tokens_total"] > 0
    assert metrics["nanochat_time_to_first_token_seconds_count"] > 0 and "nanochat_queued_requests" in metrics
    log = until(lambda: output(proc), 30, "the access log line",
                done=lambda text: "POST /v1/chat/completions 200" in text)
    assert secret not in log


def test_readme_parameter_table_is_the_servers():
    """README's chat parameter table is app.CHAT_FIELDS; its honoured fields are the request's."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert parameter_table() in readme
    honoured = [name for name, p in CHAT_FIELDS.items() if p.treatment == "honoured"]
    assert sorted(honoured) == sorted(ChatCompletionRequest.model_fields)


def test_malformed_json_is_400(server, client):
    response = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400)
    assert error["param"] is None and error["message"].startswith("the body is not valid JSON (at character 1): ")
    with pytest.raises(openai.BadRequestError):
        ask(client, "hi", temperature=-1)


def test_full_queue_is_429_and_a_disconnect_cancels(run):
    """One request at a time, one waiting: of a burst of simultaneous requests, those beyond that
    are refused with Retry-After. A streaming client that goes away cancels its request (the
    server counts it). On SIGTERM a running request finishes, and the server exits."""
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
        # SIGTERM: no new connections; the running request finishes, then the server exits
        with httpx.Client(timeout=120) as http:
            with http.stream("POST", url + "/v1/chat/completions", json={**body, "n": 1, "max_tokens": 32, "stream": True}) as running:
                lines = running.iter_lines()
                next(lines)
                proc.send_signal(signal.SIGTERM)
                until(lambda: not healthy(url), 30, "the server to stop taking connections")
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert sorted(c["index"] for line in rest[:-1] for c in json.loads(line[6:])["choices"] if c["finish_reason"]) == [0]
        assert proc.wait(timeout=60) == -signal.SIGTERM  # uvicorn raises the signal again once it has shut down
        assert "SIGTERM: taking no new requests; 1 in progress" in output(proc)
    finally:
        stop_server(proc)


def test_sigterm_ends_what_would_outlast_the_shutdown_deadline_whole(run):
    """Requests still decoding (or queued) as --shutdown-timeout runs out end a little before it, as
    --max-seconds ends them: every choice with finish_reason "length", every stream with [DONE],
    the process exiting instead of waiting for them, and nothing left for uvicorn to cancel. Each
    engine step sleeps (the worker's test-only delay), so that the answers, a context each, would
    take seconds longer than the deadline on any machine."""
    proc, url = start_server(run, "--one-at-a-time", "--max-pending", "4", "--shutdown-timeout", "2", env={STEP_DELAY: "0.05"})
    body = {"messages": [{"role": "user", "content": "Go on forever."}], "n": 8, "max_tokens": 512, "stream": True,
            "frequency_penalty": 0}
    started = threading.Barrier(5, timeout=60)  # the four streams' first lines, and the signal

    def stream():
        with httpx.Client(timeout=120) as http, http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200  # admitted: decoding or queued
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 1:
                    started.wait()
            return [line for line in lines if line]

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(stream) for _ in range(4)]
            started.wait()  # all four connected: one decoding, the others queued (4 x 8 answers of up to a context each)
            proc.send_signal(signal.SIGTERM)
            events = [f.result() for f in streams]
        assert all(lines[-1] == "data: [DONE]" for lines in events), [lines[-1:] for lines in events]
        reasons = []
        for lines in events:  # every choice ends: cut at the deadline ("length"), or by its own end token before it
            chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
            ends = {c["index"]: c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]}
            assert set(ends) == set(range(8)) and set(ends.values()) <= {"length", "stop"}, ends
            reasons += ends.values()
        assert reasons.count("length") >= 3 * 8  # the queued requests at least were cut
        assert proc.wait(timeout=60) == -signal.SIGTERM
        assert "timeout graceful shutdown exceeded" not in output(proc)
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
    chat = [sys.executable, "-m", "nanochat.cli", "chat", "--run", name]
    cli = [*chat, "--max-tokens", "8", "--temperature", "0"]
    # one shot, with one set of generation defaults: the CLI's, and the API's for the fields a request
    # leaves out (seeded sampling). The run's model is a base model: the CLI continues the text, as the
    # completions endpoint does, where a chat model answers (test_hf_import)
    defaults = subprocess.run([*chat, "--seed", "5", "--max-tokens", "24", "-p", "Count with me."], env=env,
                              capture_output=True, text=True, check=True, timeout=120)

    def continued(**fields):
        return client.completions.create(model="nanochat", prompt="Count with me.", **fields).choices[0].text

    omitted = continued(seed=5, max_tokens=24)
    explicit = continued(seed=5, max_tokens=24, temperature=GENERATION["temperature"], frequency_penalty=GENERATION["frequency_penalty"],
                         extra_body={"top_k": GENERATION["top_k"]})
    openai_defaults = continued(seed=5, max_tokens=24, temperature=1, frequency_penalty=0, extra_body={"top_k": -1})
    assert defaults.stdout == omitted + "\n" and omitted == explicit and openai_defaults != omitted
    assert omitted != ask(client, "Count with me.", seed=5, max_tokens=24).choices[0].message.content  # not a chat answer
    session = subprocess.run(cli, input="Hello\n/clear\nAgain\n/quit\n", env=env, capture_output=True, text=True, check=True,
                             timeout=120)
    assert session.stdout.count("nanochat> ") == 2 and session.stdout.startswith("you> ")
    # a prompt over the model's context (128 tokens): one line, and an interactive session goes on
    too_long = "count with me " * 100
    refused = subprocess.run([*cli, "-p", too_long], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and not refused.stdout
    assert re.fullmatch(r"nanochat chat: the prompt has \d+ tokens; the context holds 128\n", refused.stderr), refused.stderr
    session = subprocess.run(cli, input=f"{too_long}\nCount with me.\n", env=env, capture_output=True, text=True, check=True, timeout=120)
    greedy = continued(max_tokens=8, temperature=0)
    assert session.stdout.count("nanochat> ") == 2 and session.stdout.endswith(f"nanochat> {greedy}\nyou> \n")
    assert "the context holds 128: a shorter line)" in session.stderr
    missing = subprocess.run([*cli, "--source", "rl", "-p", "x"], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "chat_rl" in missing.stderr
    # -1 is every token, as in the API; what sampling cannot take, or a device torch cannot use, is one line
    every = subprocess.run([*cli, "--top-k", "-1", "-p", "Count with me."], env=env, capture_output=True, text=True, timeout=120)
    assert every.returncode == 0 and every.stdout == continued(max_tokens=8, temperature=0) + "\n"
    # a run name in the storage --storage names, as the stages take it, where $NANOCHAT_STORAGE says another
    named = subprocess.run([*cli, "--storage", str(storage), "-p", "Count with me."], capture_output=True, text=True,
                           env={**env, "NANOCHAT_STORAGE": str(storage / "elsewhere")}, timeout=120)
    assert named.returncode == 0 and named.stdout == every.stdout
    for option, code, says in [(["--top-k", "0"], 2, "top_k must be at least 1"), (["--temperature", "nan"], 2, "temperature must be"),
                               (["--device", "cuda:99"], 1, "device 'cuda:99' cannot be used here"),
                               (["--device", "meta"], 1, "device 'meta' cannot be used here: it holds no data")]:
        refused = subprocess.run([*cli, *option, "-p", "x"], env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == code and refused.stderr.startswith(f"nanochat chat: {says}"), refused.stderr
        assert len(refused.stderr.splitlines()) == 1 and not refused.stdout
    serve = subprocess.run([sys.executable, "-m", "nanochat.cli", "serve", "--run", "no-such-run"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert serve.returncode == 1 and serve.stderr.strip().splitlines() == [
        "nanochat serve: no-such-run: neither a checkpoint nor a run with chat_rl or chat_sft or mid_train or base_train done"]



def test_a_port_in_use_is_one_line_before_serve_says_it_serves(run):
    storage, name = run
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = subprocess.run([sys.executable, "-m", "nanochat.cli", "serve", "--run", name, "--port", str(port)],
                               env={**os.environ, "NANOCHAT_STORAGE": str(storage)}, capture_output=True, text=True, timeout=120)
    assert serve.returncode == 1 and serve.stdout == ""  # it never said "serving on"
    assert serve.stderr.splitlines() == [f"nanochat serve: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_a_corrupt_checkpoint_is_one_line_from_serve_and_chat(run, tmp_path):
    storage, name = run
    step = sorted((storage / "runs" / name / "base_train" / "checkpoints").glob("step_*"))[-1]
    corrupt = tmp_path / step.name
    shutil.copytree(step, corrupt)
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    says = f"cannot load the model: file://{corrupt}/model.safetensors: does not match its manifest (corrupt or partial)"
    serve = subprocess.run([sys.executable, "-m", "nanochat.cli", "serve", "--run", str(corrupt), "--port", "0"],
                           capture_output=True, text=True, timeout=120)
    assert serve.returncode != 0 and "Traceback" not in serve.stderr, serve.stderr
    assert f"nanochat serve: {says}" in serve.stderr.splitlines()[0], serve.stderr
    chat = subprocess.run([sys.executable, "-m", "nanochat.cli", "chat", "--run", str(corrupt), "-p", "x"],
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 1 and chat.stderr.strip().splitlines() == [f"nanochat chat: {says.split(': ', 1)[1]}"]
    newer = tmp_path / "newer"  # a checkpoint of newer code: a model option this code lacks
    shutil.copytree(step, newer)
    edit_meta(newer, lambda meta: meta["model_config"].update(future_option=1))
    chat = subprocess.run([sys.executable, "-m", "nanochat.cli", "chat", "--run", str(newer), "-p", "x"],
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 1 and chat.stderr.strip().splitlines() == [
        f"nanochat chat: file://{newer}/meta.json: model options this code does not know: future_option (a checkpoint of "
        "newer nanochat code: update it)"]


def test_web_ui_in_headless_chromium(server, tmp_path):
    """On a phone-sized screen: send a message, see the answer stream in, regenerate it; the model's
    name shows; New chat empties the conversation; the settings panel's temperature, max tokens and
    system prompt reach the answer, and Enter (not Shift+Enter) sends a second turn with the whole
    conversation (each answer the API's for the same request); the page never scrolls sideways.
    Leaves a screenshot in the test's tmp dir."""
    with chromium_tab(tmp_path) as tab:
        tab.open(server + "/")
        # the model's name, and its generation defaults as what empty settings mean
        tab.wait_for("document.getElementById('model').textContent === 'nanochat-base'")
        assert tab.js("document.getElementById('temperature').placeholder") == str(GENERATION["temperature"])
        assert tab.js("document.getElementById('top_k').placeholder") == str(GENERATION["top_k"])
        tab.js("document.getElementById('max_tokens').value = '24'")  # short answers: the test's time
        assert tab.js("JSON.stringify(request())") == json.dumps(  # empty settings: the model's own defaults apply
            {"messages": [], "stream": True, "max_tokens": 24}, separators=(",", ":"))
        first, error = tab.say("Hello there!")
        assert first and not error
        assert tab.js("document.querySelector('.user').textContent") == "Hello there!"
        tab.js("document.getElementById('regenerate').click()")
        tab.wait_for("document.querySelectorAll('.assistant').length === 1 && document.querySelector('.assistant').dataset.done === 'true'")
        assert tab.js("document.querySelectorAll('.msg').length") == 2
        tab.js("document.getElementById('clear').click()")
        assert tab.js("document.getElementById('log').children.length") == 0 and tab.js("request().messages") == []
        tab.js("document.getElementById('settings').open = true;"
               "document.getElementById('temperature').value = '0'; document.getElementById('max_tokens').value = '6';"
               "document.getElementById('system').value = 'Be brief.'")
        answer, error = tab.say("Name a color.")
        conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]

        def api(messages):
            return openai_client(server).chat.completions.create(model="nanochat", temperature=0, max_tokens=6,
                                                                 messages=messages).choices[0].message.content

        assert not error and answer == api(conversation)
        tab.js("document.getElementById('input').focus()")
        tab.call("Input.insertText", text="And")
        tab.press_enter(shift=True)  # a new line, not sent
        tab.call("Input.insertText", text="another?")
        assert tab.js("document.querySelectorAll('.user').length") == 1
        tab.press_enter()
        tab.wait_for("document.querySelectorAll('.assistant').length === 2 && "
                     "document.querySelectorAll('.assistant')[1].dataset.done === 'true'")
        assert tab.js("document.querySelectorAll('.user')[1].textContent") == "And\nanother?"
        second = api([*conversation, {"role": "assistant", "content": answer}, {"role": "user", "content": "And\nanother?"}])
        assert tab.js("document.querySelectorAll('.assistant')[1].textContent") == second
        assert tab.js("document.documentElement.scrollWidth <= window.innerWidth")
        shot = tab.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "ui.png").write_bytes(base64.b64decode(shot))


# the text of the answer being streamed into the web UI, null once it is done
STREAMING = "(a => a && a.dataset.done !== 'true' ? a.textContent : null)([...document.querySelectorAll('.assistant')].at(-1))"


def test_web_ui_streams_the_answer_and_stop_cancels_it(slow_server, tmp_path):
    """With the engine slowed (slow_server), the answer is seen growing between two reads while it
    streams; Stop ends it, keeps its text as the conversation's last turn, and the server cancels
    the request. New chat during an answer leaves that answer out of the new conversation."""
    cancelled = httpx.get(slow_server + "/health").json()["cancelled_requests"]
    with chromium_tab(tmp_path) as tab:
        tab.open(slow_server + "/")
        tab.js("document.getElementById('input').value = 'Tell me a long story.'; document.getElementById('form').requestSubmit()")
        first = until(lambda: tab.js(STREAMING), 30, "the answer's first text while it streams")
        grown = until(lambda: tab.js(STREAMING), 30, "the answer to grow while it streams",
                      done=lambda text: text is not None and len(text) > len(first))
        assert grown.startswith(first)
        tab.js("document.getElementById('stop').click()")
        tab.wait_for("[...document.querySelectorAll('.assistant')].at(-1).dataset.done === 'true'")
        stopped = tab.js("[...document.querySelectorAll('.assistant')].at(-1).textContent")
        assert stopped.startswith(grown) and not tab.js("!!document.querySelector('.error')")
        assert tab.js("request().messages.at(-1)") == {"role": "assistant", "content": stopped}
        assert tab.js("[document.getElementById('send').disabled, document.getElementById('stop').disabled]") == [False, True]
        # New chat while an answer streams: the cut answer joins no conversation, and the next one starts clean
        tab.js("document.getElementById('input').value = 'Another story.'; document.getElementById('form').requestSubmit()")
        until(lambda: tab.js(STREAMING), 30, "the second answer's first text while it streams")
        tab.js("document.getElementById('clear').click()")
        tab.wait_for("controller === null")  # the cut answer has finished
        assert tab.js("request().messages") == []
        tab.js("document.getElementById('input').value = 'Hi'; document.getElementById('form').requestSubmit()")
        tab.js("document.getElementById('stop').click()")
        tab.wait_for("controller === null")
        assert tab.js("request().messages.map(m => m.role)") == ["user", "assistant"] and not tab.js("!!document.querySelector('.error')")
    until(lambda: httpx.get(slow_server + "/health").json()["cancelled_requests"], 30, "the server to cancel the request",
          done=lambda n: n > cancelled)
