"""What the crash-and-resume tests of the training stages share: killing a stage as a crash would,
and comparing the whole final checkpoints of two runs."""

import filecmp
import hashlib
import json
import signal
from pathlib import Path

import psutil

from nanochat import checkpoint, storage
from tests.support.waiting import end, until

TIMES = ("train_time_s", "batch_time_s", "wall_time_s")  # meta.json's running totals of wall-clock time


def kill_after_checkpoint(proc, checkpoints, step, timeout=300):
    """Once the stage `proc` runs (in the background, under torchrun, with NANOCHAT_FAULT=<stage>:<step>:hang)
    has saved its checkpoint of `step` under `checkpoints`, kills it with SIGKILL: torchrun starts each
    worker in a session of its own, so every process of its tree, as a crash would."""
    uri = storage.normalize(str(checkpoints))
    try:
        until(lambda: storage.exists(uri) and (step, True) in checkpoint.list_steps(uri), timeout,
              f"the faulty run's checkpoint of step {step}", procs=[proc])
    except BaseException:  # a hung or failed run ends with its workers, whatever ends the wait
        end(proc)
        raise
    tree = psutil.Process(proc.pid)
    procs = [tree, *tree.children(recursive=True)]
    assert len(procs) >= 3, procs  # torchrun and its workers
    for p in procs:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    assert not psutil.wait_procs(procs, timeout=30)[1]


def final_checkpoint(run, stage_name):
    """The local directory of a committed stage's final checkpoint (its stage.json's `checkpoint` output)."""
    summary = json.loads((run / stage_name / "stage.json").read_text())
    return Path(storage.local_path(summary["outputs"]["checkpoint"]["uri"])).parent


def assert_same_final_checkpoint(run, reference, stage_name, meta_apart=TIMES):
    """The final checkpoints of `stage_name` in two runs hold the same state: every file but meta.json
    byte for byte (the weights, and each rank's optimizer and RNG state), and meta.json (model config,
    step, each rank's loader state, the running totals) apart from the keys `meta_apart`."""
    got, want = final_checkpoint(run, stage_name), final_checkpoint(reference, stage_name)
    got_files, want_files = (json.loads((d / checkpoint.MANIFEST).read_text())["files"] for d in (got, want))
    assert got_files.keys() == want_files.keys()
    world_size = json.loads((want / "meta.json").read_text())["world_size"]
    assert {f"optim_rank_{r:03d}.safetensors" for r in range(world_size)} <= want_files.keys()
    for name in want_files.keys() - {"meta.json"}:
        assert filecmp.cmp(got / name, want / name, shallow=False), f"{stage_name}: {name} differs"
    got_meta, want_meta = (json.loads((d / "meta.json").read_text()) for d in (got, want))
    for meta in (got_meta, want_meta):
        for key in meta_apart:
            meta.pop(key, None)
    assert got_meta == want_meta


def edit_meta(directory, edit):
    """Rewrites a checkpoint's meta.json through `edit(meta)` (in place), its manifest entry to match."""
    meta = json.loads((directory / "meta.json").read_text())
    edit(meta)
    data = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    (directory / "meta.json").write_bytes(data)
    manifest = json.loads((directory / checkpoint.MANIFEST).read_text())
    manifest["files"]["meta.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / checkpoint.MANIFEST).write_text(json.dumps(manifest))
