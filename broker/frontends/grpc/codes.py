"""Status codes of ``apache.rocketmq.v2``: halfmq errors mapped the way RocketMQ's proxy answers.

How this works
--------------
Every RPC answers with a ``Status{code, message}`` in its response (gRPC's own status stays
OK, as with the proxy). ``status_of(exc)`` maps a halfmq error to the code the official
clients act on: a stale receipt handle is INVALID_RECEIPT_HANDLE (a push consumer stops
retrying its ack on that code only), a conflicting or unknown transaction outcome is
INVALID_TRANSACTION_ID, and so on. ``GrpcError`` carries an explicit code when the front
end itself refuses a request (an illegal delivery time, a SQL filter).
"""

from __future__ import annotations

from typing import Any

from broker.frontends.grpc.stubs import pb
from protocol.errors import (
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
)

__all__ = ["Code", "GrpcError", "ok", "status", "status_of"]

Code = pb.Code


class GrpcError(BadRequestError):
    """A request the gRPC front end refuses, with the RocketMQ code to answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.grpc_code = code


_BY_CLASS: tuple[tuple[type[HalfMQError], int], ...] = (
    (StaleReceiptError, Code.INVALID_RECEIPT_HANDLE),
    (TransactionStateError, Code.INVALID_TRANSACTION_ID),
    (MessageTooLargeError, Code.MESSAGE_BODY_TOO_LARGE),
    (TopicNotFoundError, Code.TOPIC_NOT_FOUND),
    (MessageStateError, Code.NOT_FOUND),  # a recall of a message unknown, not scheduled or due
    (InvalidNameError, Code.BAD_REQUEST),
    (AuthError, Code.UNAUTHORIZED),
    (LimitExceededError, Code.FORBIDDEN),
    (RequestTimeoutError, Code.PROXY_TIMEOUT),
    (BrokerUnavailableError, Code.INTERNAL_SERVER_ERROR),
    (BadRequestError, Code.BAD_REQUEST),
)


def status(code: int, message: str = "") -> Any:
    """A ``Status`` message."""
    return pb.Status(code=code, message=message or pb.Code.Name(code))


_OK = status(Code.OK, "OK")


def ok() -> Any:
    """The ``Status`` OK (one shared instance: it is copied into each response)."""
    return _OK


def status_of(exc: BaseException) -> Any:
    """The ``Status`` answering a failed request (INTERNAL_ERROR for anything unknown)."""
    if isinstance(exc, GrpcError):
        return status(exc.grpc_code, str(exc))
    for cls, code in _BY_CLASS:
        if isinstance(exc, cls):
            return status(code, str(exc))
    return status(Code.INTERNAL_ERROR, f"internal error: {exc}")
