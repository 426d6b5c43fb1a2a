"""Shared plumbing: logging, rank queries, device and distributed init, code version.

Nothing here runs on import; stages call `compute_init()` once, and `stage.run_main` calls
`compute_cleanup()` however the stage ends.
"""

import ctypes
import dataclasses
import datetime
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent

log = logging.getLogger("nanochat")


class InputError(Exception):
    """Input that cannot be used (a checkpoint, a shard, a file to fetch, a data source), the message
    one line naming it; a stage reports it as that line (stage.run_main), not as a traceback."""


def setup_logging(level=logging.INFO):
    """One-line log records on stderr, tagged with the rank under torchrun."""
    rank = os.environ.get("RANK")
    tag = f"[rank {rank}] " if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def dist_info():
    """(rank, local_rank, world_size) from the torchrun environment; (0, 0, 1) without it."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def is_rank0():
    return dist_info()[0] == 0


def autodetect_device_type():
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_flags():
    """The CPU's feature flags ("avx2", "amx_bf16", ...), per /proc/cpuinfo (none where there is none)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_fast_bf16():
    """True if the CPU multiplies bf16 in hardware (AMX or AVX512-BF16)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cpu_model():
    """The CPU's model name, per /proc/cpuinfo ("unknown" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def autocast_dtype(device_type, name="auto"):
    """The dtype matmuls autocast to: `name` ("bfloat16", "float16", "float32"), or for "auto" bf16
    where the hardware does it fast (CUDA with bf16, CPUs with AMX or AVX512-BF16), fp16 on older
    GPUs (training scales the loss for it) and fp32 on other CPUs."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device_type == "cuda":  # (a V100 or T4 emulates bf16: slower than its fp16)
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device_type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def sum_over_ranks(*tensors):
    """Sums each tensor over the ranks of torch.distributed, in place (a no-op without it)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def pad_right(seqs, fill):
    """Token sequences as one (len(seqs), longest) int64 tensor, each padded on the right."""
    import torch

    out = torch.full((len(seqs), max(map(len, seqs))), fill, dtype=torch.long)
    for row, seq in enumerate(seqs):
        out[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def autocast_context(device_type, dtype):
    """A factory of autocast contexts (a no-op one for fp32)."""
    import contextlib
    import functools

    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device_type, dtype=dtype)


def measure_matmul_flops(device, dtype, n=None, seconds=0.5):
    """Matmul FLOP/s this process reaches on `device` in `dtype` (the peak MFU is taken against), with
    n x n matrices: by default 8192 on a GPU (an H100 finishes a 1024 one in microseconds, about a
    kernel launch: the peak would be the launch rate's, and MFU overstated) and 1024 on a CPU."""
    import time

    import torch

    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # a GPU queues 4 between synchronizations; a CPU checks the time after each (a CPU without fp16
    # units takes seconds for one: a 4-multiply minimum made this half a minute)
    per_check = 4 if cuda else 1
    t0 = time.perf_counter()
    for _ in range(2 if cuda else 1):
        a @ b
    sync()
    warm_up = time.perf_counter() - t0
    if not cuda and warm_up >= seconds:  # one multiply outlasts the measurement: it is the measurement
        return 2 * n**3 / warm_up
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(per_check):
            a @ b
        sync()
        iters += per_check
    return 2 * n**3 * iters / (time.perf_counter() - t0)


@dataclasses.dataclass
class Compute:
    device: "object"  # torch.device
    device_type: str
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self):
        return self.rank == 0


# glibc mallopt parameters, and the values keep_freed_memory sets
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
KEPT_MEMORY = {M_MMAP_MAX: 0, M_TOP_PAD: 64 << 20, M_TRIM_THRESHOLD: 1 << 30}


def keep_freed_memory():
    """Has glibc's malloc keep the memory this process frees for its next allocations. By default it
    gives large blocks their own mmap and returns them, and the heap's free top, to the OS, so a CPU
    training step page-faults its activations in again every time: about 120,000 faults, 6-7% of a
    cpu-preset step. Now every block comes from the heap, which grows 64 MB at a time and keeps up to
    1 GB free. Returns whether it took (False off glibc)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not Linux with glibc
        return False
    return all(mallopt(param, value) == 1 for param, value in KEPT_MEMORY.items())


def compute_init(device_type=None, seed=None):
    """Picks the device (cuda > mps > cpu), joins the process group under torchrun
    (nccl on CUDA, gloo otherwise) and seeds torch. Returns a `Compute`. Each device's process-wide
    settings: TF32 matmuls on CUDA; on the CPU, freed memory kept for reuse (keep_freed_memory).

    A collective waits NANOCHAT_COLLECTIVE_TIMEOUT_S seconds for a silent peer (the launcher sets
    it from the preset), then fails the process: a node that died without closing its connections
    (a lost machine, a hung process) would otherwise hold the others for torch's default, 30 minutes
    on gloo, 10 on NCCL."""
    import torch
    import torch.distributed as dist

    device_type = device_type or autodetect_device_type()
    rank, local_rank, world_size = dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
        if device_type == "cpu":
            keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        # torch.distributed.nn takes group.WORLD as a default argument when first imported
        # (torch._dynamo imports it). Imported after the group exists, it would keep the group
        # alive past destroy_process_group, and with it gloo's worker threads, which may still
        # be dropping a collective's tensors when the interpreter shuts down: SIGABRT at exit.
        import torch.distributed.nn  # noqa: F401
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        if os.environ.get("NANOCHAT_COLLECTIVE_TIMEOUT_S"):
            kwargs["timeout"] = datetime.timedelta(seconds=float(os.environ["NANOCHAT_COLLECTIVE_TIMEOUT_S"]))
        dist.init_process_group(backend=backend, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    return Compute(device, device_type, rank, local_rank, world_size)


def compute_cleanup():
    """Destroys the process group (joining gloo's worker threads), if there is one. A stage that never
    imported torch.distributed has none, and is spared importing torch (seconds) to find that out."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


# Never part of the code version: caches and build outputs (rebuilt from the sources, and
# different on every machine).
BUILD_DIRS = {"__pycache__", "target", "_native"}
BUILD_SUFFIXES = {".so", ".pyc", ".pyd", ".dylib", ".dll", ".o"}


def source_files(root):
    """Every file under `root` that a package loads or is built from (Python, Rust and Cargo's
    files, C, HTML, data), sorted; not caches, build outputs or hidden files."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in BUILD_DIRS and not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if not f.startswith(".") and Path(f).suffix not in BUILD_SUFFIXES]
    return sorted(files)


def source_hash(packages=("nanochat", "tasks", "rustbpe"), root=None):
    """sha256 over every source file of the given packages under `root` (default REPO_ROOT, read at
    each call, so a test can point it at a copy of the sources): each one's path relative to `root`
    (stable across machines), size and bytes."""
    root = root or REPO_ROOT
    h = hashlib.sha256()
    for package in packages:
        for path in source_files(root / package):
            data = path.read_bytes()
            h.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


def git_commit():
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def code_version(commit=True):
    """What produced an artifact: package version, git commit (if any; `commit=False` leaves it
    out without running git, as the stage cache's key does) and a hash of the sources."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("nanochat")
    except PackageNotFoundError:
        package_version = None
    return {"version": package_version, **({"commit": git_commit()} if commit else {}), "source_sha256": source_hash()}
