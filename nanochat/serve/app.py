"""The OpenAI-compatible API and the web UI, over one engine loop per device.

    POST /v1/chat/completions   OpenAI's schema (CHAT_FIELDS says what is honoured, ignored, refused);
                                stream=true gives SSE chunks ending with `data: [DONE]`
    GET  /v1/models[/{id}]      the one model served
    GET  /metrics               Prometheus metrics (ops.py), behind the API keys as /v1/ is
    GET  /health                status, load, the model's name and generation defaults
    GET  /                      the web UI (one self-contained page)

Generation never runs on the event loop: each device's Worker thread decodes, and its Relay hands
each step's pieces of text to the loop in one callback. Bad input is a 400 with an OpenAI-style error
body, a full queue a 429 with Retry-After; a client that goes away cancels its generation. In front
of /v1/, `guard.Guard` checks the API key, the client's rate and concurrency, and the body. Sampling
fields a request leaves out (or sends as null) take the model's generation defaults (its checkpoint's
generation config, nanochat.checkpoint.generation), then OpenAI's for the fields that config lacks
(top_p, presence_penalty); --max-tokens caps them all.
"""

import asyncio
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from nanochat.engine import Request as GenerationRequest
from nanochat.serve import common, completions
from nanochat.serve.common import MAX_LOGPROBS, STREAM_HEADERS, APIError, StreamOptions, api_error, usage
from nanochat.serve.guard import Guard, error_response
from nanochat.serve.ops import AccessLog, Metrics, StartupFailure
from nanochat.serve.worker import Worker, finished
from nanochat.tokenizer import ConversationError

log = logging.getLogger(__name__)

UI_PAGE = Path(__file__).with_name("ui.html")
ALIAS = "nanochat"  # a model name that always means the served model (clients and tests send it)


