"""How a stage process ends under torchrun: `stage.run_main` destroys the process group whether the
stage succeeds or fails, and destroying it really stops gloo's worker threads. Threads left running
can still be dropping a collective's tensors while the interpreter shuts down, which aborts the
process (SIGABRT) after its work is done."""

import os

from tests.support import waiting
from tests.support.stagerun import TORCHRUN

PROBE = '''
import os, sys, torch
from nanochat import common, stage

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return names.count("pt_gloo_runloop")

def main(args):
    common.compute_init("cpu")
    import nanochat.gpt  # as in every stage: imports torch._dynamo once the group exists
    counts = torch.ones(2)
    common.sum_over_ranks(counts)
    assert counts.tolist() == [2.0, 2.0] and gloo_threads() > 0
    if args.fail:
        raise stage.StageError("asked to fail")

p = stage.parser("probe", "")
p.add_argument("--fail", action="store_true")
try:
    stage.run_main(main, p, "probe")
    code = 0
except SystemExit as e:
    code = e.code
sys.stdout.write(f"exit {code}, gloo threads left {gloo_threads()}\\n")  # one write: the ranks share the pipe
'''


def test_the_process_group_ends_with_the_stage(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    for options, code in [((), 0), (("--fail",), 1)]:
        cmd = [*TORCHRUN, "2", str(script), "--", "--run", str(tmp_path / "run"), "--preset", "tiny", *options]
        done = waiting.run(cmd, 120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("exit")]
        assert lines == [f"exit {code}, gloo threads left 0"] * 2, done.stdout + done.stderr[-2000:]
