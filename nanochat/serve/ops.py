"""What an operator of `nanochat serve` watches and does: Prometheus metrics (GET /metrics, behind the
API keys), one access-log line per request (never its prompt or answer), and a graceful stop: on
SIGTERM (or Ctrl-C) the server stops taking connections, lets the requests in progress finish within
a deadline, then exits. The metrics are written in Prometheus' text format by hand: a few counters
and two histograms do not need a client library."""

import logging
import signal
import sys
import time
from collections import Counter

import uvicorn

from nanochat.inference import LOAD_ERRORS

access_log = logging.getLogger("nanochat.access")

SHUTDOWN_MARGIN = 1.0  # seconds before the shutdown deadline that the engines end their answers (at most half of it)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds to the first token
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)  # seconds per later token


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, their sum and count."""

    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value):
        for i, bound in enumerate(self.buckets):
            self.counts[i] += value <= bound
        self.sum += value
        self.count += 1

    def lines(self, name):
        yield from (f'{name}_bucket{{le="{bound:g}"}} {n}' for bound, n in zip(self.buckets, self.counts))
        yield f'{name}_bucket{{le="+Inf"}} {self.count}'
        yield f"{name}_sum {self.sum:.6f}"
        yield f"{name}_count {self.count}"


class Metrics:
    """The server's counters, updated on the event loop; `exposition` writes them with the load gauges."""

    def __init__(self):
        self.requests = Counter()  # HTTP status -> requests answered
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft, self.token_latency = Histogram(TTFT_BUCKETS), Histogram(TOKEN_BUCKETS)

    def generated(self, usage, started, first, finished):
        """A finished generation: its usage, when it was submitted, when its first text came (None:
        none came) and when it finished (time.monotonic())."""
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        if first is not None:
            self.ttft.observe(first - started)
            if usage["completion_tokens"] > 1:
                self.token_latency.observe((finished - first) / (usage["completion_tokens"] - 1))

    def exposition(self, queued, running):
        """Prometheus' text format (version 0.0.4)."""
        metrics = [
            ("nanochat_requests_total", "counter", "HTTP requests answered, by status",
             [f'nanochat_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]),
            ("nanochat_prompt_tokens_total", "counter", "prompt tokens of finished generations",
             [f"nanochat_prompt_tokens_total {self.prompt_tokens}"]),
            ("nanochat_completion_tokens_total", "counter", "tokens generated",
             [f"nanochat_completion_tokens_total {self.completion_tokens}"]),
            ("nanochat_queued_requests", "gauge", "requests waiting for an engine", [f"nanochat_queued_requests {queued}"]),
            ("nanochat_running_requests", "gauge", "requests decoding", [f"nanochat_running_requests {running}"]),
            ("nanochat_time_to_first_token_seconds", "histogram", "from submission to the first text of a request",
             list(self.ttft.lines("nanochat_time_to_first_token_seconds"))),
            ("nanochat_time_per_output_token_seconds", "histogram", "mean time per token after the first, per request",
             list(self.token_latency.lines("nanochat_time_per_output_token_seconds"))),
        ]
        return "".join(f"# HELP {name} {help}\n# TYPE {name} {kind}\n" + "".join(line + "\n" for line in lines)
                       for name, kind, help, lines in metrics)


class AccessLog:
    """ASGI middleware, outermost: one log line per HTTP request once its answer is sent (a stream's
    when it ends): client, method, path, status, seconds. Counts the statuses for /metrics."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 0

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests[status or 499] += 1  # 499: the client left before an answer started
            client = scope["client"][0] if scope.get("client") else "-"
            access_log.info("%s %s %s %d %.3fs", client, scope["method"], scope["path"], status or 499,
                            time.monotonic() - start)


class StartupFailure:
    """ASGI middleware: a model that cannot load (a corrupt checkpoint, a device this torch lacks) ends
    the server with one line saying why, where uvicorn would log the whole traceback Starlette sends
    with lifespan.startup.failed. Any other failure (a bug) keeps its traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_short(message):
            error = sys.exc_info()[1]  # Starlette sends the failure from inside its except block
            if message["type"] == "lifespan.startup.failed" and isinstance(error, LOAD_ERRORS):
                message = {**message, "message": f"nanochat serve: cannot load the model: {error}"}
            await send(message)

        await self.app(scope, receive, send_short)


class Server(uvicorn.Server):
    """uvicorn's server (which on SIGTERM or SIGINT closes its sockets, lets the requests in progress
    finish within config.timeout_graceful_shutdown, then cancels what is left and stops the app),
    saying so when told to stop. The engines end what is still running a little before that deadline
    (`finish_by`), with finish_reason "length", so that their streams end whole, [DONE] included."""

    def __init__(self, config, in_progress, finish_by):
        super().__init__(config)
        self.in_progress = in_progress  # () -> requests queued or decoding
        self.finish_by = finish_by  # (time.monotonic() deadline) -> None

    def handle_exit(self, sig, frame):
        if not self.should_exit:
            timeout = self.config.timeout_graceful_shutdown
            print(f"nanochat: {signal.Signals(sig).name}: taking no new requests; {self.in_progress()} in progress "
                  f"get up to {timeout:g} s to finish", flush=True)
            self.finish_by(time.monotonic() + timeout - min(SHUTDOWN_MARGIN, timeout / 2))
        super().handle_exit(sig, frame)
