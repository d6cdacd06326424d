"""Rights: what a user may do, as grants of glob patterns on topic and group names.

How this works
--------------
A user holds a list of :class:`Grant` ``(right, topic, group)``. ``topic`` and ``group`` are
globs (``fnmatch`` rules, case-sensitive: ``*`` any run, ``?`` one character, ``[ab]`` a
set); ``%DLQ%*`` matches every dead-letter topic. The rights:

==============  =====================================================================
``publish``     SEND to a topic matching ``topic``. With a ``group`` pattern also: announce
                a producer group matching it (HELLO), send half messages as that group and
                resolve them (END_TX; the engine adds that only the group that sent a half
                message may resolve it). Without one: plain sends only, no producer group.
``subscribe``   SUBSCRIBE (push) or RECEIVE (pull) a topic matching ``topic`` as a consumer
                group matching ``group`` (required); then ACK / SETTLE what it was given.
``read``        the admin API's views (GET) of messages of a topic matching ``topic``;
                lists, stats and the console need ``read *``.
``admin``       everything ``read`` gives, plus the admin actions (resend from a DLQ,
                commit or roll back by hand) on a topic matching ``topic``; user, token and
                topic management need ``admin *``.
==============  =====================================================================

Nothing here does I/O; :class:`Rights` answers questions from the grants alone. What is
not granted is refused.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["ALL_RIGHTS", "Grant", "Rights", "RIGHTS", "glob_matches", "validate_pattern"]

#: The rights a grant may give.
RIGHTS = ("publish", "subscribe", "read", "admin")

_PATTERN_RE = re.compile(r"^[A-Za-z0-9_%*?\[\]!-]{1,200}$")


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def glob_matches(pattern: str, name: str) -> bool:
    """True if ``name`` matches the glob ``pattern`` (case-sensitive)."""
    return pattern == "*" or _compiled(pattern).match(name) is not None


def validate_pattern(pattern: object, what: str = "pattern") -> str:
    """Return ``pattern`` if it is a usable glob on names; raise ``ValueError`` otherwise."""
    if not isinstance(pattern, str) or not _PATTERN_RE.match(pattern):
        raise ValueError(f"{what} must be a glob of name characters and * ? [ ] (got {pattern!r})")
    return pattern


@dataclass(frozen=True, slots=True)
class Grant:
    """One right on the topics (and groups) matching two globs. ``group`` is None where the
    right takes no group (``read``, ``admin``, a ``publish`` of plain sends only)."""

    right: str
    topic: str
    group: str | None = None

    def __post_init__(self) -> None:
        if self.right not in RIGHTS:
            raise ValueError(f"unknown right {self.right!r}: expected one of {', '.join(RIGHTS)}")
        validate_pattern(self.topic, "topic pattern")
        if self.group is not None:
            validate_pattern(self.group, "group pattern")
            if self.right in ("read", "admin"):
                raise ValueError(f"the {self.right} right takes no group")
        elif self.right == "subscribe":
            raise ValueError("a subscribe grant needs a group pattern (the consumer groups it may use; '*' for any)")

    def to_list(self) -> list[str | None]:
        """The stored form ``[right, topic, group]``."""
        return [self.right, self.topic, self.group]

    @classmethod
    def from_list(cls, raw: Iterable[object]) -> Grant:
        """Read the stored form; raises ``ValueError`` if malformed."""
        items = list(raw)
        if len(items) not in (2, 3):
            raise ValueError(f"a grant is [right, topic, group], got {items!r}")
        right, topic = items[0], items[1]
        group = items[2] if len(items) == 3 else None
        if not isinstance(right, str) or not isinstance(topic, str) or not (group is None or isinstance(group, str)):
            raise ValueError(f"a grant is [right, topic, group], got {items!r}")
        return cls(right, topic, group)

    def __str__(self) -> str:
        return f"{self.right} {self.topic}" + (f" group={self.group}" if self.group is not None else "")


class Rights:
    """The answers for one user's grants (see the module docstring for each right)."""

    __slots__ = ("grants",)

    def __init__(self, grants: Iterable[Grant]) -> None:
        self.grants = tuple(grants)

    def _any(self, right: str, topic: str) -> bool:
        return any(g.right == right and glob_matches(g.topic, topic) for g in self.grants)

    def may_announce_producer_group(self, group: str) -> bool:
        """HELLO as a producer of ``group`` (check-backs of that group come to it)."""
        return any(g.right == "publish" and g.group is not None and glob_matches(g.group, group)
                   for g in self.grants)

    def may_send(self, topic: str, group: str | None, half: bool) -> bool:
        """SEND to ``topic``; a half message needs a grant whose group matches ``group``."""
        for g in self.grants:
            if g.right != "publish" or not glob_matches(g.topic, topic):
                continue
            if not half:
                return True
            if group is not None and g.group is not None and glob_matches(g.group, group):
                return True
        return False

    def may_subscribe(self, topic: str, group: str) -> bool:
        """SUBSCRIBE to ``topic`` as consumer ``group``."""
        return any(g.right == "subscribe" and glob_matches(g.topic, topic)
                   and g.group is not None and glob_matches(g.group, group) for g in self.grants)

    def may_consume_as(self, group: str) -> bool:
        """Act as consumer ``group`` on some topic (SETTLE of a pull consumer's leases)."""
        return any(g.right == "subscribe" and g.group is not None and glob_matches(g.group, group)
                   for g in self.grants)

    def may_read(self, topic: str = "*") -> bool:
        """Admin views of ``topic`` (``"*"``: everything, e.g. lists and stats)."""
        if topic == "*":
            return any(g.right in ("read", "admin") and g.topic == "*" for g in self.grants)
        return self._any("read", topic) or self._any("admin", topic)

    def may_admin(self, topic: str = "*") -> bool:
        """Admin actions on ``topic`` (``"*"``: users, tokens, anything broker-wide)."""
        if topic == "*":
            return any(g.right == "admin" and g.topic == "*" for g in self.grants)
        return self._any("admin", topic)

    @property
    def any_read(self) -> bool:
        """True if the user may read something through the admin API."""
        return any(g.right in ("read", "admin") for g in self.grants)

    @property
    def any_admin(self) -> bool:
        """True if the user may act on something through the admin API."""
        return any(g.right == "admin" for g in self.grants)


#: Everything allowed: a client of a broker with no users (zero-setup on loopback, or
#: ``--allow-anonymous``).
ALL_RIGHTS = Rights([Grant("publish", "*", "*"), Grant("subscribe", "*", "*"), Grant("admin", "*")])
