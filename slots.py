"""Booking rules, and the state of each day's slots kept ready to send.

Nothing here knows about HTTP, WebSockets or SQL: the web face calls ``Board``, ``Board`` calls the store,
and every refusal is one ``SlotError`` carrying the sentence the user sees.

A booking is (date, slot). Dates are the club's days, in its time zone; a request that names no date
means today, so the original API keeps working day by day.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Callable, Container
from dataclasses import dataclass, field
from datetime import date as Date
from datetime import datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from cachetools import LRUCache

from db import (Change, Commits, DayRow, FeedRows, Limits, LineLimits, Outcome, SeriesCancel, SeriesPlan,
                SeriesResult, SlotStore, barred, booking_closes, checkin_closes, not_ended, not_started, slot_times)


class SlotError(Exception):
    """A booking or cancellation that the rules refuse; ``str(exc)`` is the user-facing message."""


class Forbidden(SlotError):
    """The rules refuse because the member is not an admin."""


@dataclass(frozen=True)
class Rules:
    """The club's booking rules: app.Settings.rules() fills them from the settings that name a rule (the
    settings declare each one's default, variable and range)."""

    hours: range
    timezone: ZoneInfo
    days_ahead: int
    grace_minutes: int
    max_per_day: int
    max_upcoming: int
    no_show_limit: int
    no_show_window_days: int
    admins: frozenset[str]
    waitlist_per_slot: int
    waitlist_per_member: int
    checkin_opens_minutes: int
    checkin_minutes: int
    checkin_required: bool
    club_name: str
    reminder_minutes: int  # before a booked slot, in members' calendars; 0: no reminder
    membership: str  # "open": any PESU account may take part; "roster": only members on the club's roster


@dataclass(frozen=True)
class Day:
    """One day's slots as everyone sees them, encoded once per change (or once per slot whose booking time
    runs out: ``until``, in UTC, is when the statuses next change by the clock alone)."""

    date: str
    version: int  # the newest event of the database this state includes
    serial: int  # this process's count of states built: orders two states of one version (see ``until``)
    rows: list[DayRow]
    until: datetime | None
    slots: list[dict[str, Any]]
    available: list[int]
    booked: list[int]
    slots_json: bytes  # body of GET /slots
    update_text: str  # the slots_update message sent on sockets
    event_bytes: bytes  # the same message as a Server-Sent Event, id = version

    def newer_than(self, other: Day) -> bool:
        return (self.version, self.serial) > (other.version, other.serial)

    def news_to(self, other: Day) -> bool:
        """Whether a listener holding ``other`` (of the same day) should be sent this: it is newer, and
        it says something else (a re-read of an unchanged day is not news)."""
        return self.newer_than(other) and (self.version != other.version or self.slots_json != other.slots_json)


def times_of(slot_id: int) -> dict[str, str]:
    start, end = slot_times(slot_id)
    return {"start_time": start, "end_time": end}


def describe_slot(day: Day, slot_id: int) -> dict[str, Any]:
    """One slot as GET /now and GET /me tell it: when, who holds it, whether they checked in."""
    slot = next(s for s in day.slots if s["id"] == slot_id)
    return {"date": day.date, "id": slot_id, "start_time": slot["start_time"], "end_time": slot["end_time"],
            "holder": slot["booked_by"], "checked_in": slot["checked_in"]}


DATE_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_date(value: Any) -> str:
    """A YYYY-MM-DD string, checked to be a real date; SlotError if it is not."""
    if isinstance(value, str) and DATE_FORMAT.fullmatch(value) and "1970" <= value[:4] <= "2999":
        try:  # (years outside that range only make date arithmetic overflow)
            return Date.fromisoformat(value).isoformat()
        except ValueError:
            pass
    raise SlotError(f"Invalid date {preview(value)[:32]!r}: use YYYY-MM-DD")


