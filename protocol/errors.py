"""The one error table: every error the broker can report, with a stable numeric code.

How this works
--------------
Each exception class carries a class attribute ``code`` (the number that travels on the
wire in an ERROR frame) and ``retriable`` (whether the SDKs may transparently retry the
request). ``error_from_code()`` turns a wire error back into the same class on the
client side, so a caller catches ``MessageTooLargeError`` whether it came from the local
check or from the broker.

The tree::

    HalfMQError                      (code 1, not retriable: internal error)
    ├── BrokerUnavailableError       (code 2, retriable)
    ├── InvalidNameError             (code 3)
    ├── MessageTooLargeError         (code 4)
    ├── RequestTimeoutError          (code 5, retriable)
    ├── TransactionStateError        (code 6)
    ├── AuthError                    (code 7)
    ├── BadRequestError              (code 8: malformed frame or request)
    ├── TopicNotFoundError           (code 9: auto-create is off)
    ├── LimitExceededError           (code 10: a documented limit of the broker)
    ├── StaleReceiptError            (code 11: a receipt handle whose lease ended or changed)
    └── MessageStateError            (code 12: unknown message, or not in a state that allows the request)
"""

from __future__ import annotations

import reprlib

__all__ = [
    "HalfMQError",
    "BrokerUnavailableError",
    "InvalidNameError",
    "MessageTooLargeError",
    "RequestTimeoutError",
    "TransactionStateError",
    "AuthError",
    "BadRequestError",
    "TopicNotFoundError",
    "LimitExceededError",
    "StaleReceiptError",
    "MessageStateError",
    "ERRORS_BY_CODE",
    "error_from_code",
]


class HalfMQError(Exception):
    """Base class of every halfmq error."""

    code: int = 1
    retriable: bool = False


class BrokerUnavailableError(HalfMQError):
    """The broker cannot be reached (connection refused or lost, broker shutting down)."""

    code = 2
    retriable = True


class InvalidNameError(HalfMQError):
    """A topic or group name does not match ``^[A-Za-z0-9_-]{1,127}$`` or is reserved."""

    code = 3


class MessageTooLargeError(HalfMQError):
    """A body (or a frame) is larger than the broker's ``--max-message-size``."""

    code = 4


class RequestTimeoutError(HalfMQError):
    """No reply arrived within the request's deadline."""

    code = 5
    retriable = True


class TransactionStateError(HalfMQError):
    """An outcome conflicts with the one already recorded, or the transaction is unknown."""

    code = 6


class AuthError(HalfMQError):
    """The handshake was refused."""

    code = 7


class BadRequestError(HalfMQError):
    """A malformed frame or request: wrong types, missing fields, unknown operation."""

    code = 8


class TopicNotFoundError(HalfMQError):
    """The topic does not exist and the broker does not auto-create topics."""

    code = 9


class LimitExceededError(HalfMQError):
    """A request goes past a documented limit of the broker (``--max-topics``,
    ``--max-prefetch``, ``--max-connections``, ...); the message names the limit."""

    code = 10


class StaleReceiptError(HalfMQError):
    """A receipt handle whose lease was acked, failed, expired or changed, or that an
    earlier run of the broker issued: the message is (or will be) delivered again."""

    code = 11


class MessageStateError(HalfMQError):
    """The message is unknown, or not in a state that allows the request (a recall of a
    message that was not scheduled, or whose time has come); the message says which."""

    code = 12


ERRORS_BY_CODE: dict[int, type[HalfMQError]] = {
    cls.code: cls
    for cls in (
        HalfMQError,
        BrokerUnavailableError,
        InvalidNameError,
        MessageTooLargeError,
        RequestTimeoutError,
        TransactionStateError,
        AuthError,
        BadRequestError,
        TopicNotFoundError,
        LimitExceededError,
        StaleReceiptError,
        MessageStateError,
    )
}


def error_from_code(code: object, message: object) -> HalfMQError:
    """Return an exception instance of the class registered for ``code``.

    ``code`` and ``message`` come from the peer's ERROR payload and are not trusted: a code
    that is not a registered ``int`` (unknown, a string, an unhashable list...) gives the
    base class ``HalfMQError``, and a message that is not a ``str`` is shown abbreviated
    (``reprlib.repr``: bounded in length and nesting). Never raises.
    """
    cls = ERRORS_BY_CODE.get(code, HalfMQError) if type(code) is int else HalfMQError
    if type(message) is not str:
        message = reprlib.repr(message)
    return cls(message)
