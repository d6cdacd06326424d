"""halfmq wire protocol: frames, the ``Message`` model, enums, names and the error table.

Pure functions and types, no I/O; shared by the broker and both SDKs.
"""

from protocol.enums import ConsumeResult, LocalTransactionState, Op, Ops, Role
from protocol.errors import (
    ERRORS_BY_CODE,
    AuthError,
    BadRequestError,
    BrokerUnavailableError,
    HalfMQError,
    InvalidNameError,
    LimitExceededError,
    MessageStateError,
    MessageTooLargeError,
    RequestTimeoutError,
    StaleReceiptError,
    TopicNotFoundError,
    TransactionStateError,
    error_from_code,
)
from protocol.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_OVERHEAD,
    MAX_CLIENT_ID,
    MAX_FRAME_ITEMS,
    MAX_SEND_MESSAGES,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameTooLargeError,
    ProtocolError,
    encode_frame,
)
from protocol.message import Message, SendResult
from protocol.names import (
    DLQ_PREFIX,
    dlq_topic,
    validate_name,
    validate_send_topic,
    validate_subscribe_topic,
)

__all__ = [
    "ConsumeResult",
    "LocalTransactionState",
    "Op",
    "Ops",
    "Role",
    "ERRORS_BY_CODE",
    "AuthError",
    "BadRequestError",
    "BrokerUnavailableError",
    "HalfMQError",
    "InvalidNameError",
    "LimitExceededError",
    "MessageStateError",
    "MessageTooLargeError",
    "RequestTimeoutError",
    "StaleReceiptError",
    "TopicNotFoundError",
    "TransactionStateError",
    "error_from_code",
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_OVERHEAD",
    "MAX_CLIENT_ID",
    "MAX_FRAME_ITEMS",
    "MAX_SEND_MESSAGES",
    "PROTOCOL_VERSION",
    "FrameDecoder",
    "FrameTooLargeError",
    "ProtocolError",
    "encode_frame",
    "Message",
    "SendResult",
    "DLQ_PREFIX",
    "dlq_topic",
    "validate_name",
    "validate_send_topic",
    "validate_subscribe_topic",
]
