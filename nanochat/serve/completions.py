"""OpenAI's legacy completions endpoint and vLLM's tokenizer endpoints: raw text (or token ids) in,
no chat template, so a base model is reachable as it was trained and lm-evaluation-harness can score
continuations by their logprobs.

    POST /v1/completions   OpenAI's legacy schema (below); stream=true gives SSE chunks, then [DONE]
    GET  /tokenizer_info   the tokenizer's special tokens and context, as vLLM serves it
    POST /tokenize         {"prompt": text, "add_special_tokens": true} -> {"tokens", "count", "max_model_len"}
    POST /detokenize       {"tokens": [ids]} -> {"prompt": text}

Requests go through the same Workers as chat (one engine loop per device, continuous batching); each
prompt of a request is one engine Request of n rows. Logprobs are the engine's (log_softmax of the
soft-capped logits, before temperature and penalties); with echo, the prompt's come from its prefill.
Text is encoded as the exported tokenizer.json encodes it (and so as vLLM would serve that): <|bos|>
first, as our pretraining documents start, and special-token strings in the text as those tokens.
Echoed text is the decoded prompt, <|bos|> included: what the model read.

Every field of OpenAI's legacy request is honoured, ignored or refused with a 400 naming it (FIELDS);
a field OpenAI's request does not have is refused too. The tokenizer endpoints sit behind the same API keys and
limits as /v1/ (guard.Guard).
"""

import asyncio
import codecs
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from nanochat import hf_tokenizer
from nanochat.engine import Request as GenerationRequest
from nanochat.serve import common
from nanochat.serve.common import MAX_LOGPROBS, STREAM_HEADERS, APIError, StreamOptions, usage
from nanochat.serve.worker import finished

# What happens to each field of OpenAI's legacy completions request (and our extension, top_k):
# honoured, ignored (accepted, changes nothing) or refused (a 400 naming it). README.md's table is this.
FIELDS = {
    "model": ("honoured", "the served model's id, or `nanochat`; another is a 404 naming the served model"),
    "prompt": ("honoured", "text (the BOS token first), token ids, or a list of either; prompt i's sample j is choice i·n + j"),
    "max_tokens": ("honoured", "default the model's; at most `--max-tokens`; 0 with `echo` scores the prompt alone"),
    "temperature": ("honoured", "0 to 2; 0 (or below 1e-6) is greedy"),
    "top_p": ("honoured", "nucleus sampling"),
    "top_k": ("honoured", "an extension (as vLLM's): the k most likely tokens; -1: all"),
    "frequency_penalty": ("honoured", "-2 to 2, as OpenAI subtracts it"),
    "presence_penalty": ("honoured", "-2 to 2, as OpenAI subtracts it"),
    "n": ("honoured", "at most `--max-n`; the n samples share one prefill"),
    "seed": ("honoured", "sample i draws from a generator seeded with seed + i"),
    "stop": ("honoured", "up to `--max-stop` strings, not included in the text"),
    "stream": ("honoured", "server-sent events ending with `data: [DONE]`"),
    "stream_options": ("honoured", "include_usage: a last chunk with the usage (`usage: null` on the others)"),
    "echo": ("honoured", "the text starts with the decoded prompt (its BOS token included); with logprobs, the prompt's too"),
    "logprobs": ("honoured", f"0 to {MAX_LOGPROBS}: tokens, token_logprobs, top_logprobs (the k most likely and the chosen "
                             "token), text_offset; the log-softmax of the model's logits, before temperature and penalties"),
    "best_of": ("honoured", "equal to n (every sample is returned); another value is refused"),
    "suffix": ("refused", "no insertion; `\"\"` is accepted"),
    "logit_bias": ("refused", "not implemented; `{}` is accepted"),
    "user": ("ignored", "metadata"),
}


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions request; null means not given; an unknown field is refused."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # vLLM's other options (model, return_token_strs) change nothing here
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    tokens: list[int]


def prompts_of(body, tokenizer, limits):
    """The prompts' token ids: a text prompt is <|bos|> + its text."""
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt or len(prompt) > limits.max_messages:
        raise APIError(400, f"prompt takes 1 to {limits.max_messages} prompts", "prompt")
    prompts = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if len(p) > limits.max_message_chars:
                raise APIError(400, f"prompt {i} is longer than {limits.max_message_chars} characters", "prompt")
            p = encode(tokenizer, p, bos=True)
        if not p or not all(0 <= t < tokenizer.vocab_size for t in p):
            raise APIError(400, f"prompt {i}: token ids must be 0 to {tokenizer.vocab_size - 1}, and at least one", "prompt")
        prompts.append(p)
    return prompts


def encode(tokenizer, text, bos):
    """Text as the exported tokenizer.json encodes it: special-token strings become those tokens."""
    return [tokenizer.bos_token_id] * bos + tokenizer.enc.encode(text, allowed_special="all")


def sampling_params(body, limits, generation):
    """The engine's SamplingParams, once every field is classified (FIELDS): this endpoint's own
    checks (suffix, logit_bias, best_of, max_tokens 0), then the ones it shares with chat
    (common.sampling_params)."""
    if body.suffix:
        raise APIError(400, "suffix is not supported (no insertion)", "suffix")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise APIError(400, "best_of is supported only equal to n (every sample is returned)", "best_of")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 needs echo (there would be nothing to return)", "max_tokens")
    return common.sampling_params(body, limits, generation, body.max_tokens, logprobs=body.logprobs,
                                  prompt_logprobs=body.logprobs if body.echo else None)


