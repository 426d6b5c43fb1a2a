"""Soak: 64 concurrent streaming clients against `nanochat serve` (API key on) for a bounded time,
watching the server process for failures and leaks.

    python bench/serve_soak.py                   trains a tiny run first (tiny preset, ../shared/data)
    python bench/serve_soak.py --run myrun --seconds 600

Each client sends streaming requests one after another over its own keep-alive connection until
time is up. The server's resident memory, threads and open file descriptors are read with psutil:
at the start (idle, after one warm-up request per client), after the first minute (or half the run, if
shorter) and at the end (server idle: no request in progress, client connections closed). Passes
when no request failed, the end RSS is within +10% of the first minute's, descriptors are back to
their idle count at the start and threads too (give or take the engine's tool pool, whose threads
start as the model happens to call the calculator).
Prints the figures and one JSON line; exits 1 if it did not pass.
"""

import argparse
import concurrent.futures
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from nanochat.common import git_commit
from nanochat.engine import TOOL_WORKERS  # threads of the engine's tool pool, started as the model calls tools
from serve_load import serve, train_tiny_run  # bench/ is on sys.path: this file runs as a script

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-soak"
MAX_TOKENS = 48
RSS_GROWTH = 1.10  # allowed end RSS / first-minute RSS


def stream_once(http, url, i):
    """One streaming request; (True, completion tokens) if it ended properly, else (False, why)."""
    body = {"messages": [{"role": "user", "content": f"Tell me about the number {i}."}], "stream": True,
            "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": i, "stream_options": {"include_usage": True}}
    try:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return False, f"status {response.status_code}: {response.read()[:200]!r}"
            finish, tokens, done = None, 0, False
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    finish = next((c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]), finish)
                    tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
    except httpx.HTTPError as e:
        return False, repr(e)
    if not done or finish not in ("stop", "length"):
        return False, f"ended without [DONE] or with finish_reason {finish}"
    return True, tokens


def snapshot(proc):
    with proc.oneshot():
        return {"rss_mb": round(proc.memory_info().rss / 2**20, 1), "threads": proc.num_threads(), "fds": proc.num_fds()}


def idle_snapshot(proc, url):
    """The server's figures once no request is in progress and the connections its clients closed are gone."""
    while httpx.get(url + "/health").json()["active_requests"]:
        time.sleep(0.1)
    time.sleep(1)
    return snapshot(proc)


def soak(url, server, clients, seconds):
    """Runs the clients against the server at `url` (process `server`): the figures."""
    def connect():
        return [httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) for _ in range(clients)]

    counts, failures, lock = {"completed": 0, "failed": 0, "tokens": 0}, [], threading.Lock()

    def client(c):
        n = 0
        while time.monotonic() < deadline:
            ok, result = stream_once(sessions[c], url, c * 1_000_000 + n)
            n += 1
            with lock:
                counts["completed" if ok else "failed"] += 1
                counts["tokens"] += result if ok else 0
                if not ok and len(failures) < 5:
                    failures.append(result)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        sessions = connect()
        warm = list(pool.map(lambda c: stream_once(sessions[c], url, -1 - c), range(clients)))
        if not all(ok for ok, _ in warm):
            raise SystemExit(f"warm-up failed: {[why for ok, why in warm if not ok][:3]}")
        for session in sessions:
            session.close()
        start, sessions = idle_snapshot(server, url), connect()
        began = time.monotonic()
        deadline = began + seconds
        futures = [pool.submit(client, c) for c in range(clients)]
        time.sleep(min(60, seconds / 2))
        first_minute = snapshot(server)
        for future in futures:
            future.result()
    elapsed = time.monotonic() - began
    for session in sessions:
        session.close()
    end = idle_snapshot(server, url)
    return {**counts, "tok_s": round(counts["tokens"] / elapsed, 1), "failures": failures, "start": start,
            "first_minute": first_minute, "end": end, "rss_growth": round(end["rss_mb"] / first_minute["rss_mb"], 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run name or URI (default: train a tiny run in a temp dir)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pretrain"))
    parser.add_argument("--seconds", type=float, default=120, help="how long the clients keep sending (default 120)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default 64)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NANOCHAT_API_KEY": KEY}
        if args.run is None:
            env["NANOCHAT_STORAGE"] = tmp
            args.run = train_tiny_run(tmp, args.data)
        proc, url = serve(args.run, env, "--max-concurrent", str(args.clients), "--rate-limit", "0")
        try:
            figures = soak(url, psutil.Process(proc.pid), args.clients, args.seconds)
        finally:
            proc.terminate()
            proc.wait()
    start, end = figures["start"], figures["end"]
    passed = (figures["failed"] == 0 and figures["rss_growth"] <= RSS_GROWTH
              and end["threads"] <= start["threads"] + TOOL_WORKERS and end["fds"] <= start["fds"])
    print(f"{figures['completed']} requests completed, {figures['failed']} failed {figures['failures'] or ''}")
    print(f"server RSS {figures['first_minute']['rss_mb']} MB after the first minute, {figures['end']['rss_mb']} MB at the end "
          f"(x{figures['rss_growth']}); threads {figures['start']['threads']} -> {figures['end']['threads']}; "
          f"open fds {figures['start']['fds']} -> {figures['end']['fds']}")
    print(json.dumps({"bench": "serve_soak", "device": "cpu", "commit": git_commit(), "load_average_1m": os.getloadavg()[0],
                      "clients": args.clients, "seconds": args.seconds, "max_tokens": MAX_TOKENS, **figures, "pass": passed}))
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
