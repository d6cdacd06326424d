"""halfmq storage: segmented append-only log, per-queue indexes, metadata, recovery.

How this works: :class:`MessageStore` owns a data directory (locked with ``LOCK``): log
segments in ``log/`` (see :mod:`storage.log`; each record framed as :mod:`storage.framing`
says), queue indexes in ``index/`` (see
:mod:`storage.queue_index`) and ``meta.sqlite`` (see :mod:`storage.metadata`). Appends are
group-committed by one writer task (see :mod:`storage.store` and the parts it lists);
every file operation goes through :mod:`storage.fileio`.
"""

from .lock import DataDirLockedError
from .metadata import Metadata
from .model import (
    BundleTarget,
    IndexEntry,
    IndexTarget,
    NewBundle,
    NewRecord,
    Record,
    RefsTarget,
    Stored,
)
from .store import MessageStore, StoreClosedError

__all__ = [
    "BundleTarget",
    "DataDirLockedError",
    "IndexEntry",
    "IndexTarget",
    "Metadata",
    "MessageStore",
    "NewBundle",
    "NewRecord",
    "Record",
    "RefsTarget",
    "StoreClosedError",
    "Stored",
]
