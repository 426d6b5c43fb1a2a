"""Schemathesis against `nanochat serve`'s own OpenAPI spec, on a real server on 127.0.0.1 with an
API key: for every operation, a bounded and seeded set of generated requests (schema examples,
boundary and wrong-type cases, then random ones); no answer may be a 5xx, and every non-2xx answer
must carry OpenAI's error body. The requests made per operation and status are printed."""

from collections import Counter, defaultdict

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from nanochat.serve.app import create_app
from tests.support.serving import KEY, serving

pytest_plugins = ["tests.support.serving"]

SPEC = create_app(engine_factory=None).openapi()  # what the server serves: its engines load at startup, not here
schema = schemathesis.openapi.from_dict(SPEC)
STATUSES = defaultdict(Counter)  # "METHOD /path" -> status -> requests


@pytest.fixture(scope="module")
def fuzzed(run):
    """The server under fuzzing (short completions, at most 2 a request: the fuzz is after errors, not
    text; no rate limit); prints the requests it got."""
    with serving(run, "--api-key", KEY, "--max-tokens", "8", "--max-n", "2", "--rate-limit", "0") as url:
        assert httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json() == SPEC
        yield url
    for operation, statuses in sorted(STATUSES.items()):
        print(f"fuzz: {operation}: {sum(statuses.values())} requests, by status {dict(sorted(statuses.items()))}")
    total = sum(STATUSES.values(), Counter())
    print(f"fuzz: {sum(total.values())} requests in all, {sum(n for s, n in total.items() if s >= 500)} with a 5xx")


@schema.parametrize()
@settings(max_examples=100, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_openai_error_bodies(case, fuzzed):
    response = case.call(base_url=fuzzed, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    STATUSES[f"{case.method} {case.path}"][response.status_code] += 1
    assert response.status_code < 500, (case.as_curl_command(), response.text)
    if not 200 <= response.status_code < 300:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), response.text


def test_max_tokens_caps_the_models_default(fuzzed):
    """--max-tokens 8 caps the model's own default (512) for requests that leave max_tokens out, on both
    endpoints (and /health says so, for the web UI); a request for 9 tokens, or for 3 completions
    with --max-n 2, is refused naming the field."""
    headers = {"Authorization": f"Bearer {KEY}"}
    bodies = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "Tell me a long story."}]},
              "/v1/completions": {"prompt": "Once upon a time", "temperature": 0, "frequency_penalty": 0}}
    answers = {path: httpx.post(fuzzed + path, json=body, headers=headers, timeout=60).json() for path, body in bodies.items()}
    assert all(a["usage"]["completion_tokens"] <= 8 for a in answers.values()), answers
    assert answers["/v1/completions"]["choices"][0]["finish_reason"] == "length", answers
    assert httpx.get(fuzzed + "/health").json()["max_tokens"] == 8
    for path, body in bodies.items():
        for over in ({"max_tokens": 9}, {"n": 3}):
            answer = httpx.post(fuzzed + path, json={**body, **over}, headers=headers)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == next(iter(over)), answer.text
