"""The OpenAI-compatible API and the web UI, over one engine loop per device.

    POST /v1/chat/completions   OpenAI's schema; stream=true gives SSE chunks ending with `data: [DONE]`
    GET  /v1/models             the one model served
    GET  /health                status and load
    GET  /                      the web UI (one self-contained page)

Generation never runs on the event loop: each device's Worker thread decodes, and its Relay hands
each step's pieces of text to the loop in one callback. Bad input is a 400 with an OpenAI-style error
body, a full queue a 429 with Retry-After; a client that goes away cancels its generation. In front
of /v1/, `guard.Guard` checks the API key, the client's rate and concurrency, and the body.
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
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from nanochat.engine import Request as GenerationRequest
from nanochat.engine import SamplingParams
from nanochat.serve.guard import Guard, error_response
from nanochat.serve.worker import QueueFull, Worker
from nanochat.tokenizer import ConversationError

log = logging.getLogger(__name__)

UI_PAGE = Path(__file__).with_name("ui.html")
DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there
MIN_TEMPERATURE = 1e-6  # below this, greedy: logits / temperature would overflow fp32 into inf and NaN


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
    max_tokens: int = setting(4096, "tokens per completion (also the default of max_tokens)")
    max_seconds: float = setting(300.0, "wall time per request in seconds; then its completions end with finish_reason length")
    max_concurrent: int = setting(32, "requests in progress per client; more get 429")
    rate_limit: int = setting(600, "requests per minute per client (bursts of as many); more get 429; 0: no limit")
    max_pending: int = setting(64, "requests waiting per engine; more get 429")
    max_requests: int | None = None  # requests decoding together per engine (1: one at a time)
    retry_after: int = 1  # seconds, in a 429's Retry-After when the wait is unknown


class APIError(Exception):
    def __init__(self, status, message, param=None, type="invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completions request that apply here (others are ignored);
    top_k is an extension."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as OpenAI (torch's generators take no more)
    stream: bool = False
    stream_options: StreamOptions | None = None


def sampling_params(body, limits):
    """The engine's SamplingParams for a validated request, checking the server's limits."""
    if len(body.messages) > limits.max_messages:
        raise APIError(400, f"at most {limits.max_messages} messages per request", "messages")
    for i, message in enumerate(body.messages):
        if len(message.text()) > limits.max_message_chars:
            raise APIError(400, f"message {i} is longer than {limits.max_message_chars} characters", f"messages.{i}.content")
    if body.n > limits.max_n:
        raise APIError(400, f"n must be at most {limits.max_n}", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > limits.max_stop or not all(stop):
        raise APIError(400, f"stop takes at most {limits.max_stop} non-empty strings", "stop")
    max_tokens = body.max_completion_tokens or body.max_tokens or limits.max_tokens
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens must be at most {limits.max_tokens}", "max_tokens")
    temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
    return SamplingParams(temperature=temperature, top_k=body.top_k, top_p=body.top_p,
                          max_tokens=max_tokens, stop=tuple(stop), seed=body.seed,
                          frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty)


def render_prompt(tokenizer, messages):
    """Prompt ids for the next assistant message."""
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if conversation[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", "messages")
    try:
        return tokenizer.render_for_completion(conversation)
    except ConversationError as e:
        raise APIError(400, str(e), "messages") from None


def create_app(engine_factory, limits=Limits(), devices=("cpu",), model_name="nanochat", api_keys=(), cors_origins=()):
    """The FastAPI app. `engine_factory(device)` builds the Engine of one device, at startup, in the
    Worker thread that runs it; a request goes to the least loaded worker. With `api_keys`, /v1/ needs one of
    them; `cors_origins` are the web origins whose pages may call the API (none by default)."""
    workers, relays = [], {}  # relays: worker -> its Relay

    async def lifespan(app):
        for device in devices:
            relay = Relay(asyncio.get_running_loop())
            workers.append(await asyncio.to_thread(Worker, functools.partial(engine_factory, device), limits.max_pending,
                                                   limits.max_requests, limits.max_seconds, relay.flush))
            relays[workers[-1]] = relay
        yield
        for worker in workers:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.add_middleware(Guard, keys=api_keys, limits=limits)
    if cors_origins:  # outermost, so that preflight requests and refusals get CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return error_response(e.status, e.message, e.param, e.type, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return error_response(400, f"{where}: {first['msg']}" if where else first["msg"], where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # unknown routes, wrong methods, bodies that are not UTF-8
        return error_response(e.status_code, str(e.detail), type="invalid_request_error" if e.status_code < 500 else "server_error",
                              headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, e):
        log.exception("unhandled error")
        return error_response(500, "internal server error", type="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "devices": len(workers),
                "active_requests": sum(len(w.active) for w in workers),
                "queued_requests": sum(len(w.pending) for w in workers),
                "cancelled_requests": sum(w.cancelled for w in workers)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "nanochat"}]}

    @app.get("/", response_class=HTMLResponse)
    async def ui():
        return UI_PAGE.read_text()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: Request):
        params = sampling_params(body, limits)
        worker = min(workers, key=lambda w: w.load)
        prompt = render_prompt(worker.engine.tokenizer, body.messages)
        events = asyncio.Queue()
        request = GenerationRequest(prompt, params, body.n, relays[worker].sender(events))
        try:
            worker.submit(request)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(limits.retry_after)}) from None
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model or model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_chunks(request, events, meta, include_usage), media_type="text/event-stream")
        return await complete(request, events, meta, http_request)

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


def usage(request):
    completion_tokens = sum(len(c.token_ids) for c in request.completions)
    prompt_tokens = len(request.prompt_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def until_finished(request, events):
    """Yields the events that have arrived, as {index: (text, finish_reason)} with each completion's
    texts joined (a client that falls behind gets fewer, larger chunks), until all have finished."""
    finished = 0
    while finished < request.n:
        batch = [await events.get()]
        while not events.empty():
            batch.append(events.get_nowait())
        merged = {}
        for index, text, finish_reason, _logprobs in batch:
            merged[index] = (merged.get(index, ("", None))[0] + text, finish_reason)
            finished += finish_reason is not None
        yield merged


async def complete(request, events, meta, http_request):
    """The non-streaming answer; a client that disconnects meanwhile cancels the generation."""
    async def drain():
        async for _ in until_finished(request, events):
            pass

    done = asyncio.create_task(drain())
    try:
        while not done.done():
            await asyncio.wait({done}, timeout=DISCONNECT_POLL)
            if not done.done() and await http_request.is_disconnected():
                done.cancel()
                return JSONResponse({}, status_code=499)
    finally:
        if not done.done():
            request.cancelled = True
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason, "logprobs": None} for c in request.completions]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(request)}


async def stream_chunks(request, events, meta, include_usage):
    """SSE chunks as OpenAI sends them: the role first, then content deltas, a finish_reason per
    choice, optionally usage, then [DONE]. Leaving early (the client went away) cancels."""
    def chunk(choices, **extra):
        return "data: " + json.dumps({**meta, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    try:
        for i in range(request.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for merged in until_finished(request, events):
            for index, (text, finish_reason) in merged.items():
                if text:
                    yield chunk([{"index": index, "delta": {"content": text}, "finish_reason": None}])
                if finish_reason is not None:
                    yield chunk([{"index": index, "delta": {}, "finish_reason": finish_reason}])
        if include_usage:
            yield chunk([], usage=usage(request))
        yield "data: [DONE]\n\n"
    finally:
        request.cancelled = True
