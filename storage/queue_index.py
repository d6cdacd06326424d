"""Per-(topic, queue) index files of fixed-size entries pointing into the log.

How this works
--------------
``<data_dir>/index/<quoted topic>/<queue_id>.idx`` starts with a 24-byte header
(magic ``HQIX``, u32 version, u64 ``base``, u64 ``start``) followed by 24-byte entries
(u64 log pos, u32 size, u32 tag hash, u64 store time ms). Entry for queue offset ``o`` is at
byte ``24 + (o - base) * 24``. ``start`` is the first retained offset (``queue_start``);
retention raises it in place and rewrites the file (new ``base``) only when the dead prefix
is large. Reading "next N from offset o" is one ``pread`` — never a log scan.

Offsets are assigned when a record is appended (``next_offset``), but only entries
already written to the file (``end``) are visible. The writer thread writes the entries of a
batch right after the log bytes; the event loop then advances ``end``. Index files are not
fsynced per batch: they are rebuilt from the log after a crash.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from urllib.parse import quote, unquote

from .model import IndexEntry

__all__ = ["ENTRY", "QueueIndexFile", "index_path", "scan_index_dir"]

ENTRY = struct.Struct("<QIIQ")
HEADER = struct.Struct("<4sIQQ")
MAGIC = b"HQIX"
VERSION = 1
ESIZE = ENTRY.size  # 24
HSIZE = HEADER.size  # 24
COMPACT_MIN_DEAD = 4096
_new = object.__new__
_e_pos = IndexEntry.pos.__set__  # type: ignore[attr-defined]
_e_size = IndexEntry.size.__set__  # type: ignore[attr-defined]
_e_tag = IndexEntry.tag_hash.__set__  # type: ignore[attr-defined]
_e_time = IndexEntry.store_time.__set__  # type: ignore[attr-defined]


def index_path(root: Path, topic: str, queue_id: int) -> Path:
    return root / quote(topic, safe="") / f"{queue_id}.idx"


def scan_index_dir(root: Path) -> list[tuple[str, int, Path]]:
    """Every index file under ``root`` as ``(topic, queue_id, path)``."""
    out = []
    if not root.is_dir():
        return out
    for tdir in sorted(root.iterdir()):
        if not tdir.is_dir():
            continue
        for f in sorted(tdir.iterdir()):
            stem, dot, ext = f.name.partition(".")
            if dot and ext == "idx" and stem.isdigit():
                out.append((unquote(tdir.name), int(stem), f))
    return out


class QueueIndexFile:
    """One queue's index file plus its counters (``start`` <= ``end`` <= ``next_offset``)."""

    __slots__ = ("topic", "queue_id", "path", "fd", "base", "start", "end", "next_offset", "dirty")

    def __init__(self, topic: str, queue_id: int, path: Path, fd: int, base: int, start: int, end: int) -> None:
        self.topic = topic
        self.queue_id = queue_id
        self.path = path
        self.fd = fd
        self.base = base
        self.start = start
        self.end = end
        self.next_offset = end
        self.dirty = False

    @classmethod
    def open(cls, root: Path, topic: str, queue_id: int) -> QueueIndexFile:
        """Open or create the index file; a torn trailing entry is cut off."""
        path = index_path(root, topic, queue_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, HSIZE, 0)
            if size < HSIZE or len(raw) < HSIZE or raw[:4] != MAGIC:
                base = start = 0
                os.ftruncate(fd, 0)
                os.pwrite(fd, HEADER.pack(MAGIC, VERSION, 0, 0), 0)
                size = HSIZE
            else:
                _, _, base, start = HEADER.unpack(raw)
            count = (size - HSIZE) // ESIZE
            if HSIZE + count * ESIZE != size:
                os.ftruncate(fd, HSIZE + count * ESIZE)
            end = base + count
            start = min(max(start, base), end)
        except BaseException:
            os.close(fd)
            raise
        return cls(topic, queue_id, path, fd, base, start, end)

    # -- reads (event loop) -----------------------------------------------------------
    def read(self, offset: int, max_count: int) -> list[tuple[int, IndexEntry]]:
        """Up to ``max_count`` visible ``(offset, entry)`` pairs from ``offset`` (clamped to start)."""
        raw = self.read_raw(offset, max_count)
        if raw is None:
            return []
        first, data = raw
        out = []
        append = out.append
        new = _new
        for p, s, t, ts in ENTRY.iter_unpack(data):
            e = new(IndexEntry)
            _e_pos(e, p)
            _e_size(e, s & 0x7FFFFFFF)  # (a bundle member's entry has MEMBER_BIT set)
            _e_tag(e, t)
            _e_time(e, ts)
            append((first, e))
            first += 1
        return out

    def read_raw(self, offset: int, max_count: int) -> tuple[int, bytes] | None:
        """``(first offset, packed entries)`` of up to ``max_count`` visible entries, or None."""
        if offset < self.start:
            offset = self.start
        n = min(max_count, self.end - offset)
        if n <= 0:
            return None
        raw = os.pread(self.fd, n * ESIZE, HSIZE + (offset - self.base) * ESIZE)
        if len(raw) % ESIZE:
            raw = raw[: len(raw) - len(raw) % ESIZE]
        return offset, raw

    # -- writes (writer thread, or loop while the writer is idle) ---------------------
    def write_entries(self, first_offset: int, data: bytes) -> None:
        """Write packed entries starting at queue offset ``first_offset``."""
        at = HSIZE + (first_offset - self.base) * ESIZE
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, at)
            view = view[n:]
            at += n
        self.dirty = True

    def truncate(self, end: int) -> None:
        """Drop entries at and after offset ``end``."""
        end = max(end, self.base)
        os.ftruncate(self.fd, HSIZE + (end - self.base) * ESIZE)
        self.end = self.next_offset = end
        self.start = min(self.start, end)

    def set_start(self, start: int) -> None:
        """Raise ``queue_start``; rewrite the file when the dead prefix got large."""
        if start <= self.start:
            return
        self.start = start
        dead = start - self.base
        if dead >= COMPACT_MIN_DEAD and dead * 2 >= self.end - self.base:
            self._compact()
        else:
            self.write_header()

    def write_header(self) -> None:
        """Persist ``base`` and ``start`` in the file header."""
        os.pwrite(self.fd, HEADER.pack(MAGIC, VERSION, self.base, self.start), 0)
        self.dirty = True

    def _compact(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        live = os.pread(self.fd, (self.end - self.start) * ESIZE, HSIZE + (self.start - self.base) * ESIZE)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, HEADER.pack(MAGIC, VERSION, self.start, self.start) + live)
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            raise
        os.close(self.fd)
        self.fd = fd
        self.base = self.start
        self.dirty = False

    def sync(self) -> None:
        if self.dirty:
            self.dirty = False
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