def setting(default, help):
    """A limit that `nanochat serve` exposes as an option, with this help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Limits:
    """What a request, and a client (its API key, or its IP address when the server has no keys),
    may ask of the server."""
    max_body_bytes: int = setting(1 << 20, "request body size in bytes; larger gets 413")
    body_timeout: float = setting(30.0, "seconds to receive a request body; slower gets 408")
    max_messages: int = setting(64, "messages per request")
    max_message_chars: int = setting(32_000, "characters per message")
    max_n: int = setting(8, "completions per request (n)")
    max_stop: int = setting(4, "stop strings per request")
    max_tokens: int = setting(4096, "tokens per completion: a request may ask for no more, and the model's default is cut to it")
    max_seconds: float = setting(300.0, "wall time per request in seconds; then its completions end with finish_reason length")
    max_concurrent: int = setting(32, "requests in progress per client; more get 429")
    rate_limit: int = setting(600, "requests per minute per client (bursts of as many); more get 429; 0: no limit")
    max_pending: int = setting(64, "requests waiting per engine; more get 429")
    max_requests: int | None = None  # requests decoding together per engine (1: one at a time)
    retry_after: int = 1  # seconds, in a 429's Retry-After when the wait is unknown


@dataclass(frozen=True)
class Param:
    """What the server does with a field of OpenAI's chat request: `honoured`, `ignored` (accepted,
    changes nothing) or `refused` (a 400 naming it, unless `allows(value)`: the values that ask for
    nothing we lack, such as tools=[])."""
    treatment: Literal["honoured", "ignored", "refused"]
    note: str
    allows: object = None


# Every field of OpenAI's chat completions request (and top_k, an extension), in one table: the
# honoured ones are ChatCompletionRequest's fields, the README's parameter table is written from it.
CHAT_FIELDS = {
    "model": Param("honoured", f"the served model's id, or `{ALIAS}`; another is a 404 naming the served model"),
    "messages": Param("honoured", "system, developer, user and assistant text; see the conversation shapes below"),
    "temperature": Param("honoured", "0 to 2; 0 (or below 1e-6) is greedy"),
    "top_p": Param("honoured", "nucleus sampling"),
    "top_k": Param("honoured", "an extension (as vLLM's): the k most likely tokens; -1: all"),
    "frequency_penalty": Param("honoured", "-2 to 2, as OpenAI subtracts it"),
    "presence_penalty": Param("honoured", "-2 to 2, as OpenAI subtracts it"),
    "max_tokens": Param("honoured", "at most `--max-tokens`"),
    "max_completion_tokens": Param("honoured", "as max_tokens, and wins over it"),
    "n": Param("honoured", "at most `--max-n`; the n samples share one prefill"),
    "stop": Param("honoured", "up to `--max-stop` strings, not included in the text"),
    "seed": Param("honoured", "sample i draws from a generator seeded with seed + i: reproducible in any batch"),
    "stream": Param("honoured", "server-sent events ending with `data: [DONE]`"),
    "stream_options": Param("honoured", "include_usage: a last chunk with the usage (`usage: null` on the others)"),
    "logprobs": Param("honoured", "the log-softmax of the model's logits, before temperature and penalties"),
    "top_logprobs": Param("honoured", f"0 to {MAX_LOGPROBS}, with logprobs"),
    "user": Param("ignored", "metadata"),
    "metadata": Param("ignored", "metadata; nothing is stored"),
    "store": Param("ignored", "nothing is stored"),
    "service_tier": Param("ignored", "one tier"),
    "prompt_cache_key": Param("ignored", "a caching hint"),
    "prompt_cache_retention": Param("ignored", "a caching hint"),
    "safety_identifier": Param("ignored", "metadata"),
    "parallel_tool_calls": Param("ignored", "means nothing without tools"),
    "tools": Param("refused", "no tool calling: the model's python tool runs inside the server", lambda v: v == []),
    "tool_choice": Param("refused", "no tool calling", lambda v: v == "none"),
    "functions": Param("refused", "no function calling", lambda v: v == []),
    "function_call": Param("refused", "no function calling", lambda v: v == "none"),
    "response_format": Param("refused", "no JSON mode or schemas; `{\"type\": \"text\"}` is accepted",
                             lambda v: v == {"type": "text"}),
    "logit_bias": Param("refused", "not implemented; `{}` is accepted", lambda v: v == {}),
    "modalities": Param("refused", "text only; `[\"text\"]` is accepted", lambda v: v == ["text"]),
    "audio": Param("refused", "text only"),
    "prediction": Param("refused", "no predicted outputs"),
    "reasoning_effort": Param("refused", "not a reasoning model"),
    "verbosity": Param("refused", "not implemented"),
    "web_search_options": Param("refused", "no web search"),
}


def parameter_table():
    """The README's table of the chat request's fields (tests check that they agree)."""
    rows = ["| Field | | Notes |", "|---|---|---|"]
    rows += [f"| `{name}` | {p.treatment} | {p.note} |" for name, p in CHAT_FIELDS.items()]
    return "\n".join(rows)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # extra: name, refusal, ...
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def text_only(cls, content):
        """An image or audio part is refused by name, not as a part that failed to be text."""
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in (None, "text"):
                raise ValueError(f"content parts of type {kind!r} are not supported: this model reads text only")
        return content

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(BaseModel):
    """The honoured fields of OpenAI's chat completions request (CHAT_FIELDS); the others arrive as
    extras and are checked by `refusals`. Every optional field may be null: not given. Strict, as
    every request model here: a value of another JSON type is a 400 naming its field, as OpenAI's
    (no "3" or true for 3)."""
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as OpenAI (torch's generators take no more)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def field_path(loc, body):
    """The request field (e.g. messages.0.content) a validation error's `loc` names: its first part
    (which may be missing from the request), then the parts that lead on through the request `body`;
    pydantic goes on to the union member it tried (messages.0.content.str), which is no field."""
    parts, value = [], body
    for part in loc:
        inside = (isinstance(value, dict) and part in value) or \
            (isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value))
        if parts and not inside:
            break
        parts.append(str(part))
        value = value[part] if inside else None
    return ".".join(parts)


def refusals(body):
    """A 400 naming a field the server would not honour: an unknown field, else the first refused one
    (in CHAT_FIELDS' order: tools before tool_choice) whose value asks for something."""
    extra = body.model_extra or {}
    for name in extra:
        if name not in CHAT_FIELDS:
            raise APIError(400, f"unrecognized request argument supplied: {name}", name)
    for name, param in CHAT_FIELDS.items():
        value = extra.get(name)
        if param.treatment == "refused" and value is not None and not (param.allows and param.allows(value)):
            raise APIError(400, f"{name} is not supported by this server ({param.note})", name, code="unsupported_parameter")


def sampling_params(body, limits, generation):
    """The engine's SamplingParams for a validated request: the chat endpoint's own checks (messages,
    top_logprobs), then the ones it shares with completions (common.sampling_params)."""
    if len(body.messages) > limits.max_messages:
        raise APIError(400, f"at most {limits.max_messages} messages per request", "messages")
    for i, message in enumerate(body.messages):
        if len(message.text()) > limits.max_message_chars:
            raise APIError(400, f"message {i} is longer than {limits.max_message_chars} characters", f"messages.{i}.content")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    field = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"  # which wins
    return common.sampling_params(body, limits, generation, getattr(body, field), field,
                                  logprobs=(body.top_logprobs or 0) if body.logprobs else None)


def render_prompt(tokenizer, messages):
    """Prompt ids for the next assistant message, or the continuation of a final assistant one."""
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return tokenizer.render_for_completion(conversation, continue_final_message=True)
    except ConversationError as e:
        raise APIError(400, str(e), "messages") from None


def create_app(engine_factory, limits=Limits(), devices=("cpu",), model_name=ALIAS, api_keys=(), cors_origins=()):
    """The FastAPI app. `engine_factory(device)` builds the Engine of one device, at startup, in the
    Worker thread that runs it; a request goes to the least loaded worker. The model's generation
    defaults (SamplingParams fields) are the engine's `generation` (inference.load_engine sets it
    from the checkpoint). With `api_keys`, /v1/ and /metrics need one of them; `cors_origins` are the
    web origins whose pages may call the API (none by default)."""
    workers, relays = [], {}  # relays: worker -> its Relay
    generation = {}  # the engines' (filled at startup)
    metrics = Metrics()

    async def lifespan(app):
        for device in devices:
            relay = Relay(asyncio.get_running_loop())
            workers.append(await asyncio.to_thread(Worker, functools.partial(engine_factory, device), limits.max_pending,
                                                   limits.max_requests, limits.max_seconds, relay.flush))
            relays[workers[-1]] = relay
        generation.update(workers[0].engine.generation)
        yield
        for worker in workers:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.state.in_progress = lambda: sum(w.load for w in workers)
    app.state.finish_by = lambda deadline: [w.finish_by(deadline) for w in workers]
    app.add_middleware(Guard, keys=api_keys, limits=limits)
    if cors_origins:  # outside the guard, so that preflight requests and refusals get CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(AccessLog, metrics=metrics)
    app.add_middleware(StartupFailure)
    created = int(time.time())
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "nanochat"}

    def served(name):
        """The served model's card for a requested model name, or a 404 naming the served model."""
        if name is not None and name not in (model_name, ALIAS):
            raise APIError(404, f"the model {name!r} is not served here; this server serves {model_name!r} (also as "
                           f"{ALIAS!r})", "model", code="model_not_found")
        return model_card

    app.add_exception_handler(APIError, api_error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        first = e.errors()[0]
        if first["type"] == "json_invalid":  # its loc is ("body", the character where parsing stopped), not a field
            return error_response(400, f"the body is not valid JSON (at character {first['loc'][-1]}): {first['msg']}", None)
        where = field_path([p for p in first["loc"] if p != "body"], e.body)
        return error_response(400, f"{where}: {first['msg']}" if where else first["msg"], where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # unknown routes, wrong methods, bodies that are not UTF-8
        return error_response(e.status_code, str(e.detail), type="invalid_request_error" if e.status_code < 500 else "server_error",
                              headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, e):
        log.exception("unhandled error")
        return error_response(500, "internal server error", type="server_error")

    def queued_and_active():
        """The requests waiting for an engine and those decoding, over all the workers."""
        return sum(len(w.pending) for w in workers), sum(len(w.active) for w in workers)

    @app.get("/health")
    async def health():
        queued, active = queued_and_active()
        return {"status": "ok", "model": model_name, "generation": generation, "max_tokens": limits.max_tokens,
                "devices": len(workers), "active_requests": active, "queued_requests": queued,
                "cancelled_requests": sum(w.cancelled for w in workers)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        text = metrics.exposition(*queued_and_active())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        return served(model_id)

    @app.get("/", response_class=HTMLResponse)
    async def ui():
        return UI_PAGE.read_text()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: Request):
        served(body.model)
        refusals(body)
        params = sampling_params(body, limits, generation)
        worker = min(workers, key=lambda w: w.load)
        tokenizer = worker.engine.tokenizer
        prompt = render_prompt(tokenizer, body.messages)
        events = asyncio.Queue()
        request = GenerationRequest(prompt, params, body.n or 1, relays[worker].sender(events))
        common.submit(worker, [request], limits, "messages")
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        progress = Progress(request, events, metrics, tokenizer)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_chunks(progress, meta, include_usage), media_type="text/event-stream",
                                     headers=STREAM_HEADERS)
        return await complete(progress, meta, http_request)

    completions.add_routes(app, workers, relays, limits, served, generation, metrics)  # /v1/completions, /tokenize, ... (completions.py)
    return app


class Relay:
    """Carries a worker's events (emitted in its thread) to the event loop: those of one engine step
    go over in one loop callback, rather than one wake-up of the loop per token."""

    def __init__(self, loop):
        self.loop, self.events = loop, []

    def sender(self, queue):
        """A request's on_event: its events reach `queue` (an asyncio.Queue)."""
        return lambda *event: self.events.append((queue, event))

    def flush(self):
        """In the worker's thread, after a step: hands the step's events to the loop."""
        if self.events:
            events, self.events = self.events, []
            self.loop.call_soon_threadsafe(deliver, events)


def deliver(events):
    for queue, event in events:
        queue.put_nowait(event)


def logprobs_content(tokenizer, token_logprobs):
    """OpenAI's chat `logprobs.content` entries of TokenLogprobs."""
    def entry(token, logprob):
        data = tokenizer.id_to_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(token, logprob) for token, logprob in t.top]}
            for t in token_logprobs]


