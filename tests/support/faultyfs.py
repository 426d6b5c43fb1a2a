"""Storage that fails, for fault-injection tests.

`FaultyFileSystem` (protocol `faulty`) wraps a real fsspec filesystem through URL chaining,
`faulty::file:///tmp/x` or `faulty::s3://bucket/x`. Each call fails with probability `FAULTS.rate`
(seeded) with the transient errors of a flaky network or object store, before the call or, for an
upload, after it landed (a lost answer); while `FAULTS.down`, every call fails. An upload lands
whole or not at all, as a PUT does.

`faulty_s3_server()` is a real S3 server (moto) whose writes of keys containing `match` are answered
503, for stage programs run as subprocesses.
"""

import contextlib
import errno
import random

import fsspec
from fsspec.implementations.chained import ChainedFileSystem

from tests.support.s3server import moto_app, moto_server

TRANSIENT = (
    lambda op: ConnectionResetError(errno.ECONNRESET, f"injected: connection reset during {op}"),
    lambda op: TimeoutError(f"injected: {op} timed out"),
    lambda op: OSError(errno.EIO, f"injected: I/O error during {op}"),
    lambda op: OSError(errno.EBUSY, f"injected: SlowDown during {op}"),  # s3fs's 503
)


class Faults:
    """What every FaultyFileSystem does; `reset` before each scenario."""

    def __init__(self):
        self.reset()

    def reset(self, rate=0.0, seed=0, down=False):
        self.rate, self.rng, self.down, self.injected = rate, random.Random(seed), down, 0

    def check(self, op):
        if self.down:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"injected: storage down ({op})")
        if self.rng.random() < self.rate:
            self.injected += 1
            raise self.rng.choice(TRANSIENT)(op)


FAULTS = Faults()


class FaultyFileSystem(ChainedFileSystem):
    protocol = "faulty"

    def __init__(self, target_protocol="file", target_options=None, fo=None, **kwargs):
        super().__init__(**kwargs)
        self.fs = fsspec.filesystem(target_protocol, **(target_options or {}))

    def call(self, op, *args, **kwargs):
        FAULTS.check(op)
        return getattr(self.fs, op)(*args, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        return self.call("ls", path, detail, **kwargs)

    def info(self, path, **kwargs):
        return self.call("info", path, **kwargs)

    def exists(self, path, **kwargs):
        return self.call("exists", path, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        return self.call("cat_file", path, start, end, **kwargs)

    def get_file(self, rpath, lpath, **kwargs):
        return self.call("get_file", rpath, lpath, **kwargs)

    def rm(self, path, recursive=False, **kwargs):
        return self.call("rm", path, recursive, **kwargs)

    def put_file(self, lpath, rpath, **kwargs):
        self.fs.makedirs(self.fs._parent(rpath), exist_ok=True)  # as on an object store, no directory needed
        self.call("put_file", lpath, rpath, **kwargs)
        FAULTS.check("put_file response")

    def _open(self, path, mode="rb", **kwargs):
        assert mode == "rb", "storage writes through put_file"
        return self.call("open", path, mode)


def register():
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


class FailingWrites:
    """WSGI middleware: a 503 ServiceUnavailable for every PUT/POST whose path contains `match`."""

    def __init__(self, app):
        self.app, self.match = app, None

    def __call__(self, environ, start_response):
        if self.match and environ["REQUEST_METHOD"] in ("PUT", "POST") and self.match in environ["PATH_INFO"]:
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            start_response("503 Service Unavailable", [("Content-Type", "application/xml")])
            return [b"<Error><Code>ServiceUnavailable</Code><Message>injected outage</Message></Error>"]
        return self.app(environ, start_response)


@contextlib.contextmanager
def faulty_s3_server():
    """A moto S3 server on 127.0.0.1 behind FailingWrites: yields (endpoint URL, the middleware)."""
    app = FailingWrites(moto_app())
    with moto_server(app) as endpoint:
        yield endpoint, app
