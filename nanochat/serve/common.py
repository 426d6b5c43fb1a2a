"""What the chat and the legacy completions endpoints share: the error a request is refused with,
the sampling limits and the stream's headers."""

from pydantic import BaseModel

from nanochat.serve.guard import error_response

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
    include_usage: bool | None = None