async def until_finished(request, events):
    """Yields the events that have arrived, as {index: (text, finish_reason, logprobs)} with each
    completion's texts and logprobs joined (a client that falls behind gets fewer, larger chunks),
    until all have finished."""
    finished = 0
    while finished < request.n:
        batch = [await events.get()]
        while not events.empty():
            batch.append(events.get_nowait())
        merged = {}
        for index, text, finish_reason, logprobs in batch:
            old_text, _, old_logprobs = merged.get(index, ("", None, []))
            merged[index] = (old_text + text, finish_reason, old_logprobs + list(logprobs))
            finished += finish_reason is not None
        yield merged


class Progress:
    """A submitted request as the loop sees it: its events as they arrive, and its metrics."""

    def __init__(self, request, events, metrics, tokenizer):
        self.request, self.events, self.metrics, self.tokenizer = request, events, metrics, tokenizer
        self.started, self.first = time.monotonic(), None

    async def until_finished(self):
        """until_finished's events, timed: the request's metrics are recorded when it ends."""
        async for merged in until_finished(self.request, self.events):
            if self.first is None and any(text for text, _, _ in merged.values()):
                self.first = time.monotonic()
            yield merged
        self.metrics.generated(usage([self.request]), self.started, self.first, time.monotonic())

    def logprobs(self, token_logprobs):
        if self.request.params.logprobs is None:
            return None
        return {"content": logprobs_content(self.tokenizer, token_logprobs), "refusal": None}


