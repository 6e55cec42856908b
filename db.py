"""The SQLite slot store: the only module that speaks SQL.

One connection on one worker thread owns every read and write, so the event loop never waits on the disk
and writes from this process are serialized (datasette's pattern). Writes from other processes on the same
file are serialized by SQLite: every change runs inside ``BEGIN IMMEDIATE``, which takes the write lock
before the first read, so "is it free, is the member under their limits?" and "book it" can never be split
by another writer. The primary key (date, slot_id) makes a double booking impossible even so.

Every change also appends a row to ``events``: the admin's history, and the feed from which other worker
processes learn which days changed. The newest event id is the state's ``version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date as Date
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import orjson

T = TypeVar("T")
logger = logging.getLogger("rero")

SCHEMA_VERSION = 2

SCHEMA = """
-- The original system's table, kept as it was so its databases open, now only the slots' definitions.
CREATE TABLE IF NOT EXISTS slots (
    id INTEGER PRIMARY KEY,
    start_time TEXT NOT NULL,
    end_time TEXT NOT NULL,
    is_booked BOOLEAN DEFAULT FALSE,
    booked_by TEXT DEFAULT NULL,
    booked_at DATETIME DEFAULT NULL,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    updated_at DATETIME DEFAULT CURRENT_TIMESTAMP
);
-- One row per booked or closed (date, slot). booked_by is an SRN, or NULL for a closed slot (or a
-- booking migrated from before the original system tracked users).
CREATE TABLE IF NOT EXISTS bookings (
    date TEXT NOT NULL,
    slot_id INTEGER NOT NULL,
    booked_by TEXT,
    booked_at TEXT NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (date, slot_id)
);
CREATE INDEX IF NOT EXISTS bookings_by_member ON bookings (booked_by, date);
-- Members waiting for a booked slot, in order of id: the first who may take it gets it when it frees up.
CREATE TABLE IF NOT EXISTS waitlist (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    date TEXT NOT NULL,
    slot_id INTEGER NOT NULL,
    srn TEXT NOT NULL,
    joined_at TEXT NOT NULL,
    UNIQUE (date, slot_id, srn)
);
CREATE INDEX IF NOT EXISTS waitlist_by_member ON waitlist (srn, date);
-- Append-only history of every change.
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    srn TEXT,
    action TEXT NOT NULL,
    date TEXT,
    slot_id INTEGER,
    via TEXT NOT NULL,
    note TEXT
);
-- Reads of the history that stay as cheap however long it grows: a (date, slot)'s changes (or a date
-- range's), one member's, and the notes that name a member or an event ("booked by X", "no-show 42").
-- (No semicolon in these comments: the schema is split on them.)
CREATE INDEX IF NOT EXISTS events_by_slot ON events (date, slot_id);
CREATE INDEX IF NOT EXISTS events_by_member ON events (srn, date, slot_id);
CREATE INDEX IF NOT EXISTS events_by_note ON events (note) WHERE note IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- Session tokens signed out before they expired (a token's random id, never the token itself), so
-- every worker refuses them. Rows go once the token would have expired anyway.
CREATE TABLE IF NOT EXISTS revoked_tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- only grows, so other workers can read "what is new"
    jti TEXT NOT NULL UNIQUE,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS revoked_by_expiry ON revoked_tokens (expires);
-- The login guard's state (failed guesses per username and address, per-address buckets), shared by every
-- worker, and forgotten once expired. Never a password: keys are usernames and addresses.
CREATE TABLE IF NOT EXISTS guard (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS guard_by_expiry ON guard (expires);
-- Admins' recurring closures and reservations (POST /admin/series): the same slots on chosen weekdays
-- between two dates. Their rows in bookings carry the series id, so cancelling it removes exactly those.
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,  -- close | reserve
    srn TEXT,  -- whom a reserve holds the slots for
    slots TEXT NOT NULL,  -- JSON, e.g. [14, 15]
    weekdays TEXT NOT NULL,  -- JSON, e.g. ["tue"]
    first TEXT NOT NULL,
    last TEXT NOT NULL,
    title TEXT,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    cancelled_by TEXT,
    cancelled_at TEXT
);
-- Private calendar feeds: a member's own (kind 'member') or an admin's view of the lab ('lab'). Only the
-- SHA-256 of a feed's secret is kept, so the database alone opens no feed.
CREATE TABLE IF NOT EXISTS calendar_links (
    secret_hash TEXT PRIMARY KEY,
    srn TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (srn, kind)
) WITHOUT ROWID;
-- The club's roster: with MEMBERSHIP=roster only these members (and admins) may book, wait, check in or link
-- a feed. Changed by admins at run time, each change an event.
CREATE TABLE IF NOT EXISTS members (
    srn TEXT PRIMARY KEY,
    added_by TEXT NOT NULL,
    added_at TEXT NOT NULL
) WITHOUT ROWID;
-- Admins granted at run time by an owner (ADMIN_SRNS, who are admins always and are never listed here).
CREATE TABLE IF NOT EXISTS admins (
    srn TEXT PRIMARY KEY,
    granted_by TEXT NOT NULL,
    granted_at TEXT NOT NULL
) WITHOUT ROWID;
-- Members an admin suspended (in either membership mode): barred from booking until ``until`` (the day
-- bookings open again to them), or until lifted when it is NULL.
CREATE TABLE IF NOT EXISTS suspensions (
    srn TEXT PRIMARY KEY,
    until TEXT,
    reason TEXT,
    suspended_by TEXT NOT NULL,
    suspended_at TEXT NOT NULL
) WITHOUT ROWID
"""
# Columns added since a table was first created: added to older databases when they are opened.
ADDED_COLUMNS = (
    ("slots", "booked_by", "TEXT DEFAULT NULL"),  # a database from before the original tracked users
    ("bookings", "checked_in", "INTEGER NOT NULL DEFAULT 0"),
    ("bookings", "series", "INTEGER"),  # the series that closed or reserved the slot
    ("events", "series", "INTEGER"),
    ("bookings", "reason", "TEXT"),  # why an admin closed the slot (a series' closures: its title)
)

# (slot_id, booked_by, booked_at, closed, waiting, checked_in, reason) for the slots of one day that are booked or
# closed (reason: why a closed one is closed, or None)
DayRow = tuple[int, str | None, str, int, int, int, str | None]
# (date, slot_id, position in line) of a member's places in waitlists
Place = tuple[str, int, int]


# -- the booking rules: each once, in SQL where it must hold under concurrency, with its Python twin ------
#
# Every rule below is written once. Where both SQL (which decides, so any number of workers agree) and
# Python (which answers from memory) need it, the Python function is the SQL fragment's twin, and a test
# ("rules and their twins" in test_app.py) holds the two to the same answers on the minute before, at and
# after each boundary.

# A slot relative to the club's current hour; each takes (today, today, the hour's slot_id) as parameters.
NOT_ENDED = "(date > ? OR (date = ? AND slot_id >= ?))"  # the hour's own slot has not ended yet
NOT_STARTED = "(date > ? OR (date = ? AND slot_id > ?))"  # later than the hour's own slot, which has begun


def not_ended(date: str, slot_id: int, today: str, hour: int) -> bool:
    """NOT_ENDED's twin: (date, slot_id) has not ended by the club's ``hour`` of ``today``."""
    return date > today or (date == today and slot_id >= hour)


def not_started(date: str, slot_id: int, today: str, hour: int) -> bool:
    """NOT_STARTED's twin: (date, slot_id) has not begun by the club's ``hour`` of ``today``."""
    return date > today or (date == today and slot_id > hour)


def booking_closes(date: str, slot_id: int, grace_minutes: int) -> datetime:
    """The grace rule: a slot may be booked (or handed on from its waitlist) until BOOKING_GRACE_MINUTES after its
    start, in the club's time. The one home of that rule, for every module."""
    return datetime.fromisoformat(date) + timedelta(hours=slot_id, minutes=grace_minutes)


# A booking's check-in clock starts at the later of its slot's start and the moment it was made (booked_at,
# "YYYY-MM-DD HH:MM:SS" in the club's time, to the second): in seconds of the day, for SQL on the bookings
# table. checkin_starts() is its twin for a booking in memory.
CHECKIN_STARTS = (
    "MAX(slot_id * 3600, CASE WHEN substr(booked_at, 1, 10) = date THEN"
    " CAST(substr(booked_at, 12, 2) AS INTEGER) * 3600 + CAST(substr(booked_at, 15, 2) AS INTEGER) * 60"
    " + CAST(substr(booked_at, 18, 2) AS INTEGER) ELSE 0 END)")
# The check-in deadline has passed: takes (CHECKIN_MINUTES in seconds, the club's second of the day now).
CHECKIN_MISSED = f"{CHECKIN_STARTS} + ? <= ?"


def checkin_starts(date: str, slot_id: int, booked_at: str | None) -> int:
    """CHECKIN_STARTS for one booking: the second of its day from which its check-in window counts (a
    booked_at of another day, or none, counts from the slot's start). Parsed as SQLite's CAST parses, so a
    value in an original database's own format gives the same answer here as in SQL."""

    def number(start: int) -> int:  # CAST(substr(booked_at, start, 2) AS INTEGER)
        digits = LEADING_INTEGER.match((booked_at or "")[start - 1:start + 1])
        return int(digits.group()) if digits else 0

    made = 0
    if booked_at is not None and booked_at[:10] == date:
        made = number(12) * 3600 + number(15) * 60 + number(18)
    return max(slot_id * 3600, made)


LEADING_INTEGER = re.compile(r" *[+-]?[0-9]+")


def checkin_closes(date: str, slot_id: int, booked_at: str | None, checkin_minutes: int) -> datetime:
    """CHECKIN_MISSED's twin: the moment (club time) from which a booking not checked in is released."""
    return datetime.fromisoformat(date) + timedelta(seconds=checkin_starts(date, slot_id, booked_at),
                                                    minutes=checkin_minutes)


# A no-show event (alias e) that no forgive event names (a forgive's note is "no-show <its id>").
UNFORGIVEN = ("e.action = 'no_show' AND NOT EXISTS"
              " (SELECT 1 FROM events f WHERE f.action = 'forgive' AND f.note = 'no-show ' || e.id)")


def barred(no_shows: int, limit: int) -> bool:
    """The no-show bar: ``no_shows`` unforgiven no-shows in the window bar new bookings at NO_SHOW_LIMIT
    (0: never)."""
    return limit > 0 and no_shows >= limit


# Who may take part at all: off the roster (in roster mode; takes srn), or suspended today (takes srn, today).
OFF_ROSTER = "NOT EXISTS (SELECT 1 FROM members WHERE srn = ?)"
SUSPENDED = "EXISTS (SELECT 1 FROM suspensions WHERE srn = ? AND (until IS NULL OR until > ?))"


# What happened to a member's booking that they did not do themselves: the events they are told of, on
# their sockets and in /me. An admin's cancel is filed under the admin, noting "booked by SRN"; one made on
# the member's behalf is filed under the member, noting "by ADMIN".
NOTICES = ("(action IN ('promote', 'no_show', 'release') OR (action = 'cancel' AND (note LIKE 'booked by %'"
           " OR note LIKE 'by %')))")
MEMBER_OF_EVENT = "CASE WHEN note LIKE 'booked by %' THEN substr(note, 11) ELSE srn END"
FILED_FOR_SRN = "(note IS NULL OR note NOT LIKE 'booked by %')"  # about srn's own booking: MEMBER_OF_EVENT = srn
EXPORT_CHUNK = 1000  # rows an export reads at a time
USAGE_COLUMNS = ("hours_booked", "hours_checked_in", "no_shows", "no_shows_forgiven", "late_cancels",
                 "lines_joined", "promoted")


# A member's place (alias w) in its slot's line, counting from 1: the places that joined no later.
WAITLIST_POSITION = ("(SELECT COUNT(*) FROM waitlist x WHERE x.date = w.date AND x.slot_id = w.slot_id"
                     " AND x.id <= w.id)")


def slot_times(slot_id: int) -> tuple[str, str]:
    """A slot's start and end as every output writes them: slot 23 ends at "24:00" (the day's end, as ISO
    8601 allows), never "00:00", which would read as before it began."""
    return f"{slot_id:02d}:00", f"{slot_id + 1:02d}:00"


@dataclass(frozen=True)
class Limits:
    """What one member may hold; 0 means no limit. ``now_hour``: slots at or before it have started."""

    per_day: int
    upcoming: int
    today: str
    now_hour: int
    no_shows: int = 0  # no-shows (not forgiven) that bar new bookings
    no_shows_since: str = ""  # counted from this date on
    roster: bool = False  # MEMBERSHIP=roster: only members on the roster may take part
    exempt: frozenset[str] = frozenset()  # the admins: never barred by the roster or a suspension


@dataclass(frozen=True)
class LineLimits:
    """How long waitlists may grow: members per slot, and slots one member may wait for at once."""

    per_slot: int
    per_member: int


# What a write came to: "ok", or the reason the rules refused it (slots.py words each for members).
Outcome = Literal["ok", "booked", "taken", "closed", "open", "free", "other", "own", "already", "absent", "none",
                  "full", "member_full", "per_day", "upcoming", "no_shows", "not_member", "suspended"]


@dataclass(frozen=True)
class Change:
    """The outcome of a write: ``outcome`` is "ok" or why not; ``version`` and ``rows`` are the day after.
    ``promoted``: the member a cancellation handed the slot to from its waitlist; ``position``: a new place
    in a waitlist."""

    outcome: Outcome
    version: int
    rows: list[DayRow]
    booked_by: str | None = None
    promoted: str | None = None
    position: int = 0


@dataclass(frozen=True)
class Commits:
    """What other processes committed: the newest version, the days changed (each with its newest
    version), and the tokens signed out, as (jti, expires), up to revoked-token id ``revoked``."""

    version: int
    days: dict[str, int]
    revoked: int
    tokens: list[tuple[str, float]]
    admins: frozenset[str] | None = None  # the granted admins, when a grant or revoke is among the changes


# (date, slot_id, result, member) of one step of a series: "closed", "reserved", "conflict" (the member's
# booking stays), "already_closed", "already_theirs" (the member had booked it) or "started"
SeriesStep = tuple[str, int, str, str | None]


@dataclass(frozen=True)
class SeriesPlan:
    """What an admin asks of a series: ``pairs`` are its (date, slot_id) in order; those at or before
    ``started`` (today's date and hour now) have begun and are left alone."""

    action: str  # close | reserve
    srn: str | None
    slots: list[int]
    weekdays: list[str]
    first: str
    last: str
    title: str | None
    pairs: list[tuple[str, int]]
    started: tuple[str, int]

    def describe(self) -> str:
        what = "close" if self.action == "close" else f"reserve for {self.srn}"
        title = f" ({self.title})" if self.title else ""
        return (f"{what} slots {', '.join(map(str, self.slots))} on {', '.join(self.weekdays)}"
                f" from {self.first} until {self.last}{title}")


@dataclass(frozen=True)
class SeriesResult:
    series: int
    steps: list[SeriesStep]
    version: int
    days: dict[str, list[DayRow]]  # the days it changed, after


@dataclass(frozen=True)
class SeriesCancel:
    outcome: str  # ok | none | cancelled
    version: int
    days: dict[str, list[DayRow]]
    freed: list[tuple[str, int]]
    promoted: list[tuple[str, int, str]]  # (date, slot_id, srn) handed on from a waitlist
    handed: list[tuple[str, int, int]]  # (date, slot_id, series) taken over by another series


@dataclass(frozen=True)
class FeedRows:
    """A calendar feed's rows (see SlotStore.feed): ``held`` (date, slot_id, booked_by, booked_at, closed,
    series, series title), ``places`` (date, slot_id, position, joined_at), ``removed`` (date, slot_id,
    when), and the id and time of each (date, slot)'s last change."""

    srn: str
    kind: str  # member | lab
    held: list[tuple[str, int, str | None, str, int, int | None, str | None]]
    places: list[tuple[str, int, int, str]]  # ... and joined_at
    removed: list[tuple[str, int, str]]
    revisions: dict[tuple[str, int], tuple[int, str]]  # (date, slot_id): (its last change's id, and time)


class SlotStore:
    """Bookings of hourly slots by date, in one SQLite file."""

    def __init__(self, path: str, hours: Sequence[int]) -> None:
        self.path = path
        self.hours = list(hours)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        # Long reads (calendar feeds, history, series) on a connection and thread of their own: in WAL mode
        # they read a snapshot while writes go on, so no booking waits behind them.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-read")
        self._read_conn: sqlite3.Connection | None = None
        # Reports (an admin's exports: seconds over years of history) on a third, so no member's read (/me,
        # a feed, the history) ever queues behind one.
        self._reports = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-report")
        self._report_conn: sqlite3.Connection | None = None
        self.generation: Generation | None = None  # None for ":memory:"
        self._data_version = 0  # no connection reports 0: the first look reads everything

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "SlotStore.open() first"
        return self._conn

    @property
    def reader(self) -> sqlite3.Connection:
        """The connection long reads use (the writer's own for ":memory:", which no other can open)."""
        return self._read_conn or self.conn

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in one read transaction on the reader's thread: one consistent snapshot of the file."""
        return await self._snapshot(self._read_conn, self._reader, lambda _: fn(*args))

    async def _report(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(connection) in one read transaction on the reports' own connection and thread."""
        return await self._snapshot(self._report_conn, self._reports, fn)

    async def _snapshot(self, conn: sqlite3.Connection | None, executor: ThreadPoolExecutor,
                        fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(conn) in one read transaction on conn's own thread (for ":memory:", which no other connection
        can open: on the writer's connection and thread)."""

        def read() -> T:
            if conn is None:
                return fn(self.conn)
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

        return await asyncio.get_running_loop().run_in_executor(self._executor if conn is None else executor, read)

    # -- lifetime -----------------------------------------------------------------------------------------

    async def open(self, today: str, now: str) -> int:
        """Create or migrate the database; returns the current version."""
        return await self._run(self._open, today, now)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=True)
        await asyncio.get_running_loop().run_in_executor(self._reports, self._close_reports)
        self._reports.shutdown(wait=True)
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            self._read_conn.close()
            self._read_conn = None

    def _close_reports(self) -> None:
        if self._report_conn is not None:
            self._report_conn.close()
            self._report_conn = None

    def _open(self, today: str, now: str) -> int:
        if self.path != ":memory:":
            check_own_files(self.path)
            create_private(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # Another worker may be upgrading the file (building indexes over a long history takes seconds):
        # wait for it as long as it takes, then no more than 10 s for any one write.
        conn.execute("PRAGMA busy_timeout = 3600000")
        set_wal(conn, 3600)
        # FULL: a commit is on disk before we answer, so an acknowledged booking survives a power cut.
        conn.execute("PRAGMA synchronous = FULL")
        self._conn = conn
        if self.path != ":memory:":
            self.generation = Generation(self.path + "-gen")
        self._upgrade(today, now)
        if self.generation is not None:
            self._mark_own()
            self.generation.set_open(True)
        conn.execute("PRAGMA busy_timeout = 10000")
        if self.path != ":memory:":
            self._read_conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._read_conn.execute("PRAGMA busy_timeout = 10000")
            self._report_conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._report_conn.execute("PRAGMA busy_timeout = 10000")
        return self._version()

    def _upgrade(self, today: str, now: str) -> None:
        conn = self.conn
        with self._transaction():
            for statement in SCHEMA.split(";"):
                conn.execute(statement)
            for table, column, declaration in ADDED_COLUMNS:
                if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            conn.execute("CREATE INDEX IF NOT EXISTS bookings_by_series ON bookings (series) WHERE series IS NOT NULL")
            conn.execute("DROP INDEX IF EXISTS events_by_date")  # events_by_slot begins with the date
            conn.execute("DROP INDEX IF EXISTS events_by_srn")  # events_by_member begins with (srn, date)
            conn.executemany(
                "INSERT OR IGNORE INTO slots (id, start_time, end_time, is_booked) VALUES (?, ?, ?, 0)",
                [(hour, *slot_times(hour)) for hour in self.hours],
            )
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None or row[0] < SCHEMA_VERSION:
                self._migrate_undated(today, now)
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))

    def _migrate_undated(self, today: str, now: str) -> None:
        """The original system's bookings had no date: when DATABASE_PATH is the original's own file, they
        become bookings on the next day each slot is still ahead (as ``upgrade`` brings them in)."""
        rows = self.conn.execute(
            "SELECT id, booked_by, booked_at FROM slots WHERE is_booked ORDER BY id"
        ).fetchall()
        if not rows:
            return
        placed = [(ahead(id_, today, now), id_, booked_by, booked_at or now) for id_, booked_by, booked_at in rows]
        self.conn.executemany(
            "INSERT OR IGNORE INTO bookings (date, slot_id, booked_by, booked_at) VALUES (?, ?, ?, ?)", placed)
        # The original's own table is left as it was, so the original backend can run on this file again
        # (it then shows its bookings as they were at the upgrade); meta's schema version marks the copy done.
        for date, slot_id, booked_by, booked_at in placed:
            self._log(now, booked_by, "migrate", date, slot_id, "system",
                      f"from the original database (booked at {booked_at})")

    def _mark_own(self) -> None:
        """Give the database an id of its own (PRAGMA application_id, in the file's header) and write it in
        the -gen file too, so check_own_files can tell the files beside it are its own. Decided in a write
        transaction, so two workers opening a new file agree; -gen learns it once the header on disk has it."""
        assert self.generation is not None
        with self._transaction():
            own = self.conn.execute("PRAGMA application_id").fetchone()[0]
            if own == 0:
                own = random.randint(1, 2**31 - 1)
                self.conn.execute(f"PRAGMA application_id = {own}")
        own_bytes = (own % 2**32).to_bytes(4, "big")
        if self.generation.owner() == own_bytes:
            return
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # (the header on disk: what check_own_files reads)
        if header_of(self.path)[68:72] == own_bytes:
            self.generation.set_owner(own_bytes)

    async def bring_in(self, original: str, date: str | None, today: str, now: str, stamp: str) -> list[str]:
        """``python app.py upgrade``: bring the original system's bookings (read from its database, read-only)
        into this one in one transaction, each onto ``date`` or the next day its slot is still ahead; one
        line per booking says what became of it. A second run with the same original changes nothing (meta
        keeps ``stamp``, ``now`` with its offset, under the original's key)."""
        rows, unusable = read_original(original)
        key = upgrade_key(rows)

        def bring_in() -> list[str]:
            done = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if done is not None:
                return [f"{original}: its {len(rows)} booking(s) were brought in at {done[0]}: nothing changed"]
            lines = list(unusable)
            for slot_id, booked_by, booked_at in rows:
                who = booked_by or "no member"
                target = date or ahead(slot_id, today, now)
                start, end = slot_times(slot_id) if 0 <= slot_id <= 23 else ("?", "?")
                where = f"slot {slot_id} ({start}-{end}) of {who}"
                current = self._current(target, slot_id) if slot_id in self.hours else None
                if slot_id not in self.hours:
                    lines.append(f"{where}: left out, not one of HOURS")
                elif not not_started(target, slot_id, today, int(now[11:13])):
                    lines.append(f"{where}: left out, it has started on {target}")
                elif current is not None and current[0] == booked_by and booked_by and not current[1]:
                    lines.append(f"{where}: already booked on {target}, unchanged")
                elif current is not None:
                    holder = "closed" if current[1] else f"booked by {current[0]}"
                    lines.append(f"{where}: left out, slot {slot_id} on {target} is {holder}")
                else:
                    self.conn.execute("INSERT INTO bookings (date, slot_id, booked_by, booked_at) VALUES (?, ?, ?, ?)",
                                      (target, slot_id, booked_by, booked_at or now))
                    self._log(now, booked_by, "migrate", target, slot_id, "upgrade",
                              f"from the original database {Path(original).name} (booked at {booked_at})")
                    lines.append(f"{where}: booked on {target}")
            self.conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, stamp))
            return lines

        return await self._run(self._commit, bring_in)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.generation is not None:
            if not Path(self.path + "-wal").exists():  # the last to close: SQLite removed the WAL
                self.generation.set_open(False)
            self.generation.close()
            self.generation = None

    def generation_key(self) -> bytes | None:
        """What the database's generation is now (see Generation); None for ":memory:". One small read of
        the page cache, so the event loop can check a cache without a thread hop."""
        return None if self.generation is None else self.generation.read()

    # -- reads ------------------------------------------------------------------------------------------

    def _version(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]

    def _day(self, date: str) -> list[DayRow]:
        return self.conn.execute(
            "SELECT slot_id, booked_by, booked_at, closed,"
            " (SELECT COUNT(*) FROM waitlist w WHERE w.date = b.date AND w.slot_id = b.slot_id), checked_in,"
            " CASE WHEN closed THEN COALESCE(reason, (SELECT title FROM series s WHERE s.id = b.series)) END"
            " FROM bookings b WHERE date = ? ORDER BY slot_id", (date,)
        ).fetchall()

    async def day(self, date: str) -> tuple[int, list[DayRow]]:
        """The version and the booked or closed slots of one day."""
        return await self._run(lambda: (self._version(), self._day(date)))

    async def notices_since(self, after: int) -> tuple[int, list[tuple[str, str, str, int]]]:
        """The newest event id, and (action, srn, date, slot_id) of the events after id ``after`` that a member
        is to be told of personally (NOTICES: a promotion from a waitlist, a release, an admin's cancellation
        of their booking; ``srn`` is the member's). ``after`` -1: only the newest id (a process starting up
        tells nobody of the past)."""

        def notices() -> tuple[int, list[tuple[str, str, str, int]]]:
            newest = self._version()
            if after < 0:
                return newest, []
            return newest, self.conn.execute(  # (NOT INDEXED: the few rows after ``after``, by rowid)
                f"SELECT action, {MEMBER_OF_EVENT}, date, slot_id FROM events NOT INDEXED WHERE id > ? AND id <= ?"
                f" AND {NOTICES} ORDER BY id", (after, newest),
            ).fetchall()

        return await self._run(notices)

    async def changes_since(self, version: int, revoked: int) -> Commits | None:
        """What other processes (other workers on this file) committed since we last looked: changes after
        event ``version`` and tokens revoked after id ``revoked``; None if nothing was committed."""
        return await self._run(self._changes_since, version, revoked)

    def _changes_since(self, version: int, revoked: int) -> Commits | None:
        # data_version moves only when *another* connection commits: a cheap poll, no table read.
        data_version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        if data_version == self._data_version:
            return None
        self._data_version = data_version
        if self.generation is not None:
            self.generation.bump()  # someone else committed, perhaps not through this module: caches go
        days = self.conn.execute(  # (NOT INDEXED: by rowid, not a walk of events_by_slot from end to end)
            "SELECT date, MAX(id) FROM events NOT INDEXED WHERE id > ? GROUP BY date", (version,)
        ).fetchall()
        tokens = self.conn.execute(
            "SELECT id, jti, expires FROM revoked_tokens WHERE id > ? ORDER BY id", (revoked,)
        ).fetchall()
        admins = None
        if self.conn.execute("SELECT EXISTS (SELECT 1 FROM events NOT INDEXED WHERE id > ?"
                             " AND action IN ('admin_grant', 'admin_revoke'))", (version,)).fetchone()[0]:
            admins = frozenset(srn for (srn,) in self.conn.execute("SELECT srn FROM admins"))
        return Commits(
            max((last for _, last in days), default=version),
            {date: last for date, last in days if date},
            tokens[-1][0] if tokens else revoked,
            [(jti, expires) for _, jti, expires in tokens],
            admins,
        )

    async def revoke(self, jti: str, expires: float, now: float) -> None:
        """Record a signed-out token's id (and forget those that have expired since)."""

        def revoke() -> None:
            with self._transaction():
                # A few of the oldest expired rows go with each logout (through the index on expires), so the
                # work per logout stays small however many rows there are, and the table never outgrows logouts.
                self.conn.execute(
                    "DELETE FROM revoked_tokens WHERE id IN"
                    " (SELECT id FROM revoked_tokens WHERE expires <= ? ORDER BY expires LIMIT 16)", (now,)
                )
                self.conn.execute("INSERT OR IGNORE INTO revoked_tokens (jti, expires) VALUES (?, ?)", (jti, expires))

        await self._run(revoke)

    async def upcoming_of(
        self, srn: str, today: str, after_hour: int
    ) -> tuple[list[tuple[str, int, str]], list[Place]]:
        """(date, slot_id, booked_at) of srn's bookings that have not ended yet, oldest first, and their
        places in waitlists."""
        return await self._run(self._upcoming_of, srn, today, after_hour)

    def _upcoming_of(self, srn: str, today: str, after_hour: int) -> tuple[list[tuple[str, int, str]], list[Place]]:
        bookings = self.conn.execute(
            f"SELECT date, slot_id, booked_at FROM bookings WHERE booked_by = ? AND NOT closed AND {NOT_ENDED}"
            " ORDER BY date, slot_id",
            (srn, today, today, after_hour),
        ).fetchall()
        places = self.conn.execute(
            f"SELECT date, slot_id, {WAITLIST_POSITION} FROM waitlist w WHERE srn = ? AND {NOT_ENDED}"
            " ORDER BY date, slot_id",
            (srn, today, today, after_hour),
        ).fetchall()
        return bookings, places

    async def history(
        self, since: str | None, until: str | None, srn: str | None, limit: int, offset: int,
        action: str | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        """(total matching, one page of events newest first), filtered by date range, SRN (a member's own
        events and what admins did to their bookings) and action."""
        return await self._read(self._history, since, until, srn, limit, offset, action)

    def _history(
        self, since: str | None, until: str | None, srn: str | None, limit: int, offset: int,
        action: str | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        where, params = ["1"], []
        if since is not None:
            where.append("date >= ?")
            params.append(since)
        if until is not None:
            where.append("date <= ?")
            params.append(until)
        if srn is not None:  # (an admin's cancel of srn's booking is filed under the admin, noting srn)
            where.append("(srn = ? OR note = 'booked by ' || ?)")
            params += [srn, srn]
        if action is not None:
            where.append("action = ?")
            params.append(action)
        clause = " AND ".join(where)
        total = self.reader.execute(f"SELECT COUNT(*) FROM events WHERE {clause}", params).fetchone()[0]
        cursor = self.reader.execute(
            f"SELECT id, at, srn, action, date, slot_id, via, note, series FROM events WHERE {clause}"
            " ORDER BY id DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        names = [d[0] for d in cursor.description]
        return total, [dict(zip(names, row, strict=True)) for row in cursor]

    # -- writes -----------------------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)

    def _log(
        self, at: str, srn: str | None, action: str, date: str | None, slot_id: int | None, via: str,
        note: str | None = None, series: int | None = None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO events (at, srn, action, date, slot_id, via, note, series) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (at, srn, action, date, slot_id, via, note, series),
        )

    def _current(self, date: str, slot_id: int) -> tuple[str | None, int] | None:
        return self.conn.execute(
            "SELECT booked_by, closed FROM bookings WHERE date = ? AND slot_id = ?", (date, slot_id)
        ).fetchone()

    def _commit(self, fn: Callable[[], T], *, keep: bool = True) -> T:
        """fn() in one write transaction (rolled back if ``keep`` is false: a dry run); the generation is
        bumped after a commit that changed rows, so a reader that saw the old generation read before it."""
        before = self.conn.total_changes
        with _Transaction(self.conn, keep):
            result = fn()
        if keep and self.generation is not None and self.conn.total_changes != before:
            self.generation.bump()
        return result

    def _write(self, fn: Callable[[], tuple[Outcome, str | None] | tuple[Outcome, str | None, str | None, int]],
               date: str) -> Change:
        def write() -> Change:
            outcome, booked_by, *more = fn()
            return Change(outcome, self._version(), self._day(date), booked_by, *more)  # type: ignore[arg-type]

        return self._commit(write)

    def _standing(self, srn: str, limits: Limits) -> Outcome | None:
        """Why srn may not take part at all ("not_member", "suspended"), or None; read in the writing
        transaction, so a member removed or suspended is refused from its commit on, by every worker."""
        if srn in limits.exempt:
            return None
        if limits.roster and self.conn.execute(f"SELECT {OFF_ROSTER}", (srn,)).fetchone()[0]:
            return "not_member"
        if self.conn.execute(f"SELECT {SUSPENDED}", (srn, limits.today)).fetchone()[0]:
            return "suspended"
        return None

    def _over_limits(self, srn: str, date: str, limits: Limits) -> Outcome | None:
        """Why srn may not take another booking on date (see _standing; "per_day", "upcoming", "no_shows"),
        or None."""
        standing = self._standing(srn, limits)
        if standing is not None:
            return standing
        if self._barred(srn, limits):
            return "no_shows"
        if limits.per_day and self._count(srn, "date = ?", date) >= limits.per_day:
            return "per_day"
        if limits.upcoming and self._count(srn, NOT_STARTED, limits.today, limits.today, limits.now_hour) >= (
            limits.upcoming
        ):
            return "upcoming"
        return None

    async def book(self, date: str, slot_id: int, srn: str, at: str, limits: Limits, via: str,
                   note: str | None = None) -> Change:
        """Book a free slot within srn's limits: outcome "ok", "taken", "closed", "per_day" or "upcoming"
        (``note``: "by ADMIN" for a booking an admin made on srn's behalf)."""

        def book() -> tuple[Outcome, str | None]:
            current = self._current(date, slot_id)
            if current is not None:
                return ("closed" if current[1] else "taken"), current[0]
            refusal = self._take(date, slot_id, srn, at, limits, "book", via, note)
            return (refusal, None) if refusal else ("ok", srn)

        return await self._run(self._write, book, date)

    def _no_shows(self, srn: str, since: str) -> list[str]:
        """The dates of srn's no-shows from ``since`` on that an admin has not forgiven, oldest first."""
        return [date for (date,) in self.conn.execute(
            f"SELECT date FROM events e WHERE srn = ? AND {UNFORGIVEN} AND date >= ? ORDER BY date", (srn, since)
        )]

    async def no_shows(self, srn: str, since: str) -> list[str]:
        return await self._run(self._no_shows, srn, since)

    def _barred(self, srn: str, limits: Limits) -> bool:
        """srn's no-shows bar them from a new booking or line (``barred``, on what this transaction reads)."""
        return bool(limits.no_shows) and barred(len(self._no_shows(srn, limits.no_shows_since)), limits.no_shows)

    async def forgive(self, srn: str, date: str, slot_id: int, admin: str, at: str, via: str) -> Change:
        """An admin forgives srn's no-show of (date, slot_id): outcome "ok" or "none" (no such no-show that is
        not forgiven yet)."""

        def forgive() -> tuple[Outcome, str | None]:
            row = self.conn.execute(
                f"SELECT id FROM events e WHERE srn = ? AND {UNFORGIVEN} AND date = ? AND slot_id = ?"
                " ORDER BY id LIMIT 1", (srn, date, slot_id),
            ).fetchone()
            if row is None:
                return "none", None
            self._log(at, admin, "forgive", date, slot_id, via, f"no-show {row[0]}")
            return "ok", srn

        return await self._run(self._write, forgive, date)

    def _take(self, date: str, slot_id: int, srn: str, at: str, limits: Limits, action: str, via: str,
              note: str | None = None) -> Outcome | None:
        """Give srn the free slot if their limits allow (and log ``action``); else why not (see _over_limits).
        Booking, a waitlist join on a free slot and a promotion from the waitlist all take a slot this way."""
        refusal = self._over_limits(srn, date, limits)
        if refusal is None:
            self.conn.execute("INSERT INTO bookings (date, slot_id, booked_by, booked_at) VALUES (?, ?, ?, ?)",
                              (date, slot_id, srn, at))
            self._log(at, srn, action, date, slot_id, via, note)
        return refusal

    async def join_waitlist(self, date: str, slot_id: int, srn: str, at: str, limits: Limits, line: LineLimits,
                            via: str) -> Change:
        """Put srn in line for a booked slot; a free one is booked for them at once (outcome "booked").
        Otherwise "ok" with their ``position``, or why not: "own", "closed", "already", "full", "member_full",
        "per_day", "upcoming"."""

        def join() -> tuple[Outcome, str | None, str | None, int]:
            current = self._current(date, slot_id)
            if current is None:  # freed meanwhile: the joiner gets it, never neither
                outcome, booked_by = book_free()
                return outcome, booked_by, None, 0
            booked_by, closed = current
            if closed:
                return "closed", None, None, 0
            if booked_by == srn:
                return "own", None, None, 0
            standing = self._standing(srn, limits)
            if standing is not None:
                return standing, None, None, 0
            waiting = self.conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(srn = ?), 0) FROM waitlist WHERE date = ? AND slot_id = ?",
                (srn, date, slot_id),
            ).fetchone()
            if waiting[1]:
                return "already", None, None, 0
            if line.per_slot and waiting[0] >= line.per_slot:
                return "full", None, None, 0
            mine = self.conn.execute(
                f"SELECT COUNT(*) FROM waitlist WHERE srn = ? AND {NOT_ENDED}",
                (srn, limits.today, limits.today, limits.now_hour),
            ).fetchone()[0]  # lines for slots that have not ended
            if line.per_member and mine >= line.per_member:
                return "member_full", None, None, 0
            if self._barred(srn, limits):
                return "no_shows", None, None, 0
            self.conn.execute("INSERT INTO waitlist (date, slot_id, srn, joined_at) VALUES (?, ?, ?, ?)",
                              (date, slot_id, srn, at))
            self._log(at, srn, "join", date, slot_id, via)
            return "ok", booked_by, None, waiting[0] + 1

        def book_free() -> tuple[Outcome, str | None]:
            refusal = self._take(date, slot_id, srn, at, limits, "book", via, "from a waitlist join: the slot was free")
            return (refusal, None) if refusal else ("booked", srn)

        return await self._run(self._write, join, date)

    async def leave_waitlist(self, date: str, slot_id: int, srn: str, at: str, via: str) -> Change:
        """Take srn out of a slot's line: outcome "ok" or "absent"."""

        def leave() -> tuple[Outcome, str | None]:
            gone = self.conn.execute("DELETE FROM waitlist WHERE date = ? AND slot_id = ? AND srn = ?",
                                     (date, slot_id, srn)).rowcount
            if not gone:
                return "absent", None
            self._log(at, srn, "leave", date, slot_id, via)
            return "ok", None

        return await self._run(self._write, leave, date)

    def _promote(self, date: str, slot_id: int, at: str, limits: Limits | None) -> str | None:
        """A booking just went: hand the slot to the first in line who may take it (within their limits),
        in the same transaction. With ``limits`` None (the slot can no longer be booked) or nobody able to
        take it, the line is cleared."""
        line = self.conn.execute("SELECT id, srn FROM waitlist WHERE date = ? AND slot_id = ? ORDER BY id",
                                 (date, slot_id)).fetchall()
        for id_, srn in line if limits is not None else ():
            if self._take(date, slot_id, srn, at, limits, "promote", "system", "from the waitlist") is None:
                self.conn.execute("DELETE FROM waitlist WHERE id = ?", (id_,))
                return srn
        if line:
            self.conn.execute("DELETE FROM waitlist WHERE date = ? AND slot_id = ?", (date, slot_id))
        return None

    def _count(self, srn: str, condition: str, *params: Any) -> int:
        """srn's own bookings under condition (a slot an admin's series reserved for them does not count)."""
        return self.conn.execute(
            f"SELECT COUNT(*) FROM bookings WHERE booked_by = ? AND NOT closed AND series IS NULL AND {condition}",
            (srn, *params),
        ).fetchone()[0]

    async def cancel(self, date: str, slot_id: int, srn: str, at: str, via: str, *, anyones: bool,
                     limits: Limits | None = None, note: str | None = None) -> Change:
        """Cancel srn's booking (anyone's, for an admin): outcome "ok", "free", "closed" or "other". The
        slot goes to the first in its waitlist who may take it (``limits``: None if it cannot be booked)."""

        def cancel() -> tuple[Outcome, str | None, str | None, int]:
            current = self._current(date, slot_id)
            if current is None:
                return "free", None, None, 0
            booked_by, closed = current
            if closed:
                return "closed", None, None, 0
            if booked_by != srn and not anyones:
                return "other", booked_by, None, 0
            self.conn.execute("DELETE FROM bookings WHERE date = ? AND slot_id = ?", (date, slot_id))
            self._log(at, srn, "cancel", date, slot_id, via, note if booked_by == srn else f"booked by {booked_by}")
            return "ok", booked_by, self._promote(date, slot_id, at, limits), 0

        return await self._run(self._write, cancel, date)

    async def check_in(self, date: str, slot_id: int, srn: str, at: str, via: str, *, anyones: bool,
                       limits: Limits | None = None) -> Change:
        """Mark srn's booking (anyone's, for an admin) checked in: outcome "ok", "free", "closed", "other" or
        "already". Racing a no-show release, exactly one of the two wins: the release deletes only what is
        not checked in, and this updates only what is still booked."""

        def check_in() -> tuple[Outcome, str | None]:
            current = self.conn.execute(
                "SELECT booked_by, closed, checked_in FROM bookings WHERE date = ? AND slot_id = ?", (date, slot_id)
            ).fetchone()
            if current is None:
                return "free", None
            booked_by, closed, checked_in = current
            if closed:
                return "closed", None
            if booked_by != srn and not anyones:
                return "other", booked_by
            standing = None if anyones or limits is None else self._standing(srn, limits)
            if standing is not None:
                return standing, booked_by
            if checked_in:
                return "already", booked_by
            self.conn.execute("UPDATE bookings SET checked_in = 1 WHERE date = ? AND slot_id = ?", (date, slot_id))
            self._log(at, srn, "check_in", date, slot_id, via, None if booked_by == srn else f"booked by {booked_by}")
            return "ok", booked_by

        return await self._run(self._write, check_in, date)

    async def release_no_shows(self, today: str, second: int, checkin_minutes: int, grace_minutes: int, at: str,
                               limits: Limits) -> list[tuple[str, int, str, str | None]]:
        """Release today's bookings not checked in by their deadline (``second`` is the club's second of the
        day now): each a ``no_show`` event, the slot handed on to its waitlist as a cancellation would, while
        it is still bookable (before start + ``grace_minutes``). Returns (date, slot_id, holder, promoted) for
        each; the database decides, so any number of workers may call this and each booking is released once.

        A booking's deadline is ``checkin_minutes`` after the later of its start and the moment it was made
        (CHECKIN_STARTS): one made, or handed on from the waitlist, after the start gets a check-in window of
        its own."""

        now = datetime.fromisoformat(today) + timedelta(seconds=second)

        def release() -> list[tuple[str, int, str, str | None]]:
            due = self.conn.execute(
                f"SELECT slot_id, booked_by, booked_at FROM bookings WHERE date = ? AND NOT closed AND NOT checked_in"
                f" AND booked_by IS NOT NULL AND {CHECKIN_MISSED} ORDER BY slot_id",
                (today, checkin_minutes * 60, second),
            ).fetchall()
            released = []
            for slot_id, holder, booked_at in due:
                self.conn.execute("DELETE FROM bookings WHERE date = ? AND slot_id = ?", (today, slot_id))
                if self._moved_up_late(today, slot_id, holder, booked_at):  # they did not choose that hour
                    self._log(at, holder, "release", today, slot_id, "system",
                              f"not checked in within {checkin_minutes} minutes; moved up from the waitlist"
                              " within the hour before the start, so not a no-show")
                else:
                    self._log(at, holder, "no_show", today, slot_id, "system",
                              f"not checked in within {checkin_minutes} minutes")
                bookable = now < booking_closes(today, slot_id, grace_minutes)
                released.append((today, slot_id, holder,
                                 self._promote(today, slot_id, at, limits if bookable else None)))
            return released

        return await self._run(self._commit, release)

    def _moved_up_late(self, date: str, slot_id: int, holder: str, booked_at: str | None) -> bool:
        """Whether this booking came to its holder from the waitlist (not by their own choice) after the hour
        before the slot's start: releasing it then is no no-show of theirs."""
        return booked_at is not None and booked_at >= f"{date} {slot_id - 1:02d}:00:00" and self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM events WHERE action = 'promote' AND srn = ? AND date = ? AND slot_id = ?"
            " AND at = ?)", (holder, date, slot_id, booked_at)).fetchone()[0]

    async def set_closed(self, date: str, slot_id: int, closed: bool, srn: str, at: str, via: str,
                         reason: str | None = None) -> Change:
        """Close a free slot or reopen a closed one: outcome "ok", "taken", "closed" or "open"."""

        def set_closed() -> tuple[Outcome, str | None]:
            current = self._current(date, slot_id)
            if closed:
                if current is not None:
                    return ("closed" if current[1] else "taken"), current[0]
                self.conn.execute(
                    "INSERT INTO bookings (date, slot_id, booked_by, booked_at, closed, reason)"
                    " VALUES (?, ?, NULL, ?, 1, ?)", (date, slot_id, at, reason),
                )
            else:
                if current is None or not current[1]:
                    return "open", None
                self.conn.execute("DELETE FROM bookings WHERE date = ? AND slot_id = ?", (date, slot_id))
            self._log(at, srn, "close" if closed else "open", date, slot_id, via, reason if closed else None)
            return "ok", None

        return await self._run(self._write, set_closed, date)


    # -- series: an admin's recurring closures and reservations ------------------------------------------

    async def add_series(self, plan: SeriesPlan, admin: str, at: str, via: str, *, dry_run: bool) -> SeriesResult:
        """Close (or reserve for plan.srn) every free (date, slot) of the plan, in one transaction: a slot
        held by a member is a "conflict" and stays theirs. With ``dry_run`` the same work is done and then
        rolled back, so the answer is exactly what a real run would have done at that moment."""

        def add() -> SeriesResult:
            cursor = self.conn.execute(
                "INSERT INTO series (action, srn, slots, weekdays, first, last, title, created_by, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (plan.action, plan.srn, orjson.dumps(plan.slots).decode(), orjson.dumps(plan.weekdays).decode(),
                 plan.first, plan.last, plan.title, admin, at),
            )
            series = cursor.lastrowid
            assert series is not None
            self._log(at, admin, "series", None, None, via, plan.describe(), series)
            results: list[SeriesStep] = []
            changed: list[str] = []
            for date, slot_id in plan.pairs:
                started = (date, slot_id) <= plan.started
                current = None if started else self._current(date, slot_id)
                if not started and current is None:
                    self.conn.execute(
                        "INSERT INTO bookings (date, slot_id, booked_by, booked_at, closed, series)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (date, slot_id, plan.srn, at, int(plan.action == "close"), series),
                    )
                    action = "close" if plan.action == "close" else "reserve"
                    self._log(at, admin, action, date, slot_id, via, plan.srn and f"for {plan.srn}", series)
                    results.append((date, slot_id, "closed" if action == "close" else "reserved", plan.srn))
                    if not changed or changed[-1] != date:
                        changed.append(date)
                    continue
                if current is None:
                    outcome, member, why = "started", None, "it had started"
                elif current[1]:
                    outcome, member, why = "already_closed", None, "already closed"
                elif plan.srn is not None and current[0] == plan.srn:
                    outcome, member, why = "already_theirs", current[0], f"already booked by {current[0]}"
                else:  # a member's booking is never taken
                    outcome, member, why = "conflict", current[0], f"booked by {current[0]}"
                results.append((date, slot_id, outcome, member))
                self._log(at, admin, "series_skip", date, slot_id, via, why, series)
            return SeriesResult(series, results, self._version(), {date: self._day(date) for date in changed})

        return await self._run(functools.partial(self._commit, add, keep=not dry_run))

    async def cancel_series(self, series: int, admin: str, at: str, via: str, limits: Limits) -> SeriesCancel:
        """Free what is left of a series (its slots that have not started: ``limits`` says when now is): a
        closed slot reopens, a reserved one goes to the first in its waitlist who may take it, or is free;
        but a slot that another running series asked for and found taken (a ``series_skip``) goes to the
        oldest such series. Outcome "ok", "none" (no such series) or "cancelled" (already)."""

        def cancel() -> SeriesCancel:
            row = self.conn.execute("SELECT cancelled_at FROM series WHERE id = ?", (series,)).fetchone()
            if row is None or row[0] is not None:
                return SeriesCancel("none" if row is None else "cancelled", self._version(), {}, [], [], [])
            held = self.conn.execute(  # (a holder who checked in early for a slot about to start keeps it)
                "SELECT date, slot_id, booked_by, closed FROM bookings WHERE series = ? AND NOT checked_in"
                f" AND {NOT_STARTED} ORDER BY date, slot_id",
                (series, limits.today, limits.today, limits.now_hour),
            ).fetchall()
            freed, promoted, handed = [], [], []
            for date, slot_id, holder, closed in held:
                self.conn.execute("DELETE FROM bookings WHERE date = ? AND slot_id = ?", (date, slot_id))
                if closed:
                    self._log(at, admin, "open", date, slot_id, via, None, series)
                else:
                    self._log(at, admin, "cancel", date, slot_id, via, f"booked by {holder}", series)
                heir = self.conn.execute(
                    "SELECT s.id, s.action, s.srn FROM events e JOIN series s ON s.id = e.series WHERE e.date = ?"
                    " AND e.slot_id = ? AND e.action = 'series_skip' AND s.cancelled_at IS NULL AND s.id != ?"
                    " ORDER BY s.id LIMIT 1", (date, slot_id, series),
                ).fetchone()
                if heir is not None:  # the oldest other series that asked for it has it now
                    heir_id, action, srn = heir
                    self.conn.execute(
                        "INSERT INTO bookings (date, slot_id, booked_by, booked_at, closed, series)"
                        " VALUES (?, ?, ?, ?, ?, ?)", (date, slot_id, srn, at, int(action == "close"), heir_id),
                    )
                    self._log(at, admin, "close" if action == "close" else "reserve", date, slot_id, via,
                              f"series {series} was cancelled" + (f"; for {srn}" if srn else ""), heir_id)
                    waiting = self.conn.execute(  # a closed slot has no line; the new holder need not wait
                        "SELECT id, srn FROM waitlist WHERE date = ? AND slot_id = ? AND (? OR srn = ?)",
                        (date, slot_id, action == "close", srn)).fetchall()
                    for id_, member in waiting:
                        self.conn.execute("DELETE FROM waitlist WHERE id = ?", (id_,))
                        self._log(at, member, "leave", date, slot_id, via, f"the slot went to series {heir_id}",
                                  heir_id)
                    handed.append((date, slot_id, heir_id))
                    continue
                freed.append((date, slot_id))
                taker = None if closed else self._promote(date, slot_id, at, limits)
                if taker is not None:
                    promoted.append((date, slot_id, taker))
            self.conn.execute("UPDATE series SET cancelled_by = ?, cancelled_at = ? WHERE id = ?", (admin, at, series))
            self._log(at, admin, "series_cancel", None, None, via,
                      f"{len(freed)} slot(s) freed, {len(handed)} handed to other series", series)
            days = {date: self._day(date) for date in dict.fromkeys(date for date, *_ in held)}
            return SeriesCancel("ok", self._version(), days, freed, promoted, handed)

        return await self._run(self._commit, cancel)

    async def series_list(self, today: str, now_hour: int, limit: int = 500) -> list[dict[str, Any]]:
        """The newest series first, each with how many of its slots are still held and have not started."""

        def series_list() -> list[dict[str, Any]]:
            cursor = self.reader.execute(
                "SELECT id, action, srn, slots, weekdays, first, last, title, created_by, created_at, cancelled_by,"
                " cancelled_at, (SELECT COUNT(*) FROM bookings b WHERE b.series = s.id"
                f" AND {NOT_STARTED}) AS upcoming"  # (date and slot_id: the innermost table's, b's)
                " FROM series s ORDER BY id DESC LIMIT ?", (today, today, now_hour, limit),
            )
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor]
            for row in rows:
                row["slots"], row["weekdays"] = orjson.loads(row["slots"]), orjson.loads(row["weekdays"])
                row["from"], row["until"] = row.pop("first"), row.pop("last")
            return rows

        return await self._read(series_list)

    # -- calendar feeds -------------------------------------------------------------------------------------

    async def link_calendar(self, srn: str, kind: str, secret_hash: str | None, at: str,
                            limits: Limits | None = None) -> bool | Outcome:
        """Give srn's feed of this kind a new secret (its old one stops working), or with ``secret_hash``
        None remove it; whether there was one before, or (with ``limits``) why srn may not (_standing)."""

        def link() -> bool | Outcome:
            standing = None if limits is None else self._standing(srn, limits)
            if standing is not None:
                return standing
            gone = self.conn.execute("DELETE FROM calendar_links WHERE srn = ? AND kind = ?", (srn, kind)).rowcount
            if secret_hash is not None:
                self.conn.execute(
                    "INSERT INTO calendar_links (secret_hash, srn, kind, created_at) VALUES (?, ?, ?, ?)",
                    (secret_hash, srn, kind, at),
                )
            return gone > 0

        # the commit bumps the generation: feeds cached under an old secret go, in every process
        return await self._run(self._commit, link)

    async def happened_to(self, srn: str, since: str, limit: int = 10) -> list[tuple[str, str, str, int, str | None]]:
        """(action, at, date, slot_id, the admin who did it or None) of the NOTICES about srn's bookings from
        ``since`` (a time; so of slots dated from its day on), newest first: what /me lists. Two steps down
        an index (events_by_member, events_by_note), however long the member's history."""
        columns = ("id, action, at, date, slot_id, CASE WHEN note LIKE 'booked by %' THEN srn WHEN action = 'cancel'"
                   " THEN substr(note, 4) END")
        rows = await self._read(lambda: self.reader.execute(
            f"SELECT * FROM (SELECT {columns} FROM events WHERE srn = ? AND date >= ? AND at >= ? AND {NOTICES}"
            f" AND {FILED_FOR_SRN}"
            f" UNION ALL SELECT {columns} FROM events WHERE note = 'booked by ' || ? AND at >= ? AND {NOTICES})"
            " ORDER BY id DESC LIMIT ?", (srn, since[:10], since, srn, since, limit)).fetchall())
        return [row[1:] for row in rows]

    # -- reports ---------------------------------------------------------------------------------------

    async def export_chunk(self, kind: str, since: str, until: str, after: tuple[Any, ...],
                           limit: int = EXPORT_CHUNK) -> list[tuple[Any, ...]]:
        """The next ``limit`` rows of an export (``kind`` "bookings", "events" or "no_shows") of the slots
        dated ``since`` to ``until``, after the key ``after`` (the first column, or for bookings the first
        two): one short read each, so a report of any length never holds the reader, or memory, for long."""
        if kind == "bookings":
            query = ("SELECT date, slot_id, booked_by, booked_at, checked_in, series FROM bookings WHERE NOT closed"
                     " AND date BETWEEN ? AND ? AND (date, slot_id) > (?, ?) ORDER BY date, slot_id LIMIT ?")
        elif kind == "events":  # (an event of no slot, a roster change say, is dated by when it happened)
            query = ("SELECT id, at, srn, action, date, slot_id, via, note, series FROM events"
                     " WHERE id > ? AND COALESCE(date, substr(at, 1, 10)) BETWEEN ? AND ? ORDER BY id LIMIT ?")
        else:
            query = (f"SELECT id, at, srn, date, slot_id, note, NOT ({UNFORGIVEN}) FROM events e WHERE e.id > ?"
                     " AND e.action = 'no_show' AND e.date BETWEEN ? AND ? ORDER BY e.id LIMIT ?")
        params = (since, until, *after, limit) if kind == "bookings" else (*after, since, until, limit)
        return await self._report(lambda conn: conn.execute(query, params).fetchall())

    async def usage(self, since: str, until: str) -> dict[str, dict[str, int]]:
        """Per member, for the slots dated ``since`` to ``until``: hours booked and checked in (the bookings
        held), no-shows counted and forgiven, late cancels (their own, made within an hour of the start), lines
        joined and places promoted. A handful of grouped reads, whatever the span."""

        def usage(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            table: dict[str, dict[str, int]] = {}
            queries = {
                ("hours_booked", "hours_checked_in"): "SELECT booked_by, COUNT(*), SUM(checked_in) FROM bookings"
                " WHERE NOT closed AND booked_by IS NOT NULL AND date BETWEEN ? AND ? GROUP BY booked_by",
                ("no_shows", "no_shows_forgiven"): f"SELECT srn, SUM({UNFORGIVEN}), SUM(NOT ({UNFORGIVEN})) FROM"
                " events e WHERE action = 'no_show' AND date BETWEEN ? AND ? GROUP BY srn",
                ("late_cancels",): "SELECT srn, COUNT(*) FROM events WHERE action = 'cancel' AND note IS NULL"
                " AND date BETWEEN ? AND ? AND at >= datetime(date, printf('+%d hours',"
                " slot_id), '-1 hour') GROUP BY srn",
                ("lines_joined",): "SELECT srn, COUNT(*) FROM events WHERE action = 'join' AND date BETWEEN ? AND ?"
                " GROUP BY srn",
                ("promoted",): "SELECT srn, COUNT(*) FROM events WHERE action = 'promote' AND date BETWEEN ? AND ?"
                " GROUP BY srn",
            }
            for columns, query in queries.items():
                for srn, *counts in conn.execute(query, (since, until)):
                    row = table.setdefault(srn, dict.fromkeys(USAGE_COLUMNS, 0))
                    row.update(zip(columns, (int(count or 0) for count in counts)))
            return dict(sorted(table.items()))

        return await self._report(usage)

    # -- the roster and suspensions --------------------------------------------------------------------

    async def change_roster(self, srns: list[str], add: bool, admin: str, at: str, via: str) -> list[str]:
        """Add srns to the roster (or remove them), in one transaction, each change an event (srn: the
        member, note: the admin); the srns that changed (the rest were on it, or off it, already)."""

        def change() -> list[str]:
            changed = []
            for srn in srns:
                if add:
                    done = self.conn.execute("INSERT OR IGNORE INTO members (srn, added_by, added_at) VALUES (?, ?, ?)",
                                             (srn, admin, at)).rowcount
                else:
                    done = self.conn.execute("DELETE FROM members WHERE srn = ?", (srn,)).rowcount
                if done:
                    changed.append(srn)
                    self._log(at, srn, "member_add" if add else "member_remove", None, None, via, f"by {admin}")
            return changed

        return await self._run(self._commit, change)

    async def set_admin(self, srn: str, admin: bool, owner: str, at: str, via: str) -> tuple[bool, frozenset[str]]:
        """Grant srn the admin role (or revoke it), an event: whether anything changed, and the admins granted
        at run time as the commit leaves them (read in it: never behind a long read)."""

        def set_admin() -> tuple[bool, frozenset[str]]:
            if admin:
                done = self.conn.execute("INSERT OR IGNORE INTO admins (srn, granted_by, granted_at) VALUES (?, ?, ?)",
                                         (srn, owner, at)).rowcount
            else:
                done = self.conn.execute("DELETE FROM admins WHERE srn = ?", (srn,)).rowcount
            if done:
                self._log(at, srn, "admin_grant" if admin else "admin_revoke", None, None, via, f"by {owner}")
            return bool(done), frozenset(srn for (srn,) in self.conn.execute("SELECT srn FROM admins"))

        return await self._run(self._commit, set_admin)

    async def admins(self) -> list[tuple[str, str, str]]:
        """(srn, granted_by, granted_at) of the admins granted at run time, by SRN."""
        return await self._read(lambda: self.reader.execute(
            "SELECT srn, granted_by, granted_at FROM admins ORDER BY srn").fetchall())

    async def members(self, search: str, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
        """(how many match, one page of them by SRN) of the roster, ``search`` a part of the SRN; each with
        its suspension, if any."""

        def members() -> tuple[int, list[dict[str, Any]]]:
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where = "m.srn LIKE ? ESCAPE '\\'"
            total = self.reader.execute(f"SELECT COUNT(*) FROM members m WHERE {where}", (pattern,)).fetchone()[0]
            rows = self.reader.execute(
                "SELECT m.srn, m.added_by, m.added_at, s.until, s.reason, s.srn IS NOT NULL FROM members m"
                f" LEFT JOIN suspensions s ON s.srn = m.srn WHERE {where} ORDER BY m.srn LIMIT ? OFFSET ?",
                (pattern, limit, offset)).fetchall()
            return total, [{"srn": srn, "added_by": by, "added_at": added, "suspended":
                             {"until": until, "reason": reason} if suspended else None}
                            for srn, by, added, until, reason, suspended in rows]

        return await self._read(members)

    async def suspend(self, srn: str, until: str | None, reason: str | None, admin: str, at: str, via: str) -> None:
        """Suspend srn (again: the new terms replace the old), an event."""

        def suspend() -> None:
            self.conn.execute("INSERT OR REPLACE INTO suspensions (srn, until, reason, suspended_by, suspended_at)"
                              " VALUES (?, ?, ?, ?, ?)", (srn, until, reason, admin, at))
            self._log(at, srn, "suspend", None, None, via,
                      f"by {admin}, " + (f"until {until}" if until else "until lifted") + (f": {reason}" if reason else ""))

        await self._run(self._commit, suspend)

    async def unsuspend(self, srn: str, admin: str, at: str, via: str) -> bool:
        """Lift srn's suspension; whether there was one."""

        def unsuspend() -> bool:
            if not self.conn.execute("DELETE FROM suspensions WHERE srn = ?", (srn,)).rowcount:
                return False
            self._log(at, srn, "unsuspend", None, None, via, f"by {admin}")
            return True

        return await self._run(self._commit, unsuspend)

    async def suspension(self, srn: str) -> tuple[str | None, str | None] | None:
        """(until, reason) of srn's suspension, or None."""
        return await self._read(lambda: self.reader.execute(
            "SELECT until, reason FROM suspensions WHERE srn = ?", (srn,)).fetchone())

    async def feed(self, secret_hash: str, since: str, today: str, until: str, removed_since: str) -> FeedRows | None:
        """What the feed with this secret shows, or None if no feed has it: for a member, their bookings
        dated ``since`` or later, their waitlist places from ``today`` on, and their bookings removed
        (cancelled, released, left) at ``removed_since`` or later; for the lab, every booking and closed slot
        from ``since`` to ``until``, and those removed. One read, so a rotated secret is refused at once in
        every process. What it reads grows with the feed's window, never with the member's history."""

        def feed() -> FeedRows | None:
            link = self.reader.execute("SELECT srn, kind FROM calendar_links WHERE secret_hash = ?",
                                     (secret_hash,)).fetchone()
            if link is None:
                return None
            srn, kind = link
            held = ("SELECT b.date, b.slot_id, b.booked_by, b.booked_at, b.closed, b.series, s.title FROM bookings b"
                    " LEFT JOIN series s ON s.id = b.series WHERE b.date >= ?")
            if kind == "member":
                rows = self.reader.execute(f"{held} AND b.booked_by = ? AND NOT b.closed ORDER BY b.date, b.slot_id",
                                         (since, srn)).fetchall()
                places = self.reader.execute(
                    f"SELECT date, slot_id, {WAITLIST_POSITION}, joined_at FROM waitlist w WHERE srn = ?"
                    " AND date >= ? ORDER BY date, slot_id", (srn, today),
                ).fetchall()
                removed = self._removed(srn, since, removed_since)
                pairs = sorted({(row[0], row[1]) for row in [*rows, *places, *removed]})
            else:
                rows = self.reader.execute(f"{held} AND b.date <= ? ORDER BY b.date, b.slot_id",
                                         (since, until)).fetchall()
                places = []
                first, last = Date.fromisoformat(since), Date.fromisoformat(until)
                pairs = [((first + timedelta(days=n)).isoformat(), slot_id)
                         for n in range((last - first).days + 1) for slot_id in self.hours]
            # each (date, slot)'s last change (one step down events_by_slot): its revision, and for the lab
            # whether a slot nobody holds now was taken away in the last week
            last_change = {pair: self.reader.execute(
                "SELECT id, at, action FROM events WHERE date = ? AND slot_id = ? ORDER BY id DESC LIMIT 1", pair,
            ).fetchone() for pair in pairs}
            revisions = {pair: (change[0], change[1]) for pair, change in last_change.items() if change}
            if kind == "lab":
                now_held = {(row[0], row[1]) for row in rows}
                removed = [(date, slot_id, change[1]) for (date, slot_id), change in last_change.items()
                           if change and (date, slot_id) not in now_held and change[1] >= removed_since
                           and change[2] in ("cancel", "no_show", "open")]
            return FeedRows(srn, kind, rows, places, removed, revisions)

        return await self._read(feed)


    def _removed(self, srn: str, since: str, removed_since: str) -> list[tuple[str, int, str]]:
        """(date, slot_id, when) of srn's bookings and places dated ``since`` or later that went (cancelled,
        released, left, or cancelled by an admin) at ``removed_since`` or later. One step down
        events_by_member per (date, slot) the member ever touched in that window, and one step back to its
        last removal: a member who booked and cancelled one slot 300,000 times costs two steps for it."""
        removed: dict[tuple[str, int], str] = {}
        pair: tuple[str, int] = (since, -1)
        while True:
            # the next (date, slot) after this one: a later slot of its date, else the first of a later date
            # (in two steps: a row-value range (date, slot_id) > (?, ?) would walk the pair's own events)
            row = self.reader.execute(
                "SELECT date, slot_id FROM events WHERE srn = ? AND date = ? AND slot_id > ?"
                " ORDER BY slot_id LIMIT 1", (srn, *pair),
            ).fetchone() or self.reader.execute(
                "SELECT date, slot_id FROM events WHERE srn = ? AND date > ? ORDER BY date, slot_id LIMIT 1",
                (srn, pair[0]),
            ).fetchone()
            if row is None:
                break
            pair = (row[0], row[1])
            last = self.reader.execute(
                "SELECT at FROM events WHERE srn = ? AND date = ? AND slot_id = ? AND (action IN ('no_show', 'release',"
                f" 'leave') OR (action = 'cancel' AND {FILED_FOR_SRN})) ORDER BY id DESC LIMIT 1", (srn, *pair),
            ).fetchone()
            if last is not None and last[0] >= removed_since:
                removed[pair] = last[0]
        for date, slot_id, at in self.reader.execute(  # an admin's cancellations of their bookings
            "SELECT date, slot_id, MAX(at) FROM events WHERE note = 'booked by ' || ? AND action = 'cancel'"
            " AND date >= ? AND at >= ? GROUP BY date, slot_id", (srn, since, removed_since),
        ):
            removed[(date, slot_id)] = max(at, removed.get((date, slot_id), at))
        return [(date, slot_id, at) for (date, slot_id), at in removed.items()]


def set_wal(conn: sqlite3.Connection, wait: float) -> None:
    """PRAGMA journal_mode = WAL, tried again while busy for up to ``wait`` seconds. Changing the mode turns
    a read lock into the write lock, and there SQLite answers SQLITE_BUSY at once instead of calling the
    busy handler (to avoid a deadlock), so two workers converting one new file at once made one fail."""
    deadline = time.monotonic() + wait
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.005 + 0.02 * random.random())  # (apart, so two waiting workers do not collide again)


class GuardStore:
    """The login guard's state (pesu.Guard), shared by every worker on the file: small JSON values under
    string keys, each with an expiry.

    It has its own connection and thread, and its commits are not synced to disk (after a power cut the
    state would be worth little anyway), so a flood of logins never waits behind the bookings' fsyncs, and
    bookings wait for at most one short guard transaction at a time.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-guard")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._call(self._open)

    async def close(self) -> None:
        await self._call(self._close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA synchronous = OFF")
        self._conn = conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(entries, *args)`` inside one write transaction: what it reads, no other worker changes
        before it has written. An exception from fn rolls back whatever it wrote."""

        def run() -> T:
            assert self._conn is not None, "GuardStore.open() first"
            with _Transaction(self._conn):
                return fn(_Entries(self._conn, args[-1]), *args)

        return await self._call(run)


class _Entries:
    """The guard's entries as one transaction sees them, at the guard's time ``now``."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now

    def get(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM guard WHERE key = ? AND expires > ?", (key, self.now)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def put(self, key: str, value: Any, ttl: float) -> None:
        # A few expired entries go with each write, so the table holds about one window's worth.
        self.conn.execute(
            "DELETE FROM guard WHERE key IN (SELECT key FROM guard WHERE expires <= ? ORDER BY expires LIMIT 8)",
            (self.now,),
        )
        self.conn.execute(
            "INSERT OR REPLACE INTO guard (key, value, expires) VALUES (?, ?, ?)",
            (key, orjson.dumps(value).decode(), self.now + ttl),
        )

    def delete(self, key: str) -> None:
        self.conn.execute("DELETE FROM guard WHERE key = ?", (key,))


class Generation:
    """Eight bytes in a file beside the database (``rero.db-gen``), shared through the page cache by every
    process that uses it: each bumps it after every commit that changes bookings, so any of them can tell
    with one small read whether something may have changed since it last looked.

    A reader takes the generation *before* it reads the database, a writer bumps it *after* it commits:
    then a cache keyed by the generation is never older than its key says. Two bumps at once may both
    write the same new value; either way the value moved on, which is all a reader asks.

    It is read with pread rather than mapped: a mapping of a file that someone cuts short (a ``cp`` over it)
    kills the process with SIGBUS at the next read, where a read only comes back short. A short file is
    given a fresh random generation, so no cache can take it for one it was keyed by.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # (readable by the service's user only)
        self.repairing = threading.Lock()
        if len(os.pread(self.fd, 8, 0)) < 8:  # new
            os.pwrite(self.fd, os.urandom(8), 0)

    def read(self) -> bytes:
        value = os.pread(self.fd, 8, 0)
        if len(value) < 8:
            with self.repairing:  # (the event loop and the database thread may both find it short)
                value = os.pread(self.fd, 8, 0)
                if len(value) < 8:
                    logger.warning("%s was cut to %d bytes (copied over?): it now holds a fresh generation, so "
                                   "every cache of its database starts afresh", self.path, len(value))
                    value = os.urandom(8)
                    os.pwrite(self.fd, value, 0)
        return value

    def bump(self) -> None:
        os.pwrite(self.fd, ((int.from_bytes(self.read(), "little") + 1) % (1 << 64)).to_bytes(8, "little"), 0)

    def owner(self) -> bytes:
        """The id of the database this file belongs to (bytes 8 to 12; empty in a file from before ids)."""
        return os.pread(self.fd, 4, 8)

    def set_owner(self, owner: bytes) -> None:
        os.pwrite(self.fd, owner, 8)

    def set_open(self, open_: bool) -> None:
        """Byte 12: 1 while a process has the database open, 0 once the last one closed it cleanly (and
        SQLite removed the WAL): a WAL beside a database closed cleanly is another's (check_own_files)."""
        if len(self.owner()) == 4:
            os.pwrite(self.fd, b"\x01" if open_ else b"\x00", 12)

    def close(self) -> None:
        os.close(self.fd)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (or always, with ``keep`` false: a dry run sees
    exactly what its writes would do, then undoes them): takes the write lock up front, so no other
    process can slip a write between our reads and our write."""

    def __init__(self, conn: sqlite3.Connection, keep: bool = True) -> None:
        self.conn = conn
        self.keep = keep

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type or not self.keep else "COMMIT")


# -- the files of a database -----------------------------------------------------------------------------


class ForeignFiles(ValueError):
    """-wal, -shm or -gen files beside a database that are not its own."""


def header_of(path: str) -> bytes:
    """The database file's 100-byte header as it is on disk (b"" for a missing or empty file)."""
    try:
        with open(path, "rb") as file:
            return file.read(100)
    except FileNotFoundError:
        return b""


def check_own_files(path: str) -> None:
    """Refuse a database beside -wal, -shm or -gen files left by another one (a file copied over a stopped
    service's, or over a running one's). SQLite would replay such a WAL into the file it finds and keep
    only the other database's pages: the copy's bookings gone, "integrity ok". Ours are told by the header:
    a database of ours is in WAL mode (bytes 18 and 19 are 2) and its id (application_id, bytes 68 to 72)
    is the one its -gen file holds; and a WAL beside it is its own only if it was not closed cleanly (the
    last process to close removes the WAL, and -gen says so). A database with an id whose -gen is gone or
    cut short is refused too while a WAL or -shm lies beside it: which database they belong to is unknown."""
    header = header_of(path)
    wal = header[18:20] == b"\x02\x02"
    beside = [suffix for suffix in ("-wal", "-shm", "-gen") if Path(path + suffix).exists()]
    if not beside or len(header) < 100:  # (a new database: no other's pages to lose)
        return
    gen = b""
    if "-gen" in beside:
        with open(path + "-gen", "rb") as file:
            gen = file.read(13)
    owner, closed = gen[8:12], gen[12:13] == b"\x00"
    has_id = header[68:72] != b"\x00\x00\x00\x00"
    unknown = has_id and len(owner) < 4 and ("-wal" in beside or "-shm" in beside)
    if not wal or (owner and header[68:72] != owner) or unknown or ("-wal" in beside and closed):
        names = [Path(path).name + suffix for suffix in beside]
        files = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        raise ForeignFiles(f"{files} beside it {'are' if len(names) > 1 else 'is'} not its own (left by another"
                           f" database): if {Path(path).name} is the original system's, move it away and bring its"
                           " bookings in with the upgrade command (app.py upgrade ORIGINAL.db); otherwise move "
                           + ("those files" if len(names) > 1 else "that file") + " away")


def create_private(path: str) -> None:
    """Create the database file readable and writable by its owner only, if it does not exist: SQLite gives
    its -wal and -shm files the database file's mode. Folders it makes are its owner's alone too."""
    private_folders(Path(path).parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))


