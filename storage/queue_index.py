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
already written to the file (``end``) are visible. The event loop writes the entries of a
batch while (or before) the log bytes are written; it advances ``end`` once the log bytes
are. Index files are not fsynced per batch: they are rebuilt from the log after a crash.

Descriptors: a :class:`QueueIndexFile` holds its counters, not an open file. Its descriptor
comes from an :class:`IndexFiles` cache of at most ``limit`` open files (least recently
used closed first, by a clock hand: an access only sets a flag), so a broker with 100,000
queues holds a bounded number of descriptors. Only the event loop (or, while the store
opens, the one recovery thread) touches the cache; fsyncs in worker threads open their own
short-lived descriptors (:meth:`QueueIndexFile.sync_path`), never a cached one, which the
loop may close meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections import OrderedDict
from pathlib import Path
from urllib.parse import quote, unquote

from .fileio import REAL, FileIO
from .model import IndexEntry

__all__ = ["ENTRY", "DEFAULT_OPEN_INDEXES", "IndexFiles", "QueueIndexFile", "index_path", "scan_index_dir"]

log = logging.getLogger(__name__)

#: Index files kept open at once by default (``--max-open-indexes``): with the broker's
#: other files and sockets this fits a ``ulimit -n`` of 1024.
DEFAULT_OPEN_INDEXES = 256

ENTRY = struct.Struct("<QIIQ")
HEADER = struct.Struct("<4sIQQ")
MAGIC = b"HQIX"
VERSION = 1
ESIZE = ENTRY.size  # 24
HSIZE = HEADER.size  # 24
COMPACT_MIN_DEAD = 4096
_new = object.__new__
_SLOTS = vars(IndexEntry)  # the slot descriptors: set fields of a frozen instance
_e_pos = _SLOTS["pos"].__set__
_e_size = _SLOTS["size"].__set__
_e_tag = _SLOTS["tag_hash"].__set__
_e_time = _SLOTS["store_time"].__set__


def index_path(root: Path, topic: str, queue_id: int) -> Path:
    return root / quote(topic, safe="") / f"{queue_id}.idx"


def scan_index_dir(root: Path, io: FileIO = REAL) -> list[tuple[str, int, Path]]:
    """Every index file under ``root`` as ``(topic, queue_id, path)``."""
    out: list[tuple[str, int, Path]] = []
    if not io.isdir(root):
        return out
    for tname in sorted(io.listdir(root)):
        tdir = root / tname
        if not io.isdir(tdir):
            continue
        for name in sorted(io.listdir(tdir)):
            stem, dot, ext = name.partition(".")
            if dot and ext == "idx" and stem.isdigit():
                out.append((unquote(tname), int(stem), tdir / name))
    return out


