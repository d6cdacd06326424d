"""halfmq consumer SDK: ``PushConsumer`` (the broker pushes) and ``SimpleConsumer`` (you pull).

How this works: a push consumer subscribes a group to a topic over one connection (shared
client code in ``producer_sdk.connection``); the broker pushes deliveries, a bounded pool
of workers runs the listener, and results are acked in batches. A simple consumer asks for
batches of messages, each leased for its own invisible duration, and acks each by its
receipt handle. ``WebhookVerifier`` checks the requests of a broker webhook on the
receiving side (``consumer_sdk.webhook``).

    from consumer_sdk import PushConsumer, ConsumeResult

    async def on_message(message):
        return ConsumeResult.SUCCESS

    async with PushConsumer("127.0.0.1:7600", group="consumer_bank2", topic="transfer",
                            listener=on_message):
        ...
"""

from consumer_sdk.consumer import PushConsumer
from consumer_sdk.dedup import apply_once, claim_key, create_dedup_table
from consumer_sdk.simple import ReceivedMessage, SimpleConsumer
from consumer_sdk.webhook import WebhookRequest, WebhookVerificationError, WebhookVerifier
from protocol import (
    AuthError,
    BrokerUnavailableError,
    ConsumeResult,
    HalfMQError,
    InvalidNameError,
    LimitExceededError,
    Message,
    MessageStateError,
    MessageTooLargeError,
    RequestTimeoutError,
    StaleReceiptError,
    TopicNotFoundError,
    TransactionStateError,
)

__all__ = [
    "PushConsumer",
    "SimpleConsumer",
    "ReceivedMessage",
    "StaleReceiptError",
    "ConsumeResult",
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
    "apply_once",
    "claim_key",
    "create_dedup_table",
    "WebhookVerifier",
    "WebhookRequest",
    "WebhookVerificationError",
]