def private_folders(folder: Path) -> None:
    """Make the folder and any missing above it, each 0700 (mkdir's parents=True gives the umask's mode to
    all but the last)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)


def reserve(name: str) -> str:
    """A new file's name, name or name-2, -3 ...: created empty (0600) here, so two callers never share one."""
    for n in range(1, 1000):
        candidate = name if n == 1 else f"{name}-{n}"
        try:
            private_folders(Path(candidate).parent)
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(name)


def ahead(slot_id: int, today: str, now: str) -> str:
    """The next date on which slot ``slot_id`` is still ahead at ``now`` (a time of ``today``): today, or
    tomorrow once it has started. Where an original's undated booking goes."""
    if not_started(today, slot_id, today, int(now[11:13])):
        return today
    return (Date.fromisoformat(today) + timedelta(days=1)).isoformat()


def read_only(path: str) -> sqlite3.Connection:
    """A connection that cannot change the file: as a URI, since as_uri() escapes "#" and "?", so that it
    names exactly this file."""
    return sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)


def upgrade_key(rows: list[tuple[int, str | None, str | None]]) -> str:
    """meta's key that says these bookings of an original were brought in (by any name: a copy of the
    same file is the same original)."""
    return "upgrade " + hashlib.sha256(orjson.dumps(rows)).hexdigest()[:32]


