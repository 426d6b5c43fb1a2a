"""`nanochat serve`: the OpenAI-compatible API and web UI for a run's model.

    nanochat serve --run myrun                       newest of rl -> sft -> mid -> base, on 127.0.0.1:8000
    nanochat serve --run s3://bucket/runs/x --source sft --port 8080
    nanochat serve --run myrun --devices 8           one engine per GPU, requests to the least loaded
"""

import argparse

from nanochat.serve.app import Limits, create_app

__all__ = ["Limits", "create_app", "main"]


def build_parser():
    p = argparse.ArgumentParser(prog="nanochat serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--run", required=True, help="run name or URI, or a checkpoint URI")
    p.add_argument("--source", choices=["base", "mid", "sft", "rl"], help="which stage's model (default: the newest done)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--devices", type=int, default=1, help="engines, one per GPU (cuda:0..N-1); 1 on CPU")
    p.add_argument("--max-rows", type=int, default=16, help="sequences each engine decodes together")
    p.add_argument("--max-pending", type=int, default=Limits.max_pending, help="queued requests per engine before 429")
    p.add_argument("--one-at-a-time", action="store_true", help="no batching: one request per engine at a time")
    return p


def main(argv=None):
    import torch
    import uvicorn

    from nanochat.common import autodetect_device_type, setup_logging
    from nanochat.engine import find_checkpoint, load_engine

    args = build_parser().parse_args(argv)
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
    directory, source = find_checkpoint(args.run, args.source)
    limits = Limits(max_pending=args.max_pending, max_requests=1 if args.one_at_a_time else None)
    app = create_app(lambda device: load_engine(directory, device=device, max_rows=args.max_rows), limits, devices,
                     model_name=f"nanochat-{source or 'checkpoint'}")
    print(f"nanochat: serving {directory} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
