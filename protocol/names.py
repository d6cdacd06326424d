"""Validation of topic and group names (SPEC §3).

Error messages quote the refused value abbreviated (``shown``): a name comes from a client,
and may be megabytes long or nested a thousand levels deep (``repr`` of that would raise
``RecursionError``, and a full copy would make the error larger than the request).
"""

from __future__ import annotations

import re
import reprlib

from protocol.errors import InvalidNameError

__all__ = [
    "NAME_PATTERN",
    "DLQ_PREFIX",
    "WEBHOOK_GROUP_PREFIX",
    "dlq_topic",
    "validate_group_ref",
    "validate_name",
    "validate_send_topic",
    "validate_subscribe_topic",
    "shown",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,127}")
DLQ_PREFIX = "%DLQ%"

#: The consumer group of webhook ``NAME`` is ``webhook:NAME``: ``:`` is outside the name
#: pattern, so no client's group can ever be called that (see ``broker.webhooks``).
WEBHOOK_GROUP_PREFIX = "webhook:"

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 160
_SHOWN.maxlevel = 3


def shown(value: object) -> str:
    """``repr(value)`` for an error message: at most ~160 characters and 3 levels deep. Never raises."""
    return _SHOWN.repr(value)


def dlq_topic(group: str) -> str:
    """The dead-letter topic of a consumer group: ``%DLQ%<group>``."""
    return DLQ_PREFIX + group


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a valid topic/group name; raise ``InvalidNameError`` otherwise."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidNameError(f"invalid {what} {shown(name)}: must match ^[A-Za-z0-9_-]{{1,127}}$")
    return name


def validate_group_ref(group: object, what: str = "group") -> str:
    """A group an operator or a DLQ topic may name: a client's group (``validate_name``)
    or a webhook's group ``webhook:NAME``. Raise ``InvalidNameError`` otherwise."""
    if isinstance(group, str) and group.startswith(WEBHOOK_GROUP_PREFIX):
        validate_name(group[len(WEBHOOK_GROUP_PREFIX):], f"webhook name in {what}")
        return group
    return validate_name(group, what)


def validate_send_topic(topic: object) -> str:
    """A topic a producer may send to: a plain name, never a reserved ``%`` system topic."""
    if isinstance(topic, str) and topic.startswith("%"):
        raise InvalidNameError(f"topic {shown(topic)} is reserved for the broker; producers cannot send to it")
    return validate_name(topic, "topic")


def validate_subscribe_topic(topic: object) -> str:
    """A topic a consumer may subscribe to: a plain name or ``%DLQ%<group>`` (of a
    client's group or a webhook's)."""
    if isinstance(topic, str) and topic.startswith(DLQ_PREFIX):
        validate_group_ref(topic[len(DLQ_PREFIX) :], "group in DLQ topic")
        return topic
    return validate_name(topic, "topic")