def brought_in(path: str, original: str) -> str | None:
    """When ``upgrade`` brought this original in to the database at path (read-only), or None."""
    key = upgrade_key(read_original(original).rows)
    if not Path(path).exists():
        return None
    with contextlib.closing(read_only(path)) as conn:
        conn.execute("PRAGMA busy_timeout = 10000")
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])


MEMBER_FORMAT = re.compile(r"[A-Z0-9]{1,32}")  # an SRN as the app takes one (app.SRN)


class Original(NamedTuple):
    """What the original system's database holds booked: the bookings to bring in (slot id, the member's
    SRN or None, when it was booked), and a line for each booked row that cannot be one."""

    rows: list[tuple[int, str | None, str | None]]
    unusable: list[str]


def read_original(path: str) -> Original:
    """The original system's booked slots, read without changing its file; a fault of the file is named
    as the original's (ValueError), never as the live database's."""
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    try:
        with contextlib.closing(read_only(path)) as conn:
            conn.execute("PRAGMA busy_timeout = 10000")
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "slots" not in tables:
                raise ValueError(f"{path} is not the original system's database (it has no slots table)")
            if "meta" in tables:
                raise ValueError(f"{path} is a rero-slots database, not the original system's")
            columns = {row[1] for row in conn.execute("PRAGMA table_info(slots)")}
            who = "booked_by" if "booked_by" in columns else "NULL"
            when = "booked_at" if "booked_at" in columns else "NULL"
            found = conn.execute(f"SELECT id, {who}, {when} FROM slots WHERE is_booked ORDER BY id").fetchall()
    except sqlite3.Error as exc:
        raise ValueError(f"{path} (the original): {exc}") from None
    rows, unusable = [], []
    for id_, by, at in found:
        member = by.strip().upper() if isinstance(by, str) else by
        if not isinstance(id_, int) or isinstance(id_, bool):
            unusable.append(f"a booked row whose id is {str(id_)[:40]!r}: left out, not a slot")
        elif member is not None and not (isinstance(member, str) and MEMBER_FORMAT.fullmatch(member)):
            unusable.append(f"slot {id_}: left out, booked_by {str(member)[:40]!r} is not an SRN")
        else:
            rows.append((id_, member, None if at is None else str(at)[:40]))
    return Original(rows, unusable)