def token_text(data):
    """A token's text in OpenAI's logprobs: its UTF-8, or "bytes:\\xNN..." for a piece of a character."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class LegacyLogprobs:
    """One choice's logprobs in OpenAI's legacy format, built piece by piece as its text is:
    tokens, token_logprobs, top_logprobs ({token text: logprob}: the k most likely and the chosen
    one, so up to k + 1) and text_offset (where each token's text starts in the choice's text)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = 0

    def add(self, entries, tokens=None):
        """The format for the next TokenLogprobs (`entries`; None: a prompt's first token, of `tokens`)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, entry in enumerate(entries):
            token = tokens[i] if entry is None else entry.token
            data = self.tokenizer.id_to_bytes(token)
            out["tokens"].append(token_text(data))
            out["text_offset"].append(self.offset)
            self.offset += len(self.decoder.decode(data))
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(entry.logprob)
            top = {token_text(self.tokenizer.id_to_bytes(t)): lp for t, lp in entry.top}
            top.setdefault(out["tokens"][-1], entry.logprob)
            out["top_logprobs"].append(top)
        if tokens is not None:  # an echoed prompt is decoded on its own (Choices.piece), as the engine decodes the completion
            self.offset += len(self.decoder.decode(b"", final=True))  # a character it ends inside of: one U+FFFD
        return out


def add_routes(app, workers, relays, limits, served, generation, metrics):
    """Adds /v1/completions and the tokenizer endpoints to create_app's app, over its workers and
    their relays (filled at startup); `served(name)` is the served model's card (or raises the 404
    that names it), `generation` the model's generation defaults, `metrics` the server's ops.Metrics."""

    def tokenizer():
        return workers[0].engine.tokenizer

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {**hf_tokenizer.tokenizer_config(workers[0].engine.max_len), "chat_template": hf_tokenizer.CHAT_TEMPLATE,
                "vocab_size": tokenizer().vocab_size}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        tokens = encode(tokenizer(), body.prompt, body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": workers[0].engine.max_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        tok = tokenizer()
        if not all(0 <= t < tok.vocab_size for t in body.tokens):
            raise APIError(400, f"tokens must be 0 to {tok.vocab_size - 1}", "tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: Request):
        model = served(body.model)["id"]
        params = sampling_params(body, limits, generation)
        worker = min(workers, key=lambda w: w.load)
        prompts = prompts_of(body, worker.engine.tokenizer, limits)
        events = asyncio.Queue()
        requests = []
        for i, ids in enumerate(prompts):
            send = relays[worker].sender(events)
            requests.append(GenerationRequest(ids, params, body.n or 1, lambda *event, i=i, send=send: send(i, *event)))
        common.submit(worker, requests, limits, "prompt")
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        choices = Choices(requests, worker.engine.tokenizer, body.echo, body.logprobs is not None, metrics)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(choices, events, meta, include_usage), media_type="text/event-stream",
                                     headers=STREAM_HEADERS)
        if not await finished(events_of(choices, events), http_request, requests):
            return JSONResponse({}, status_code=499)
        return {**meta, "object": "text_completion", "choices": choices.whole(), "usage": usage(requests)}


class Choices:
    """The choices of a request's prompts (prompt i's sample j is choice i * n + j), each with its
    text so far (the echoed prompt first) and its logprobs, from the engine's events; and the
    request's metrics (when it was submitted, when its first text came)."""

    def __init__(self, requests, tokenizer, echo, logprobs, metrics):
        self.requests, self.tokenizer, self.echo, self.logprobs = requests, tokenizer, echo, logprobs
        self.metrics, self.started, self.first = metrics, time.monotonic(), None
        self.n = requests[0].n
        self.formats = [LegacyLogprobs(tokenizer) for _ in range(len(requests) * self.n)]
        self.begun = set()  # choices whose first chunk (with the echo) is out

    def index(self, prompt, sample):
        return prompt * self.n + sample

    def piece(self, prompt, sample, text, finish_reason, entries):
        """A choice's chunk for an event: its text (after the echoed prompt, for the first) and logprobs."""
        index, request = self.index(prompt, sample), self.requests[prompt]
        echo = self.echo and index not in self.begun
        self.begun.add(index)
        if echo:
            text = self.tokenizer.decode(request.prompt_ids) + text
        logprobs = None
        if self.logprobs:
            format = self.formats[index]
            echoed = format.add(request.prompt_logprobs, request.prompt_ids) if echo else {}
            logprobs = {key: echoed.get(key, []) + values for key, values in format.add(entries).items()}
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}

    def whole(self):
        """Every choice, complete (after all have finished)."""
        return [self.piece(p, c.index, c.text, c.finish_reason, c.logprobs or [])
                for p, request in enumerate(self.requests) for c in request.completions]


async def events_of(choices, events):
    """The events (prompt, sample, text, finish_reason, logprobs) as they arrive, until every choice
    has finished; then the request's metrics are recorded."""
    unfinished = len(choices.formats)
    while unfinished:
        event = await events.get()
        unfinished -= event[3] is not None
        if event[2] and choices.first is None:
            choices.first = time.monotonic()
        yield event
    choices.metrics.generated(usage(choices.requests), choices.started, choices.first, time.monotonic())


async def stream(choices, events, meta, include_usage):
    """SSE chunks as OpenAI's legacy endpoint sends them: text pieces (the echoed prompt first) with
    their logprobs, a finish_reason per choice, usage if asked (null in every other chunk), [DONE]."""
    def chunk(choices_, **extra):
        return "data: " + json.dumps({**meta, "object": "text_completion", "choices": choices_, **extra}) + "\n\n"

    extra = {"usage": None} if include_usage else {}
    try:
        async for prompt, sample, text, finish_reason, entries in events_of(choices, events):
            yield chunk([choices.piece(prompt, sample, text, finish_reason, entries)], **extra)
        if include_usage:
            yield chunk([], usage=usage(choices.requests))
        yield "data: [DONE]\n\n"
    finally:
        for request in choices.requests:
            request.cancelled = True
