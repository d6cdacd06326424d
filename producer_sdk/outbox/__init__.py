"""The transactional outbox: messages written in your own database transaction, relayed later.

How this works: ``Outbox.add(conn, topic, body, keys=...)`` inserts a row of the outbox
table inside the application's own transaction, so the message exists if and only if the
business change committed. A relay (``Outbox.relay(producer)`` in the application, or
``halfmq outbox-relay --db URL --broker ADDR``) claims committed rows, sends them with
``Producer.send_batch`` in insertion order per key, and marks them SENT; sent rows are
deleted (or archived) after a retention. Modules: ``outbox`` (the public class), ``relay``
(the loop), ``table`` (its statements), ``plan`` (batch planning without I/O), ``sql``
(the three drivers), ``cli`` (the command).

    from producer_sdk import Outbox
    outbox = Outbox.postgres("postgresql://app@127.0.0.1/app")
    await outbox.create_table()
    async with conn.transaction():
        await conn.execute("UPDATE account SET balance = balance - $1 WHERE id = $2", 20, 1)
        await outbox.add(conn, "transfer", body, keys=[tx_no])
    await outbox.relay(producer)          # runs until cancelled
"""

from producer_sdk.outbox.outbox import OUTBOX_TABLE, Outbox, OutboxTransactionError
from producer_sdk.outbox.plan import OUTBOX_ID
from producer_sdk.outbox.relay import OutboxRelay, OutboxTableMissingError, RelayStats
from producer_sdk.outbox.table import FailedRow, OutboxStatus

__all__ = [
    "Outbox",
    "OutboxRelay",
    "RelayStats",
    "OutboxStatus",
    "FailedRow",
    "OutboxTransactionError",
    "OutboxTableMissingError",
    "OUTBOX_ID",
    "OUTBOX_TABLE",
]
