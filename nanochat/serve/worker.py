"""One engine loop per device: a thread that admits queued requests into the running batch as rows
free up (continuous batching) and decodes one token for all of them per step."""

import logging
import threading
from collections import deque

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """No room in the queue: the caller should answer 429."""


class Worker:
    """Runs an Engine in its own thread. `submit` queues a Request (at most `max_pending` wait);
    `max_requests` caps the requests decoding together (1: one request at a time)."""

    def __init__(self, engine, max_pending, max_requests=None):
        self.engine = engine
        self.max_pending = max_pending
        self.max_requests = max_requests
        self.pending = deque()
        self.active = []
        self.wakeup = threading.Condition()
        self.stopped = False
        self.cancelled = 0  # requests whose client went away before they finished
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self.thread.start()

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
            self.wakeup.notify()

    def stop(self):
        with self.wakeup:
            self.stopped = True
            self.wakeup.notify()
        self.thread.join()

    def run(self):
        while True:
            with self.wakeup:
                while not self.stopped and not self.pending and not self.active:
                    self.wakeup.wait()
                if self.stopped:
                    return
                admitted = self.admissible()
            try:
                for request in admitted:
                    self.active.append(request)
                    self.engine.add(request)
                self.engine.step()
            except Exception:  # a bug, not a bad request (those fail in submit): fail what was running, keep serving
                log.exception("engine step failed; failing %d requests", len(self.active))
                for request in self.active:
                    request.fail()
                self.engine.reset()
            self.cancelled += sum(r.cancelled and not r.done for r in self.active)
            self.active = [r for r in self.active if not r.done and not r.cancelled]

    def admissible(self):
        """Takes from the queue the requests that fit now (oldest first; cancelled ones dropped)."""
        admitted, rows = [], self.engine.free_rows
        while self.pending:
            request = self.pending[0]
            if request.cancelled:
                self.pending.popleft()
                self.cancelled += 1
                continue
            if request.n > rows or (self.max_requests and len(self.active) + len(admitted) >= self.max_requests):
                break
            admitted.append(self.pending.popleft())
            rows -= request.n
        return admitted
