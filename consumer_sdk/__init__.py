"""halfmq consumer SDK: ``PushConsumer``.

How this works: a consumer subscribes a group to a topic over one connection (shared
client code in ``producer_sdk.connection``); the broker pushes deliveries, a bounded pool
of workers runs the listener, and results are acked in batches.

    from consumer_sdk import PushConsumer, ConsumeResult

    async def on_message(message):
        return ConsumeResult.SUCCESS

    async with PushConsumer("127.0.0.1:7600", group="consumer_bank2", topic="transfer",
                            listener=on_message):
        ...
"""

from consumer_sdk.consumer import PushConsumer
from consumer_sdk.dedup import apply_once, claim_key, create_dedup_table
from protocol import (
    AuthError,
    BrokerUnavailableError,
    ConsumeResult,
    HalfMQError,
    InvalidNameError,
    LimitExceededError,
    Message,
    MessageTooLargeError,
    RequestTimeoutError,
    TransactionStateError,
)

__all__ = [
    "PushConsumer",
    "ConsumeResult",
    "Message",
    "HalfMQError",
    "BrokerUnavailableError",
    "InvalidNameError",
    "MessageTooLargeError",
    "RequestTimeoutError",
    "TransactionStateError",
    "AuthError",
    "LimitExceededError",
    "apply_once",
    "claim_key",
    "create_dedup_table",
]
