"""Who may call the API, and how much: API keys, requests in progress and requests per minute per
client, body size and body read time. `Guard` is a plain ASGI middleware in front of every /v1/
route, /metrics, vLLM's tokenizer endpoints and the API's schema pages (GUARDED), so a refused request costs no body read
and no JSON parsing. Refusals are OpenAI-style error bodies and close the connection (a client that
kept sending would otherwise hold it)."""

import asyncio
import hashlib
import hmac
import math
from collections import Counter

from fastapi.responses import JSONResponse

MAX_HEADER_BYTES = 16 * 1024  # h11 refuses larger headers only when they arrive over several reads
# path prefixes behind the keys and limits (a path P counts as P + "/"): the API, its metrics, vLLM's tokenizer
# endpoints, and FastAPI's pages that describe the API (its schema is the API's, not the web UI's)
GUARDED = ("/v1/", "/metrics/", "/tokenizer_info/", "/tokenize/", "/detokenize/", "/docs/", "/redoc/", "/openapi.json/")

def error_response(status, message, param=None, type="invalid_request_error", code=None, headers=None):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Refused(Exception):
    """A request the guard answers itself."""

    def __init__(self, status, message, code, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.response = error_response(status, message, None, type, code, {**(headers or {}), "Connection": "close"})


def too_many(message, seconds):
    return Refused(429, message, "rate_limit_exceeded", "rate_limit_error", {"Retry-After": str(math.ceil(seconds))})


def digest(key):
    # equal-length digests, so comparing them reveals nothing, not even the key's length
    return hashlib.sha256(key).digest()


class RateLimit:
    """A token bucket per client: `per_minute` requests a minute, in bursts of up to as many."""

    MAX_CLIENTS = 10_000  # past this many buckets, the full ones (the same as none) are dropped

    def __init__(self, per_minute):
        self.capacity, self.rate = per_minute, per_minute / 60
        self.buckets = {}  # client -> (tokens, when)

    def take(self, client, now):
        """Takes a token: 0, or (none taken) the seconds until the client has one."""
        tokens, then = self.buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate)
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1, now)
        if len(self.buckets) > self.MAX_CLIENTS:
            self.buckets = {c: (t, w) for c, (t, w) in self.buckets.items() if t + (now - w) * self.rate < self.capacity}
        return 0


class Guard:
    """ASGI middleware: headers over MAX_HEADER_BYTES get 431; then for the GUARDED paths (/v1/,
    /metrics, the tokenizer endpoints and the schema pages): the API key (if any are configured), the client's requests
    in progress and rate, then the body (read whole here, within its size and time limits, and
    handed on). A client is its API key, or its IP address when the server has no keys."""

    def __init__(self, app, keys, limits):
        self.app, self.limits = app, limits
        self.keys = [(key, digest(key.encode())) for key in keys]
        self.rate = RateLimit(limits.rate_limit) if limits.rate_limit else None
        self.running = Counter()  # client -> its requests in progress

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
            return await Refused(431, f"the request headers are larger than {MAX_HEADER_BYTES} bytes",
                                 "headers_too_large").response(scope, receive, send)
        if not (scope["path"] + "/").startswith(GUARDED):
            return await self.app(scope, receive, send)
        try:
            client = self.client(scope)
            self.admit(client)
        except Refused as e:
            return await e.response(scope, receive, send)
        self.running[client] += 1
        try:
            body = await self.read_body(scope, receive)
            if body is not None:
                await self.app(scope, replay(body, receive), send)
        except Refused as e:
            await e.response(scope, receive, send)
        finally:
            self.running[client] -= 1
            if not self.running[client]:
                del self.running[client]

    def client(self, scope):
        """Who is asking: the configured key presented as `Authorization: Bearer`, compared in
        constant time with every key; without keys, the client's address. Refused (401) otherwise."""
        if not self.keys:
            return scope["client"][0] if scope.get("client") else "local"
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        given, match = digest(token.strip() if scheme.lower() == b"bearer" else b""), None
        for key, key_digest in self.keys:
            if hmac.compare_digest(given, key_digest):
                match = key
        if match is None:
            raise Refused(401, "a valid API key is required (Authorization: Bearer <key>)", "invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})
        return match

    def admit(self, client):
        if self.running[client] >= self.limits.max_concurrent:
            raise too_many(f"at most {self.limits.max_concurrent} requests in progress per client", self.limits.retry_after)
        wait = self.rate.take(client, asyncio.get_running_loop().time()) if self.rate else 0
        if wait:
            raise too_many(f"at most {self.limits.rate_limit} requests a minute per client", wait)

    async def read_body(self, scope, receive):
        """The whole body (None if the client left), or Refused: larger than max_body_bytes (413,
        at once when Content-Length says so, also when chunked) or slower than body_timeout (408)."""
        limit, loop = self.limits.max_body_bytes, asyncio.get_running_loop()
        too_large = Refused(413, f"the request body is larger than {limit} bytes", "request_too_large")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > limit:
            raise too_large
        deadline, chunks, size, more = loop.time() + self.limits.body_timeout, [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise Refused(408, f"the request body took longer than {self.limits.body_timeout:g} s", "request_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                raise too_large
            more = message.get("more_body", False)
        return b"".join(chunks)


def replay(body, receive):
    """A `receive` that gives the app the body already read, then whatever comes next (disconnect)."""
    sent = False

    async def receive_replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_replayed
