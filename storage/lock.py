"""Exclusive lock on a data directory.

How this works: ``LOCK`` in the data directory is opened and locked with
``fcntl.flock(LOCK_EX | LOCK_NB)``; the holder writes its pid into it. flock locks belong to
an open file description, so a second open of the same directory fails both from another
process and from the same process. The lock disappears with the process (even on kill -9).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["DataDirLockedError", "DataDirLock"]


class DataDirLockedError(RuntimeError):
    """Raised when another store (any process) holds the data directory."""

    def __init__(self, data_dir: Path, holder_pid: int | None) -> None:
        self.data_dir = data_dir
        self.holder_pid = holder_pid
        who = f"pid {holder_pid}" if holder_pid is not None else "an unknown process"
        super().__init__(f"data directory {data_dir} is locked by {who}")


class DataDirLock:
    """The held lock; :meth:`release` (idempotent) gives it up."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "LOCK"
        self._fd: int | None = None

    @classmethod
    def acquire(cls, data_dir: str | Path) -> DataDirLock:
        """Take the lock or raise :class:`DataDirLockedError` naming the directory and pid."""
        lock = cls(Path(data_dir).resolve())
        fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                raw = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                pid: int | None = int(raw) if raw.isdigit() else None
            finally:
                os.close(fd)
            raise DataDirLockedError(lock.data_dir, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        lock._fd = fd
        return lock

    def release(self) -> None:
        """Release the lock (the file stays; it is harmless without a holder)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