def preview(value: Any) -> str:
    """A request's value for an error message: a string as it is, a number or null as JSON, a list or an
    object only as such (never encoded: one nested a few hundred deep would not even encode)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return "[...]" if isinstance(value, list) else "{...}"
    return orjson.dumps(value).decode()


# series and calendar feeds
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # as a series names them
SERIES_MAX_DAYS = 366  # how far ahead a series may reach
FEED_SECRET_BYTES = 32
FEED_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")  # token_urlsafe(32)
FEED_PAST_DAYS = 30  # bookings shown after their day
FEED_CANCELLED_DAYS = 7  # a cancelled booking stays (STATUS:CANCELLED) this long, so calendars drop it
LAB_FEED_DAYS = 26 * 7  # how far ahead the lab's feed looks
FEED_CACHE_BYTES = 32 * 1024 * 1024  # feeds kept ready, rotated links' included (LRU)
FEED_ENTRY_BYTES = 512  # what a kept feed costs besides its body (its key, ETag, tuples; measured ~450)


@dataclass
class Polled:
    """What Board.poll() found: the new day's state when the club's date changed, bookings released as
    no-shows (date, slot_id, holder, who had it from the waitlist), tokens other processes signed out
    (jti, expires), and (action, srn, date, slot_id) of events to tell a member of; ``error``: the read that
    failed after them (a locked database), if one did."""

    today: Day | None = None
    released: list[tuple[str, int, str, str | None]] = field(default_factory=list)
    signed_out: list[tuple[str, float]] = field(default_factory=list)
    notices: list[tuple[str, str, str, int]] = field(default_factory=list)
    error: Exception | None = None


class Board:
    """The rules for changing slots, and each day's state, rebuilt once per change.

    ``GET /slots`` and broadcasts read ready-encoded bytes from here and never touch the database.
    """

    def __init__(self, store: SlotStore, rules: Rules, clock: Callable[[], datetime],
                 watched: Container[str] = (), on_change: Callable[[Day], None] = lambda day: None) -> None:
        self.store = store
        self.rules = rules
        self.clock = clock
        self.on_change = on_change  # every new state of a day (the app broadcasts it)
        self.admins = frozenset(rules.admins)  # the owners (ADMIN_SRNS) and the admins they granted (poll reloads)
        self.seen = 0  # the newest event id whose change this process has taken in
        self.watched = watched  # the days listeners watch (the hub's count of them)
        self.kept: dict[str, Day] = {}  # today's state and those of watched days
        self.days: LRUCache[str, Day] = LRUCache(maxsize=64)  # other days read lately
        self.serial = 0  # states built so far
        self.notices_pending = False  # this process wrote an event a member is to be told of (see poll)
        self._date = ""  # the club's date poll() last saw
        self._revoked = 0  # the newest signed-out token's id taken in
        self._told = 0  # the newest event id looked at for notices
        # srn -> ((the store's generation, today, hour), body of POST /my-bookings)
        self.bookings: LRUCache[str, tuple[tuple[bytes | None, str, int], bytes]] = LRUCache(maxsize=10_000)
        # secret's hash -> ((the store's generation, today), the feed), at most FEED_CACHE_BYTES in all (an
        # entry's own objects take some 450 bytes besides the body); a feed being built, by secret's hash
        self.feeds: LRUCache[str, tuple[tuple[bytes | None, str], Feed]] = LRUCache(
            maxsize=FEED_CACHE_BYTES, getsizeof=lambda entry: FEED_ENTRY_BYTES + len(entry[1].body))
        self._building: dict[str, tuple[tuple[bytes | None, str], asyncio.Future[Feed | None]]] = {}
        # the club's hour last seen: its start and end in UTC, its date and hour (empty until first asked)
        self._hour = (datetime.max.replace(tzinfo=timezone.utc), datetime.min.replace(tzinfo=timezone.utc), "", 0)

    # -- time --------------------------------------------------------------------------------------

    def now(self) -> datetime:
        """The club's wall-clock time (naive, in its time zone)."""
        return self.clock().astimezone(self.rules.timezone).replace(tzinfo=None)

    def today(self) -> str:
        """The club's date (GET /slots asks on every request: see hour())."""
        return self.hour()[0]

    def hour(self) -> tuple[str, int]:
        """The club's date and hour, worked out again only when the clock leaves the hour (in UTC bounds)
        it was last in: a comparison instead of a time-zone lookup, on every GET /slots and /my-bookings."""
        now = self.clock()
        start, end, date, hour = self._hour
        if not start <= now < end:
            local = now.astimezone(self.rules.timezone)
            start = local.replace(minute=0, second=0, microsecond=0).astimezone(timezone.utc)
            end = start + timedelta(hours=1)
            date, hour = local.date().isoformat(), local.hour
            self._hour = (start, end, date, hour)
        return date, hour

    def resolve(self, value: Any) -> str:
        """The date a request names, or today when it names none."""
        return self.today() if value is None else parse_date(value)

    def stamp(self) -> str:
        """The club's time now as the history records it ("YYYY-MM-DD HH:MM:SS", in its time zone)."""
        return self.now().strftime("%Y-%m-%d %H:%M:%S")

    # -- each day's state, kept ready and handed to on_change --------------------------------------

    async def day(self, date: str) -> Day:
        """The state of one day, from memory when it has not changed."""
        day = self.cached(date)
        if day is None:
            version, rows = await self.store.day(date)
            return self._remember(date, version, rows)
        if day.until is not None and self.clock() >= day.until:
            return self._remember(date, day.version, day.rows)
        return day

    def _remember(self, date: str, version: int, rows: list[DayRow]) -> Day:
        """Keep the newest state of a day, and hand every state that is news to ``on_change``.

        Whatever teaches this process a newer state (its own write, a refused one, a read, another worker's
        change, or the clock) goes through here, so none is kept without being broadcast.
        """
        cached = self.cached(date)
        if cached is not None and cached.version >= version:
            if cached.until is None or self.clock() < cached.until:
                return cached  # nothing new (or an older read finishing late)
            version, rows = cached.version, cached.rows  # the clock moved on: the same rows, new statuses
        day = self._build(date, version, rows)
        self._keep(day)
        self.on_change(day)
        return day

    def cached(self, date: str) -> Day | None:
        return self.kept.get(date) or self.days.get(date)

    def _keep(self, day: Day) -> None:
        """Today and the days listeners watch are kept for as long as that lasts; others in a small LRU,
        so that reading many days can neither grow memory nor push out what members are looking at."""
        if day.date in self.watched or day.date == self.today():
            self.kept[day.date] = day
            self.days.pop(day.date, None)
        else:
            self.days[day.date] = day
            self.kept.pop(day.date, None)

    def expire(self) -> None:
        """Rebuild the remembered days whose statuses the clock has changed (a slot can no longer be booked,
        a day comes into the booking window), so that they are broadcast; days nobody watches any more go
        back to the LRU."""
        now = self.clock()
        for date, day in [*self.kept.items(), *self.days.items()]:
            if day.until is not None and now >= day.until:
                self._remember(date, day.version, day.rows)
            elif date in self.kept and date not in self.watched and date != self.today():
                self._keep(day)

    def _build(self, date: str, version: int, rows: list[DayRow]) -> Day:
        now = self.now()
        day = Date.fromisoformat(date)
        opens = datetime.combine(day - timedelta(days=self.rules.days_ahead), time())  # the window reaches it
        taken = {slot_id: rest for slot_id, *rest in rows}
        slots, changes = [], []
        for hour in self.rules.hours:
            booked_by, booked_at, closed, waiting, checked_in, reason = taken.get(hour, (None, None, 0, 0, 0, None))
            deadline = booking_closes(date, hour, self.rules.grace_minutes)
            if closed:
                status = "closed"
            elif hour in taken:
                status = "booked"
            elif now >= deadline:
                status = "started"
            elif now < opens:
                status, deadline = "not_open", opens
            else:
                status = "available"
            if status in ("available", "not_open"):
                changes.append(deadline)
            slots.append({
                "id": hour,
                **times_of(hour),
                # The original clients offer any slot that is not booked: so is_booked is true for every slot
                # that cannot be booked now, and status says why.
                "is_booked": status != "available",
                "booked_by": booked_by if status == "booked" else None,
                "booked_at": booked_at if status == "booked" else None,
                "closed": bool(closed),
                "reason": reason if closed else None,  # why an admin or a series closed it
                "status": status,
                "waiting": waiting,  # how many wait for it, never who
                "checked_in": bool(checked_in) and status == "booked",
                "date": date,
            })
        available = [s["id"] for s in slots if s["status"] == "available"]
        booked = [s["id"] for s in slots if s["status"] == "booked"]
        data = {"slots": slots, "available_slots": available, "booked_slots": booked, "date": date}
        update = orjson.dumps({
            "type": "slots_update",
            "data": {**data, "version": version},
            "timestamp": now.isoformat(),
        })
        event = b"id: %d\ndata: %s\n\n" % (version, update)
        until = min(changes).replace(tzinfo=self.rules.timezone).astimezone(timezone.utc) if changes else None
        self.serial += 1
        return Day(date, version, self.serial, rows, until, slots, available, booked, orjson.dumps(data),
                   update.decode(), event)

    async def refresh(self, changes: Commits) -> None:
        """Take in the days that other processes (other workers on the same file) changed."""
        self.seen = max(self.seen, changes.version)
        for date, last in changes.days.items():
            cached = self.cached(date)
            if cached is None or cached.version < last:
                version, rows = await self.store.day(date)
                self._remember(date, version, rows)

    def _settle(self, date: str, slot_id: int, change: Change, refusals: dict[Outcome, str]) -> None:
        """Take in the day a write left behind (refused or not), then refuse with the sentence for its
        outcome if it is not "ok" (a closed slot's with the reason it was closed for, if it has one)."""
        self._remember(date, change.version, change.rows)
        if change.outcome != "ok":
            sentence = refusals[change.outcome].format(booked_by=change.booked_by)
            reason = next((row[6] for row in change.rows if row[0] == slot_id and row[3]), None)
            raise SlotError(f"{sentence}: {reason}" if change.outcome == "closed" and reason else sentence)

    # -- housekeeping: what poll() finds for the app -----------------------------------------------

    async def open(self) -> None:
        self.seen = await self.store.open(self.today(), self.stamp())
        await self._load_admins()
        self._date = self.today()
        self._told, _ = await self.store.notices_since(-1)  # the newest event id: tell nobody of the past

    async def poll(self) -> Polled:
        """The board's housekeeping, every WATCH_INTERVAL: the club's midnight, states the clock changed,
        bookings whose check-in was missed, and what other processes (other workers on the same file)
        committed: changed days (broadcast through ``on_change``), signed-out tokens, and the events a
        member is to be told of. A read that fails midway (a locked database) ends the poll with ``error``
        set, and what was found before it is handed over all the same; what it did not reach, the next
        poll finds (each cursor moves only once its read is in hand)."""
        found = Polled()
        try:
            await self._poll(found)
        except Exception as exc:  # (the app logs it; the next poll tries again)
            found.error = exc
        return found

    async def _poll(self, found: Polled) -> None:
        today = self.today()
        if today != self._date:  # first, and on its own, so that what follows is broadcast under the new day
            found.today = await self.day(today)
            self._date = today  # only once the new day's state is in hand: a failed read is tried again
            return
        self.expire()
        if await self.releases_due():
            found.released += await self.release_no_shows()
        changes = await self.store.changes_since(self.seen, self._revoked)
        if changes is not None:
            self._revoked = changes.revoked
            found.signed_out += changes.tokens
            if changes.admins is not None:  # another process granted or revoked the role
                self.admins = frozenset(self.rules.admins) | changes.admins
            await self.refresh(changes)  # each new state goes to on_change
        if changes is not None or self.notices_pending:  # promotions and releases, by any process
            self.notices_pending = False
            self._told, notices = await self.store.notices_since(self._told)  # each event looked at once
            found.notices += notices

    async def revoke_token(self, jti: str, expires: float, now: float) -> None:
        """Record a signed-out session token, so every worker refuses it for the rest of its life."""
        await self.store.revoke(jti, expires, now)

    # -- days, the booking window and limits -------------------------------------------------------

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
        since = (now.date() - timedelta(days=self.rules.no_show_window_days - 1)).isoformat()
        return Limits(self.rules.max_per_day, self.rules.max_upcoming, now.date().isoformat(), now.hour,
                      self.rules.no_show_limit, since, self.rules.membership == "roster", self.admins)

    async def _refuse_standing(self, srn: str, outcome: Outcome) -> None:
        """Forbidden, saying what to do, if a write found srn may not take part ("not_member", "suspended")."""
        if outcome == "not_member":
            raise Forbidden(f"Only {self.rules.club_name} members can book; ask an admin to add {srn}")
        if outcome == "suspended":
            terms = await self.store.suspension(srn)
            until, reason = terms if terms is not None else (None, None)
            raise Forbidden(f"{srn} is suspended " + (f"until {until}" if until else "until an admin lifts it")
                            + (f": {reason}" if reason else ""))

    def _bookable(self, date: str, slot_id: int) -> None:
        """SlotError unless (date, slot_id) may be booked now: it exists, its day is in the window, and it
        began no more than the grace ago."""
        self._check(date, slot_id, for_booking=True)
        if self.now() >= booking_closes(date, slot_id, self.rules.grace_minutes):
            raise SlotError(f"Slot {slot_id} on {date} has already started")

    async def book(self, date: str, slot_id: int, srn: str, via: str, by: str | None = None) -> None:
        """Book (date, slot_id) for srn (the new state goes to ``on_change``); ``by``: the admin who books it
        on their behalf (their limits and standing apply as if they booked it themselves)."""
        self._bookable(date, slot_id)
        if by is not None:
            self.admin_only(by)
        change = await self.store.book(date, slot_id, srn, self.stamp(), self._limits(), via,
                                       None if by is None else f"by {by}")
        await self._refuse_standing(srn, change.outcome)
        if change.outcome == "no_shows":
            raise SlotError(await self._no_show_refusal(srn))
        self._settle(date, slot_id, change, {
            "taken": f"Slot {slot_id} is not available",
            "closed": f"Slot {slot_id} on {date} is closed",
            "per_day": f"Daily limit reached: at most {self.rules.max_per_day} booking(s) per day",
            "upcoming": f"Limit reached: at most {self.rules.max_upcoming} upcoming booking(s)",
        })

    async def cancel(self, date: str, slot_id: int, srn: str, via: str, by: str | None = None) -> str | None:
        """Cancel srn's own booking (an admin: anyone's, even after it started; ``by``: an admin cancelling
        srn's booking on their behalf, filed under srn); the slot goes to the first member in its waitlist
        who may take it, whose SRN is returned."""
        if by is not None:
            self.admin_only(by)
        admin = self.is_admin(srn) or by is not None
        self._check(date, slot_id, for_booking=False)
        now = self.now()
        if not not_started(date, slot_id, now.date().isoformat(), now.hour) and not admin:
            raise SlotError(f"Slot {slot_id} on {date} has already started and can no longer be cancelled")
        bookable = now < booking_closes(date, slot_id, self.rules.grace_minutes)
        change = await self.store.cancel(date, slot_id, srn, self.stamp(), via, anyones=admin and by is None,
                                         limits=self._limits() if bookable else None,
                                         note=None if by is None else f"by {by}")
        self._settle(date, slot_id, change, {
            "free": f"Slot {slot_id} is not booked",
            "closed": f"Slot {slot_id} on {date} is closed, not booked",
            "other": f"Slot {slot_id} is booked by someone else; you can only cancel your own bookings",
        })
        # (the member is told of a promotion, and of an admin's cancellation of their booking)
        self.notices_pending |= change.promoted is not None or change.booked_by != srn or by is not None
        return change.promoted

    async def bookings_body(self, srn: str) -> bytes:
        """The body of POST /my-bookings for srn: their bookings that have not ended yet, oldest first.

        Encoded once, and answered from memory while nothing has been committed to the database since (by
        any process), which the store's generation tells with one memory read: exact across workers, and
        no thread hop. The clock's hour is part of the key, since a booking drops out as it ends.
        """
        key = (self.store.generation_key(), *self.hour())
        cached = self.bookings.get(srn)
        if key[0] is not None and cached is not None and cached[0] == key:
            return cached[1]
        today, hour = key[1], key[2]
        rows, places = await self.store.upcoming_of(srn, today, hour)
        bookings = [
            {"id": slot_id, **times_of(slot_id), "booked_at": booked_at, "date": date}
            for date, slot_id, booked_at in rows
            if slot_id in self.rules.hours
        ]
        waitlist = [
            {"id": slot_id, **times_of(slot_id), "date": date, "position": position}
            for date, slot_id, position in places
        ]
        body = orjson.dumps({"success": True, "bookings": bookings, "total_bookings": len(bookings),
                             "waitlist": waitlist})
        if key[0] is not None:
            self.bookings[srn] = (key, body)  # the version read before the rows: never newer than they are
        return body

    # -- admins ------------------------------------------------------------------------------------

    def is_admin(self, srn: str) -> bool:
        """An owner (ADMIN_SRNS) or an admin they granted: checked on every request, so a revoked admin's
        tokens lose the role at once here, and within a poll (WATCH_INTERVAL) on every other worker."""
        return srn in self.admins

    def owner_only(self, srn: str) -> None:
        """Forbidden (403) unless srn is an owner: one of ADMIN_SRNS."""
        if srn not in self.rules.admins:
            raise Forbidden("Owners only (ADMIN_SRNS)")

    async def _load_admins(self) -> None:
        self.admins = frozenset(self.rules.admins) | {srn for srn, _, _ in await self.store.admins()}

    async def set_admin(self, owner: str, srn: str, admin: bool, via: str) -> None:
        """An owner grants srn the admin role, or revokes it (owners themselves keep it: they are the setting)."""
        self.owner_only(owner)
        if srn in self.rules.admins:
            raise SlotError(f"{srn} is an owner (ADMIN_SRNS): the role comes from the settings")
        changed, granted = await self.store.set_admin(srn, admin, owner, self.stamp(), via)
        self.admins = frozenset(self.rules.admins) | granted  # at once, on this worker
        if not changed:
            raise SlotError(f"{srn} is already an admin" if admin else f"{srn} is not an admin")

    async def admin_list(self, admin: str) -> dict[str, Any]:
        self.admin_only(admin)
        granted = await self.store.admins()
        return {"owners": sorted(self.rules.admins),
                "admins": [{"srn": srn, "granted_by": by, "granted_at": self.with_offset(at)}
                           for srn, by, at in granted]}

    def admin_only(self, srn: str) -> None:
        """Forbidden (403) unless srn is an admin."""
        if not self.is_admin(srn):
            raise Forbidden("Admins only")

    async def set_closed(self, date: str, slot_id: int, closed: bool, srn: str, via: str,
                         reason: str | None = None) -> None:
        """An admin closes a free slot (nobody can book it; ``reason`` is shown to everyone) or reopens a
        closed one."""
        self.admin_only(srn)
        self._check(date, slot_id, for_booking=False)
        change = await self.store.set_closed(date, slot_id, closed, srn, self.stamp(), via, reason)
        self._settle(date, slot_id, change, {
            "taken": f"Slot {slot_id} on {date} is booked by {{booked_by}}; cancel the booking first",
            "closed": f"Slot {slot_id} on {date} is already closed",
            "open": f"Slot {slot_id} on {date} is not closed",
        })

    async def history(
        self, srn: str, since: str | None, until: str | None, who: str | None, page: int, page_size: int,
        action: str | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        self.admin_only(srn)
        total, events = await self.store.history(since, until, who, page_size, (page - 1) * page_size, action)
        return total, [{**event, "at": self.with_offset(event["at"])} for event in events]

    async def forgive_no_show(self, admin: str, srn: str, date: str, slot_id: int, via: str) -> None:
        """An admin forgives a member's no-show: it no longer counts against NO_SHOW_LIMIT."""
        self.admin_only(admin)
        if slot_id not in self.rules.hours:
            raise SlotError(f"Slot {slot_id} does not exist")
        change = await self.store.forgive(srn, date, slot_id, admin, self.stamp(), via)
        self._settle(date, slot_id, change, {"none": f"{srn} has no no-show on slot {slot_id} on {date} to forgive"})

    async def _no_show_refusal(self, srn: str) -> str:
        """The sentence for a member barred by no-shows: how many, and until when."""
        limits = self._limits()
        dates = await self.store.no_shows(srn, limits.no_shows_since)
        if not barred(len(dates), self.rules.no_show_limit):  # forgiven since the refusal: say so, and let them try again
            return "Too many no-shows a moment ago; one was just forgiven, so try again"
        # bookable again once all but limit - 1 of them have left the window
        until = Date.fromisoformat(dates[len(dates) - self.rules.no_show_limit]) + timedelta(
            days=self.rules.no_show_window_days)
        return (f"{len(dates)} no-show(s) in the last {self.rules.no_show_window_days} days: no new bookings "
                f"until {until.isoformat()} (an admin can forgive one)")

    # -- reports (admins only) -----------------------------------------------------------------------

    async def export(self, admin: str, kind: str, since: str, until: str) -> AsyncIterator[list[tuple[Any, ...]]]:
        """An export's rows, a chunk at a time (see SlotStore.export_chunk); the admin is checked before each
        one, so an export of years ends where its admin's role was revoked."""
        self.admin_only(admin)
        if until < since:
            raise SlotError(f"to ({until}) is before from ({since})")

        async def chunks() -> AsyncIterator[list[tuple[Any, ...]]]:
            after: tuple[Any, ...] = ("", 0) if kind == "bookings" else (0,)
            while self.is_admin(admin) and (rows := await self.store.export_chunk(kind, since, until, after)):
                yield rows
                after = rows[-1][:2] if kind == "bookings" else rows[-1][:1]

        return chunks()

    async def usage(self, admin: str, since: str, until: str) -> dict[str, dict[str, int]]:
        self.admin_only(admin)
        if until < since:
            raise SlotError(f"to ({until}) is before from ({since})")
        return await self.store.usage(since, until)

    def with_offset(self, at: str | None) -> str | None:
        """A time as the history writes it (club time), with its UTC offset: "2026-11-24T08:02:11+05:30"."""
        if at is None:
            return None
        try:
            return datetime.fromisoformat(at).replace(tzinfo=self.rules.timezone).isoformat()
        except ValueError:  # (an original database's own format): as it is
            return at

    # -- who may book: the roster and suspensions (admins only) --------------------------------------

    async def change_roster(self, admin: str, srns: list[str], add: bool, via: str) -> list[str]:
        """Add members to the roster, or remove them; the SRNs that changed."""
        self.admin_only(admin)
        return await self.store.change_roster(srns, add, admin, self.stamp(), via)

    async def members(self, admin: str, search: str, page: int, page_size: int) -> tuple[int, list[dict[str, Any]]]:
        self.admin_only(admin)
        total, members = await self.store.members(search, page_size, (page - 1) * page_size)
        return total, [{**member, "added_at": self.with_offset(member["added_at"])} for member in members]

    async def suspend(self, admin: str, srn: str, until: str | None, reason: str | None, via: str, *,
                      cancel_bookings: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Bar srn from booking until ``until`` (a date from tomorrow on) or until lifted. It cancels nothing
        unless asked: (the bookings of theirs that remain, those cancelled) are returned."""
        self.admin_only(admin)
        if self.is_admin(srn):
            raise SlotError(f"{srn} is an admin; admins cannot be suspended")
        if until is not None and until <= self.today():
            raise SlotError(f"until ({until}) must be after today: it is the day bookings open to them again")
        await self.store.suspend(srn, until, reason, admin, self.stamp(), via)
        held = orjson.loads(await self.bookings_body(srn))["bookings"]
        cancelled = []
        if cancel_bookings:
            for booking in held:
                with contextlib.suppress(SlotError):  # (one that began meanwhile stays)
                    await self.cancel(booking["date"], booking["id"], admin, via)
                    cancelled.append(booking)
        return [b for b in held if b not in cancelled], cancelled

    async def unsuspend(self, admin: str, srn: str, via: str) -> None:
        self.admin_only(admin)
        if not await self.store.unsuspend(srn, admin, self.stamp(), via):
            raise SlotError(f"{srn} is not suspended")

    # -- waitlists, check-in, no-shows and who holds the lab now -----------------------------------

    async def join_waitlist(self, date: str, slot_id: int, srn: str, via: str) -> str:
        """Queue srn for a booked slot (a free one is booked for them at once); the sentence to answer."""
        self._bookable(date, slot_id)
        line = LineLimits(self.rules.waitlist_per_slot, self.rules.waitlist_per_member)
        change = await self.store.join_waitlist(date, slot_id, srn, self.stamp(), self._limits(), line, via)
        await self._refuse_standing(srn, change.outcome)
        if change.outcome == "no_shows":
            raise SlotError(await self._no_show_refusal(srn))
        if change.outcome == "booked":
            self._remember(date, change.version, change.rows)
            return f"Slot {slot_id} was free, and is now booked for you"
        self._settle(date, slot_id, change, {
            "own": f"You already hold slot {slot_id} on {date}",
            "closed": f"Slot {slot_id} on {date} is closed",
            "already": f"You are already in line for slot {slot_id} on {date}",
            "full": f"The waitlist for slot {slot_id} on {date} is full ({self.rules.waitlist_per_slot} waiting)",
            "member_full": f"You can wait for at most {self.rules.waitlist_per_member} slots at once",
            "per_day": f"Daily limit reached: at most {self.rules.max_per_day} booking(s) per day",
            "upcoming": f"Limit reached: at most {self.rules.max_upcoming} upcoming booking(s)",
        })
        return f"You are number {change.position} in line for slot {slot_id} on {date}"

    async def leave_waitlist(self, date: str, slot_id: int, srn: str, via: str) -> None:
        """Take srn out of a slot's waitlist."""
        self._check(date, slot_id, for_booking=False)
        change = await self.store.leave_waitlist(date, slot_id, srn, self.stamp(), via)
        self._settle(date, slot_id, change, {"absent": f"You are not in line for slot {slot_id} on {date}"})

    async def check_in(self, date: str, slot_id: int, srn: str, via: str) -> None:
        """The holder checks in, from CHECKIN_OPENS_MINUTES before the start to CHECKIN_MINUTES after it (an
        admin may check anyone in, any time that day)."""
        admin = self.is_admin(srn)
        start = self._check(date, slot_id, for_booking=False)
        opens = start - timedelta(minutes=self.rules.checkin_opens_minutes)
        slot = next(s for s in (await self.day(date)).slots if s["id"] == slot_id)
        closes = self._checkin_closes(slot)
        now = self.now()
        if admin and date != now.date().isoformat():
            raise SlotError(f"Check-in is for the slot's own day ({date})")
        if not admin and now < opens:
            raise SlotError(f"Check-in for slot {slot_id} on {date} opens at {opens:%H:%M}")
        if not admin and now >= closes:
            raise SlotError(f"Check-in for slot {slot_id} on {date} closed at {closes:%H:%M}")
        change = await self.store.check_in(date, slot_id, srn, self.stamp(), via, anyones=admin,
                                           limits=self._limits())
        await self._refuse_standing(srn, change.outcome)
        self._settle(date, slot_id, change, {
            "free": f"Slot {slot_id} on {date} is not booked",
            "closed": f"Slot {slot_id} on {date} is closed",
            "other": f"Slot {slot_id} on {date} is booked by someone else",
            "already": f"Slot {slot_id} on {date} is already checked in",
        })

    def _checkin_closes(self, slot: dict[str, Any]) -> datetime:
        """When a booking's check-in closes: CHECKIN_MINUTES after the later of its start and the moment it was
        made, to the second (a booking made, or handed on from the waitlist, after the start has a window of
        its own). db.checkin_closes is the twin of the SQL that releases it."""
        return checkin_closes(slot["date"], slot["id"], slot["booked_at"], self.rules.checkin_minutes)

    async def releases_due(self) -> bool:
        """Whether a booking of today has passed its check-in deadline unchecked (from memory, once today
        has been read: after a restart, that read finds what the restart missed)."""
        if not self.rules.checkin_required:
            return False
        day = await self.day(self.today())
        now = self.now()
        return any(slot["status"] == "booked" and not slot["checked_in"] and now >= self._checkin_closes(slot)
                   for slot in day.slots)

    async def release_no_shows(self) -> list[tuple[str, int, str, str | None]]:
        """Release today's bookings whose holders did not check in in time (see SlotStore.release_no_shows);
        each day changed is taken in and broadcast."""
        now = self.now()
        today = now.date().isoformat()
        second = now.hour * 3600 + now.minute * 60 + now.second
        released = await self.store.release_no_shows(today, second, self.rules.checkin_minutes,
                                                     self.rules.grace_minutes, self.stamp(), self._limits())
        if released:
            self.notices_pending = True
            version, rows = await self.store.day(today)
            self._remember(today, version, rows)
        return released

    async def current(self) -> dict[str, Any]:
        """GET /now: the slot under way (None between slots) and the next one, each with its holder and
        whether they checked in; from memory (each day's state is kept ready)."""
        now = self.now()
        today = await self.day(self.today())
        today_date = now.date().isoformat()
        later = [hour for hour in self.rules.hours if not_started(today_date, hour, today_date, now.hour)]
        if later:
            upcoming, following = today, later[0]
        else:  # the day's slots are over: tomorrow's first
            upcoming, following = await self.day((now.date() + timedelta(days=1)).isoformat()), self.rules.hours[0]
        return {"now": now.replace(tzinfo=self.rules.timezone).isoformat(timespec="seconds"),
                "current": describe_slot(today, now.hour) if now.hour in self.rules.hours else None,
                "next": describe_slot(upcoming, following)}

    async def leave_early(self, date: str, slot_id: int, srn: str, via: str) -> str | None:
        """The holder gives up the slot under way: the rest of it goes to the first in its line who may take
        it (whose SRN is returned), or it is free, bookable while the grace allows."""
        self._check(date, slot_id, for_booking=False)
        now = self.now()
        today = now.date().isoformat()
        if not_started(date, slot_id, today, now.hour) or not not_ended(date, slot_id, today, now.hour):
            raise SlotError(f"Slot {slot_id} on {date} is not under way: cancel a booking before it starts")
        change = await self.store.cancel(date, slot_id, srn, self.stamp(), via, anyones=False,
                                         limits=self._limits(), note="left early")
        self._settle(date, slot_id, change, {
            "free": f"Slot {slot_id} is not booked",
            "closed": f"Slot {slot_id} on {date} is closed, not booked",
            "other": f"Slot {slot_id} is booked by someone else; you can only leave your own",
        })
        self.notices_pending |= change.promoted is not None
        return change.promoted

    async def lately(self, srn: str) -> list[dict[str, Any]]:
        """What happened to srn's bookings in the last FEED_CANCELLED_DAYS that they did not do themselves
        (promotions, releases, admins' cancellations), newest first, at most ten: for /me."""
        since = (self.now() - timedelta(days=FEED_CANCELLED_DAYS)).strftime("%Y-%m-%d %H:%M:%S")
        return [{"action": action, "at": self.with_offset(at), "date": date, "slot_id": slot_id, "by": by}
                for action, at, date, slot_id, by in await self.store.happened_to(srn, since)]

    async def next_booking(self, srn: str, current: dict[str, Any] | None) -> dict[str, Any] | None:
        """srn's next booking that has not ended, besides ``current`` (the slot under way, when they hold it)."""
        for booking in orjson.loads(await self.bookings_body(srn))["bookings"]:
            if current is None or (booking["date"], booking["id"]) != (current["date"], current["id"]):
                return booking
        return None

    # -- series ------------------------------------------------------------------------------------

    async def add_series(self, admin: str, action: str, srn: str | None, slots: list[int], weekdays: list[str],
                         first: str, last: str, title: str | None, via: str, *, dry_run: bool) -> SeriesResult:
        """An admin closes (or reserves for srn) the same slots on chosen weekdays from ``first`` to ``last``:
        any date from today on, the booking window aside; a member's booking is a conflict and stays theirs.
        Each day it changes is broadcast."""
        self.admin_only(admin)
        for slot_id in slots:
            if slot_id not in self.rules.hours:
                raise SlotError(f"Slot {slot_id} does not exist")
        now = self.now()
        start, end = Date.fromisoformat(first), Date.fromisoformat(last)
        if start < now.date():
            raise SlotError(f"{first} is in the past")
        if end < start:
            raise SlotError(f"until ({last}) is before from ({first})")
        if end > now.date() + timedelta(days=SERIES_MAX_DAYS):
            raise SlotError(f"A series may reach at most {SERIES_MAX_DAYS} days ahead")
        chosen = {WEEKDAYS.index(day) for day in weekdays}
        dates = [start + timedelta(days=n) for n in range((end - start).days + 1)]
        pairs = [(day.isoformat(), slot_id) for day in dates if day.weekday() in chosen for slot_id in slots]
        if not pairs:
            raise SlotError(f"No {', '.join(weekdays)} from {first} until {last}")
        plan = SeriesPlan(action, srn, slots, weekdays, first, last, title, pairs, (now.date().isoformat(), now.hour))
        result = await self.store.add_series(plan, admin, self.stamp(), via, dry_run=dry_run)
        if not dry_run:  # (a dry run's days are what would have been: never kept, never broadcast)
            await self._remember_all(result.version, result.days)
        return result

    async def cancel_series(self, admin: str, series: int, via: str) -> SeriesCancel:
        """An admin cancels what is left of a series: its slots that have not started are freed (a reserved
        one handed to the first in its waitlist who may take it), and each day broadcast."""
        self.admin_only(admin)
        result = await self.store.cancel_series(series, admin, self.stamp(), via, self._limits())
        if result.outcome != "ok":
            raise SlotError(f"Series {series} " + ("does not exist" if result.outcome == "none" else
                                                   "is already cancelled"))
        self.notices_pending |= bool(result.promoted) or bool(result.freed)
        await self._remember_all(result.version, result.days)
        return result

    async def series_list(self, admin: str) -> list[dict[str, Any]]:
        self.admin_only(admin)
        today, hour = self.hour()
        return [{**series, "created_at": self.with_offset(series["created_at"]),
                 "cancelled_at": self.with_offset(series["cancelled_at"])}
                for series in await self.store.series_list(today, hour)]

    async def _remember_all(self, version: int, days: dict[str, list[DayRow]]) -> None:
        """Take in (and broadcast) many days a write changed, letting the loop breathe between them."""
        for n, (date, rows) in enumerate(days.items()):
            self._remember(date, version, rows)
            if n % 8 == 7:
                await asyncio.sleep(0)

    # -- calendar feeds ----------------------------------------------------------------------------

    async def link_calendar(self, srn: str, kind: str) -> str:
        """A new secret for srn's calendar feed (``kind`` "member", or "lab" for admins); any older link to
        that feed stops working. Only its hash is stored."""
        if kind == "lab":
            self.admin_only(srn)
        secret = secrets.token_urlsafe(FEED_SECRET_BYTES)
        linked = await self.store.link_calendar(srn, kind, feed_hash(secret), self.stamp(), self._limits())
        if isinstance(linked, str):
            await self._refuse_standing(srn, linked)
        return secret

    async def unlink_calendar(self, srn: str, kind: str) -> bool:
        """Remove srn's link to that feed; whether there was one."""
        return await self.store.link_calendar(srn, kind, None, self.stamp())

    async def feed(self, secret: str) -> Feed | None:
        """The iCalendar feed a secret opens, or None. Encoded once, and answered from memory while nothing
        has been committed since (the store's generation: see bookings_body) and the day is the same;
        requests that arrive while it is being built wait for that one build. Only real feeds are kept:
        a guessed secret costs one indexed read, and never pushes a member's feed out of memory."""
        if not FEED_SECRET.fullmatch(secret):
            return None
        key = (self.store.generation_key(), self.today())
        digest = feed_hash(secret)
        cached = self.feeds.get(digest)
        if key[0] is not None and cached is not None and cached[0] == key:
            return cached[1]
        building = self._building.get(digest)
        if building is None or building[0] != key:
            task = asyncio.ensure_future(self._build_feed(digest, key))
            self._building[digest] = (key, task)
            task.add_done_callback(lambda _: self._building.pop(digest, None)
                                   if self._building.get(digest, (None, None))[1] is task else None)
            building = (key, task)
        return await asyncio.shield(building[1])  # one caller going away leaves the build to the rest

    async def _build_feed(self, digest: str, key: tuple[bytes | None, str]) -> Feed | None:
        today = Date.fromisoformat(key[1])
        since = (today - timedelta(days=FEED_PAST_DAYS)).isoformat()
        until = (today + timedelta(days=LAB_FEED_DAYS)).isoformat()
        removed_since = (today - timedelta(days=FEED_CANCELLED_DAYS)).isoformat()
        rows = await self.store.feed(digest, since, key[1], until, removed_since)
        if rows is None or (rows.kind == "lab" and not self.is_admin(rows.srn)):
            self.feeds.pop(digest, None)  # a rotated or removed link's feed goes at once
            return None
        # in a thread: the lab's feed after a term of series is some 2000 events, 50 ms of work
        body = await asyncio.to_thread(render_feed, rows, self.rules, since)
        result = Feed(body, f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"')
        if key[0] is not None:
            with contextlib.suppress(ValueError):  # (one feed bigger than the whole cache is not kept)
                self.feeds[digest] = (key, result)
        return result


# -- calendar feeds (iCalendar, RFC 5545) ---------------------------------------------------------------------


def feed_hash(secret: str) -> str:
    """What is stored of a feed's secret: a 256-bit random secret needs no slow hash."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Feed:
    body: bytes
    etag: str


ICS_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f]")  # not allowed in a TEXT value (newlines are escaped)


def ics_text(value: str) -> str:
    """A TEXT value, escaped (RFC 5545, 3.3.11): an SRN as PESU sent it cannot start a line of its own."""
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    return ICS_CONTROLS.sub("", value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
                            .replace("\n", "\\n"))


def fold(line: str) -> bytes:
    """One content line, folded at 75 octets (never inside a UTF-8 character), ending in CRLF."""
    data = line.encode()
    if len(data) <= 75:
        return data + b"\r\n"
    parts, start, width = [], 0, 75
    while start < len(data):
        end = min(start + width, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation byte: cut before its character
            end -= 1
        parts.append(data[start:end])
        start, width = end, 74  # a continued line starts with a space
    return b"\r\n ".join(parts) + b"\r\n"


def ics_utc(stamp: str | None, fallback: datetime, zone: ZoneInfo) -> str:
    """A stored club-time stamp ("YYYY-MM-DD HH:MM:SS") as a UTC DATE-TIME; ``fallback`` if unreadable."""
    try:
        local = datetime.fromisoformat(stamp or "").replace(tzinfo=None)
    except ValueError:
        local = fallback
    return local.replace(tzinfo=zone).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _offset(delta: timedelta | None) -> str:
    seconds = int((delta or timedelta()).total_seconds())
    sign, seconds = ("-" if seconds < 0 else "+"), abs(seconds)
    text = f"{sign}{seconds // 3600:02d}{seconds % 3600 // 60:02d}"
    return text + (f"{seconds % 60:02d}" if seconds % 60 else "")


@functools.lru_cache(maxsize=16)
def vtimezone(zone: ZoneInfo, first_year: int, last_year: int) -> tuple[str, ...]:
    """A VTIMEZONE for the zone, exact over these years: the offset in force on 1 January of the first,
    then every change of offset (found by day, then to the second) until the end of the last."""
    def at(ts: int) -> datetime:
        return datetime.fromtimestamp(ts, zone)

    def offset(ts: int) -> timedelta:
        return at(ts).utcoffset() or timedelta()

    begin = int(datetime(first_year, 1, 1, tzinfo=zone).timestamp())
    end = int(datetime(last_year + 1, 1, 1, tzinfo=zone).timestamp())
    changes = []  # (the first second of a new offset, the offset before, the offset after)
    previous, current = begin, offset(begin)
    for ts in range(begin + 86400, end + 86400, 86400):
        if offset(ts) != current:
            low, high = previous, ts  # the offset changes in (low, high]
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if offset(middle) == current else (low, middle)
            changes.append((high, current, offset(high)))
            current = offset(ts)
        previous = ts

    def observance(kind: str, ts: int, before: timedelta, after: timedelta) -> list[str]:
        local_start = datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None) + before  # as clocks read then
        return [f"BEGIN:{kind}", f"DTSTART:{local_start:%Y%m%dT%H%M%S}", f"TZOFFSETFROM:{_offset(before)}",
                f"TZOFFSETTO:{_offset(after)}", f"TZNAME:{ics_text(at(ts).tzname() or 'local')}", f"END:{kind}"]

    # DAYLIGHT is the later of two offsets (Dublin's summer too, which the tz database counts as standard
    # time); the year's first observance is the other kind from the first change
    first = "DAYLIGHT" if changes and changes[0][2] < changes[0][1] else "STANDARD"
    lines = ["BEGIN:VTIMEZONE", f"TZID:{zone.key}", *observance(first, begin, offset(begin), offset(begin))]
    for ts, before, after in changes:
        lines += observance("DAYLIGHT" if after > before else "STANDARD", ts, before, after)
    return (*lines, "END:VTIMEZONE")


def render_feed(rows: FeedRows, rules: Rules, since: str) -> bytes:
    """An iCalendar (RFC 5545) feed: one VEVENT per (date, slot), its UID stable through every change of it
    (a waitlist place that becomes a booking, a booking cancelled), times in the club's zone. Each change
    of the slot is a revision (SEQUENCE, and DTSTAMP its time): what calendar apps compare to update."""
    zone, club, kind = rules.timezone, rules.club_name, rows.kind
    owner = "lab" if kind == "lab" else hashlib.sha256(rows.srn.encode()).hexdigest()[:12]
    events: dict[tuple[str, int], list[str]] = {}

    def event(date: str, slot_id: int, made: str | None, status: str, summary: str, description: str) -> None:
        start = datetime.combine(Date.fromisoformat(date), time(slot_id))
        sequence, changed = rows.revisions.get((date, slot_id), (0, made))
        stamp = ics_utc(changed, start, zone)
        lines = ["BEGIN:VEVENT", f"UID:{date}-slot{slot_id:02d}-{owner}@rero-slots", f"DTSTAMP:{stamp}",
                 f"LAST-MODIFIED:{stamp}", f"SEQUENCE:{sequence}", f"DTSTART;TZID={zone.key}:{start:%Y%m%dT%H%M%S}",
                 f"DTEND;TZID={zone.key}:{start + timedelta(hours=1):%Y%m%dT%H%M%S}",
                 f"SUMMARY:{ics_text(summary)}", f"DESCRIPTION:{ics_text(description)}",
                 f"LOCATION:{ics_text(club)}", f"STATUS:{status}",
                 f"TRANSP:{'OPAQUE' if status == 'CONFIRMED' else 'TRANSPARENT'}"]  # only a held slot is busy
        if status == "CONFIRMED" and kind == "member" and rules.reminder_minutes:
            lines += ["BEGIN:VALARM", "ACTION:DISPLAY", f"DESCRIPTION:{ics_text(summary)}",
                      f"TRIGGER:-PT{rules.reminder_minutes}M", "END:VALARM"]
        events[(date, slot_id)] = [*lines, "END:VEVENT"]

    def when(slot_id: int) -> str:
        return "slot {}-{}".format(*slot_times(slot_id))

    for date, slot_id, holder, booked_at, closed, series, title in rows.held:
        named = f" ({title})" if title else ""
        if kind == "member":
            reserved = " reserved for you by an admin" if series else ""
            event(date, slot_id, booked_at, "CONFIRMED", f"{club}: {when(slot_id)}{named}",
                  f"Your booking of {when(slot_id)} on {date}{reserved}.")
        elif closed:
            event(date, slot_id, booked_at, "CONFIRMED", f"{club}: {when(slot_id)} closed{named}",
                  f"{when(slot_id).capitalize()} on {date} is closed" + (f" (series {series})" if series else "") + ".")
        else:
            who = holder or "a member"
            event(date, slot_id, booked_at, "CONFIRMED", f"{club}: {when(slot_id)} booked by {who}{named}",
                  f"{when(slot_id).capitalize()} on {date} is booked by {who}"
                  + (f" (reserved by series {series})" if series else "") + ".")
    for date, slot_id, position, joined_at in rows.places:
        if (date, slot_id) not in events:
            event(date, slot_id, joined_at, "TENTATIVE",
                  f"{club}: {when(slot_id)}, waiting (number {position} in line)",
                  f"You are number {position} in line for {when(slot_id)} on {date}; it is yours if it comes free.")
    for date, slot_id, at in rows.removed:
        if (date, slot_id) not in events:
            event(date, slot_id, at, "CANCELLED", f"{club}: {when(slot_id)} (cancelled)",
                  f"{when(slot_id).capitalize()} on {date} is no longer "
                  + ("yours." if kind == "member" else "booked or closed."))
    name = f"{club}: my slots" if kind == "member" else f"{club}: all slots"
    years = [int(date[:4]) for date, _ in events] + [int(since[:4])]
    # (no METHOD: a subscribed feed is not a scheduling message, and DTSTAMP then means "last revised")
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", f"PRODID:-//rero-slots//{ics_text(club)}//EN", "CALSCALE:GREGORIAN",
             f"NAME:{ics_text(name)}", f"X-WR-CALNAME:{ics_text(name)}", f"X-WR-TIMEZONE:{zone.key}",
             "REFRESH-INTERVAL;VALUE=DURATION:PT1H", "X-PUBLISHED-TTL:PT1H",
             *vtimezone(zone, min(years), max(years))]
    for key in sorted(events):
        lines += events[key]
    lines.append("END:VCALENDAR")
    return b"".join(fold(line) for line in lines)
