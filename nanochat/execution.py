"""Sandboxed Python: untrusted programs (the model's tool calls, HumanEval completions) run in a
child interpreter with limits, and nothing they do reaches the caller.

    execute("print(1 + 1)").stdout == "2\n"
    calculator("3 * (4 + 5)") == "27"

Containment, in layers (each one alone stops most of the hostile programs in tests/test_execution.py):
- a fresh `python -I` in a new session (killed as a group), in an empty temp directory, with a
  scrubbed environment (PATH, HOME, LANG, TMPDIR only);
- as root, the program runs as `nobody`; otherwise as ourselves;
- its own namespaces where the kernel allows them: mount, network (no interface up), PID (all its
  processes die with it) and IPC, a user namespace when we are not root, and a read-only view of
  the system with its temp directory the one writable place (nanochat/sandbox.py, the child's
  side). Where the kernel allows none (or NANOCHAT_SANDBOX=seccomp forces it), a seccomp filter
  refuses sockets and signals outside the program's group; then it can read whatever its user
  can, which the log says once;
- rlimits: CPU seconds, address space, processes (counted per user, so the limit is the user's
  current count plus MAX_PROCESSES), file size (which also caps the captured output), core dumps;
- a wall-clock timeout, after which the whole process group is killed.
"""

import functools
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from nanochat.common import log

TIMEOUT = 5.0  # seconds of wall time
MEMORY_BYTES = 512 * 2**20  # address space of each process
MAX_PROCESSES = 16  # processes the program may add to its user's count
MAX_OUTPUT_BYTES = 2**20  # stdout and stderr each; also the largest file the program may write
KILL_WAIT = 5.0  # seconds to wait for a killed program to be gone
CALCULATOR_TIMEOUT = 2.0
CALCULATOR_MAX_CHARS = 256
ISOLATION_VARIABLE = "NANOCHAT_SANDBOX"  # "seccomp": use the fallback even where namespaces work
CHILD = Path(__file__).with_name("sandbox.py")  # the child's first code, run from source
PROBE = "import decimal"  # needs the view to hold the Python: its stdlib and a C extension


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
    return run(program, timeout, memory_bytes, user, isolation(user))


def isolation(user):
    """How the sandbox contains programs: "namespaces", else "seccomp" (see the module docstring)."""
    forced = os.environ.get(ISOLATION_VARIABLE, "")
    if forced not in ("", "seccomp"):
        raise ValueError(f"{ISOLATION_VARIABLE} must be 'seccomp' or unset, not {forced!r}")
    return chosen_isolation(user, forced == "seccomp")


@functools.cache
def chosen_isolation(user, forced):
    """Tries the namespaces once, with a probe program, unless forced not to. The fallback is
    logged with what it leaves open, as nothing else would show it."""
    if forced:
        reason = f"{ISOLATION_VARIABLE}=seccomp"
    else:
        probe = run(PROBE, TIMEOUT, MEMORY_BYTES, user, "namespaces")
        if probe.success:
            return "namespaces"
        reason = f"they failed here: {probe.error}"
    log.warning("sandbox: no namespaces (%s): programs run under a seccomp filter that refuses sockets and signals "
                "outside their process group, but they can read and write what uid %d can", reason, user[0] if user else os.getuid())
    return "seccomp"


def run(program, timeout, memory_bytes, user, isolation):
    """Runs `program` as `user` (None: ourselves) contained by `isolation`; its ExecutionResult."""
    uid = user[0] if user else os.getuid()
    sandbox_dir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    work = os.path.join(sandbox_dir, "work")  # the program's directory; the child mounts its view's root on sandbox_dir/root
    config = {
        "isolation": isolation,
        "user": user,
        "work": work,
        "limits": {
            "RLIMIT_CPU": int(timeout) + 1,
            "RLIMIT_AS": memory_bytes,
            "RLIMIT_NPROC": processes_of(uid) + MAX_PROCESSES,
            "RLIMIT_FSIZE": MAX_OUTPUT_BYTES + 1,  # one byte over: a capped output is seen as truncated
            "RLIMIT_CORE": 0,
        },
    }
    try:
        os.chmod(sandbox_dir, 0o711)  # the sandbox user may pass through to work/, but not read our output files
        os.mkdir(work)
        os.mkdir(os.path.join(sandbox_dir, "root"))
        with open(os.path.join(work, "program.py"), "w") as f:
            f.write(program)
        if user:
            os.chown(work, *user)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        out_path, err_path = os.path.join(sandbox_dir, "stdout"), os.path.join(sandbox_dir, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [interpreter(user), "-I", "-c", CHILD.read_text(), json.dumps(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work, env=env,
                start_new_session=True, close_fds=True,
            )
            try:
                timed_out = not ends_within(proc, timeout)
                returncode = None if timed_out else proc.wait()
            finally:
                kill_group(proc)
        stdout, stderr = read_capped(out_path), read_capped(err_path)
    finally:
        shutil.rmtree(sandbox_dir, ignore_errors=True)
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


def ends_within(proc, timeout):
    """Whether `proc` ends within `timeout` seconds. Its pidfd wakes us when it does, where
    Popen.wait(timeout) would poll and answer up to 50 ms late."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


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

