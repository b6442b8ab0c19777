"""File writes that a killed process or a full disk never leave half-done: atomic replacement (temp file + rename)
and appended lines that are cut back when they fail.

Lives in ul_model (which depends on nothing of the harness); ``ulbench.io`` builds on it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # out of space, out of quota


class DiskFullError(OSError):
    """A write ran out of disk space or quota. What it had written was removed again (a replaced file keeps its
    previous version); the message names the file, the bytes to write and the bytes free, and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def _size(n: int) -> str:
    return f"{n / 1e9:.3g} GB ({n} bytes)" if n >= 1e6 else f"{n} bytes"


def disk_full_error(path: str | os.PathLike, needed_bytes: int, cause: OSError, at_least: bool = False,
                    needed_for: str = "", note: str = "") -> DiskFullError:
    """The DiskFullError of a write of ``needed_bytes`` (for ``needed_for``: a whole of which ``path`` is part) to
    ``path`` that failed with ``cause`` (ENOSPC/EDQUOT)."""
    path = Path(path)
    where = path.parent
    while not where.exists() and where != where.parent:  # the folder may be gone (a partial checkpoint removed)
        where = where.parent
    try:
        free = _size(shutil.disk_usage(where).free)
    except OSError:
        free = "unknown"
    reason = "disk quota exceeded" if cause.errno == errno.EDQUOT else "no space left on the device"
    amount = (f"at least {_size(needed_bytes)}" if at_least and needed_bytes else "more than was free" if at_least
              else _size(needed_bytes))
    message = " ".join(filter(None, (
        f"{path}: {reason} ({amount} to write{' for ' + needed_for if needed_for else ''}, {free} free there).",
        "Nothing was left half-written: the partial file was removed and a previous version of it, if any, is intact.",
        note,
        "Free space on that disk (or quota), or move the run to a larger one, then run the command again (training "
        "resumes from its latest checkpoint; keep_checkpoints sets how many checkpoints a run keeps).")))
    return DiskFullError(cause.errno, message, str(path))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", nbytes: int | None = None):
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block finishes. A full disk
    raises DiskFullError (``nbytes``: the size about to be written, for its message), the temp file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results and reports get the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = 0
        if tmp is not None:
            with contextlib.suppress(OSError):
                written = os.path.getsize(tmp)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, DiskFullError) and e.errno in DISK_FULL:
            raise disk_full_error(path, nbytes if nbytes is not None else written, e, at_least=nbytes is None) from e
        raise


def atomic_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb", nbytes=len(data)) as f:
        f.write(data)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (``line`` + newline) to a journal with a single write; a failed write (a full disk) is cut
    back off, so the file never holds a partial line that a later append would run into. A process killed mid-write
    can still leave a torn last line: readers (``ul_model.train``'s metrics) drop it when they start."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            if e.errno in DISK_FULL:
                raise disk_full_error(path, len(data), e) from e
            raise
    finally:
        os.close(fd)
