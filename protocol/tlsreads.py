"""Reading under TLS into one lent buffer instead of new bytes per TLS record.

How this works
--------------
The TLS layer of asyncio and of uvloop hands a plain ``asyncio.Protocol`` each read as
new ``bytes``: it asks OpenSSL for the decrypted data in chunks of up to 256 KiB, each a
new bytes object allocated at that size and shrunk after, and joins the chunks when a read
had several TLS records (one per 16 KiB at most). A ``BufferedProtocol`` instead lends it a
buffer to decrypt into. :class:`TLSReads` lends one buffer per thread, shared by all the
thread's connections, and calls the protocol's own ``data_received`` with a view of what
was read. That view is only valid during the call: the next read of any connection of the
thread writes over it, so ``data_received`` must copy whatever it keeps
(``protocol.FrameDecoder`` does: decoded frames are new objects, a partial frame is copied).

Only TLS connections use it. On a plain socket the event loop's own reads into new bytes
are cheaper than a second Python call per read.
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["TLSReads", "TLS_READ_BUFFER"]

#: bytes of the buffer each thread lends (the TLS layers read at most 256 KiB at a time)
TLS_READ_BUFFER = 256 * 1024


class _Buffer(threading.local):
    def __init__(self) -> None:
        self.view = memoryview(bytearray(TLS_READ_BUFFER))


_buffer = _Buffer()


class TLSReads(asyncio.BufferedProtocol):
    """Mixin for a protocol whose ``data_received`` copies what it keeps: the TLS layer
    decrypts into the thread's shared buffer, and ``data_received`` gets a view.

    List it after the protocol class (``class P(MyProtocol, TLSReads)``), so that the
    protocol's own methods come first, ``eof_received`` included; the protocol must not
    derive from ``asyncio.Protocol`` (uvloop then never lends a buffer) and must define
    ``eof_received`` itself if ``BaseProtocol`` is its base."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        """The thread's buffer (the TLS layer reads at most its length)."""
        return _buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were decrypted into the buffer: hand them to ``data_received``."""
        with _buffer.view[:nbytes] as data:
            self.data_received(data)  # type: ignore[attr-defined]
