"""The delivery record of a webhook: which messages were delivered, when, after how many
attempts — bounded, kept in memory, saved in pages off the delivery path.

How this works
--------------
One :class:`DeliveryRecord` per message the webhook attempted: attempts, state
(``in_flight``, ``retrying``, ``delivered``, ``dead_lettered``), the last HTTP status or
error, and the times of the first attempt, the last attempt and the delivery (ms).

Records live in *pages* of ``page_size``; a record created or updated moves to the
newest page, so pages are ordered by last update. When there are more than ``pages``
pages the oldest page is dropped with its records: at most ``page_size * pages`` records
(10,500 by default) are kept, the most recently updated ones. ``take_changes`` returns
the pages changed since the last call (and those dropped): the owner writes them to the
engine's settings every few seconds, one value per page, so a busy webhook rewrites a
page or two per save, never one value per message, and nothing is written while a
message is delivered. After a restart ``load`` rebuilds the record from the saved pages;
what changed in the last few seconds before a crash is missing (the broker's own view of
the message, from its group, still answers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_PAGES", "DEFAULT_PAGE_SIZE", "DeliveryLog", "DeliveryRecord"]

DEFAULT_PAGE_SIZE = 500
DEFAULT_PAGES = 21
#: Characters of an error (or of the endpoint's response) kept in a record.
ERROR_CHARS = 200

_STATES = ("in_flight", "retrying", "delivered", "dead_lettered")


@dataclass(slots=True)
class DeliveryRecord:
    """What happened to one message of a webhook (times in ms since the epoch)."""

    msg_id: str
    attempts: int = 0
    state: str = "in_flight"
    last_status: int | None = None
    last_error: str | None = None
    first_attempt_at: int = 0
    last_attempt_at: int = 0
    delivered_at: int | None = None
    page: int = -1

    def to_row(self) -> list[Any]:
        return [self.msg_id, self.attempts, _STATES.index(self.state), self.last_status, self.last_error,
                self.first_attempt_at, self.last_attempt_at, self.delivered_at]

    @classmethod
    def from_row(cls, row: list[Any], page: int) -> DeliveryRecord:
        return cls(row[0], row[1], _STATES[row[2]], row[3], row[4], row[5], row[6], row[7], page)

    def public(self) -> dict[str, Any]:
        """The record as the admin API shows it."""
        return {
            "msg_id": self.msg_id, "state": self.state, "delivered": self.state == "delivered",
            "attempts": self.attempts, "last_status": self.last_status, "last_error": self.last_error,
            "first_attempt_at": self.first_attempt_at, "last_attempt_at": self.last_attempt_at,
            "delivered_at": self.delivered_at,
        }


class DeliveryLog:
    """The bounded delivery record of one webhook (see the module docstring)."""

    def __init__(self, *, page_size: int = DEFAULT_PAGE_SIZE, pages: int = DEFAULT_PAGES) -> None:
        self.page_size = page_size
        self.max_pages = pages
        self.records: dict[str, DeliveryRecord] = {}
        self._pages: dict[int, dict[str, None]] = {}  # page -> its msg_ids (an ordered set)
        self._newest = 0
        self._dirty: set[int] = set()
        self._dropped: set[int] = set()

    def get(self, msg_id: str) -> DeliveryRecord | None:
        """The record of ``msg_id``, if kept."""
        return self.records.get(msg_id)

    def _touch(self, rec: DeliveryRecord) -> None:
        """Move ``rec`` to the newest page (a new one when full); drop the oldest pages."""
        if rec.page == self._newest and rec.page in self._pages:
            self._dirty.add(rec.page)
            return
        if rec.page >= 0:
            old = self._pages.get(rec.page)
            if old is not None:
                old.pop(rec.msg_id, None)
                self._dirty.add(rec.page)
        page = self._pages.get(self._newest)
        if page is None:
            page = self._pages[self._newest] = {}
        elif len(page) >= self.page_size:
            self._newest += 1
            page = self._pages[self._newest] = {}
        page[rec.msg_id] = None
        rec.page = self._newest
        self._dirty.add(self._newest)
        self._trim()

    def _trim(self) -> None:
        """Drop the oldest pages, with their records, past ``max_pages``."""
        while len(self._pages) > self.max_pages:
            oldest = min(self._pages)
            for msg_id in self._pages.pop(oldest):
                self.records.pop(msg_id, None)
            self._dirty.discard(oldest)
            self._dropped.add(oldest)

    def attempt_started(self, msg_id: str, reconsume_times: int, now_ms: int) -> DeliveryRecord:
        """An attempt of ``msg_id`` begins (``reconsume_times``: the broker's count of its
        earlier failed deliveries, which also survives a lost record)."""
        rec = self.records.get(msg_id)
        if rec is None:
            rec = self.records[msg_id] = DeliveryRecord(msg_id, first_attempt_at=now_ms)
        rec.attempts = max(rec.attempts + 1, reconsume_times + 1)
        rec.state = "in_flight"
        rec.last_attempt_at = now_ms
        self._touch(rec)
        return rec

    def attempt_finished(self, rec: DeliveryRecord, *, ok: bool, status: int | None, error: str | None,
                         last_allowed: bool, now_ms: int) -> None:
        """The attempt's result; ``last_allowed``: a failure dead-letters the message."""
        rec.last_status = status
        rec.last_error = error[:ERROR_CHARS] if error else None
        if ok:
            rec.state = "delivered"
            rec.delivered_at = now_ms
        else:
            rec.state = "dead_lettered" if last_allowed else "retrying"
        if self.records.get(rec.msg_id) is rec:  # (not dropped meanwhile)
            self._touch(rec)

    def take_changes(self) -> dict[int, list[list[Any]] | None]:
        """Pages changed since the last call: page -> its rows, or None for a dropped page."""
        out: dict[int, list[list[Any]] | None] = dict.fromkeys(self._dropped)
        for p in self._dirty:
            ids = self._pages.get(p)
            if ids is not None:
                out[p] = [self.records[m].to_row() for m in ids]
        self._dirty.clear()
        self._dropped.clear()
        return out

    def load(self, pages: dict[int, list[list[Any]]]) -> None:
        """Rebuild from saved pages (as ``take_changes`` returned them)."""
        for p in sorted(pages):
            ids = self._pages.setdefault(p, {})
            for row in pages[p]:
                rec = DeliveryRecord.from_row(row, p)
                prev = self.records.get(rec.msg_id)
                if prev is not None:  # saved on two pages (a crash between their saves)
                    self._pages[prev.page].pop(rec.msg_id, None)
                self.records[rec.msg_id] = rec
                ids[rec.msg_id] = None
            self._newest = max(self._newest, p)
        self._trim()
