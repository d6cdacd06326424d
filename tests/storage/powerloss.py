"""A file layer that remembers what a power cut would lose, for the power-loss test.

How this works
--------------
:class:`TracingFS` is a :class:`storage.fileio.FileIO` that keeps every file in memory and
appends each operation to ``trace``: file data writes and truncations, syncs, directory
changes (create, mkdir, rename, unlink) and directory syncs. The test also logs the
store's metadata writes into it (``meta``). A workload runs once against it; then
:func:`power_cut` replays a prefix ``trace[:k]`` into a :class:`Disk` model that knows, per
file, the image as of its last sync and the writes since, and per directory, the entries
as of its last sync and the changes since. At the cut:

- each write not yet synced is kept, dropped, or torn (some of its 512-byte sectors
  reach the disk, others not), independently, in order; a write through an ``O_DSYNC``
  descriptor was synced when it returned, so it is always kept; a truncation not synced
  is kept or dropped;
- each directory keeps a prefix of its changes since its last sync (a created or renamed
  file not followed by a directory sync may vanish, or come back under its old name);
- the metadata (SQLite, ``synchronous=NORMAL``: a commit reaches the disk in order, but
  not at once) keeps a prefix of its writes.

The result is a fresh, fully synced :class:`TracingFS` (and a metadata dict) for the store
to recover from.
"""

from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from storage.fileio import FileIO

SECTOR = 512


class _Inode:
    __slots__ = ("ino", "data")

    def __init__(self, ino: int, data: bytes = b"") -> None:
        self.ino = ino
        self.data = bytearray(data)


def _apply_write(buf: bytearray, off: int, data: bytes) -> None:
    if len(buf) < off:
        buf.extend(bytes(off - len(buf)))
    buf[off : off + len(data)] = data