async def complete(progress, meta, http_request):
    """The non-streaming answer; a client that disconnects meanwhile cancels the generation."""
    request = progress.request
    if not await finished(progress.until_finished(), http_request, [request]):
        return JSONResponse({}, status_code=499)
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason, "logprobs": progress.logprobs(c.logprobs or [])} for c in request.completions]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage([request])}


async def stream_chunks(progress, meta, include_usage):
    """SSE chunks as OpenAI sends them: the role first, then content deltas (with their logprobs), a
    finish_reason per choice, optionally usage (null on every chunk but the last), then [DONE].
    Leaving early (the client went away) cancels."""
    request = progress.request
    extra = {"usage": None} if include_usage else {}

    def chunk(choices, **extra):
        return "data: " + json.dumps({**meta, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    try:
        for i in range(request.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], **extra)
        async for merged in progress.until_finished():
            for index, (text, finish_reason, logprobs) in merged.items():
                if text or logprobs:
                    yield chunk([{"index": index, "delta": {"content": text}, "finish_reason": None,
                                  "logprobs": progress.logprobs(logprobs)}], **extra)
                if finish_reason is not None:
                    yield chunk([{"index": index, "delta": {}, "finish_reason": finish_reason}], **extra)
        if include_usage:
            yield chunk([], usage=usage([request]))
        yield "data: [DONE]\n\n"
    finally:
        request.cancelled = True
