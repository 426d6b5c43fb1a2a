"""Soak: 64 concurrent streaming clients against `nanochat serve` (API key on) for a bounded time,
watching the server process for failures and leaks.

    python bench/serve_soak.py                   the d4 model of bench/inference.py (random weights)
    python bench/serve_soak.py --run myrun --seconds 600

Each client sends streaming requests one after another over its own keep-alive connection until
time is up. The server's resident memory, threads and open file descriptors are read with psutil:
at the start (idle, after 10 s of the same load), after the first minute (or half the run, if
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
import time
from collections import Counter

import httpx
import psutil
from serve_load import save_d4_checkpoint, serve  # bench/ is on sys.path: this file runs as a script

from nanochat.common import git_commit
from nanochat.engine import TOOL_WORKERS  # threads of the engine's tool pool, started as the model calls tools

KEY = "sk-soak"
MAX_TOKENS = 48
RSS_GROWTH = 1.10  # allowed end RSS / first-minute RSS
WARM_UP = 10  # seconds of the same load before the start figures: the allocator meets every batch size and length


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


def client(url, seconds, c):
    """Client c: streaming requests one after another over its own keep-alive connection for `seconds`
    (closed after): (counts of completed, failed and tokens, the first failures)."""
    counts, failures, n = Counter(), [], 0
    deadline = time.monotonic() + seconds
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
        while time.monotonic() < deadline:
            ok, result = stream_once(http, url, c * 1_000_000 + n)
            n += 1
            counts.update({"completed": 1, "tokens": result} if ok else {"failed": 1})
            failures += [] if ok or len(failures) >= 5 else [result]
    return counts, failures


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
    """Warms the server up, then runs the clients against it for `seconds`: the figures."""
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        warm_up = [pool.submit(client, url, WARM_UP, c) for c in range(clients)]
        if any(f.result()[0]["failed"] for f in warm_up):
            raise SystemExit(f"warm-up failed: {[f.result()[1] for f in warm_up if f.result()[1]][:3]}")
        start = idle_snapshot(server, url)
        began = time.monotonic()
        futures = [pool.submit(client, url, seconds, c) for c in range(clients)]
        time.sleep(min(60, seconds / 2))
        first_minute = snapshot(server)
        results = [f.result() for f in futures]
    elapsed = time.monotonic() - began
    end = idle_snapshot(server, url)
    counts = sum((c for c, _ in results), Counter())
    return {"completed": counts["completed"], "failed": counts["failed"], "tok_s": round(counts["tokens"] / elapsed, 1),
            "failures": [f for _, fs in results for f in fs][:5], "start": start, "first_minute": first_minute, "end": end,
            "rss_growth": round(end["rss_mb"] / first_minute["rss_mb"], 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run name or URI (default: the d4 model of bench/inference.py, saved in a temp dir)")
    parser.add_argument("--seconds", type=float, default=120, help="how long the clients keep sending (default 120)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default 64)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NANOCHAT_API_KEY": KEY}
        if args.run is None:
            args.run = save_d4_checkpoint(tmp)
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
