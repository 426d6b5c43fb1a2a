"""/v1/completions and the tokenizer endpoints of a real `nanochat serve` (the suite's tiny base
model, behind an API key) with real clients: the official openai package and raw HTTP. The oracle
of every logprob is our model's own log-softmax of its soft-capped logits, computed here without
a cache from the model loaded as the server loads it; the echo oracle also runs with
NANOCHAT_CPU_FASTPATHS=0 (a server and an oracle on torch's ops, as on a CPU without nanochat.cpu's
fast paths)."""

import json
import re
from pathlib import Path

import httpx
import openai
import pytest
import torch

from nanochat import cpu
from nanochat.inference import load_engine
from nanochat.serve.completions import FIELDS, CompletionRequest
from tests.support.serving import KEY, assert_openai_error, openai_client, output, start_server, stop_server

pytest_plugins = ["tests.support.serving", "tests.support.cpupaths"]

AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT_TOL = 1e-4  # prompt logprobs: the server's prefill is the same one forward over the same ids
# a generated token's logprob comes from a cached decode step, in the served dtype (bf16 on CPUs with
# bf16 matmuls), against the oracle's one uncached forward: the same value up to that dtype's rounding
DECODE_TOL = 5e-2


@pytest.fixture(scope="module")
def server(run):
    proc, url = start_server(run, "--api-key", KEY, env={"OMP_NUM_THREADS": "1"})  # the tiny model's matmuls on busy cores
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def torch_ops_server(run):
    """The same server with NANOCHAT_CPU_FASTPATHS=0: (process, URL)."""
    proc, url = start_server(run, "--api-key", KEY, env={"OMP_NUM_THREADS": "1", cpu.SWITCH: "0"})
    yield proc, url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, api_key=KEY)


def oracle_of(run):
    """ids -> (T, vocab): log_softmax of the served model's capped logits at every position, uncached,
    from the model loaded as the server loads it (with this process's NANOCHAT_CPU_FASTPATHS)."""
    storage, name = run
    model = load_engine(str(storage / "runs" / name)).model

    @torch.inference_mode()
    def log_softmax(ids):
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)

    return log_softmax


@pytest.fixture(scope="module")
def oracle(run):
    return oracle_of(run)


def post(server, path, body, headers=AUTH):
    return httpx.post(server + path, json=body, headers=headers, timeout=60)


