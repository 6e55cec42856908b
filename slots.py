"""Booking rules, and the state of each day's slots kept ready to send.

Nothing here knows about HTTP, WebSockets or SQL: the web face calls ``Board``, ``Board`` calls the store,
and every refusal is one ``SlotError`` carrying the sentence the user sees.

A booking is (date, slot). Dates are the club's days, in its time zone; a request that names no date
means today, so the original API keeps working day by day.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date as Date
from datetime import datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from cachetools import LRUCache

from db import Change, Changes, DayRow, Limits, SlotStore


class SlotError(Exception):
    """A booking or cancellation that the rules refuse; ``str(exc)`` is the user-facing message."""


class Forbidden(SlotError):
    """The rules refuse because the member is not an admin."""


@dataclass(frozen=True)
class Rules:
    """The club's booking rules, from the settings."""

    hours: range
    timezone: ZoneInfo
    days_ahead: int = 7
    grace_minutes: int = 30
    max_per_day: int = 0
    max_upcoming: int = 0
    admins: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Day:
    """One day's slots as everyone sees them, encoded once per change."""

    date: str
    version: int
    slots: list[dict[str, Any]]
    available: list[int]
    booked: list[int]
    slots_json: bytes  # body of GET /slots
    update_text: str  # the slots_update message sent on sockets
    event_bytes: bytes  # the same message as a Server-Sent Event, id = version


DATE_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_date(value: Any) -> str:
    """A YYYY-MM-DD string, checked to be a real date; SlotError if it is not."""
    if isinstance(value, str) and DATE_FORMAT.fullmatch(value):
        try:
            return Date.fromisoformat(value).isoformat()
        except ValueError:
            pass
    shown = value if isinstance(value, str) else orjson.dumps(value).decode()
    raise SlotError(f"Invalid date {shown[:32]!r}: use YYYY-MM-DD")


