"""Booking rules and the current state of the slots, kept ready to send.

Nothing here knows about HTTP, WebSockets or SQL: the web face calls ``Board``, ``Board`` calls the store,
and every refusal is one ``SlotError`` carrying the sentence the user sees.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import orjson

from db import Row, Snapshot


class SlotError(Exception):
    """A booking or cancellation that the rules refuse; ``str(exc)`` is the user-facing message."""


class Store(Protocol):
    async def book(self, slot_id: int, srn: str, at: str) -> tuple[str, Snapshot]: ...
    async def cancel(self, slot_id: int, srn: str) -> tuple[str, Snapshot]: ...
    async def bookings_of(self, srn: str) -> list[Row]: ...


def slot_dict(row: Row) -> dict[str, Any]:
    id_, start, end, is_booked, booked_by, booked_at = row
    return {
        "id": id_,
        "start_time": start,
        "end_time": end,
        "is_booked": bool(is_booked),
        "booked_by": booked_by,
        "booked_at": booked_at,
    }


class Board:
    """The slots as everyone currently sees them, plus the rules for changing them.

    The state is rebuilt once per change and kept both as a dict and as ready-encoded JSON, so
    ``GET /slots`` and broadcasts never touch the database or re-serialize.
    """

    def __init__(self, store: Store, hours: range, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.hours = hours
        self.clock = clock
        self.version = -1
        self.slots: list[dict[str, Any]] = []
        self.available: list[int] = []
        self.booked: list[int] = []
        self.slots_json = b""  # body of GET /slots
        self.update_text = ""  # the slots_update message, as sent on every socket

    def apply(self, snapshot: Snapshot) -> bool:
        """Take a newer state from the store; False (and nothing changes) if it is not newer."""
        version, rows = snapshot
        if version <= self.version:
            return False
        self.version = version
        self.slots = [slot_dict(row) for row in rows]
        self.available = [s["id"] for s in self.slots if not s["is_booked"]]
        self.booked = [s["id"] for s in self.slots if s["is_booked"]]
        data = {"slots": self.slots, "available_slots": self.available, "booked_slots": self.booked}
        self.slots_json = orjson.dumps(data)
        self.update_text = orjson.dumps(
            {"type": "slots_update", "data": data, "timestamp": self.clock().isoformat()}
        ).decode()
        return True

    def check_slot(self, slot_id: int) -> None:
        if slot_id not in self.hours:
            raise SlotError(f"Slot {slot_id} does not exist")

    async def book(self, slot_id: int, srn: str) -> bool:
        """Book slot_id for srn; True if the visible state changed (always, on success)."""
        self.check_slot(slot_id)
        at = self.clock().strftime("%Y-%m-%d %H:%M:%S")
        outcome, snapshot = await self.store.book(slot_id, srn, at)
        changed = self.apply(snapshot)
        if outcome == "missing":
            raise SlotError(f"Slot {slot_id} does not exist")
        if outcome != "ok":
            raise SlotError(f"Slot {slot_id} is not available")
        return changed

    async def cancel(self, slot_id: int, srn: str) -> bool:
        """Cancel srn's own booking of slot_id; True if the visible state changed."""
        self.check_slot(slot_id)
        outcome, snapshot = await self.store.cancel(slot_id, srn)
        changed = self.apply(snapshot)
        if outcome == "missing":
            raise SlotError(f"Slot {slot_id} does not exist")
        if outcome == "free":
            raise SlotError(f"Slot {slot_id} is not booked")
        if outcome == "other":
            raise SlotError(f"Slot {slot_id} is booked by someone else; you can only cancel your own bookings")
        return changed

    async def bookings_of(self, srn: str) -> list[dict[str, Any]]:
        rows = await self.store.bookings_of(srn)
        return [
            {"id": id_, "start_time": start, "end_time": end, "booked_at": booked_at}
            for id_, start, end, _, _, booked_at in rows
            if id_ in self.hours
        ]