# -- maintenance: python app.py backup PATH / python app.py check ------------------------------------------


def backup(source: str, target: str) -> int:
    """Copy a live database, consistent to one moment, through SQLite's online backup API (safe while the
    server writes: a plain file copy could miss what still sits in the WAL). Returns the bookings copied."""
    if not Path(source).exists():
        raise FileNotFoundError(source)
    if Path(target).exists() and Path(target).resolve() == Path(source).resolve():
        raise ValueError("the copy would overwrite the database itself")
    private_folders(Path(target).parent)
    existed = Path(target).exists()
    try:
        with contextlib.closing(sqlite3.connect(source)) as live:
            live.execute("PRAGMA busy_timeout = 10000")
            live.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # not a database: fail before the copy
            try:
                if not existed:
                    create_private(target)
                copy = sqlite3.connect(target)
            except sqlite3.Error as exc:
                raise sqlite3.OperationalError(f"cannot write the copy at {target}: {exc}") from None
            with contextlib.closing(copy):
                live.backup(copy)
                os.chmod(target, 0o600)  # (a copy written over an older file is private too)
                return _counts(copy)["bookings"]
    except BaseException:
        if not existed:  # leave no empty or partial copy behind
            Path(target).unlink(missing_ok=True)
        raise


def _counts(conn: sqlite3.Connection) -> dict[str, Any]:
    """The schema version and what the database holds; an original system's database (not yet upgraded,
    so without meta, bookings or events) has schema None and its booked slots counted."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    schema = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() if "meta" in tables else None
    if "bookings" in tables:
        booked, closed, days = conn.execute(
            "SELECT COALESCE(SUM(NOT closed), 0), COALESCE(SUM(closed), 0), COUNT(DISTINCT date) FROM bookings"
        ).fetchone()
    elif "slots" in tables:
        booked, closed, days = conn.execute("SELECT COUNT(*) FROM slots WHERE is_booked").fetchone()[0], 0, 1
    else:
        booked = closed = days = 0
    events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] if "events" in tables else 0
    return {"schema": schema[0] if schema else None, "bookings": booked, "closed_slots": closed, "days": days,
            "events": events}


def prepare(path: str, hours: Sequence[int], today: str, now: str) -> None:
    """Create or migrate the database once, then close it: what ``python app.py`` does before its workers
    start, so that what would stop them (a file it may not write, files beside it not its own) is one line
    from one process, and the workers never race to create the file."""
    async def once() -> None:
        store = SlotStore(path, hours)
        try:
            await store.open(today, now)
        finally:
            await store.close()

    asyncio.run(once())


def check_writable(path: str) -> None:
    """Raise OSError or sqlite3.Error if the server could not create or write the database at path."""
    if path == ":memory:":
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")


def check(path: str) -> dict[str, Any]:
    """PRAGMA integrity_check, the schema version and booking counts, read without changing anything."""
    if not Path(path).exists():
        raise FileNotFoundError(path)
    with contextlib.closing(read_only(path)) as conn:
        conn.execute("PRAGMA busy_timeout = 10000")
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        return {"ok": problems == ["ok"], "integrity": problems, **_counts(conn)}
