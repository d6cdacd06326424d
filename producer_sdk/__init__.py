"""halfmq producer SDK: ``Producer`` for plain messages, ``TransactionProducer`` for half messages,
``Outbox`` for messages written in the application's own database transaction.

How this works: each producer owns one ``producer_sdk.connection.Connection`` (handshake,
pipelined requests, automatic reconnect); ``Producer.send`` is one ``SEND`` frame and one
reply; ``TransactionProducer.send_in_transaction`` sends a half message, runs the
``TransactionListener`` (or a ``BatchTransactionListener``, many local transactions in
one call), reports its outcome and answers the broker's check-backs.

    from producer_sdk import Producer
    async with Producer("127.0.0.1:7600", group="producer_bank1") as p:
        r = await p.send("transfer", b"...", tags="TagA", keys=["tx-1"])
"""

from producer_sdk.local_tx import (
    AlreadyRolledBackError,
    TxLogBatchListener,
    TxLogChecker,
    TxLogListener,
    create_tx_log,
    record_commit,
)
from producer_sdk.outbox import Outbox
from producer_sdk.producer import Producer
from producer_sdk.transaction import TransactionListener, TransactionProducer
from producer_sdk.tx_batches import BatchTransactionListener
from protocol import (
    AuthError,
    BrokerUnavailableError,
    HalfMQError,
    InvalidNameError,
    LimitExceededError,
    LocalTransactionState,
    Message,
    MessageStateError,
    MessageTooLargeError,
    RequestTimeoutError,
    SendResult,
    TopicNotFoundError,
    TransactionStateError,
)

__all__ = [
    "Producer",
    "TransactionProducer",
    "TransactionListener",
    "BatchTransactionListener",
    "LocalTransactionState",
    "SendResult",
    "Message",
    "HalfMQError",
    "BrokerUnavailableError",
    "InvalidNameError",
    "MessageTooLargeError",
    "RequestTimeoutError",
    "TopicNotFoundError",
    "TransactionStateError",
    "AuthError",
    "LimitExceededError",
    "MessageStateError",
    "TxLogChecker",
    "TxLogListener",
    "TxLogBatchListener",
    "record_commit",
    "create_tx_log",
    "AlreadyRolledBackError",
    "Outbox",
]
