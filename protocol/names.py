"""Validation of topic and group names (SPEC §3)."""

from __future__ import annotations

import re

from protocol.errors import InvalidNameError

__all__ = [
    "NAME_PATTERN",
    "DLQ_PREFIX",
    "dlq_topic",
    "validate_name",
    "validate_send_topic",
    "validate_subscribe_topic",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,127}")
DLQ_PREFIX = "%DLQ%"


def dlq_topic(group: str) -> str:
    """The dead-letter topic of a consumer group: ``%DLQ%<group>``."""
    return DLQ_PREFIX + group


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a valid topic/group name; raise ``InvalidNameError`` otherwise."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidNameError(f"invalid {what} {name!r}: must match ^[A-Za-z0-9_-]{{1,127}}$")
    return name


def validate_send_topic(topic: object) -> str:
    """A topic a producer may send to: a plain name, never a reserved ``%`` system topic."""
    if isinstance(topic, str) and topic.startswith("%"):
        raise InvalidNameError(f"topic {topic!r} is reserved for the broker; producers cannot send to it")
    return validate_name(topic, "topic")


def validate_subscribe_topic(topic: object) -> str:
    """A topic a consumer may subscribe to: a plain name or ``%DLQ%<group>``."""
    if isinstance(topic, str) and topic.startswith(DLQ_PREFIX):
        validate_name(topic[len(DLQ_PREFIX) :], "group in DLQ topic")
        return topic
    return validate_name(topic, "topic")
