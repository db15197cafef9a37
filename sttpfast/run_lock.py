"""One process per run folder: an exclusive ``fcntl.flock`` on ``RUN/.lock``, which holds the pid.

The kernel releases a flock when its process dies (even by SIGKILL), so a lock left by a
killed run is simply taken over; a live holder makes the second process stop with a
message naming the holder's process id.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["RunLock", "RunLocked", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunLocked(ValueError):
    """Another live process holds the run folder."""


class RunLock:
    """Hold the lock of run folder ``run_dir`` from :meth:`acquire` to :meth:`release`
    (or the end of the process)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"run folder {self.path.parent} is in use by process {holder} "
                            f"(lock {self.path}); wait for it to end or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
