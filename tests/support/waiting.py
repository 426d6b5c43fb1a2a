"""Waiting in tests, always with a deadline: for a condition, for a process, for a command. A wait
that gives up says what it waited for, and the processes it waited on do not outlive it (torchrun's
workers live in sessions of their own, so a process is ended with every descendant)."""

import shlex
import subprocess
import time

import psutil

from flows import launch


def until(attempt, timeout, what, done=bool, procs=(), interval=0.2):
    """The first result of attempt() that is done(), trying every `interval` s. TimeoutError naming
    `what` after `timeout` s; RuntimeError if one of the Popen `procs` exits first."""
    deadline = time.monotonic() + timeout
    while not done(result := attempt()):
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{shlex.join(map(str, proc.args))} exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}; last: {result!r}")
        time.sleep(interval)
    return result


def processes(marker):
    """The processes whose command line holds `marker` (a run's directory, say)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def end(proc, grace=10):
    """Ends a Popen and all its descendants (SIGTERM, SIGKILL to those alive after `grace` s) and
    reaps it."""
    if proc.returncode is not None:  # reaped already: its pid may be another process's by now
        return
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:  # already reaped
        tree = []
    launch.kill_tree(tree, grace)
    proc.wait()  # bounded: whatever was left got SIGKILL


def run(cmd, timeout, input=None, **popen):
    """subprocess.run(cmd, capture_output=True, text=True) whose deadline, or any exception while it
    waits (pytest-timeout's too), ends the command's whole tree, where subprocess.run would kill the
    command alone and orphan its children. Past the deadline: a TimeoutError naming the command."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else None, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        end(proc)
        _, err = proc.communicate()
        raise TimeoutError(f"{shlex.join(map(str, cmd))} still running after {timeout} s (ended); "
                           f"its last output:\n{err[-3000:]}") from None
    except BaseException:
        end(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
