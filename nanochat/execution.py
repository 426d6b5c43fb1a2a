"""Sandboxed Python: untrusted programs (the model's tool calls, HumanEval completions) run in a
child interpreter with limits, and nothing they do reaches the caller.

    execute("print(1 + 1)").stdout == "2\n"
    calculator("3 * (4 + 5)") == "27"

Containment, in layers (each one alone stops most of the hostile programs in tests/test_execution.py):
- a fresh `python -I` in a new session (killed as a group), in an empty temp directory, with a
  scrubbed environment (PATH, HOME, LANG only);
- Linux namespaces where the kernel allows them: a new network namespace (no interface is up, so
  no connection goes anywhere) and a new PID namespace (the program is its PID 1: its processes
  cannot see or signal anything outside, and all die with it); otherwise Python's socket module
  is disabled;
- as root, the program runs as `nobody`, so it can write only where anyone can (its temp dir is
  handed over to it) and read nothing private of the caller (/proc/<pid>/environ);
- rlimits: CPU seconds, address space, processes (counted per user, so the limit is the user's
  current count plus MAX_PROCESSES), file size (which also caps the captured output), core dumps;
- a wall-clock timeout, after which the whole process group is killed.
"""

import functools
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

TIMEOUT = 5.0  # seconds of wall time
MEMORY_BYTES = 512 * 2**20  # address space of each process
MAX_PROCESSES = 16  # processes the program may add to its user's count
MAX_OUTPUT_BYTES = 2**20  # stdout and stderr each; also the largest file the program may write
KILL_WAIT = 5.0  # seconds to wait for a killed program to be gone
CALCULATOR_TIMEOUT = 2.0
CALCULATOR_MAX_CHARS = 256

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000

# The child's first code, run by the sandbox's own interpreter before the program: isolate, drop
# privileges, set limits, then run the program as __main__ (as PID 1 of its namespace if any).
BOOTSTRAP = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
flags = cfg["clone_flags"] | (0 if os.getuid() == 0 else cfg["clone_newuser"])
isolated = libc.unshare(flags) == 0
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if isolated and os.fork():  # the child is PID 1 of the new namespace; when it dies, all its processes do
    _, status = os.wait()
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)
if not isolated:
    import socket
    def no_network(*args, **kwargs):
        raise OSError("network access is disabled in the sandbox")
    socket.socket = socket.create_connection = socket.socketpair = no_network
del ctypes, json, os, resource, cfg, libc, flags, isolated
import runpy
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
"""


@dataclass
class ExecutionResult:
    success: bool  # exit code 0 within the time limit
    stdout: str
    stderr: str
    returncode: int | None  # None when killed at the timeout
    timed_out: bool
    error: str | None  # a one-line reason when not successful


def sandbox_user():
    """(uid, gid) to run as: nobody when we are root, else None (stay ourselves)."""
    if os.getuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


@functools.cache
def interpreter(user):
    """A Python the sandbox user can run: ours, else the system's (ours may live in a private home)."""
    for candidate in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        kwargs = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
        try:
            if candidate and subprocess.run([candidate, "-I", "-c", "import json, runpy"], cwd="/", **kwargs).returncode == 0:
                return candidate
        except OSError:  # not executable by that user
            pass
    raise RuntimeError(f"no Python interpreter that uid {user[0]} can run")


def processes_of(uid):
    count = 0
    for p in psutil.process_iter(["uids"]):
        uids = p.info["uids"]
        count += uids is not None and uids.real == uid
    return count


def read_capped(path):
    with open(path, "rb") as f:
        data = f.read(MAX_OUTPUT_BYTES + 1)
    text = data[:MAX_OUTPUT_BYTES].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > MAX_OUTPUT_BYTES else "")


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else None


def execute(program, timeout=TIMEOUT, memory_bytes=MEMORY_BYTES):
    """Runs the Python source `program` in the sandbox and returns its ExecutionResult."""
    user = sandbox_user()
    uid = user[0] if user else os.getuid()
    config = {
        "clone_flags": CLONE_NEWNET | CLONE_NEWPID,
        "clone_newuser": CLONE_NEWUSER,
        "uid": user and user[0],
        "gid": user and user[1],
        "limits": {
            "RLIMIT_CPU": int(timeout) + 1,
            "RLIMIT_AS": memory_bytes,
            "RLIMIT_NPROC": processes_of(uid) + MAX_PROCESSES,
            "RLIMIT_FSIZE": MAX_OUTPUT_BYTES + 1,  # one byte over: a capped output is seen as truncated
            "RLIMIT_CORE": 0,
        },
    }
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    try:
        with open(os.path.join(workdir, "program.py"), "w") as f:
            f.write(program)
        if user:
            os.chown(workdir, *user)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [interpreter(user), "-I", "-c", BOOTSTRAP, json.dumps(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir, env=env,
                start_new_session=True, close_fds=True,
            )
            try:
                returncode, timed_out = proc.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            finally:
                kill_group(proc)
        stdout, stderr = read_capped(out_path), read_capped(err_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    success = returncode == 0
    if success:
        error = None
    elif timed_out:
        error = f"timed out after {timeout:g} s"
    elif returncode < 0 or returncode > 128:
        error = f"killed by signal {signal.Signals(abs(returncode) % 128).name}"
    else:
        error = last_line(stderr) or f"exit code {returncode}"
    return ExecutionResult(success, stdout, stderr, returncode, timed_out, error)


def kill_group(proc):
    """Kills the program's process group and waits until none of it runs. Its namespace's PID 1
    is not our child, so we watch for it to die rather than wait for it; the kernel kills the
    rest of a namespace before its PID 1 is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    deadline = time.monotonic() + KILL_WAIT
    while time.monotonic() < deadline and any(group_alive(p, proc.pid) for p in psutil.process_iter(["status"])):
        time.sleep(0.01)


def group_alive(process, pgid):
    try:
        return process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == pgid
    except (ProcessLookupError, psutil.Error):
        return False


def calculator(expression):
    """The model's python tool: evaluates one Python expression in the sandbox and returns its
    value as text, or None if it fails (then nothing is forced into the model's output)."""
    expression = expression.strip()
    if not expression or len(expression) > CALCULATOR_MAX_CHARS or "\n" in expression:
        return None
    program = f"print(eval(compile({expression!r}, '<tool>', 'eval'), {{}}))"
    result = execute(program, timeout=CALCULATOR_TIMEOUT)
    return result.stdout.strip() if result.success else None

