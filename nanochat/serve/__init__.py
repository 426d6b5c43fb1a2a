"""`nanochat serve`: the OpenAI-compatible API and web UI for a run's model.

    nanochat serve --run myrun                       newest of rl -> sft -> mid -> base, on 127.0.0.1:8000
    nanochat serve --run s3://bucket/runs/x --source sft --port 8080
    nanochat serve --run myrun --devices 8           one engine per GPU, requests to the least loaded
    NANOCHAT_API_KEY=k1,k2 nanochat serve --run myrun --host 0.0.0.0   on the network: /v1/ needs a key

On SIGTERM (or Ctrl-C) the server takes no new connections, gives the requests in progress up to
--shutdown-timeout seconds to finish (those still running then end a second before it, with
finish_reason "length"), then exits. Every request is one line of the log (never its text).
"""

import argparse
import ipaddress
import os
import re
import socket
from dataclasses import fields

from nanochat import pipeline
from nanochat.serve.app import Limits, create_app
from nanochat.serve.guard import MAX_HEADER_BYTES
from nanochat.training_options import COUNT, RATE, number

__all__ = ["Limits", "SERVING_ON", "create_app", "main"]
# the line main prints once it listens, as a program that started it with --port 0 finds the port: group 1
SERVING_ON = re.compile(r"^nanochat: serving .+ on http://\S+:(\d+) ", re.MULTILINE)
LIMITS = [f for f in fields(Limits) if "help" in f.metadata]  # the limits that are options


def build_parser():
    p = argparse.ArgumentParser(prog="nanochat serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    pipeline.add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--devices", type=COUNT, default=1, help="engines, one per GPU (cuda:0..N-1); 1 on CPU (default: %(default)s)")
    p.add_argument("--max-rows", type=COUNT, default=16, help="sequences each engine decodes together (default: %(default)s)")
    p.add_argument("--one-at-a-time", action="store_true", help="no batching: one request per engine at a time")
    p.add_argument("--api-key", action="append", default=[], help="a key that /v1/ accepts as `Authorization: Bearer "
                   "<key>` (repeatable; also NANOCHAT_API_KEY, comma-separated; default: none, /v1/ is open)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--shutdown-timeout", type=RATE, default=30.0, help="seconds the requests in progress get to "
                   "finish on SIGTERM; a second before (at most half of it), any still running end with finish_reason "
                   "length (default: %(default)s)")
    p.add_argument("--cors-origin", action="append", default=[], help="a web origin (https://host:port) whose pages "
                   "may call the API (repeatable; default: none)")
    for f in LIMITS:
        least = 0 if isinstance(f.default, float) or f.name == "rate_limit" else 1  # rate limit 0: none
        p.add_argument("--" + f.name.replace("_", "-"), type=number(type(f.default), least), default=f.default,
                       help=f"{f.metadata['help']} (default: %(default)s)")
    return p


def api_keys(args):
    """The keys from --api-key and NANOCHAT_API_KEY (comma-separated)."""
    keys = [*args.api_key, *os.environ.get("NANOCHAT_API_KEY", "").split(",")]
    return [k.strip() for k in keys if k.strip()]


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def listening_socket(host, port):
    """The server's socket, bound before the server says where it serves: a port in use is one line
    (uvicorn said so after "serving on"). Port 0 takes a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"nanochat serve: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def main(argv=None):
    import torch
    import uvicorn

    from nanochat.checkpoint import find_checkpoint
    from nanochat.common import autodetect_device_type, setup_logging
    from nanochat.inference import LOAD_ERRORS, check_switch, load_engine
    from nanochat.serve.ops import Server

    args = build_parser().parse_args(argv)
    keys = api_keys(args)
    if not keys and not is_loopback(args.host) and not args.insecure:
        raise SystemExit(f"nanochat serve: refusing to serve {args.host} without an API key: give --api-key or "
                         "NANOCHAT_API_KEY (or --insecure to let anyone who can reach it in)")
    try:  # read again at each model load, in the workers once serving: a bad value is refused before that
        check_switch()
    except ValueError as e:
        raise SystemExit(f"nanochat serve: {e}") from None
    setup_logging()
    device_type = autodetect_device_type()
    if device_type == "cuda":
        if args.devices > torch.cuda.device_count():
            raise SystemExit(f"--devices {args.devices}: only {torch.cuda.device_count()} GPUs")
        devices = [f"cuda:{i}" for i in range(args.devices)]
    else:
        if args.devices != 1:
            raise SystemExit(f"--devices {args.devices}: several engines need several GPUs (device type {device_type})")
        devices = [device_type]
    try:
        directory, source = find_checkpoint(args.run, args.source, args.storage)
    except LOAD_ERRORS as e:
        raise SystemExit(f"nanochat serve: {e}") from None
    limits = Limits(**{f.name: getattr(args, f.name) for f in LIMITS}, max_requests=1 if args.one_at_a_time else None)
    app = create_app(lambda device: load_engine(directory, device=device, max_rows=args.max_rows), limits, devices,
                     model_name=f"nanochat-{source or 'checkpoint'}", api_keys=keys, cors_origins=args.cors_origin)
    sock = listening_socket(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"nanochat: serving {directory} on http://{host}:{sock.getsockname()[1]}"
          f" ({'API key required' if keys else 'no API key'})", flush=True)
    # an idle keep-alive connection is closed after 5 s; h11 answers incomplete headers over its limit with 400
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", http="h11", server_header=False,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    Server(config, app.state.in_progress, app.state.finish_by).run(sockets=[sock])
