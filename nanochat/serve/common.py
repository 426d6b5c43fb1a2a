"""What the chat and the legacy completions endpoints share: the error a request is refused with,
the sampling fields' defaults, limits and checks, submitting to a worker, and the stream's headers."""

from pydantic import BaseModel, ConfigDict

from nanochat.engine import ContextTooLong, SamplingParams, TooManySamples
from nanochat.serve.guard import error_response
from nanochat.serve.worker import QueueFull

MIN_TEMPERATURE = 1e-6  # below this, greedy: logits / temperature would overflow fp32 into inf and NaN
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat endpoint and vLLM (OpenAI's legacy endpoint allows 5)
# OpenAI's values of the sampling fields a model's generation config (chat.GENERATION) has none of
DEFAULTS = {"top_p": 1.0, "presence_penalty": 0.0}
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # so that no proxy holds events back


class APIError(Exception):
    """A request refused with OpenAI's error body, naming the field (`param`)."""

    def __init__(self, status, message, param=None, type="invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code, self.headers = status, message, param, type, code, headers


async def api_error(request, e):
    """The app's handler of APIError."""
    return error_response(e.status, e.message, e.param, e.type, e.code, e.headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool | None = None


def sampling_params(body, limits, generation, max_tokens, max_tokens_field="max_tokens", **fields):
    """The engine's SamplingParams of a validated chat or completions request, after the checks both
    endpoints make (stream_options, n, stop, max_tokens, top_k). A sampling field the request leaves out (or sends as
    null) takes the model's generation default (`generation`), else DEFAULTS. `max_tokens`: the
    request's (None: not given), from its field `max_tokens_field` (what an error names); `fields`: the
    endpoint's own SamplingParams fields (logprobs)."""
    if body.stream_options is not None and not body.stream:  # OpenAI refuses it too
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    if (body.n or 1) > limits.max_n:
        raise APIError(400, f"n must be at most {limits.max_n}", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > limits.max_stop or not all(stop):
        raise APIError(400, f"stop takes at most {limits.max_stop} non-empty strings", "stop")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"{max_tokens_field} must be at most {limits.max_tokens}", max_tokens_field)
    if body.top_k == 0:
        raise APIError(400, "top_k must be at least 1 (or -1: all tokens)", "top_k")
    defaults = {**DEFAULTS, **generation}

    def given(name):
        value = getattr(body, name)
        return defaults[name] if value is None else value

    temperature, top_k = given("temperature"), given("top_k")
    return SamplingParams(temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
                          top_k=None if top_k == -1 else top_k, top_p=given("top_p"),
                          max_tokens=min(defaults["max_tokens"], limits.max_tokens) if max_tokens is None else max_tokens,
                          stop=tuple(stop), seed=body.seed, frequency_penalty=given("frequency_penalty"),
                          presence_penalty=given("presence_penalty"), **fields)


def submit(worker, requests, limits, param):
    """Queues all the requests, or none (a refusal cancels those already in): one that can never run
    is a 400 naming n for an n beyond the engine's rows, else `param` (the prompt's field; with code
    context_length_exceeded for a prompt longer than the context), a full queue a 429."""
    try:
        for request in requests:
            worker.submit(request)
    except (ValueError, QueueFull) as e:
        for request in requests:
            request.cancelled = True
        if isinstance(e, QueueFull):
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(limits.retry_after)}) from None
        if isinstance(e, TooManySamples):
            raise APIError(400, str(e), "n") from None
        raise APIError(400, str(e), param, code="context_length_exceeded" if isinstance(e, ContextTooLong) else None) from None


def usage(requests):
    """OpenAI's usage of engine requests (a chat request is one; a completions request one per prompt)."""
    prompt_tokens = sum(len(r.prompt_ids) for r in requests)
    completion_tokens = sum(len(c.token_ids) for r in requests for c in r.completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