class IndexFiles:
    """An LRU (clock) cache of open index-file descriptors: at most ``limit`` open at once.

    Use from one thread at a time (the event loop once the store is open).
    """

    def __init__(self, limit: int = DEFAULT_OPEN_INDEXES, io: FileIO = REAL) -> None:
        self.io = io
        if limit < 1:
            raise ValueError("the index descriptor cache needs room for at least one file")
        self.limit = limit
        self._open: OrderedDict[QueueIndexFile, None] = OrderedDict()
        self.opened = 0  # files opened since start (a miss each)
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._open)

    def fd(self, q: QueueIndexFile) -> int:
        """The open descriptor of ``q`` (opening it, closing the least recently used)."""
        fd = q.fd
        if fd >= 0:
            q.used = True
            return fd
        opened = self._open
        while len(opened) >= self.limit:
            self._evict_one()
        try:
            fd = self.io.open(q.path, os.O_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not opened:
                raise
            # the process is out of descriptors: give back half of ours and try once more
            log.warning("storage: out of file descriptors opening %s; closing %d cached index files",
                        q.path, (len(opened) + 1) // 2)
            for _ in range((len(opened) + 1) // 2):
                self._evict_one()
            fd = self.io.open(q.path, os.O_RDWR)
        q.fd = fd
        q.used = True
        opened[q] = None
        self.opened += 1
        return fd

    def adopt(self, q: QueueIndexFile, fd: int) -> None:
        """Take ``fd`` (just opened for ``q``) into the cache, or close it if it is full."""
        if len(self._open) >= self.limit:
            self.io.close(fd)
            return
        q.fd = fd
        self._open[q] = None

    def _evict_one(self) -> None:
        opened = self._open
        while True:  # second chance: a file used since the hand last passed goes round again
            q = next(iter(opened))
            if q.used:
                q.used = False
                opened.move_to_end(q)
                continue
            del opened[q]
            fd, q.fd = q.fd, -1
            self.evicted += 1
            self.io.close(fd)
            return

    def replaced(self, q: QueueIndexFile, fd: int) -> None:
        """``q``'s file was rewritten and reopened as ``fd`` (the old one is closed)."""
        q.fd = fd
        q.used = True
        self._open[q] = None

    def forget(self, q: QueueIndexFile) -> None:
        """Close ``q``'s descriptor if it is open."""
        if self._open.pop(q, 0) is None:
            fd, q.fd = q.fd, -1
            self.io.close(fd)

    def close_all(self) -> None:
        """Close every cached descriptor."""
        for q in self._open:
            fd, q.fd = q.fd, -1
            self.io.close(fd)
        self._open.clear()


class QueueIndexFile:
    """One queue's index file plus its counters (``start`` <= ``end`` <= ``next_offset``).

    ``fd`` is -1 while the file is not in its :class:`IndexFiles` cache.
    """

    __slots__ = ("topic", "queue_id", "path", "files", "io", "fd", "used", "base", "start", "end", "next_offset",
                 "dirty", "new")

    def __init__(self, topic: str, queue_id: int, path: Path, files: IndexFiles, base: int, start: int,
                 end: int) -> None:
        self.topic = topic
        self.queue_id = queue_id
        self.path = path
        self.files = files
        self.io = files.io
        self.fd = -1
        self.used = False
        self.base = base
        self.start = start
        self.end = end
        self.next_offset = end
        self.dirty = False
        self.new = False  # created since the last checkpoint: its directory entry is not synced

    @classmethod
    def open(cls, root: Path, topic: str, queue_id: int, files: IndexFiles) -> QueueIndexFile:
        """Open or create the index file; a torn trailing entry is cut off. Its descriptor
        stays in ``files`` if there is room (else it is closed again)."""
        path = index_path(root, topic, queue_id)
        io = files.io
        created = False
        try:
            fd = io.open(path, os.O_RDWR)
        except FileNotFoundError:
            io.makedirs(path.parent)
            fd = io.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            created = True
        try:
            size = io.fstat(fd).st_size
            raw = io.pread(fd, HSIZE, 0)
            if size < HSIZE or len(raw) < HSIZE or raw[:4] != MAGIC:
                base = start = 0
                io.ftruncate(fd, 0)
                io.pwrite(fd, HEADER.pack(MAGIC, VERSION, 0, 0), 0)
                size = HSIZE
            else:
                _, _, base, start = HEADER.unpack(raw)
            count = (size - HSIZE) // ESIZE
            if HSIZE + count * ESIZE != size:
                io.ftruncate(fd, HSIZE + count * ESIZE)
            end = base + count
            start = min(max(start, base), end)
        except BaseException:
            io.close(fd)
            raise
        q = cls(topic, queue_id, path, files, base, start, end)
        q.new = created
        q.dirty = created
        files.adopt(q, fd)
        return q

    # -- reads (event loop) -----------------------------------------------------------
    def read(self, offset: int, max_count: int) -> list[tuple[int, IndexEntry]]:
        """Up to ``max_count`` visible ``(offset, entry)`` pairs from ``offset`` (clamped to start)."""
        raw = self.read_raw(offset, max_count)
        if raw is None:
            return []
        first, data = raw
        out: list[tuple[int, IndexEntry]] = []
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
        fd = self.fd
        if fd < 0:
            fd = self.files.fd(self)
        else:
            self.used = True
        raw = self.io.pread(fd, n * ESIZE, HSIZE + (offset - self.base) * ESIZE)
        if len(raw) % ESIZE:
            raw = raw[: len(raw) - len(raw) % ESIZE]
        return offset, raw

    # -- writes (event loop, or the recovery thread while the store opens) --------------
    def write_entries(self, first_offset: int, data: bytes) -> None:
        """Write packed entries starting at queue offset ``first_offset``."""
        at = HSIZE + (first_offset - self.base) * ESIZE
        fd = self.fd
        if fd < 0:
            fd = self.files.fd(self)
        else:
            self.used = True
        view = memoryview(data)
        pwrite = self.io.pwrite
        while view:
            n = pwrite(fd, view, at)
            view = view[n:]
            at += n
        self.dirty = True

    def truncate(self, end: int) -> None:
        """Drop entries at and after offset ``end``."""
        end = max(end, self.base)
        if end < self.end:  # (the file ends at ``end`` entries since it was opened)
            self.io.ftruncate(self.files.fd(self), HSIZE + (end - self.base) * ESIZE)
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
        self.io.pwrite(self.files.fd(self), HEADER.pack(MAGIC, VERSION, self.base, self.start), 0)
        self.dirty = True

    def _compact(self) -> None:
        io = self.io
        tmp = self.path.with_suffix(".tmp")
        old = self.files.fd(self)
        live = io.pread(old, (self.end - self.start) * ESIZE, HSIZE + (self.start - self.base) * ESIZE)
        fd = io.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            io.pwrite(fd, HEADER.pack(MAGIC, VERSION, self.start, self.start) + live, 0)
            io.fsync(fd)
            io.replace(tmp, self.path)
        except BaseException:
            io.close(fd)
            raise
        io.close(old)
        self.files.replaced(self, fd)
        self.base = self.start
        self.dirty = False
        self.new = True  # (the rename is made durable with the directory at the next checkpoint)

    def sync_path(self) -> None:
        """fsync the file through a descriptor of its own (worker threads: a cached
        descriptor may be closed by the loop meanwhile)."""
        io = self.io
        fd = io.open(self.path, os.O_RDONLY)
        try:
            io.fsync(fd)
        finally:
            io.close(fd)

    def close(self) -> None:
        """Close the descriptor, if open."""
        self.files.forget(self)
