"""One writer per run directory: ``flock`` on ``RUN/locks/<scope>.lock``, holding the owner's host and pid.

``flock`` is released by the kernel when its process dies (a SIGKILL, a node lost with its NFS client), so a dead
holder's lock is free to take without guessing from pids; the file's text only names the holder in the error.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from ulbench.errors import UserError


class RunLock:
    """Exclusive locks on named scopes of a run directory (``all``, or one method under SLURM)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.folder = Path(run_dir) / "locks"
        self._held: dict[str, int] = {}

    def acquire(self, scope: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{scope}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"{self.folder.parent} is being written by {holder} (lock {path}); wait for it to "
                            "finish or stop it, then `ulbench run --resume` again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"), "job": os.environ.get("SLURM_JOB_ID")}).encode(), 0)
        self._held[scope] = fd

    def held_by_other(self, scope: str) -> bool:
        """Whether another process holds ``scope`` now (probed without keeping the lock)."""
        path = self.folder / f"{scope}.lock"
        if not path.is_file():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        for fd in self._held.values():
            os.close(fd)  # closing the descriptor drops the flock
        self._held.clear()


def _read_holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 4096, 0) or b"{}")
        job = f", SLURM job {h['job']}" if h.get("job") else ""
        return f"pid {h['pid']} on host {h['host']} (since {h['since']}{job})"
    except (ValueError, KeyError, OSError):
        return "another process"


@contextmanager
def file_lock(path: str | os.PathLike):
    """A short blocking ``flock`` (read-modify-write of a shared file by several writers)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
