"""One engine loop per device: a thread that admits queued requests into the running batch as rows
free up (continuous batching) and decodes one token for all of them per step."""

import asyncio
import logging
import os
import threading
import time
from collections import deque

log = logging.getLogger(__name__)
DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there
# test-only: seconds each engine step sleeps, so that a test sees an answer grow or cuts it mid-stream
STEP_DELAY = "NANOCHAT_SERVE_TEST_STEP_DELAY"


class QueueFull(Exception):
    """No room in the queue: the caller should answer 429."""


async def finished(events, http_request, requests):
    """Consumes `events` (an async iterator that ends when `requests` have finished) for a
    non-streaming answer: True once they have, False if the client went away first, in which case
    the requests are cancelled so their rows free up."""
    async def drain():
        async for _ in events:
            pass

    done = asyncio.create_task(drain())
    try:
        while not done.done():
            await asyncio.wait({done}, timeout=DISCONNECT_POLL)
            if not done.done() and await http_request.is_disconnected():
                done.cancel()
                return False
    finally:
        if not done.done():
            for request in requests:
                request.cancelled = True
    return True


class Worker:
    """Runs an Engine in its own thread. `submit` queues a Request (at most `max_pending` wait);
    `max_requests` caps the requests decoding together (1: one request at a time). A request still
    unfinished `max_seconds` after it was submitted is cut short: its unfinished completions end
    with finish_reason "length", as when max_tokens is reached. `after_step()`, if given, runs in
    the thread after every step (requests' events are emitted there, during the step).

    The thread builds its engine itself (`engine_factory()`; the constructor waits, and raises what
    the factory raised): on CPU, torch ops from a second thread start a second OpenMP thread team,
    and with more OpenMP threads than cores libgomp stops spinning between parallel regions, which
    halves decoding speed."""

    def __init__(self, engine_factory, max_pending, max_requests=None, max_seconds=float("inf"), after_step=None):
        self.engine = None
        self.after_step = after_step
        self.max_pending = max_pending
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.pending = deque()
        self.active = []
        self.deadlines = {}  # request (queued or decoding) -> time.monotonic() when it is cut short
        self.last_deadline = float("inf")  # no request runs past it (finish_by)
        self.wakeup = threading.Condition()
        self.stopped = False
        self.cancelled = 0  # requests whose client went away before they finished
        self.step_delay = float(os.environ.get(STEP_DELAY, "0"))  # test-only (STEP_DELAY)
        self.thread = threading.Thread(target=self.run, args=(engine_factory,), name="engine", daemon=True)
        self.built = threading.Event()
        self.failure = None
        self.thread.start()
        self.built.wait()
        if self.failure is not None:
            raise self.failure

    @property
    def load(self):
        """Requests queued or decoding (for balancing across devices)."""
        return len(self.pending) + len(self.active)

    def submit(self, request):
        self.engine.check(request)  # a request that can never run fails now, as a ValueError
        with self.wakeup:
            if len(self.pending) >= self.max_pending:
                raise QueueFull(f"{len(self.pending)} requests are waiting; try again shortly")
            self.pending.append(request)
            self.deadlines[request] = min(time.monotonic() + self.max_seconds, self.last_deadline)
            self.wakeup.notify()

    def finish_by(self, deadline):
        """Ends every request, queued or decoding or submitted later, by `deadline` (time.monotonic())
        at the latest, as --max-seconds does: a stopping server's answers end whole, with their
        finish_reason, rather than cut off mid-stream when its shutdown deadline passes."""
        with self.wakeup:
            self.last_deadline = min(self.last_deadline, deadline)
            for request, due in self.deadlines.items():
                self.deadlines[request] = min(due, deadline)
            self.wakeup.notify()

    def stop(self):
        with self.wakeup:
            self.stopped = True
            self.wakeup.notify()
        self.thread.join()

    def run(self, engine_factory):
        try:
            self.engine = engine_factory()
        except BaseException as e:  # the constructor raises it
            self.failure = e
            return
        finally:
            self.built.set()
        while True:
            with self.wakeup:
                while not self.stopped and not self.pending and not self.active:
                    self.wakeup.wait()
                if self.stopped:
                    return
                self.cut_overdue()
                admitted = self.admissible()
            try:
                self.active.extend(admitted)  # before adding, so that a failure fails them all
                self.engine.add(*admitted)
                self.engine.step()
            except Exception:  # a bug, not a bad request (those fail in submit): fail what was running, keep serving
                log.exception("engine step failed; failing %d requests", len(self.active))
                for request in self.active:
                    request.fail()
                self.engine.reset()
            with self.wakeup:  # deadlines is read by finish_by, on the event loop
                for request in self.active:
                    if request.done or request.cancelled:
                        self.retire(request)
            self.active = [r for r in self.active if not r.done and not r.cancelled]
            if self.after_step is not None:
                self.after_step()
            if self.step_delay:
                time.sleep(self.step_delay)

    def retire(self, request):
        """Forgets a request that left the queue or the batch for good."""
        del self.deadlines[request]
        self.cancelled += not request.done

    def cut_overdue(self):
        """Ends the requests past their deadline (their rows are dropped at the engine's next step)."""
        now = time.monotonic()
        for request in [*self.pending, *self.active]:
            if self.deadlines[request] <= now and not request.done and not request.cancelled:
                for completion in request.completions:
                    if completion.finish_reason is None:
                        request.emit(completion.index, "", "length")
                request.cancelled = True

    def admissible(self):
        """Takes from the queue the requests that fit now (oldest first; cancelled ones dropped)."""
        admitted, rows = [], self.engine.free_rows
        while self.pending:
            request = self.pending[0]
            if request.cancelled:
                self.retire(self.pending.popleft())
                continue
            if request.n > rows or (self.max_requests and len(self.active) + len(admitted) >= self.max_requests):
                break
            admitted.append(self.pending.popleft())
            rows -= request.n
        return admitted
