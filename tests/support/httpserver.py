"""A real HTTP server on 127.0.0.1 serving a directory, with Range support and fault injection.

    with serve(root) as server:
        server.inject("/pretrain/shard_00000.parquet", "status:500", "status:500")  # then success
        ... fetch server.url + "/pretrain/shard_00000.parquet" ...
        server.gets(path)  # [(range header, status, body bytes sent)] of its GETs, in arrival order

Each injected fault applies to one GET of its path, in order; later requests are served normally.
Faults:
    status:CODE   answer CODE with a short body (e.g. 500, 503, 429 with Retry-After: 0)
    drop:N        send the headers and N body bytes, then reset the connection (RST)
    truncate:N    claim the full Content-Length, send N bytes, then close cleanly (FIN)
    short:N       serve only the first N bytes, with a Content-Length of N (a lying server)
    slow:SECONDS  pause SECONDS before each 64 KiB chunk of the body
    norange       ignore the Range header and answer 200 with the whole file
Files carry an ETag and honour If-Range (a stale validator gets the whole file, status 200).
Directories answer with an HTML listing (as fsspec's http `ls` expects), or 403 with
`listings=False` (like a bucket website or nginx without autoindex).
"""

import contextlib
import html
import os
import re
import socket
import struct
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

CHUNK = 64 * 1024
RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head):
        server = self.server
        path = unquote(urlsplit(self.path).path)
        fault = None if head else server.next_fault(path)
        local = os.path.realpath(os.path.join(server.root, path.lstrip("/")))
        if not local.startswith(server.root):
            return self._status(path, 403)
        if fault and fault.startswith("status:"):
            return self._status(path, int(fault.split(":")[1]))
        if os.path.isdir(local):
            return self._listing(path, local, head) if server.listings else self._status(path, 403)
        if not os.path.isfile(local):
            return self._status(path, 404)
        with open(local, "rb") as f:
            data = f.read()
        etag = f'"{len(data)}-{os.stat(local).st_mtime_ns}"'
        start, status = 0, 200
        m = RANGE_RE.match(self.headers.get("Range", ""))
        if m and fault != "norange" and self.headers.get("If-Range", etag) == etag:
            start = int(m.group(1))
            if start >= len(data):
                server.record("GET", path, self.headers.get("Range"), 416, 0)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        if fault and fault.startswith("short:"):
            body = body[: int(fault.split(":")[1])]
        entry = server.record(self.command, path, self.headers.get("Range"), status, 0 if head else None)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not head:
            server.update(entry, self._send_body(body, fault))

    def _send_body(self, body, fault):
        kind, _, arg = (fault or "").partition(":")
        limit = int(arg) if kind in ("drop", "truncate") else len(body)
        sent = 0
        for i in range(0, min(limit, len(body)), CHUNK):
            if kind == "slow":
                time.sleep(float(arg))
            piece = body[i:min(i + CHUNK, limit)]
            try:
                self.wfile.write(piece)
                self.wfile.flush()
            except OSError:  # the client gave up (e.g. its read timed out)
                self.close_connection = True
                return sent
            sent += len(piece)
        if kind == "drop":  # SO_LINGER 0: close() sends RST, the client sees a reset
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if kind in ("drop", "truncate"):
            self.close_connection = True
        return sent

    def _status(self, path, code):
        body = f"{code} injected or not found\n".encode()
        self.server.record(self.command, path, self.headers.get("Range"), code, 0)
        self.send_response(code)
        if code == 429:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _listing(self, path, local, head):
        if not path.endswith("/"):
            self.send_response(301)
            self.send_header("Location", path + "/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        links = "".join(f'<a href="{html.escape(n)}">{html.escape(n)}</a>\n' for n in sorted(os.listdir(local)))
        body = f"<html><body>\n{links}</body></html>\n".encode()
        self.server.record(self.command, path, None, 200, 0)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class FaultyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root, listings=True):
        super().__init__(("127.0.0.1", 0), Handler)
        self.root, self.listings = os.path.realpath(root), listings
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests = []
        self._faults = defaultdict(list)
        self._lock = threading.Condition()

    def inject(self, path, *faults):
        with self._lock:
            self._faults[path].extend(faults)

    def next_fault(self, path):
        with self._lock:
            return self._faults[path].pop(0) if self._faults[path] else None

    def record(self, method, path, range_header, status, sent=0):
        """Logs a request before it is answered (so a client never sees an answer the log lacks);
        sent=None while its body is on the way (see update)."""
        entry = [method, path, range_header, status, sent]
        with self._lock:
            self.requests.append(entry)
        return entry

    def update(self, entry, sent):
        """Sets the bytes sent of a request whose body has gone."""
        with self._lock:
            entry[4] = sent
            self._lock.notify_all()

    def gets(self, path=None):
        """The GET requests (of `path`, or of every file) as (range header, status, bytes sent), once
        every body on the way has gone: a client can finish reading before the server counts."""
        with self._lock:
            if not self._lock.wait_for(lambda: all(entry[4] is not None for entry in self.requests), timeout=10):
                raise TimeoutError(f"bodies still on the way after 10 s: {[e for e in self.requests if e[4] is None]}")
            return [(r, s, n) for m, p, r, s, n in self.requests if m == "GET" and (path is None or p == path)
                    and not p.endswith("/")]


@contextlib.contextmanager
def serve(root, listings=True):
    server = FaultyServer(root, listings)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