def tokenize(server, text, add_special_tokens=True):
    response = post(server, "/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_openai_client_echo_logprobs_equal_our_log_softmax(request, run, fastpaths):
    """completions.create(echo=True, logprobs=5): the prompt's logprobs (None first) and the
    completion's equal the oracle's, each with its top 5 (and the chosen token); the text is the
    echoed prompt then the completion, and text_offset says where each token starts in it. Also
    with NANOCHAT_CPU_FASTPATHS=0 (torch-ops): a server whose log says its fast paths are off,
    against the model loaded with them off."""
    if fastpaths:
        server, oracle = request.getfixturevalue("server"), request.getfixturevalue("oracle")
    else:
        proc, server = request.getfixturevalue("torch_ops_server")
        if not torch.cuda.is_available():  # where the server's model is on the CPU, which the switch is about
            assert f"CPU fast paths off ({cpu.SWITCH}=0)" in output(proc)
        oracle = oracle_of(run)  # fastpaths set the switch in this process
    client = openai_client(server, api_key=KEY)
    prompt = "The capital of France is"
    response = client.completions.create(model="nanochat", prompt=prompt, echo=True, logprobs=5, max_tokens=6,
                                         temperature=0, frequency_penalty=0)  # not the model's default penalty
    choice = response.choices[0]
    ids = tokenize(server, prompt)
    generated = len(choice.logprobs.tokens) - len(ids)
    assert response.object == "text_completion" and response.model == "nanochat-base" and response.id.startswith("cmpl-")
    assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == generated > 0
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    detok = post(server, "/detokenize", {"tokens": ids}).json()["prompt"]
    assert detok == "<|bos|>" + prompt and choice.text.startswith(detok)
    sequence = list(ids)
    for position in range(1, len(logprobs.tokens)):
        token, logprob, top = logprobs.tokens[position], logprobs.token_logprobs[position], logprobs.top_logprobs[position]
        row, tol = oracle(sequence[:position])[-1], PROMPT_TOL if position < len(ids) else DECODE_TOL
        if position == len(sequence):  # greedy: the argmax of the capped logits
            sequence.append(int(row.argmax()))
            assert token.startswith("bytes:") or post(server, "/detokenize", {"tokens": [sequence[-1]]}).json()["prompt"] == token
        assert abs(logprob - row[sequence[position]].item()) < tol, (position, token)
        assert 5 <= len(top) <= 6 and top[token] == logprob
        assert sorted(top.values(), reverse=True)[:5] == pytest.approx(row.topk(5).values.tolist(), abs=tol)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    for token, start in zip(logprobs.tokens, logprobs.text_offset):
        assert token.startswith("bytes:") or choice.text[start:start + len(token)] == token


def test_echo_offsets_when_the_prompt_ends_inside_a_character(server):
    """A prompt of token ids whose last token is the first byte of a two-byte character: the echo is
    the prompt decoded on its own (that byte a U+FFFD), the completion follows it, and text_offset
    puts each completion token after the echo."""
    lead = 0xC3  # a byte-level BPE's first 256 ids are the bytes
    assert post(server, "/detokenize", {"tokens": [lead, 0xA9]}).json()["prompt"] == "\u00e9"
    ids = [*tokenize(server, "The capital of France is"), lead]
    response = httpx.post(server + "/v1/completions", headers=AUTH, timeout=60, json={
        "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 4, "temperature": 0, "frequency_penalty": 0}).json()
    choice = response["choices"][0]
    echo = post(server, "/detokenize", {"tokens": ids}).json()["prompt"]
    assert echo.endswith("is\ufffd") and choice["text"].startswith(echo)
    offsets = choice["logprobs"]["text_offset"]
    assert len(offsets) == len(ids) + response["usage"]["completion_tokens"] and offsets[len(ids)] == len(echo)


def token_counters(server):
    """/metrics' (prompt tokens, completion tokens) counters."""
    text = httpx.get(server + "/metrics", headers=AUTH).text
    return tuple(int(re.search(rf"^nanochat_{name}_tokens_total (\d+)$", text, re.M).group(1)) for name in ("prompt", "completion"))


def test_token_id_prompts_lists_and_scoring_alone(server, client, oracle):
    """A list of token-id prompts with n=2: prompt i's sample j is choice 2i + j; its tokens count in
    /metrics. With max_tokens 0 and echo a prompt is scored alone (lm-evaluation-harness sends
    max_tokens 1 and drops the last)."""
    prompts = [tokenize(server, "Once upon a time"), tokenize(server, "1, 2, 3,", False)]
    before = token_counters(server)
    response = client.completions.create(model="nanochat", prompt=prompts, n=2, max_tokens=3, temperature=0)
    after = token_counters(server)
    assert (after[0] - before[0], after[1] - before[1]) == (response.usage.prompt_tokens, response.usage.completion_tokens)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text  # greedy, twice
    assert response.usage.prompt_tokens == len(prompts[0]) + len(prompts[1])  # a prompt counts once, as OpenAI counts it
    scored = client.completions.create(model="nanochat", prompt=prompts, max_tokens=0, echo=True, logprobs=0)
    for ids, choice in zip(prompts, scored.choices):
        expected = oracle(ids)
        assert choice.finish_reason == "length" and len(choice.logprobs.token_logprobs) == len(ids)
        assert choice.logprobs.token_logprobs[1:] == pytest.approx([expected[t - 1, ids[t]].item() for t in range(1, len(ids))],
                                                                   abs=PROMPT_TOL)
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])  # k=0: the chosen token alone


def test_stop_n_seed_and_streaming(client):
    """Seeded samples repeat and differ from each other; a stop string ends the text before it; the
    stream (with usage last, null before) carries the same text and logprobs as the whole answer."""
    kw = {"model": "nanochat", "prompt": "The weather today", "max_tokens": 5, "temperature": 1.0, "n": 3, "seed": 11}
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices] and len(set(texts)) > 1
    full = client.completions.create(model="nanochat", prompt="Counting:", max_tokens=16, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = client.completions.create(model="nanochat", prompt="Counting:", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    whole = client.completions.create(model="nanochat", prompt="Counting:", max_tokens=8, temperature=0, echo=True,
                                      logprobs=2)
    text, tokens, logprobs, usages = "", [], [], []
    for chunk in client.completions.create(model="nanochat", prompt="Counting:", max_tokens=8, temperature=0, echo=True,
                                           logprobs=2, stream=True, stream_options={"include_usage": True}):
        usages.append(chunk.usage)
        for choice in chunk.choices:
            text += choice.text
            tokens += choice.logprobs.tokens
            logprobs += choice.logprobs.token_logprobs
    assert text == whole.choices[0].text and tokens == whole.choices[0].logprobs.tokens
    assert logprobs == whole.choices[0].logprobs.token_logprobs
    assert usages[-1].completion_tokens == whole.usage.completion_tokens and not any(usages[:-1])


def test_raw_stream_headers_and_base_model_text(server):
    """The event stream is not cached or buffered by a proxy; a text prompt reaches the model with no
    chat template (the prompt's ids are <|bos|> and the text's)."""
    with httpx.stream("POST", server + "/v1/completions", headers=AUTH, timeout=60,
                      json={"prompt": "Hello", "max_tokens": 2, "stream": True, "echo": True}) as response:
        assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["text"].startswith("<|bos|>Hello")


@pytest.mark.parametrize("body,status,param", [
    ({"suffix": "the end"}, 400, "suffix"),
    ({"logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"best_of": 3}, 400, "best_of"),
    ({"functions": []}, 400, "functions"),  # not a field of this endpoint
    ({"logprobs": 21}, 400, "logprobs"),
    ({"top_k": 0}, 400, "top_k"),
    ({"max_tokens": 0}, 400, "max_tokens"),  # without echo there is nothing to return
    ({"n": 9}, 400, "n"),
    ({"prompt": [[1, 2], [10 ** 6]]}, 400, "prompt"),
    ({"prompt": "word " * 300}, 400, "prompt"),  # more tokens than the context
    ({"model": "gpt-4"}, 404, "model"),
])
def test_refusals_name_the_field(server, body, status, param):
    error = assert_openai_error(post(server, "/v1/completions", {"prompt": "hi", **body}), status)
    assert error["param"] == param and param.split(".")[0] in error["message"]
    if body.get("prompt") == "word " * 300:
        assert error["code"] == "context_length_exceeded"


def test_a_prompt_that_fills_the_context_gets_its_next_token(server):
    """The context's length of token ids is answered (at most its one next token), one more is
    refused with context_length_exceeded: the engine's rule, as the chat endpoint's."""
    context = httpx.get(server + "/tokenizer_info", headers=AUTH).json()["model_max_length"]
    answer = post(server, "/v1/completions", {"prompt": [5] * context, "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert usage["prompt_tokens"] == context and usage["completion_tokens"] <= 1
    error = assert_openai_error(post(server, "/v1/completions", {"prompt": [5] * (context + 1)}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"


def test_ignored_and_null_fields_are_accepted(client):
    """Metadata (user) is ignored; best_of equal to n, an empty logit_bias or suffix, and null for any
    optional field change nothing."""
    plain = client.completions.create(model="nanochat", prompt="Hi", max_tokens=4, temperature=0).choices[0].text
    same = client.completions.create(model="nanochat", prompt="Hi", max_tokens=4, temperature=0, user="u-1", best_of=1,
                                     logit_bias={}, suffix="", extra_body={"top_p": None, "stop": None})
    assert same.choices[0].text == plain


def test_tokenizer_endpoints_as_vllm_serves_them(server):
    """/tokenizer_info, /tokenize and /detokenize (lm-evaluation-harness's remote tokenizer), behind
    the API key as /v1/ is."""
    info = httpx.get(server + "/tokenizer_info", headers=AUTH).json()
    assert info["bos_token"] == "<|bos|>" and info["eos_token"] and info["model_max_length"] == 128
    ids = tokenize(server, "Hello world")
    assert ids[0] == tokenize(server, "<|bos|>", False)[0] and tokenize(server, "Hello world", False) == ids[1:]
    assert post(server, "/detokenize", {"tokens": ids[1:]}).json() == {"prompt": "Hello world"}
    assert post(server, "/tokenize", {"prompt": "Hi"}).json()["max_model_len"] == 128
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]}), ("/v1/completions", {"prompt": "x"})):
        assert_openai_error(post(server, path, body, headers={}), 401)
    assert_openai_error(httpx.get(server + "/tokenizer_info"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai_client(server, api_key="wrong").completions.create(model="nanochat", prompt="x")


def test_every_field_is_classified_and_the_readme_says_so():
    """Every field the endpoint takes is in FIELDS (honoured, ignored or refused: none unclassified),
    and README.md's table is FIELDS."""
    assert set(FIELDS) == set(CompletionRequest.model_fields)
    assert {status for status, _ in FIELDS.values()} <= {"honoured", "ignored", "refused"}
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = re.search(r"<!-- completions-parameters:.*?-->\n(.*?)<!-- /completions-parameters -->", readme, re.S).group(1)
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert {name.strip("|` "): (status, note.rstrip(" |")) for name, status, note in rows} == FIELDS
