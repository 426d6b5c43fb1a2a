"""Orchestration overhead: the tiny preset through the speedrun flow (a temporary local Prefect
server) vs the same stage commands run directly one after another, then a fully cached re-run.
Prints one JSON line. The flow runs independent stages in parallel (tok_eval beside base_train),
so its time includes that gain as well as Prefect's overhead (server start, API calls, logs).

    .venv/bin/python bench/orchestration.py [--data-mirror ../shared/data]
"""

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from flows import launch
from flows.speedrun import run_spec, speedrun
from nanochat import pipeline
from nanochat.common import autodetect_device_type, git_commit


def run_direct(root, args):
    """The flow's stage commands, one after another, in dependency order; returns seconds."""
    spec = run_spec("tiny", "direct", root, args.data_mirror, args.nproc_per_node, 1, None)
    t0 = time.perf_counter()
    for stage in pipeline.select():
        subprocess.run(launch.command(stage, spec), env=launch.child_env(spec), check=True, capture_output=True)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-mirror", default=os.environ.get("NANOCHAT_DATA_MIRROR")
                   or str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    direct, flow = [], []
    with tempfile.TemporaryDirectory(prefix="nanochat-bench-") as root:
        for i in range(args.repeat):  # interleaved, minimum of each: a busy machine skews one run, not both
            direct.append(run_direct(f"{root}/direct{i}", args))
            t0 = time.perf_counter()
            speedrun("tiny", "flow", f"{root}/flow{i}", args.data_mirror, args.nproc_per_node)
            flow.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        speedrun("tiny", "flow", f"{root}/flow0", args.data_mirror, args.nproc_per_node)
        cached = time.perf_counter() - t0
    direct, flow = min(direct), min(flow)
    print(json.dumps({
        "bench": "orchestration", "device": autodetect_device_type(), "commit": git_commit(),
        "stages": [s.name for s in pipeline.PIPELINE],
        "direct_s": round(direct, 2), "flow_s": round(flow, 2), "overhead_pct": round(100 * (flow / direct - 1), 1),
        "cached_rerun_s": round(cached, 2),
    }))


if __name__ == "__main__":
    main()
