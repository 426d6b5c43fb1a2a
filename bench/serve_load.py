"""Serving under load: 8 concurrent streaming clients against `nanochat serve` with continuous
batching, and against the same server in --one-at-a-time mode (the reference), in one run.

    python bench/serve_load.py                  the d4 model of bench/inference.py (random weights)
    python bench/serve_load.py --run myrun      an existing run's model

The default model is the upstream-equivalent d4 (width 256, vocab 65,536), saved as a checkpoint
with a synthetic tokenizer; its random weights never end a reply early, so every request streams
its 64 tokens.

Both servers run side by side and take --repeats loads each, alternating. Prints one JSON line: per
mode the load of median throughput (aggregate completion tokens/s, p50/p99 time to first token)
and every load's tokens/s, and the ratio of the medians.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

from nanochat.common import cpu_model, git_commit

CLIENTS, REQUESTS_PER_CLIENT, MAX_TOKENS = 8, 3, 64


def save_d4_checkpoint(directory):
    """Saves bench/inference.py's d4 model and tokenizer as a checkpoint under `directory`; its URI."""
    from dataclasses import asdict

    from inference import CONFIG, random_model, synthetic_tokenizer

    from nanochat import checkpoint, storage

    directory = storage.normalize(directory)
    tokenizer = synthetic_tokenizer(CONFIG.vocab_size)
    tokenizer_uri = tokenizer.save(storage.join(directory, "tokenizer"))["tokenizer"]
    meta = {"model_config": asdict(CONFIG), "tokenizer": tokenizer_uri}
    return checkpoint.save(storage.join(directory, "checkpoints"), 0, random_model().state_dict(), {}, meta)


def serve(run, env, *options):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.cli", "serve", "--run", run, "--port", str(port), *options],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        assert proc.poll() is None, "the server exited"
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/health")
            connection.getresponse().read()
            return proc, url
        except OSError:  # not listening yet
            time.sleep(0.2)
        finally:
            connection.close()


def one_request(url, i):
    """(time to first token, completion tokens) of one streaming request. The client is the standard
    library's, and it decodes only the chunks it needs: the load runs on the server's own cores, and
    an httpx client per request (an SSL context each) spent a third of a core and 0.1 s of every TTFT."""
    body = {"messages": [{"role": "user", "content": f"Tell me about the number {i}."}], "stream": True,
            "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": i, "stream_options": {"include_usage": True}}
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    start, ttft, tokens = time.perf_counter(), None, 0
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        for line in response:
            if not line.startswith(b"data: {") or (ttft is not None and b'"usage"' not in line):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    finally:
        connection.close()
    return ttft if ttft is not None else time.perf_counter() - start, tokens


def load(url):
    """Aggregate tokens/s and TTFTs of CLIENTS clients, each sending REQUESTS_PER_CLIENT requests in turn,
    after a warm-up of CLIENTS requests at once (every batch size's kernels are made on first use)."""
    def client(c):
        return [one_request(url, c * REQUESTS_PER_CLIENT + r) for r in range(REQUESTS_PER_CLIENT)]

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda c: one_request(url, -1 - c), range(CLIENTS)))
        start = time.perf_counter()
        results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
    elapsed = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results)
    return {"tok_s": round(sum(n for _, n in results) / elapsed, 1),
            "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 3)}


def median_run(runs):
    """The run of median throughput, with every run's tokens/s."""
    chosen = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
    return {**chosen, "tok_s_runs": [r["tok_s"] for r in runs]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run name or URI (default: the d4 model of bench/inference.py)")
    parser.add_argument("--repeats", type=int, default=3, help="load runs per mode, alternating (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if args.run is None:
            args.run = save_d4_checkpoint(tmp)
        servers = {"batched": serve(args.run, env), "one_at_a_time": serve(args.run, env, "--one-at-a-time")}
        try:
            runs = {mode: [] for mode in servers}
            for _ in range(args.repeats):  # alternating, so that both modes see the same machine
                for mode, (_, url) in servers.items():
                    runs[mode].append(load(url))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
    modes = {mode: median_run(r) for mode, r in runs.items()}
    print(json.dumps({"bench": "serve_load", "device": "cpu", "cpu": cpu_model(), "commit": git_commit(),
                      "load_average_1m": os.getloadavg()[0], "clients": CLIENTS,
                      "requests": CLIENTS * REQUESTS_PER_CLIENT, "max_tokens": MAX_TOKENS, **modes,
                      "ratio": round(modes["batched"]["tok_s"] / modes["one_at_a_time"]["tok_s"], 2)}))


if __name__ == "__main__":
    main()