class TracingFS(FileIO):
    """In-memory files under ``root`` (a real directory that holds the lock and SQLite)."""

    def __init__(self, root: Path, files: dict[str, bytes] | None = None, dirs: set[str] | None = None) -> None:
        self.root = str(root)
        self.lock = threading.RLock()
        self.trace: list[tuple] = []
        self.dirs: set[str] = {self.root} | set(dirs or ())
        self.names: dict[str, _Inode] = {}
        self._next_ino = 1
        for path, data in (files or {}).items():
            self.names[path] = self._new_inode(data)
        self.fds: dict[int, tuple[_Inode, bool]] = {}  # fd -> (inode, O_DSYNC)
        self._next_fd = 1 << 20
        # bound methods replace FileIO's os attributes
        for name in ("open", "close", "pread", "pwrite", "write", "fsync", "fdatasync", "ftruncate", "fstat",
                     "replace", "unlink", "listdir"):
            setattr(self, name, getattr(self, "_" + name))

    def _new_inode(self, data: bytes = b"") -> _Inode:
        ino = _Inode(self._next_ino, data)
        self._next_ino += 1
        return ino

    @staticmethod
    def _p(path: Any) -> str:
        return os.path.normpath(str(path))

    # -- namespace -------------------------------------------------------------------
    def makedirs(self, path: Any) -> None:
        p = self._p(path)
        with self.lock:
            missing = []
            while p not in self.dirs:
                missing.append(p)
                p = os.path.dirname(p)
            for d in reversed(missing):
                self.dirs.add(d)
                self.trace.append(("mkdir", d))

    def isdir(self, path: Any) -> bool:
        return self._p(path) in self.dirs

    def exists(self, path: Any) -> bool:
        p = self._p(path)
        return p in self.dirs or p in self.names

    def _listdir(self, path: Any) -> list[str]:
        p = self._p(path)
        with self.lock:
            if p not in self.dirs:
                raise FileNotFoundError(2, "No such directory", p)
            out = [os.path.basename(n) for n in self.names if os.path.dirname(n) == p]
            out += [os.path.basename(d) for d in self.dirs if d != p and os.path.dirname(d) == p]
            return out

    def _open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        p = self._p(path)
        with self.lock:
            ino = self.names.get(p)
            if ino is None:
                if not flags & os.O_CREAT:
                    raise FileNotFoundError(2, "No such file", p)
                if os.path.dirname(p) not in self.dirs:
                    raise FileNotFoundError(2, "No such directory", p)
                ino = self.names[p] = self._new_inode()
                self.trace.append(("create", p, ino.ino))
            elif flags & os.O_TRUNC and ino.data:
                ino.data.clear()
                self.trace.append(("trunc", ino.ino, 0))
            fd = self._next_fd
            self._next_fd += 1
            self.fds[fd] = (ino, bool(flags & getattr(os, "O_DSYNC", 0)))
            return fd

    def _close(self, fd: int) -> None:
        with self.lock:
            del self.fds[fd]

    def _replace(self, src: Any, dst: Any) -> None:
        s, d = self._p(src), self._p(dst)
        with self.lock:
            self.names[d] = self.names.pop(s)
            self.trace.append(("rename", s, d))

    def _unlink(self, path: Any) -> None:
        p = self._p(path)
        with self.lock:
            del self.names[p]
            self.trace.append(("unlink", p))

    def fsync_dir(self, path: Any) -> None:
        with self.lock:
            self.trace.append(("dirsync", self._p(path)))

    # -- data ------------------------------------------------------------------------
    def _pread(self, fd: int, n: int, off: int) -> bytes:
        with self.lock:
            return bytes(self.fds[fd][0].data[off : off + n])

    def _pwrite(self, fd: int, data: Any, off: int) -> int:
        data = bytes(data)
        with self.lock:
            ino, dsync = self.fds[fd]
            _apply_write(ino.data, off, data)
            self.trace.append(("write", ino.ino, off, data, dsync))
        return len(data)

    def _write(self, fd: int, data: Any) -> int:
        raise NotImplementedError("the store writes with pwrite")

    def _ftruncate(self, fd: int, size: int) -> None:
        with self.lock:
            ino = self.fds[fd][0]
            if size < len(ino.data):
                del ino.data[size:]
            else:
                ino.data.extend(bytes(size - len(ino.data)))
            self.trace.append(("trunc", ino.ino, size))

    def _fsync(self, fd: int) -> None:
        with self.lock:
            self.trace.append(("sync", self.fds[fd][0].ino))

    _fdatasync = _fsync

    def _fstat(self, fd: int) -> SimpleNamespace:
        with self.lock:
            return SimpleNamespace(st_size=len(self.fds[fd][0].data), st_mtime=0.0)

    def meta(self, values: dict) -> None:
        """Log a metadata write (the test wraps the store's metadata with this)."""
        with self.lock:
            self.trace.append(("meta", dict(values)))


@dataclass
class _File:
    durable: bytearray  # the image as of the last sync
    since: list[tuple] = field(default_factory=list)  # ("w", off, data, dsync) / ("t", size)
    current: bytearray = field(default_factory=bytearray)


@dataclass
class Disk:
    """The state of the disk after ``trace[:k]``: what is durable and what is not yet."""

    files: dict[int, _File] = field(default_factory=dict)
    # per directory: entries (name -> inode, or None for a subdirectory) as of its last
    # sync, and the changes since
    dir_durable: dict[str, dict[str, int | None]] = field(default_factory=dict)
    dir_since: dict[str, list[tuple]] = field(default_factory=dict)
    meta: list[dict] = field(default_factory=list)

    @classmethod
    def replay(cls, root: str, trace: list[tuple], k: int) -> Disk:
        disk = cls()
        disk.dir_durable[root] = {}
        disk.dir_since[root] = []
        names: dict[str, int] = {}  # the current namespace (files only)
        for op in trace[:k]:
            kind = op[0]
            if kind == "write":
                _, ino, off, data, dsync = op
                f = disk.files[ino]
                _apply_write(f.current, off, data)
                f.since.append(("w", off, data, dsync))
            elif kind == "trunc":
                _, ino, size = op
                f = disk.files[ino]
                if size < len(f.current):
                    del f.current[size:]
                else:
                    f.current.extend(bytes(size - len(f.current)))
                f.since.append(("t", size))
            elif kind == "sync":
                f = disk.files[op[1]]
                f.durable = bytearray(f.current)
                f.since.clear()
            elif kind == "create":
                _, path, ino = op
                disk.files[ino] = _File(bytearray())
                names[path] = ino
                disk._dir_op(path, ("set", os.path.basename(path), ino))
            elif kind == "mkdir":
                path = op[1]
                disk.dir_durable.setdefault(path, {})
                disk.dir_since.setdefault(path, [])
                disk._dir_op(path, ("set", os.path.basename(path), None))
            elif kind == "rename":
                _, src, dst = op
                ino = names.pop(src)
                names[dst] = ino
                disk._dir_op(src, ("del", os.path.basename(src)))
                disk._dir_op(dst, ("set", os.path.basename(dst), ino))
            elif kind == "unlink":
                names.pop(op[1])
                disk._dir_op(op[1], ("del", os.path.basename(op[1])))
            elif kind == "dirsync":
                d = op[1]
                entries = disk.dir_durable[d]
                for change in disk.dir_since[d]:
                    _dir_apply(entries, change)
                disk.dir_since[d] = []
            elif kind == "meta":
                disk.meta.append(op[1])
        return disk

    def _dir_op(self, path: str, change: tuple) -> None:
        self.dir_since[os.path.dirname(path)].append(change)

    def pending(self) -> int:
        """Operations a cut here could lose (unsynced writes and directory changes)."""
        return sum(len(f.since) for f in self.files.values()) + sum(map(len, self.dir_since.values()))


