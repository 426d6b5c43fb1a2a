"""Locks that die with their holder, for Prefect's SERIALIZABLE cache isolation.

Prefect's FileSystemLockManager keeps a lock file until it is released, so a flow run killed
mid-stage (a cancelled deployment run ends in SIGKILL) would leave every later run of that stage
waiting forever. Here a lock is an `flock` on a file per key: the kernel drops it when its process
dies. Locks are local to one machine; across machines use a shared lock manager (prefect-redis).
"""

import fcntl
import os
import threading
import time
from pathlib import Path

import anyio.to_thread


class FlockLockManager:
    def __init__(self, directory):
        self.directory = Path(directory)
        self._held = {}  # key -> (holder, fd)
        self._mutex = threading.Lock()

    def _path(self, key):
        return self.directory / f"{key}.lock"

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None):
        """Blocks until the lock is ours (False after `acquire_timeout` s); `hold_timeout` is moot:
        the lock lasts until released or until the holding process ends. Prefect gives no
        acquire_timeout: the wait lasts as long as the holder runs the stage, which its stage timeout
        bounds (flows/stages.py), and a holder killed outright drops its flock."""
        if self.is_lock_holder(key, holder):
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while not _try_flock(fd):
            if deadline is not None and time.monotonic() > deadline:
                os.close(fd)
                return False
            time.sleep(0.1)
        with self._mutex:
            self._held[key] = (holder, fd)
        return True

    async def aacquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None):
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key, holder):
        with self._mutex:
            if self._held.get(key, (None,))[0] != holder:
                raise ValueError(f"no lock held by {holder} for key {key}")
            os.close(self._held.pop(key)[1])  # closing the file drops the flock

    def is_locked(self, key):
        if key in self._held:
            return True
        if not self._path(key).exists():
            return False
        fd = os.open(self._path(key), os.O_RDWR)
        try:
            return not _try_flock(fd)
        finally:
            os.close(fd)

    def is_lock_holder(self, key, holder):
        return self._held.get(key, (None,))[0] == holder

    def wait_for_lock(self, key, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    async def await_for_lock(self, key, timeout=None):
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)


def _try_flock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