class Board:
    """The rules for changing slots, and each day's state, rebuilt once per change.

    ``GET /slots`` and broadcasts read ready-encoded bytes from here and never touch the database.
    """

    def __init__(self, store: SlotStore, rules: Rules, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.rules = rules
        self.clock = clock
        self.seen = 0  # the newest event id whose change this process has taken in
        self.days: LRUCache[str, Day] = LRUCache(maxsize=64)
        # the club's day last seen: its start and end in UTC, and its date (an empty span until first asked)
        self._span = (datetime.max.replace(tzinfo=timezone.utc), datetime.min.replace(tzinfo=timezone.utc), "")

    # -- time -----------------------------------------------------------------------------------------

    def now(self) -> datetime:
        """The club's wall-clock time (naive, in its time zone)."""
        return self.clock().astimezone(self.rules.timezone).replace(tzinfo=None)

    def today(self) -> str:
        """The club's date. GET /slots asks on every request, so it is worked out again only when the
        clock leaves the day (in UTC bounds) it was last in: a comparison instead of a time-zone lookup."""
        now = self.clock()
        start, end, today = self._span
        if not start <= now < end:
            zone = self.rules.timezone
            day = now.astimezone(zone).date()
            start = datetime.combine(day, time(), zone).astimezone(timezone.utc)
            end = datetime.combine(day + timedelta(days=1), time(), zone).astimezone(timezone.utc)
            today = day.isoformat()
            self._span = (start, end, today)
        return today

    def resolve(self, value: Any) -> str:
        """The date a request names, or today when it names none."""
        return self.today() if value is None else parse_date(value)

    def stamp(self) -> str:
        return self.now().strftime("%Y-%m-%d %H:%M:%S")

    # -- state ----------------------------------------------------------------------------------------

    async def open(self) -> None:
        self.seen = await self.store.open(self.today(), self.stamp())

    async def day(self, date: str) -> Day:
        """The state of one day, from memory when it has not changed."""
        day = self.days.get(date)
        if day is None:
            version, rows = await self.store.day(date)
            day = self._remember(date, version, rows)
        return day

    def _remember(self, date: str, version: int, rows: list[DayRow]) -> Day:
        cached = self.days.get(date)
        if cached is not None and cached.version > version:  # an older read finishing late
            return cached
        taken = {slot_id: (booked_by, booked_at, closed) for slot_id, booked_by, booked_at, closed in rows}
        slots = []
        for hour in self.rules.hours:
            booked_by, booked_at, closed = taken.get(hour, (None, None, 0))
            slots.append({
                "id": hour,
                "start_time": f"{hour:02d}:00",
                "end_time": f"{hour + 1:02d}:00",
                "is_booked": hour in taken and not closed,
                "booked_by": None if closed else booked_by,
                "booked_at": None if closed else booked_at,
                "closed": bool(closed),
                "date": date,
            })
        available = [s["id"] for s in slots if not s["is_booked"] and not s["closed"]]
        booked = [s["id"] for s in slots if s["is_booked"]]
        data = {"slots": slots, "available_slots": available, "booked_slots": booked, "date": date}
        update = orjson.dumps({
            "type": "slots_update",
            "data": {**data, "version": version},
            "timestamp": self.now().isoformat(),
        })
        event = b"id: %d\ndata: %s\n\n" % (version, update)
        day = Day(date, version, slots, available, booked, orjson.dumps(data), update.decode(), event)
        self.days[date] = day
        return day

    async def refresh(self, changes: Changes) -> list[Day]:
        """The new states of the days that other processes (other workers on the same file) changed."""
        self.seen = max(self.seen, changes.version)
        fresh = []
        for date, last in changes.days.items():
            cached = self.days.get(date)
            if cached is None or cached.version < last:
                version, rows = await self.store.day(date)
                fresh.append(self._remember(date, version, rows))
        return fresh

    def _settle(self, date: str, change: Change, refusals: dict[str, str]) -> Day | None:
        """Remember the day a write left behind, then refuse with the sentence for its outcome if not "ok".

        Returns the Day to broadcast, or None when a newer state of that day is already known (and sent).
        """
        current = self.days.get(date)
        day = None
        if current is None or current.version < change.version:
            day = self._remember(date, change.version, change.rows)
        if change.outcome != "ok":
            raise SlotError(refusals[change.outcome].format(booked_by=change.booked_by))
        return day

    # -- rules ----------------------------------------------------------------------------------------

    def is_admin(self, srn: str) -> bool:
        return srn in self.rules.admins

    def _check(self, date: str, slot_id: int, *, for_booking: bool) -> datetime:
        """The slot's start, after checking it exists and its date is in the booking window."""
        if slot_id not in self.rules.hours:
            raise SlotError(f"Slot {slot_id} does not exist")
        today = self.now().date()
        day = Date.fromisoformat(date)
        if day < today:
            raise SlotError(f"{date} is in the past")
        if for_booking and day > today + timedelta(days=self.rules.days_ahead):
            raise SlotError(f"Bookings open {self.rules.days_ahead} days ahead")
        return datetime(day.year, day.month, day.day, slot_id)

    def _limits(self) -> Limits:
        now = self.now()
        return Limits(self.rules.max_per_day, self.rules.max_upcoming, now.date().isoformat(), now.hour)

    async def book(self, date: str, slot_id: int, srn: str, via: str) -> Day | None:
        """Book (date, slot_id) for srn; the new Day to broadcast (None if a newer one already went out)."""
        start = self._check(date, slot_id, for_booking=True)
        if self.now() >= start + timedelta(minutes=self.rules.grace_minutes):
            raise SlotError(f"Slot {slot_id} on {date} has already started")
        change = await self.store.book(date, slot_id, srn, self.stamp(), self._limits(), via)
        return self._settle(date, change, {
            "taken": f"Slot {slot_id} is not available",
            "closed": f"Slot {slot_id} on {date} is closed",
            "per_day": f"Daily limit reached: at most {self.rules.max_per_day} booking(s) per day",
            "upcoming": f"Limit reached: at most {self.rules.max_upcoming} upcoming booking(s)",
        })

    async def cancel(self, date: str, slot_id: int, srn: str, via: str) -> Day | None:
        """Cancel srn's own booking (an admin: anyone's, even after it started)."""
        admin = self.is_admin(srn)
        start = self._check(date, slot_id, for_booking=False)
        if self.now() >= start and not admin:
            raise SlotError(f"Slot {slot_id} on {date} has already started and can no longer be cancelled")
        change = await self.store.cancel(date, slot_id, srn, self.stamp(), via, anyones=admin)
        return self._settle(date, change, {
            "free": f"Slot {slot_id} is not booked",
            "closed": f"Slot {slot_id} on {date} is closed, not booked",
            "other": f"Slot {slot_id} is booked by someone else; you can only cancel your own bookings",
        })

    async def set_closed(self, date: str, slot_id: int, closed: bool, srn: str, via: str) -> Day | None:
        """An admin closes a free slot (nobody can book it) or reopens a closed one."""
        if not self.is_admin(srn):
            raise Forbidden("Admins only")
        self._check(date, slot_id, for_booking=False)
        change = await self.store.set_closed(date, slot_id, closed, srn, self.stamp(), via)
        return self._settle(date, change, {
            "taken": f"Slot {slot_id} on {date} is booked by {{booked_by}}; cancel the booking first",
            "closed": f"Slot {slot_id} on {date} is already closed",
            "open": f"Slot {slot_id} on {date} is not closed",
        })

    async def bookings_of(self, srn: str) -> list[dict[str, Any]]:
        """srn's bookings that have not ended yet, oldest first."""
        now = self.now()
        rows = await self.store.upcoming_of(srn, now.date().isoformat(), now.hour)
        return [
            {"id": slot_id, "start_time": f"{slot_id:02d}:00", "end_time": f"{slot_id + 1:02d}:00",
             "booked_at": booked_at, "date": date}
            for date, slot_id, booked_at in rows
            if slot_id in self.rules.hours
        ]

    async def history(
        self, srn: str, since: str | None, until: str | None, who: str | None, page: int, page_size: int
    ) -> tuple[int, list[dict[str, Any]]]:
        if not self.is_admin(srn):
            raise Forbidden("Admins only")
        return await self.store.history(since, until, who, page_size, (page - 1) * page_size)
