"""Durability bookkeeping and recovery: checkpoints, the clean marker, the log scan.

How this works
--------------
Every few seconds (and at close) the store fsyncs the dirty index files (and the
directories of new ones) and records a *checkpoint* in metadata: a log position up to
which index files are complete, plus each queue's end at that point. ``close()`` also
writes a ``CLEAN`` marker. ``open()`` removes the marker; if it was present and consistent,
no scan happens. Otherwise it scans the log from the checkpoint, stops at the first record
with a bad length/CRC (truncating the file there and deleting later segments), truncates
every index back to its checkpointed end and re-appends entries from the scanned records
(their index targets are in the record framing; a bundle gives one entry per member, a
references record one per reference). The references records the scan finds at the very
end of the log, after its last record of any other kind, are kept in
``recovered_refs_tail`` (a writer that puts another record after its references records
learns from them that a crash cut that record off).
Index files are opened one at a time through the bounded descriptor cache, never all at
once. The directories the store creates are fsynced before anything in them counts.

:class:`Recovery` is one part of :class:`storage.store.MessageStore` (a mixin).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import TYPE_CHECKING

from .framing import (
    FLAG_BUNDLE,
    FLAG_REFS,
    REF,
    IndexTargetInfo,
    bundle_entries,
    decode_index_target,
    read_checked,
)
from .queue_index import ENTRY, QueueIndexFile, scan_index_dir
from .state import StoreState

if TYPE_CHECKING:
    from .store import MessageStore

__all__ = ["CHECKPOINT_KEY", "CLEAN_MARKER", "EPOCH_KEY", "SEGMENT_SIZE_KEY", "Recovery"]

log = logging.getLogger("storage.store")

CLEAN_MARKER = "CLEAN"
CHECKPOINT_KEY = "storage.checkpoint"
EPOCH_KEY = "storage.epoch"
SEGMENT_SIZE_KEY = "storage.segment_size"
_entry_pack = ENTRY.pack


class Recovery(StoreState):
    """Checkpoints and recovery of :class:`storage.store.MessageStore` (see the module's "How this works")."""

    def _load_and_recover(self: MessageStore, checkpoint: dict | None) -> None:
        io = self._io
        marker_path = self.data_dir / CLEAN_MARKER
        marker = None
        if io.exists(marker_path):
            with contextlib.suppress(ValueError, OSError):
                fd = io.open(marker_path, os.O_RDONLY)
                try:
                    marker = json.loads(io.pread(fd, 4096, 0))
                finally:
                    io.close(fd)
            io.unlink(marker_path)
            io.fsync_dir(self.data_dir)
        self._log.load()
        # the log and index directories' own entries must be durable before anything in
        # them counts (a power cut may otherwise take the whole directory away)
        io.makedirs(self._index_root)
        io.fsync_dir(self.data_dir)
        if not self._log.segments:
            self._log.register(self._log.open_segment(0, int(self._clock() * 1000)))
        for topic, qid, _path in scan_index_dir(self._index_root, io):
            self._queues[(topic, qid)] = QueueIndexFile.open(self._index_root, topic, qid, self._files)
        self.recovered_clean = bool(
            isinstance(marker, dict)
            and isinstance(checkpoint, dict)
            and marker.get("end") == self._log.end
            and checkpoint.get("pos") == self._log.end
        )
        self.recovered_refs_tail = []
        if not self.recovered_clean:
            self._recover(checkpoint)
        self._last_checkpoint = self._log.end if self.recovered_clean else -1

    def _recover(self: MessageStore, checkpoint: dict | None) -> None:
        lg = self._log
        ck_pos = checkpoint.get("pos") if isinstance(checkpoint, dict) else None
        ck_queues: dict[tuple[str, int], int] = {}
        if isinstance(checkpoint, dict) and isinstance(ck_pos, int) and lg.start <= ck_pos <= lg.end:
            ck_queues = {(t, q): e for t, q, e in checkpoint.get("queues", [])}
        else:
            ck_pos = lg.start
        scanned: list[tuple[int, int, tuple[IndexTargetInfo, int]]] = []
        newest: dict[int, int] = {}
        refs_tail = self.recovered_refs_tail
        for buf, off, _length, pos in lg.iter_from(ck_pos, strict=False):
            if buf[off + 9] & FLAG_REFS:
                refs_tail.append(pos)
            elif refs_tail:
                refs_tail.clear()
            tgt = decode_index_target(buf, off)
            store_time = int.from_bytes(buf[off + 10 : off + 18], "little")
            newest[pos - pos % self.segment_size] = store_time
            if tgt is None:
                continue
            if buf[off + 9] & FLAG_BUNDLE:
                # one entry per member, at consecutive offsets from the bundle's first
                bundle = read_checked(bytes(buf[off : off + _length]), 0, _length, _length, pos, 1 << 62, -1, False)
                for k, (vpos, vsize, vtag) in enumerate(bundle_entries(bundle)):
                    t = IndexTargetInfo(tgt.topic, tgt.queue_id, vtag, -1, 0, tgt.queue_offset + k)
                    scanned.append((vpos, vsize, (t, store_time)))
            elif buf[off + 9] & FLAG_REFS:
                # one entry per reference, at consecutive offsets from the first
                rec = read_checked(bytes(buf[off : off + _length]), 0, _length, _length, pos, 1 << 62, -1, False)
                for k, (rpos, rsize, rtag) in enumerate(REF.iter_unpack(rec.body)):
                    t = IndexTargetInfo(tgt.topic, tgt.queue_id, rtag, rpos, rsize, tgt.queue_offset + k)
                    scanned.append((pos, _length, (t, store_time)))
            else:
                scanned.append((pos, _length, (tgt, store_time)))
        end = lg.scan_end
        if end < lg.end:
            if lg.zeros_from(end):
                log.info("storage: log ends at %d, before a zero-filled tail; cutting the tail", end)
            else:
                log.warning("storage: log damaged at position %d (end was %d); truncating", end, lg.end)
            lg.truncate_at(end)
        for seg in lg.segments:
            if seg.base in newest:
                seg.newest_ms = newest[seg.base]
        for key, q in self._queues.items():
            q.truncate(min(q.end, max(q.start, ck_queues.get(key, q.start))))
        pending: dict[QueueIndexFile, list[tuple[int, bytes]]] = {}
        for pos, size, (info, store_time) in scanned:
            key = (info.topic, info.queue_id)
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = QueueIndexFile.open(self._index_root, *key, self._files)
            if info.queue_offset < queue.end:
                continue
            if info.queue_offset > queue.end:
                if queue.end == queue.start:
                    queue.start = info.queue_offset
                else:
                    log.warning("storage: index gap in %s/%d before offset %d", *key, info.queue_offset)
            entry = _entry_pack(
                pos if info.ref_pos < 0 else info.ref_pos,
                size if info.ref_pos < 0 else info.ref_size,
                info.tag_hash,
                store_time,
            )
            pending.setdefault(queue, []).append((info.queue_offset, entry))
            queue.end = queue.next_offset = info.queue_offset + 1
        for q, items in pending.items():
            if _consecutive(items):
                q.write_entries(items[0][0], b"".join(e for _, e in items))
            else:
                for o, e in items:
                    q.write_entries(o, e)
            q.write_header()

    def _trim_active(self: MessageStore) -> None:
        """Cut the zero-filled tail off the active segment (a clean log ends at its data)."""
        seg = self._log.segments[-1]
        io = self._io
        if io.fstat(seg.fd).st_size > seg.size:  # (a failed fill may have grown it too)
            io.ftruncate(seg.fd, seg.size)
            io.fsync(seg.fd)
        seg.alloc = seg.size

    def _write_marker(self: MessageStore) -> None:
        io = self._io
        path = self.data_dir / CLEAN_MARKER
        tmp = path.with_suffix(".tmp")
        fd = io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            io.pwrite(fd, json.dumps({"end": self._written_end, "epoch": self.epoch}).encode(), 0)
            io.fsync(fd)
        finally:
            io.close(fd)
        io.replace(tmp, path)
        io.fsync_dir(self.data_dir)

    async def _checkpoint(self: MessageStore, final: bool = False) -> None:
        """fsync log + dirty index files, then record the replay point in metadata."""
        if self._failed is not None:
            return
        if not final and self._written_end == self._last_checkpoint:
            return
        # (the index files can take tens of ms to sync after 5 s of writes)
        pos, queues = await self._sync_written(final=final, index=True)
        await self.metadata.put(CHECKPOINT_KEY, {"pos": pos, "queues": queues})
        self._last_checkpoint = pos


def _consecutive(items: list[tuple[int, bytes]]) -> bool:
    return all(items[k][0] == items[0][0] + k for k in range(len(items)))
