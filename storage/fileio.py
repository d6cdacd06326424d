"""The file operations the store makes, behind one object that tests can replace.

How this works
--------------
Every file the store touches (log segments, index files, the clean marker, their
directories) is opened, read, written, synced, renamed and deleted through a
:class:`FileIO`. The default, :data:`REAL`, holds the ``os`` functions themselves as
attributes, so a call costs what the ``os`` call costs. A test passes another
implementation (``MessageStore.open(..., fileio=...)``), e.g. one that keeps files in
memory and, at a simulated power cut, drops or tears whatever was written but not yet
synced. Metadata (SQLite) and the data-directory lock do not go through it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["FileIO", "REAL"]


class FileIO:
    """Real file operations (``os`` calls). Paths are ``str`` or ``Path``; descriptors ints."""

    def __init__(self) -> None:
        self.open: Any = os.open
        self.close: Any = os.close
        self.pread: Any = os.pread
        self.pwrite: Any = os.pwrite
        self.write: Any = os.write
        self.fsync: Any = os.fsync
        # fdatasync flushes the data and the metadata needed to read it back (the file size)
        self.fdatasync: Any = getattr(os, "fdatasync", os.fsync)
        self.ftruncate: Any = os.ftruncate
        self.fstat: Any = os.fstat  # (callers read st_size and st_mtime)
        self.replace: Any = os.replace
        self.unlink: Any = os.unlink
        self.listdir: Any = os.listdir

    def makedirs(self, path: str | Path) -> None:
        """Create ``path`` and its missing parents."""
        os.makedirs(path, exist_ok=True)

    def isdir(self, path: str | Path) -> bool:
        return os.path.isdir(path)

    def exists(self, path: str | Path) -> bool:
        return os.path.exists(path)

    def fsync_dir(self, path: str | Path) -> None:
        """Make the entries of directory ``path`` (created, renamed, deleted files) durable."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: The real file system.
REAL = FileIO()