def _dir_apply(entries: dict[str, int | None], change: tuple) -> None:
    if change[0] == "set":
        entries[change[1]] = change[2]
    else:
        entries.pop(change[1], None)


def _tear(data: bytes, rng: random.Random) -> list[tuple[int, bytes]]:
    """Some of ``data``'s sectors: ``(offset in data, bytes)`` pieces that reach the disk."""
    out = []
    for at in range(0, len(data), SECTOR):
        if rng.random() < 0.5:
            out.append((at, data[at : at + SECTOR]))
    return out


def power_cut(root: Path, trace: list[tuple], k: int, mode: str, seed: int) -> tuple[TracingFS, dict, dict]:
    """The disk after a power cut following ``trace[:k]``: a synced :class:`TracingFS` to
    recover from, the surviving metadata, and counts of what the cut did.

    ``mode``: ``"keep"`` (every unsynced change reaches the disk), ``"drop"`` (none does),
    ``"mixed"`` (each is kept, dropped or torn at random).
    """
    rng = random.Random(seed)
    disk = Disk.replay(str(root), trace, k)
    stats = {"pending": disk.pending(), "dropped": 0, "torn": 0}

    def keep() -> str:
        if mode == "keep":
            return "keep"
        if mode == "drop":
            return "drop"
        return rng.choice(("keep", "drop", "tear"))

    images: dict[int, bytes] = {}
    for ino, f in disk.files.items():
        img = bytearray(f.durable)
        for change in f.since:
            if change[0] == "t":
                if keep() != "drop":
                    size = change[1]
                    if size < len(img):
                        del img[size:]
                    else:
                        img.extend(bytes(size - len(img)))
                else:
                    stats["dropped"] += 1
                continue
            _, off, data, dsync = change
            how = "keep" if dsync else keep()
            if how == "keep":
                _apply_write(img, off, data)
            elif how == "tear":
                stats["torn"] += 1
                for at, piece in _tear(data, rng):
                    _apply_write(img, off + at, piece)
            else:
                stats["dropped"] += 1
        images[ino] = bytes(img)
    # directories: a prefix of the changes since each one's last sync
    files: dict[str, bytes] = {}
    dirs: set[str] = set()

    def walk(d: str) -> None:
        dirs.add(d)
        entries = dict(disk.dir_durable.get(d, {}))
        since = disk.dir_since.get(d, [])
        n = {"keep": len(since), "drop": 0}.get(mode, rng.randint(0, len(since)))
        stats["dropped"] += len(since) - n
        for change in since[:n]:
            _dir_apply(entries, change)
        for name, ino in entries.items():
            path = os.path.join(d, name)
            if ino is None:
                walk(path)
            else:
                files[path] = images[ino]

    walk(str(root))
    n_meta = {"keep": len(disk.meta), "drop": 0}.get(mode, rng.randint(0, len(disk.meta)))
    meta: dict = {}
    for values in disk.meta[:n_meta]:
        meta.update(values)
    return TracingFS(root, files, dirs), meta, stats
