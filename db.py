"""The SQLite slot store: the only module that speaks SQL.

One connection on one worker thread owns every read and write, so the event loop never waits on the disk
and writes from this process are serialized (datasette's pattern). Writes from other processes on the same
file are serialized by SQLite itself: each change is a single conditional UPDATE inside ``BEGIN IMMEDIATE``,
so "is it free?" and "book it" can never be split by another writer.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# The original system's table, kept as it was so its databases open unchanged.
SCHEMA = """
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
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0);
"""

SLOT_COLUMNS = "id, start_time, end_time, is_booked, booked_by, booked_at"

Row = tuple[int, str, str, int, str | None, str | None]
Snapshot = tuple[int, list[Row]]  # (version, rows ordered by id)


class SlotStore:
    """Bookings of the twelve (or so) hourly slots, in one SQLite file."""

    def __init__(self, path: str, hours: Sequence[int]) -> None:
        self.path = path
        self.hours = list(hours)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._data_version = 0

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # -- lifetime -----------------------------------------------------------------------------------------

    async def open(self) -> Snapshot:
        """Create or migrate the database and return the current state."""
        return await self._run(self._open)

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    def _open(self) -> Snapshot:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk before we answer, so an acknowledged booking survives a power cut.
        conn.execute("PRAGMA synchronous = FULL")
        self._conn = conn
        with self._transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(slots)")}
            if "booked_by" not in columns:  # a database from before the original added user tracking
                conn.execute("ALTER TABLE slots ADD COLUMN booked_by TEXT DEFAULT NULL")
            conn.executemany(
                "INSERT OR IGNORE INTO slots (id, start_time, end_time, is_booked) VALUES (?, ?, ?, 0)",
                [(hour, f"{hour:02d}:00", f"{hour + 1:02d}:00") for hour in self.hours],
            )
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        return self._snapshot()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- reads ------------------------------------------------------------------------------------------

    def _snapshot(self) -> Snapshot:
        assert self._conn is not None
        version = self._conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0]
        rows = self._conn.execute(
            f"SELECT {SLOT_COLUMNS} FROM slots WHERE id BETWEEN ? AND ? ORDER BY id",
            (self.hours[0], self.hours[-1]),
        ).fetchall()
        return version, rows

    async def snapshot(self) -> Snapshot:
        return await self._run(self._snapshot)

    async def changed_elsewhere(self) -> Snapshot | None:
        """The new state if another process (another worker) committed since we last looked, else None."""
        return await self._run(self._changed_elsewhere)

    def _changed_elsewhere(self) -> Snapshot | None:
        assert self._conn is not None
        # data_version moves only when *another* connection commits: a cheap poll, no table read.
        data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if data_version == self._data_version:
            return None
        self._data_version = data_version
        return self._snapshot()

    async def bookings_of(self, srn: str) -> list[Row]:
        return await self._run(self._bookings_of, srn)

    def _bookings_of(self, srn: str) -> list[Row]:
        assert self._conn is not None
        return self._conn.execute(
            f"SELECT {SLOT_COLUMNS} FROM slots WHERE booked_by = ? AND is_booked = 1 ORDER BY id", (srn,)
        ).fetchall()

    # -- writes -----------------------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        assert self._conn is not None
        return _Transaction(self._conn)

    async def book(self, slot_id: int, srn: str, at: str) -> tuple[str, Snapshot]:
        """Book a free slot: returns ("ok" | "taken" | "missing", state after)."""
        return await self._run(self._book, slot_id, srn, at)

    def _book(self, slot_id: int, srn: str, at: str) -> tuple[str, Snapshot]:
        assert self._conn is not None
        with self._transaction():
            changed = self._conn.execute(
                "UPDATE slots SET is_booked = 1, booked_by = ?, booked_at = ?, updated_at = CURRENT_TIMESTAMP"
                " WHERE id = ? AND NOT is_booked",
                (srn, at, slot_id),
            ).rowcount
            outcome = "ok" if changed else self._why_not(slot_id)
            if changed:
                self._bump()
            snapshot = self._snapshot()
        return outcome, snapshot

    async def cancel(self, slot_id: int, srn: str) -> tuple[str, Snapshot]:
        """Cancel srn's booking: returns ("ok" | "free" | "other" | "missing", state after)."""
        return await self._run(self._cancel, slot_id, srn)

    def _cancel(self, slot_id: int, srn: str) -> tuple[str, Snapshot]:
        assert self._conn is not None
        with self._transaction():
            changed = self._conn.execute(
                "UPDATE slots SET is_booked = 0, booked_by = NULL, booked_at = NULL, updated_at = CURRENT_TIMESTAMP"
                " WHERE id = ? AND is_booked AND booked_by = ?",
                (slot_id, srn),
            ).rowcount
            if changed:
                self._bump()
                outcome = "ok"
            else:
                why = self._why_not(slot_id)
                outcome = "other" if why == "taken" else why
            snapshot = self._snapshot()
        return outcome, snapshot

    def _why_not(self, slot_id: int) -> str:
        assert self._conn is not None
        row = self._conn.execute("SELECT is_booked FROM slots WHERE id = ?", (slot_id,)).fetchone()
        if row is None:
            return "missing"
        return "taken" if row[0] else "free"

    def _bump(self) -> None:
        assert self._conn is not None
        self._conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'version'")


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error: takes the write lock up front, so no other
    process can slip a write between our read and our write."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
