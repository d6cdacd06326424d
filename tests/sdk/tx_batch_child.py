"""A producer process for the batch-listener kill -9 test: sends transactions, 64 in
flight, whose local transactions are committed in batches to an SQLite database; after
``die_after`` committed rows it SIGKILLs itself right after a batch's commit, before any
outcome of that batch is reported.

    python -m tests.sdk.tx_batch_child ADDRESS DB_PATH GROUP TOPIC DIE_AFTER
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys

from producer_sdk import BatchTransactionListener, LocalTransactionState, TransactionProducer


class SqliteBatches(BatchTransactionListener):
    """Each batch: one SQLite transaction, one row per transaction (a body starting with
    ``r`` is rolled back and writes nothing), one commit."""

    def __init__(self, path: str, die_after: int) -> None:
        self.path = path
        self.die_after = die_after
        self.db: sqlite3.Connection | None = None
        self.batch_no = 0

    def execute_local_transaction_batch(self, batch):
        if self.db is None:  # opened in the listener's thread
            self.db = sqlite3.connect(self.path, timeout=30.0)
        self.batch_no += 1
        states = []
        with self.db:
            for message, _arg in batch:
                if message.body.startswith(b"r"):
                    states.append(LocalTransactionState.ROLLBACK)
                    continue
                self.db.execute("INSERT INTO transfers VALUES (?, ?)", (message.msg_id, self.batch_no))
                states.append(LocalTransactionState.COMMIT)
        rows = self.db.execute("SELECT count(*) FROM transfers").fetchone()[0]
        if rows >= self.die_after and self.batch_no > 1:
            os.kill(os.getpid(), signal.SIGKILL)  # committed locally, no outcome reported
        return states

    def check_local_transaction(self, message):
        raise AssertionError("check-backs are answered by the test's own producer")


async def main(address: str, path: str, group: str, topic: str, die_after: int) -> None:
    listener = SqliteBatches(path, die_after)
    async with TransactionProducer(address, group=group, listener=listener, execute_workers=1) as p:
        slots = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            try:
                await p.send_in_transaction(topic, b"r%d" % i if i % 7 == 3 else b"c%d" % i)
            finally:
                slots.release()

        tasks = set()
        i = 0
        while True:
            await slots.acquire()
            task = asyncio.ensure_future(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1


if __name__ == "__main__":
    address, path, group, topic, die_after = sys.argv[1:6]
    asyncio.run(main(address, path, group, topic, int(die_after)))
