"""rero-slots: the web face (HTTP routes), the socket hub, and start-up.

Run with ``python app.py`` (reads HOST, PORT, WORKERS, ... from the environment); ``uvicorn app:app``
serves the same routes without the connection guards (see README).

Read top to bottom, in sections: settings; errors and responses (every refusal answered once); input;
identity; the socket hub; the handlers, grouped as the route table groups them; live listeners (the SSE
feed and the WebSocket endpoint); the route table, with the API documentation keyed by it; start-up;
serving under uvicorn (the seam: every uvicorn internal we rely on, in one place); logging and metrics;
the command line. The booking rules themselves live in slots.py (Board) and db.py (the SQL that decides).
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 11):  # asyncio.timeout, and more: stop here rather than answer every login with 500
    raise SystemExit(f"rero-slots needs Python 3.11 or newer; this is Python {sys.version.split()[0]}")

import asyncio  # noqa: E402 (after the version check)
import bisect
import collections
import contextlib
import functools
import csv
import html
import io
import logging
import math
import os
import re
import resource
import signal
import socket
import sqlite3
import struct
import threading
import urllib.parse
import zlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import orjson
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.server import ServerProtocol

import db
import pesu
from db import SlotStore
from pesu import AuthBusy, AuthUnavailable, Guard, InvalidCredentials, InvalidToken, PesuChecker, Sessions, Throttled
from slots import WEEKDAYS, Board, Day, Forbidden, Rules, SlotError, parse_date, preview

__version__ = "0.6.0"
logger = logging.getLogger("rero")


# -- settings ------------------------------------------------------------------------------------------------


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # what uvicorn knows
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def flag(value: str) -> bool:
    if value.lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(value)
    return value.lower() in ("1", "true", "yes", "on")


def url(value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(value)
    return value


def base_url(value: str) -> str:
    return url(value).rstrip("/")


def line_of_text(value: str) -> str:
    if len(value) > 64 or CONTROL_CHARACTERS.search(value):
        raise ValueError(value)
    return value


def words(value: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in value.split(",") if word.strip())


def srns(value: str) -> frozenset[str]:
    return frozenset(word.upper() for word in words(value))


def membership_mode(value: str) -> str:
    if value.lower() not in ("open", "roster"):
        raise ValueError(value)
    return value.lower()


def setting(default: Any, env: str, read: Callable[[str], Any] = str, low: float | None = None,
            high: float | None = None, *, rule: str = "", secret: bool = False) -> Any:
    """A field of Settings, declared once: its default, the environment variable that sets it, how to read
    one (and, for a number, its range), and its name in slots.Rules where the booking rules use it.
    ``secret``: kept out of repr (uvicorn's trace log prints app state, these settings included)."""
    return field(default=default, repr=not secret,
                 metadata={"env": env, "read": read, "low": low, "high": high, "rule": rule})


@dataclass(frozen=True)
class Settings:
    """Everything configurable, read once from the environment at start-up (tests build their own)."""

    host: str = setting("0.0.0.0", "HOST")
    port: int = setting(8000, "PORT", int, 1, 65535)
    log_level: str = setting("info", "LOG_LEVEL", str.lower)
    log_format: str = setting("text", "LOG_FORMAT", str.lower)  # or "json": one object per line
    workers: int = setting(1, "WORKERS", int, 1, 64)
    pesu_auth_url: str = setting(pesu.DEFAULT_URL, "PESU_AUTH_URL", url, secret=True)  # it may carry user:password@
    cache_minutes: float = setting(30, "CACHE_DURATION_MINUTES", float, 0, 24 * 60)
    pesu_timeout: float = setting(pesu.TIMEOUT_SECONDS, "PESU_TIMEOUT_SECONDS", float, 0.1, 300)
    # PESU checks in flight at once, for the whole process (and as file descriptors allow) ...
    pesu_max_concurrency: int = setting(200, "PESU_MAX_CONCURRENCY", int, 1, 1000)
    pesu_max_queue: int = setting(200, "PESU_MAX_QUEUE", int, 0, 100_000)  # ... waiting for a place; then 503
    database_path: str = setting("data/rero.db", "DATABASE_PATH")
    cors_origins: tuple[str, ...] = setting(("*",), "CORS_ORIGINS", words)
    slot_start_hour: int = setting(3, "SLOT_START_HOUR", int, 0, 23)
    slot_end_hour: int = setting(15, "SLOT_END_HOUR", int, 1, 24)
    timezone: str = setting("Asia/Kolkata", "TIMEZONE")
    booking_days_ahead: int = setting(7, "BOOKING_DAYS_AHEAD", int, 0, 3650, rule="days_ahead")
    booking_grace_minutes: int = setting(30, "BOOKING_GRACE_MINUTES", int, 0, 60, rule="grace_minutes")
    max_bookings_per_day: int = setting(0, "MAX_BOOKINGS_PER_DAY", int, 0, 24, rule="max_per_day")  # 0 = no limit
    max_upcoming_bookings: int = setting(0, "MAX_UPCOMING_BOOKINGS", int, 0, 100_000, rule="max_upcoming")
    # members waiting for one slot, and slots one member may wait for at once; 0 = no limit
    waitlist_per_slot: int = setting(5, "WAITLIST_PER_SLOT", int, 0, 1000, rule="waitlist_per_slot")
    waitlist_per_member: int = setting(3, "WAITLIST_PER_MEMBER", int, 0, 1000, rule="waitlist_per_member")
    # check-in opens this long before a slot starts, and closes this long after
    checkin_opens_minutes: int = setting(10, "CHECKIN_OPENS_MINUTES", int, 0, 120, rule="checkin_opens_minutes")
    checkin_minutes: int = setting(15, "CHECKIN_MINUTES", int, 1, 59, rule="checkin_minutes")
    # release bookings not checked in by then (no-shows)
    checkin_required: bool = setting(False, "CHECKIN_REQUIRED", flag, rule="checkin_required")
    # no-shows in the window that bar new bookings; 0 = off
    no_show_limit: int = setting(0, "NO_SHOW_LIMIT", int, 0, 1000, rule="no_show_limit")
    no_show_window_days: int = setting(30, "NO_SHOW_WINDOW_DAYS", int, 1, 3650, rule="no_show_window_days")
    admin_srns: frozenset[str] = setting(frozenset(), "ADMIN_SRNS", srns, rule="admins")
    # "open": any PESU account may book, as the original; "roster": only members on the club's roster
    membership: str = setting("open", "MEMBERSHIP", membership_mode, rule="membership")
    # empty: a random one per start-up (tokens die with it)
    session_secret: str = setting("", "SESSION_SECRET", secret=True)
    session_minutes: float = setting(60, "SESSION_MINUTES", float, 1, 366 * 24 * 60)
    # failed checks per (username, address) before delays begin (0 = off), within the window
    login_fails_per_username: int = setting(5, "LOGIN_FAILS_PER_USERNAME", int, 0, 1000)
    login_fail_window_minutes: float = setting(15, "LOGIN_FAIL_WINDOW_MINUTES", float, 1, 24 * 60)
    # failed checks per address per window (members' successes earn some back)
    login_fails_per_address: int = setting(100, "LOGIN_FAILS_PER_ADDRESS", int, 0, 1_000_000)
    # the longest delay between guesses at one username from one address
    login_max_delay_seconds: float = setting(30, "LOGIN_MAX_DELAY_SECONDS", float, 0, 3600)
    ws_rate_per_second: float = setting(20, "WS_RATE_PER_SECOND", float, 0, 10_000)  # per socket; 0 = off
    ws_rate_burst: int = setting(40, "WS_RATE_BURST", int, 1, 10_000)
    # open sockets and event streams in all (0 = off), and from one address (0 = off)
    max_connections: int = setting(5000, "MAX_CONNECTIONS", int, 0, 1_000_000)
    max_connections_per_address: int = setting(0, "MAX_CONNECTIONS_PER_ADDRESS", int, 0, 1_000_000)
    # a listener whose send takes longer than this is dropped
    send_timeout: float = setting(10.0, "SEND_TIMEOUT_SECONDS", float, 0.1, 300)
    # a connection that sends no whole request head within this is closed
    request_timeout: float = setting(10.0, "REQUEST_TIMEOUT_SECONDS", float, 0.1, 300)
    metrics: bool = setting(False, "METRICS", flag)  # GET /metrics
    ws_compression: bool = setting(False, "WS_COMPRESSION", flag)  # permessage-deflate for sockets
    # keep-alive pings; a peer that does not answer within as long is dropped
    ws_ping_seconds: float = setting(20.0, "WS_PING_SECONDS", float, 0, 3600)
    club_name: str = setting("ReRo lab", "CLUB_NAME", line_of_text, rule="club_name")  # in calendar feeds
    # a reminder this long before a booked slot, in members' calendars; 0: none
    calendar_reminder_minutes: int = setting(15, "CALENDAR_REMINDER_MINUTES", int, 0, 7 * 24 * 60,
                                             rule="reminder_minutes")
    # how members reach the server, for feed links; empty: as the request came in
    public_url: str = setting("", "PUBLIC_URL", base_url)
    # not read from the environment (tests set them)
    heartbeat_seconds: float = 15.0  # how often /events streams get a comment, so proxies keep them open
    max_backlog: int = 64  # replies waiting for a socket that does not read, before it is dropped
    watch_interval: float = 0.1  # how often to look for changes made by other worker processes

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """The settings from the environment; a value that cannot be used stops start-up with one line
        naming the variable and what it takes (SystemExit), never a traceback or a silent default."""
        values = {}
        for spec in fields(cls):
            name, raw = spec.metadata.get("env"), None
            if name is not None:
                raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            try:
                value = spec.metadata["read"](raw.strip())
            except ValueError:
                raise SystemExit(f"{name}={raw!r} is not a valid value") from None
            low, high = spec.metadata["low"], spec.metadata["high"]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high)
            ):
                raise SystemExit(f"{name}={raw!r} must be a number from {low:g} to {high:g}")
            values[spec.name] = value
        settings = cls(**values)
        if settings.slot_start_hour >= settings.slot_end_hour:
            raise SystemExit("SLOT_START_HOUR must be before SLOT_END_HOUR")
        if settings.log_format not in ("text", "json"):
            raise SystemExit("LOG_FORMAT must be text or json")
        if settings.log_level not in LOG_LEVELS:
            raise SystemExit(f"LOG_LEVEL={settings.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        settings.rules()  # an unknown TIMEZONE stops start-up here, not at the first request
        return settings

    def rules(self) -> Rules:
        """The booking rules: the settings that name a ``rule``, under that name."""
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise SystemExit(f"TIMEZONE={self.timezone!r} is not a known IANA time zone") from None
        rules = {f.metadata["rule"]: getattr(self, f.name) for f in fields(self) if f.metadata.get("rule")}
        return Rules(hours=self.hours, timezone=zone, **rules)

    @property
    def hours(self) -> range:
        return range(self.slot_start_hour, self.slot_end_hour)


# -- errors and responses ------------------------------------------------------------------------------------


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"detail": "Internal Server Error"}, 500)


class BadInput(ValueError):
    """A request field that is missing or of the wrong kind; str() says which and why."""


class Missing(BadInput):
    """ask_of's fields (slot_id, or username and password) are absent: the socket answers this in the
    original's own words."""


# Every refusal by the rules or the sign-in is an exception of the module that decides it, answered here
# once: its HTTP status and the sentence a client reads (what only HTTP can refuse, a body over 64 KiB, an
# unknown path or origin, a full door, stays an HTTPException). Starlette finds the handler along the exception's MRO (so Forbidden, a
# SlotError, is a 403 and AuthBusy, an AuthUnavailable, a 503); the socket says the same sentences
# (socket_sentence), in the original's words where its clients expect them.
REFUSALS: dict[type[Exception], tuple[int, Callable[[Any], str]]] = {
    BadInput: (422, str),  # a field missing or of the wrong kind (app)
    SlotError: (400, str),  # the booking rules say no, in their own sentence (slots)
    Forbidden: (403, str),  # only admins may (slots)
    InvalidToken: (401, lambda exc: "Invalid or expired token"),  # (pesu.Sessions)
    InvalidCredentials: (401, lambda exc: "Invalid credentials"),  # PESU said no (pesu)
    Throttled: (429, lambda exc: f"Too many failed logins; try again in {exc.retry_after} seconds"),  # (pesu.Guard)
    AuthUnavailable: (503, lambda exc: "Authentication service unavailable"),  # PESU could not be asked (pesu)
}


REFUSED = tuple(REFUSALS)  # for except: every refusal


SOCKET_SENTENCES = {  # the original socket's own answers to a booking whose login failed
    InvalidCredentials: "Authentication failed. Invalid credentials.",
    AuthUnavailable: "Authentication service unavailable. Please try again later.",
}


def refusal_of(exc: Exception) -> tuple[int, str]:
    """(HTTP status, sentence) for a refusal, by the nearest class in REFUSALS."""
    status, sentence = next(REFUSALS[kind] for kind in type(exc).__mro__ if kind in REFUSALS)
    return status, sentence(exc)


async def refused(request: Request, exc: Exception) -> Response:
    """The one HTTP answer to every refusal: ``{"detail": sentence}`` (with Retry-After where waiting helps)."""
    status, detail = refusal_of(exc)
    wait = getattr(exc, "retry_after", None)
    return JSONResponse({"detail": detail}, status, headers=None if wait is None else {"Retry-After": str(wait)})


def socket_sentence(exc: Exception, *, booking: bool) -> str:
    """What the socket says of a refusal: the HTTP sentence, or for a booking the original's own words."""
    if booking:
        for kind in type(exc).__mro__:
            if kind in SOCKET_SENTENCES:
                return SOCKET_SENTENCES[kind]
    return refusal_of(exc)[1]


NO_STORE = (b"cache-control", b"no-store")


class Edge:
    """What every HTTP response carries, and CORS for browsers: one cheap layer around the routes.

    Requests without an ``Origin`` header (curl, the same-origin page, health checks) skip CORS entirely;
    the rest go through Starlette's CORSMiddleware. With ``*`` credentials are never allowed; with an
    explicit list they are, and responses vary by origin.
    """

    def __init__(self, app: ASGIApp, cors_origins: tuple[str, ...]) -> None:
        self.app = app
        wildcard = "*" in cors_origins
        self.cors = CORSMiddleware(
            app,
            allow_origins=["*"] if wildcard else list(cors_origins),
            allow_credentials=not wildcard,  # browsers refuse credentials with "*", and so do we
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
        # no-store: answers carry members' bookings, or states that a booking makes stale at once (unless a
        # route says otherwise: a calendar feed is "private, no-cache", so that its ETag is asked about)
        self.headers = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
        # CORS answers depend on the origin; say so to caches on the answers CORSMiddleware does not mark
        self.plain_headers = self.headers if wildcard else [*self.headers, (b"vary", b"Origin")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        from_browser = any(name == b"origin" for name, _ in scope["headers"])
        extra = self.headers if from_browser else self.plain_headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), *extra]
                if not any(name == b"cache-control" for name, _ in headers):
                    headers.append(NO_STORE)
                message["headers"] = headers
            await send(message)

        await (self.cors if from_browser else self.app)(scope, receive, send_with_headers)


# -- input: a request's fields, checked before anyone asks PESU ----------------------------------------------


MAX_BODY_BYTES = 64 * 1024


async def read_body(request: Request) -> bytes:
    """The request body, refusing (413) anything over MAX_BODY_BYTES before reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes)")
    if declared.isdigit():  # the server stops the body at its declared length: take it as it comes
        message = await request.receive()
        body = message.get("body", b"")
        while message.get("more_body", False):
            message = await request.receive()
            body += message.get("body", b"")
    else:  # chunked: count as it comes
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise HTTPException(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes)")
        except ClientDisconnect:  # gone mid-body: no error of ours (it was logged with a traceback)
            raise HTTPException(400, "The request body was cut short") from None
    return bytes(body)


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (413 over MAX_BODY_BYTES, 400 if it is not one)."""
    return json_object(await read_body(request))


def json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HTTPException(400, "Request body must be valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "Request body must be a JSON object")
    return data


def slot_id_of(data: dict[str, Any]) -> int:
    value = data.get("slot_id")  # (present: ask_of says Missing first)
    # Accept 5 and "5" (the original's pydantic did); refuse true, 5.5, "abc" and absurd lengths.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 6:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BadInput("slot_id must be an integer")


def credentials_of(data: dict[str, Any]) -> tuple[str, str]:
    username, password = data.get("username"), data.get("password")  # (present: ask_of says Missing first)
    if not isinstance(username, str) or not username.strip() or len(username) > 64:
        raise BadInput("username must be a non-empty string")
    if not isinstance(password, str) or not password or len(password) > 256:
        raise BadInput("password must be a non-empty string")
    return username.strip(), password


class Ask(NamedTuple):  # a tuple: built on every request, and cheaper to build than a frozen dataclass
    """A request's fields, checked: the member's credentials and, where the route takes them, date and slot
    (empty and 0 where it does not)."""

    username: str
    password: str
    token: str | None  # a session token, used instead of username and password
    address: str  # the client's address (the real one behind a trusted proxy)
    date: str
    slot_id: int
    data: dict[str, Any]
    member: str | None  # "for": the member an admin acts for (book and cancel only)


def ask_of(board: Board, data: dict[str, Any], token: str | None, address: str, *, slot: bool) -> Ask:
    """Check a request's fields (Missing before any other BadInput, or SlotError, if they are wrong), before
    anyone asks PESU."""
    if slot and data.get("slot_id") is None:
        raise Missing("slot_id is required")
    if token is None and (data.get("username") is None or data.get("password") is None):
        raise Missing("username and password are required")
    slot_id = slot_id_of(data) if slot else 0
    username, password = ("", "") if token is not None else credentials_of(data)
    date = board.resolve(data.get("date")) if slot else ""
    member = None if not slot or data.get("for") is None else member_field(data, "for")
    return Ask(username, password, token, address, date, slot_id, data, member)


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header (any other scheme counts as a bad token)."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else header


def origin_allowed(settings: Settings, connection: Request | WebSocket) -> bool:
    """Whether a page may open a socket or stream here. Browsers always send ``Origin`` with these, and no
    CORS check guards a WebSocket or a GET, so with an explicit CORS_ORIGINS another site's page is refused
    here; a client that sends no Origin (curl, a native app, the device gateway) is not a page, and may."""
    origin = connection.headers.get("origin")
    return origin is None or "*" in settings.cors_origins or origin in settings.cors_origins


def address_of(connection: Request | WebSocket) -> str:
    return connection.client.host if connection.client else "unknown"


async def parse(request: Request[State], *, slot: bool) -> Ask:
    """The request's JSON body, checked: 400/413/422 if it is not what the route takes."""
    token = bearer_token(request)
    body = await read_body(request)
    if not body.strip():  # no body: a Bearer token says who asks, or nothing does
        if token is None:
            raise HTTPException(401, "Sign in: send username and password, or Authorization: Bearer TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})
        return ask_of(request.state["board"], {}, token, address_of(request), slot=slot)
    return ask_of(request.state["board"], json_object(body), token, address_of(request), slot=slot)


def page_field(data: dict[str, Any], name: str, default: int, most: int) -> int:
    value = data.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise BadInput(f"{name} must be an integer from 1 to {most}")
    return value


def watched_date(value: Any) -> str | None:
    """The day a listener asks to watch: a checked date, or None for "today, whichever day that is"."""
    return None if value is None else parse_date(value)


def feed_kind(data: dict[str, Any]) -> str:
    kind = data.get("feed", "member")
    if kind not in ("member", "lab"):
        raise BadInput('feed must be "member" (your bookings) or "lab" (every slot, for admins)')
    return kind


SRN = re.compile(r"[A-Z0-9]{1,32}")


WEEKDAY_NAMES = dict(zip(WEEKDAYS, WEEKDAYS)) | {  # "tue", "Tue", "tuesday" and "TUESDAY" all say Tuesday
    "monday": "mon", "tuesday": "tue", "wednesday": "wed", "thursday": "thu", "friday": "fri", "saturday": "sat",
    "sunday": "sun"}


def series_of(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of POST /admin/series, checked for kind (BadInput: 422) and as dates (SlotError: 400)."""
    action = data.get("action")
    if action not in ("close", "reserve"):
        raise BadInput('action must be "close" or "reserve"')
    slots = data.get("slots")
    if not isinstance(slots, list) or not slots or len(slots) > 24 or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in slots):
        raise BadInput("slots must be a list of slot ids, e.g. [14, 15]")
    weekdays = data.get("weekdays")
    if not isinstance(weekdays, list) or not weekdays or not all(
            isinstance(w, str) and w.strip().lower() in WEEKDAY_NAMES for w in weekdays):
        raise BadInput('weekdays must be a list of "mon", "tue", "wed", "thu", "fri", "sat", "sun"')
    if data.get("from") is None or data.get("until") is None:
        raise BadInput("from and until are required (YYYY-MM-DD)")
    srn = data.get("srn")
    if action == "reserve":
        if not isinstance(srn, str) or not SRN.fullmatch(srn.strip().upper()):
            raise BadInput("srn is required for reserve: the member's SRN")
        srn = srn.strip().upper()
    elif srn is not None:
        raise BadInput("srn is only for reserve")
    title = data.get("title")
    if title is not None and (not isinstance(title, str) or len(title) > 100 or CONTROL_CHARACTERS.search(title)):
        raise BadInput("title must be a line of text of at most 100 characters")
    dry_run = data.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise BadInput("dry_run must be true or false")
    chosen = {WEEKDAY_NAMES[w.strip().lower()] for w in weekdays}
    return {"action": action, "srn": srn, "slots": sorted(set(slots)), "title": (title or "").strip() or None,
            "weekdays": [w for w in WEEKDAYS if w in chosen], "first": parse_date(data["from"]),
            "last": parse_date(data["until"]), "dry_run": dry_run}


# -- identity: who is asking ---------------------------------------------------------------------------------


class State(TypedDict):
    settings: Settings
    board: Board
    door: Door  # read by the protocols (GuardedHttp, GuardedWebSocket) from uvicorn's copy of this state
    hub: Hub
    pesu: PesuChecker
    sessions: Sessions
    metrics: Metrics
    metrics_share: MetricsShare | None  # None: this process's own metrics are the service's (":memory:")
    reports: asyncio.Semaphore  # places for admins' reports (REPORTS_AT_ONCE)


async def srn_of(state: State, ask: Ask) -> str:
    """The member's SRN, from a session token or from PESU; else InvalidToken, or profile_of's refusals."""
    if ask.token is not None:
        return state["sessions"].claims(ask.token)["srn"]
    return (await profile_of(state, ask.username, ask.password, ask.address))["srn"]


async def profile_of(state: State, username: str, password: str, address: str) -> dict[str, Any]:
    """PESU's answer for these credentials; InvalidCredentials if it refuses them, Throttled while guessing
    at this username from this address (or from this address at all) is being slowed, AuthUnavailable if
    PESU could not be asked. The limits themselves live in the checker (pesu.Guard), where the upstream
    call is made; here each outcome is counted and logged (the refusal itself is answered by REFUSALS)."""
    fields = {"username": username, "address": address, "action": "login"}
    try:
        profile = await state["pesu"].check(username, password, address)
    except Throttled:
        state["metrics"].count("rero_logins_total", 'result="throttled"')
        logger.debug("login throttled for %s from %s", username, address, extra={**fields, "status": 429})
        raise
    except InvalidCredentials:
        state["metrics"].count("rero_logins_total", 'result="invalid"')
        logger.info("login refused for %s from %s", username, address, extra={**fields, "status": 401})
        raise
    except AuthUnavailable as exc:
        state["metrics"].count("rero_logins_total", 'result="upstream_error"')
        if isinstance(exc, AuthBusy):
            logger.debug("PESU checks queue full: %s", exc, extra={**fields, "status": 503})
        else:
            logger.warning("PESU auth unavailable at %s: %s", public_url(state["settings"].pesu_auth_url), exc,
                           extra={**fields, "status": 503})
        raise
    state["metrics"].count("rero_logins_total", 'result="ok"')
    return profile


# -- the socket hub ------------------------------------------------------------------------------------------


class Peer:
    """One listener (a WebSocket, or an SSE stream) and what is waiting to be sent to it.

    Replies to this client queue in order; the slot state does not queue at all: only the newest ``Day``
    waits, so a slow reader gets the latest state instead of a backlog of stale ones. The peer's own pump
    task sends whatever waits; the hub's fan-out writes a state itself only when the pump is idle and the
    socket takes it at once, so a slow reader can only ever stall itself. ``direct`` says the fan-out may
    write the frame to the socket now: every change of what it depends on sets it again (``reckon``).
    """

    def __init__(self, address: str) -> None:
        self.address = address  # the client's, for the per-address connection cap
        self.srn: str | None = None  # the member this socket said it is (identify), for personal messages
        self.jti: str | None = None  # the id of the token it said so with (signing out ends the messages) ...
        self.expires = 0.0  # ... and when that token expires (so does its right to them)
        self.replies: deque[str] = deque()
        self.latest: Day | None = None  # the state waiting to be sent
        self.held: Day | None = None  # the newest state handed to this peer, sent or waiting
        self.close_code: int | None = None
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.date: str | None = None  # the day this peer watches; None follows "today" across midnight
        self.due = False  # the newest state may be sent now (set by send_state and by the hub's fan-out)
        self.sending = False  # a send to this peer has started and not finished
        self.wire: GuardedWebSocket | EventWire | None = None  # our protocol's side, under python app.py
        self.direct: asyncio.WriteTransport | None = None  # its transport while a state may be written to it now
        self.frame = "plain"  # which of a state's Frames that is (see Frames)

    # -- what this peer holds, and what it is owed (the hub decides when; the peer keeps the books)

    def behind(self, day: Day) -> bool:
        """Whether day is news to this peer: another day than it holds, or a newer state of it."""
        return self.held is None or self.held.date != day.date or day.news_to(self.held)

    def offer(self, day: Day) -> bool:
        """Hand this peer a state: whether it was news (then it waits to be sent, replacing any older one)."""
        if not self.behind(day):
            return False
        self.latest = self.held = day
        return True

    def owe_state(self) -> None:
        """The waiting state is the pump's to send."""
        self.due = True
        self.reckon()
        self.wake.set()

    def send_state(self, day: Day) -> None:
        """Send this state now, as the listener's first, unless the fan-out has handed it this one (or a
        newer) while the listener waited for it: the first sockets of a process wait for the day's first
        read, and its broadcast reaches those already joined."""
        if self.offer(day):
            self.owe_state()

    def answer_with(self, day: Day) -> str:
        """A get_slots answer: this state goes in order with the replies, and an older one waiting is
        not sent after it; the text to queue."""
        self.latest, self.due, self.held = None, False, day
        self.reckon()
        return day.update_text

    def add_reply(self, text: str, max_backlog: int) -> bool:
        """Queue a reply; False if ``max_backlog`` are waiting already (the peer stopped reading)."""
        if len(self.replies) >= max_backlog:
            return False
        self.replies.append(text)
        self.reckon()
        self.wake.set()
        return True

    @property
    def idle(self) -> bool:
        """Nothing being sent, owed or queued, and not closing: a state may be written to it straight away."""
        return not (self.sending or self.due or self.replies or self.close_code is not None)

    def attach(self, wire: GuardedWebSocket | EventWire) -> None:
        """Have states written straight to this connection whenever it flows (under python app.py)."""
        self.wire, self.frame = wire, wire.frame
        wire.listen(self)  # (it tells us when our writes stop or flow again)
        self.reckon()

    def reckon(self) -> None:
        """Set ``direct`` again, after a change to what it depends on: this peer is idle and its connection
        takes writes (the fan-out then reads one attribute a listener, not the six conditions on three
        objects: at thousands of listeners each object read is a cache miss)."""
        wire = self.wire
        self.direct = wire.transport if wire is not None and wire.flowing and self.idle else None

    def take(self) -> str | Day | None:
        """What is due next: a reply (owed even while closing: a flood's warning, the answers to what it sent
        before), else the waiting state unless it is closing; None when nothing is."""
        if self.replies:
            text = self.replies.popleft()
            self.reckon()
            return text
        if self.close_code is None and self.due and self.latest is not None:
            day, self.latest, self.due = self.latest, None, False
            self.reckon()
            return day
        return None

    async def write(self, item: str | Day) -> None:
        """Write one reply or state (``sending`` while it is under way, however it ends)."""
        self.sending = True
        self.reckon()
        try:
            await (self.deliver(item) if isinstance(item, str) else self.deliver_day(item))
        finally:
            self.sending = False
            self.reckon()

    def sent(self, day: Day) -> None:
        """A state written outside the pump (by the fan-out) is no longer waiting."""
        if self.latest is day:
            self.latest = None

    def close(self, code: int) -> None:
        if self.close_code is None:
            self.close_code = code
            self.reckon()
            self.wake.set()

    async def deliver(self, text: str) -> None:
        """Send one reply (only sockets get replies)."""
        raise NotImplementedError

    async def deliver_day(self, day: Day) -> None:
        raise NotImplementedError

    async def finish(self, code: int) -> None:
        """End the connection; nothing more will be sent."""
        raise NotImplementedError


class SocketPeer(Peer):
    def __init__(self, websocket: WebSocket, address: str) -> None:
        super().__init__(address)
        self.websocket = websocket
        # our protocol (GuardedWebSocket, under python app.py), to write a state's frame to straight away;
        # None under bare uvicorn, where every state goes through ASGI
        wire = websocket.scope.get("extensions", {}).get(DIRECT_WRITES)
        if wire is not None:
            self.attach(wire)

    async def deliver(self, text: str) -> None:
        await self.websocket.send_text(text)

    async def deliver_day(self, day: Day) -> None:
        await self.websocket.send_text(day.update_text)

    async def finish(self, code: int) -> None:
        await self.websocket.close(code)


class StreamPeer(Peer):
    """A Server-Sent Events listener: the same slots_update messages, with ``id:`` = version; its only
    "replies" are the hub's heartbeat comments."""

    def __init__(self, send: Send, address: str, wire: EventWire | None = None) -> None:
        super().__init__(address)
        self.send = send
        if wire is not None:  # our HTTP protocol's side of this response, under python app.py
            self.attach(wire)

    async def deliver(self, text: str) -> None:
        await self.send({"type": "http.response.body", "body": text.encode(), "more_body": True})

    async def deliver_day(self, day: Day) -> None:
        await self.send({"type": "http.response.body", "body": day.event_bytes, "more_body": True})

    async def finish(self, code: int) -> None:
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


FAN_OUT_BATCH = 25  # listeners served per turn of the event loop during a broadcast
DIRECT_BATCH = 250  # ... of those written to straight away (a write each: ten times cheaper than a send)
HEARTBEAT = ": keep-alive\n\n"  # an SSE comment: EventSource ignores it
SEND_ERRORS = (OSError, RuntimeError, WebSocketDisconnect)  # the peer went away mid-send


class Hub:
    """The listeners; a broadcast is encoded once and handed to every listener.

    A broadcast only records the day's newest state, whatever the number of listeners. One fan-out task
    then goes through the listeners FAN_OUT_BATCH at a time, handing each the newest state of the day it
    watches unless it holds it already, and yields between batches, so a member's own reply waits behind
    one batch of sends, never behind the whole broadcast. A change that finds the hub idle goes out at
    once. Changes that arrive while a round is going out are a burst: the next round waits twice as long
    as the last one took, so bookers keep two thirds of the process, and the states of the burst coalesce
    meanwhile (each listener only ever gets the newest).

    The fan-out writes to an idle listener itself when its socket takes the bytes at once, and wakes the
    listener's own pump otherwise (a slow reader, or replies in flight), so a slow reader only ever stalls
    itself. Writing directly is what makes a round fast: waking a task per listener costs more than the
    send (about 8 ms a round of 1000 listeners on 2 cores).
    """

    def __init__(self, send_timeout: float, max_backlog: int, max_peers: int = 0, max_per_address: int = 0) -> None:
        self.peers: set[Peer] = set()  # the listeners a broadcast goes to
        self.open = 0  # listeners joined whose endpoints have not left yet
        self.members: dict[str, set[Peer]] = {}  # srn -> the sockets that said they are that member
        self.watching: collections.Counter[str] = collections.Counter()  # days peers watch by name
        self.per_address: collections.Counter[str] = collections.Counter()  # of those, by client address
        self.send_timeout = send_timeout
        self.max_backlog = max_backlog
        self.max_peers = max_peers
        self.max_per_address = max_per_address
        self.newest: dict[str, Day] = {}  # the newest state broadcast of each day
        self.frames: dict[str, Frames] = {}  # ... and it on the wire, built once for every listener
        self.today = ""  # the club's today, which listeners that name no day watch
        self.pending = asyncio.Event()
        self.fan_out_task: asyncio.Task[None] | None = None
        self.heartbeat_task: asyncio.Task[None] | None = None
        self.rounds = 0  # broadcast rounds, and the seconds they took to hand every listener its state
        self.round_seconds = 0.0
        self.direct_writes = 0  # states written straight to a listener's transport (the rest: sends)

    def start(self, heartbeat: float = 15.0) -> None:
        self.fan_out_task = asyncio.create_task(self._fan_out())
        self.heartbeat_task = asyncio.create_task(self._heartbeat(heartbeat))

    async def _heartbeat(self, interval: float) -> None:
        """An SSE comment to every /events stream now and then: proxies (nginx: 60 s by default) cut a
        response that sends nothing for a while, and a stream sends nothing while nothing changes."""
        while True:
            await asyncio.sleep(interval)
            for peer in list(self.peers):
                if isinstance(peer, StreamPeer):
                    self._queue(peer, HEARTBEAT)

    async def _fan_out(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.pending.wait()
            self.pending.clear()
            started = loop.time()
            served = 0
            self.rounds += 1
            written = 0
            today = self.today
            last: tuple[Day | None, Day | None] = (None, None)  # (held, day): whether day is news to held
            news = False
            for peer in list(self.peers):
                date = peer.date or today
                day = self.newest.get(date)
                if day is None:
                    continue
                transport = peer.direct
                if transport is not None:
                    # the common case, kept to the peer and its transport (each other object read a listener
                    # costs a cache miss at thousands of them): the frame built once, written straight away.
                    # Most hold the same older state: whether this one is news to it is worked out once.
                    held = peer.held
                    if held is day:
                        continue
                    if last[0] is not held or last[1] is not day:
                        last, news = (held, day), peer.behind(day)
                    if not news:
                        continue
                    if not transport.is_closing():  # (a close our wire was not told of: the pump's, below)
                        transport.write(getattr(self.frames[date], peer.frame))
                        peer.held, peer.latest = day, None
                        written += 1
                        if written % DIRECT_BATCH == 0:
                            await asyncio.sleep(0)
                        continue
                if not peer.offer(day):
                    continue
                if not await self._send_at_once(peer, day):
                    peer.owe_state()
                served += 1
                if served % FAN_OUT_BATCH == 0:
                    await asyncio.sleep(0)  # let woken pumps send, and members' requests in between
            self.round_seconds += loop.time() - started
            self.direct_writes += written
            if self.pending.is_set():  # more changes came during this round: a burst
                await asyncio.sleep(2 * (loop.time() - started))

    async def _send_at_once(self, peer: Peer, day: Day) -> bool:
        """Send an idle peer its newest state if its socket takes it without waiting; False leaves it to
        the peer's pump. uvicorn's send waits for a writable socket before it writes anything, so a send cut
        off by the zero timeout has written nothing."""
        if not peer.idle:
            return False
        try:
            async with asyncio.timeout(0):
                await peer.write(day)
        except TimeoutError:
            return False
        except SEND_ERRORS as exc:
            logger.debug("send failed: %r", exc)
            self._drop(peer)
            if peer.task is not None:
                peer.task.cancel()  # as its own failed send ends it: its endpoint then leaves
            return True
        peer.sent(day)
        return True

    def admits(self, address: str) -> bool:
        """Room for one more listener, in all and from this address (limits of 0 are off).

        A listener counts from join until its endpoint has left, so one dropped for not reading still
        counts while its connection is being closed."""
        if self.max_peers and self.open >= self.max_peers:
            return False
        return not self.max_per_address or self.per_address[address] < self.max_per_address

    def join(self, peer: Peer) -> None:
        peer.task = asyncio.create_task(self._pump(peer))
        self.peers.add(peer)
        self.open += 1
        self.per_address[peer.address] += 1

    def _drop(self, peer: Peer) -> None:
        """Stop sending to a listener (its pump sends nothing more); safe to call more than once."""
        self.peers.discard(peer)

    def identify(self, peer: Peer, srn: str) -> None:
        """From now on, this listener also gets the messages meant for srn alone."""
        if peer.srn is not None:
            self.members[peer.srn].discard(peer)
        peer.srn = srn
        self.members.setdefault(srn, set()).add(peer)

    def tell(self, srn: str, message: dict[str, Any], live: Callable[[str, float], bool]) -> None:
        """A message for one member, on every socket of theirs that said who it is (on this process) with
        credentials still good: a socket identified with a token that has been signed out or has expired
        since (``live(jti, expires)`` says) hears no more."""
        for peer in list(self.members.get(srn, ())):
            if peer.jti is not None and not live(peer.jti, peer.expires):
                self.members[srn].discard(peer)
                peer.srn = peer.jti = None
            else:
                self.reply(peer, message)

    async def leave(self, peer: Peer) -> None:
        """The listener's endpoint is done with it: stop its pump and stop counting it."""
        self._unwatch(peer)
        if peer.srn is not None:
            mine = self.members.get(peer.srn, set())
            mine.discard(peer)
            if not mine:
                self.members.pop(peer.srn, None)
        self._drop(peer)
        if peer.task is not None:
            peer.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await peer.task
        self.open -= 1
        self.per_address[peer.address] -= 1
        if not self.per_address[peer.address]:
            del self.per_address[peer.address]

    @property
    def sockets(self) -> int:
        """Open WebSockets (what /stats calls active connections)."""
        return sum(isinstance(peer, SocketPeer) for peer in self.peers)

    def watch(self, peer: Peer, date: str | None) -> None:
        """The peer watches that day from now on (None: today, whichever day that is)."""
        self._unwatch(peer)
        peer.date = date
        if date is not None:
            self.watching[date] += 1

    def _unwatch(self, peer: Peer) -> None:
        if peer.date is not None:
            self.watching[peer.date] -= 1
            if not self.watching[peer.date]:
                del self.watching[peer.date]
                if peer.date != self.today:
                    self.newest.pop(peer.date, None)  # nobody watches it: keep nothing of it
                    self.frames.pop(peer.date, None)

    def broadcast(self, day: Day, today: str) -> None:
        """Send a day's new state to the listeners watching that day (the fan-out sends it). A day nobody
        watches is not kept: so reading many days cannot grow the hub's memory."""
        self.today = today
        if day.date != today and day.date not in self.watching:
            return
        known = self.newest.get(day.date)
        if known is None or day.news_to(known):
            self.newest[day.date] = day
            self.frames[day.date] = Frames(day)
            self.pending.set()

    def roll_over(self, day: Day) -> None:
        """A new day began: listeners watching "today" now watch it, and past days are forgotten."""
        self.newest = {date: known for date, known in self.newest.items() if date > day.date}
        self.frames = {date: frame for date, frame in self.frames.items() if date in self.newest}
        self.broadcast(day, day.date)

    def reply(self, peer: Peer, message: dict[str, Any]) -> None:
        self._queue(peer, orjson.dumps(message).decode())

    def reply_state(self, peer: Peer, day: Day) -> None:
        """Answer a get_slots: one slots_update per request, in order with the other replies (a broadcast
        waiting for this peer is older, so it is not sent after it)."""
        self._queue(peer, peer.answer_with(day))

    def _queue(self, peer: Peer, text: str) -> None:
        if not peer.add_reply(text, self.max_backlog):
            logger.warning("dropping a socket that stopped reading (%d replies waiting)", len(peer.replies))
            self._drop(peer)
            peer.close(1008)

    async def wait_closed(self, peer: Peer) -> None:
        """Wait while the pump sends what this peer is owed and then the close frame (each send bounded)."""
        if peer.task is not None:
            await asyncio.wait({peer.task}, timeout=2 * self.send_timeout + 1)

    def close_all(self, code: int) -> None:
        for peer in list(self.peers):
            self._drop(peer)
            peer.close(code)
        for task in (self.fan_out_task, self.heartbeat_task):
            if task is not None:
                task.cancel()

    async def _pump(self, peer: Peer) -> None:
        try:
            while True:
                await peer.wake.wait()
                peer.wake.clear()
                while (item := peer.take()) is not None:  # replies before the close frame; states stop once closing
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races
                    # with a completed send, leaving this task alive after its socket has gone.
                    async with asyncio.timeout(self.send_timeout):
                        await peer.write(item)
                if peer.close_code is not None:
                    async with asyncio.timeout(self.send_timeout):
                        await peer.finish(peer.close_code)
                    return
        except asyncio.TimeoutError:
            logger.warning("dropping a listener that took over %.1fs to accept a message", self.send_timeout)
            self._drop(peer)
            peer.close(1008)  # (closing: nothing is written to it straight away while the close waits)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.send_timeout):  # the close frame may never go either
                    await peer.finish(1008)
        except SEND_ERRORS as exc:  # the peer went away mid-send; its endpoint cleans up
            logger.debug("send failed: %r", exc)
            self._drop(peer)


# -- handlers: slots, bookings and the lab now ---------------------------------------------------------------


async def today_of(state: State) -> Day:
    board = state["board"]
    return await board.day(board.today())


def db_summary(state: State, day: Day) -> dict[str, Any]:
    return {
        "total_slots": len(day.slots),
        "booked_slots": len(day.booked),
        "available_slots": len(day.available),
        "database_path": state["settings"].database_path,
    }


async def root(request: Request[State]) -> Response:
    state = request.state
    day = await today_of(state)
    return JSONResponse(
        {
            "message": "Slot Booking API is running",
            "websocket_endpoint": "/slot-booking",
            "active_connections": state["hub"].sockets,
            "booked_slots": day.booked,
        }
    )


async def health(request: Request[State]) -> Response:
    state = request.state
    day = await today_of(state)
    return JSONResponse(
        {
            "status": "healthy",
            "timestamp": state["board"].now().isoformat(),
            "active_connections": state["hub"].sockets,
            "total_slots": len(day.slots),
            "booked_slots_count": len(day.booked),
            "available_slots_count": len(day.available),
            "database": db_summary(state, day),
        }
    )


async def stats(request: Request[State]) -> Response:
    state = request.state
    summary = db_summary(state, await today_of(state))
    return JSONResponse(
        {
            "database": summary,
            "websocket": {"active_connections": state["hub"].sockets},
            "slots": {
                "total": summary["total_slots"],
                "booked": summary["booked_slots"],
                "available": summary["available_slots"],
            },
        }
    )


class SlotList:
    """GET /slots (``?date=`` for another day): the day's ready-encoded bytes.

    The route every open page polls, so it is a plain ASGI app: no Request, no per-request wrappers,
    just a cache lookup and two sends. A bad date still raises SlotError, answered by the app.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        board: Board = scope["state"]["board"]
        query = scope["query_string"]
        date = board.resolve(QueryParams(query).get("date") if query else None)  # (a SlotError is a 400)
        body = (await board.day(date)).slots_json
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


MESSAGES = {
    "book": "Slot {} booked successfully",
    "cancel": "Slot {} booking cancelled successfully",
    "close": "Slot {} closed",
    "open": "Slot {} reopened",
    "check_in": "Slot {} checked in",
    "join": "In line for slot {}",  # the board says where
    "leave": "Left the waitlist for slot {}",
    "leave_early": "Left slot {} early: the rest of it is for others",
}


async def change(state: State, action: str, ask: Ask, srn: str, *, via: str) -> str:
    """Book, cancel, close, reopen, join or leave a waitlist; the sentence that answers it (the board hands
    the new state to the hub, which broadcasts it).

    A refusal is the rules' SlotError (Forbidden where only admins may), answered by REFUSALS.
    """
    board = state["board"]
    message = MESSAGES[action].format(ask.slot_id)
    by = None
    if ask.member is not None:  # an admin books or cancels for a member: filed under the member, by them
        if action not in ("book", "cancel"):
            raise BadInput('"for" is for booking and cancelling only')
        by, srn, message = srn, ask.member, f"{message} for {ask.member}"
    if action == "book":
        await board.book(ask.date, ask.slot_id, srn, via, by)
    elif action == "cancel":
        await board.cancel(ask.date, ask.slot_id, srn, via, by)
    elif action == "join":
        message = await board.join_waitlist(ask.date, ask.slot_id, srn, via)
    elif action == "leave":
        await board.leave_waitlist(ask.date, ask.slot_id, srn, via)
    elif action == "leave_early":
        await board.leave_early(ask.date, ask.slot_id, srn, via)
    elif action == "check_in":
        await board.check_in(ask.date, ask.slot_id, srn, via)
    else:
        await board.set_closed(ask.date, ask.slot_id, action == "close", srn, via, reason_of(ask.data))
    state["metrics"].count("rero_slot_changes_total", f'action="{action}",via="{via}"')
    logger.info("%s slot %d on %s by %s via %s%s", action, ask.slot_id, ask.date, srn, via,
                "" if by is None else f" (for them, by {by})",
                extra={"srn": srn, "slot": ask.slot_id, "date": ask.date, "action": action, "via": via})
    return message


def slot_route(action: str) -> Callable[[Request[State]], Any]:
    """POST /book-slot, /cancel-slot, /admin/close-slot, /admin/open-slot: the same steps, another action."""

    async def endpoint(request: Request[State]) -> Response:
        ask = await parse(request, slot=True)
        srn = await srn_of(request.state, ask)
        message = await change(request.state, action, ask, srn, via="http")
        return JSONResponse({"success": True, "message": message, "slot_id": ask.slot_id})

    endpoint.__name__ = f"{action}_slot"
    return endpoint


async def my_bookings(request: Request[State]) -> Response:
    state = request.state
    ask = await parse(request, slot=False)
    body = await state["board"].bookings_body(await srn_of(state, ask))
    return Response(body, media_type="application/json")


async def now(request: Request[State]) -> Response:
    """Who holds the lab now, and next: for the lab's device gateway and livestream (cheap: from memory)."""
    return JSONResponse(await request.state["board"].current())


async def me(request: Request[State]) -> Response:
    """The member a Bearer token belongs to: whether they hold the slot under way, and their next booking.
    A device gateway admits exactly the current holder with the member's own token."""
    state = request.state
    token = bearer_token(request)
    if token is None:
        raise HTTPException(401, "A Bearer token is required")
    srn = state["sessions"].claims(token)["srn"]
    board = state["board"]
    current = (await board.current())["current"]
    held = current is not None and current["holder"] == srn
    return JSONResponse({"srn": srn, "holds_current_slot": held, "current": current if held else None,
                         "next_booking": await board.next_booking(srn, current if held else None),
                         "lately": await board.lately(srn)})


# -- handlers: sessions --------------------------------------------------------------------------------------


async def login(request: Request[State]) -> Response:
    """Check credentials with PESU; the answer carries a session token to use instead of them.

    With a Bearer token instead, it says whose the token is and how long it has left (no new token).
    """
    state = request.state
    ask = await parse(request, slot=False)
    if ask.token is not None:
        claims = state["sessions"].claims(ask.token)
        expires_in = int(claims["exp"] - state["sessions"].clock())
        user, token = {"srn": claims["srn"]}, ask.token
    else:
        user = await profile_of(state, ask.username, ask.password, ask.address)
        token, expires_in = state["sessions"].issue(user["srn"])
    body = {"success": True, "message": "Login successful", "user": user, "token": token, "expires_in": expires_in}
    return JSONResponse(body)


async def logout(request: Request[State]) -> Response:
    """Revoke a session token (Bearer, or ``{"token": ...}``) for the rest of its life, on every worker."""
    state = request.state
    token = bearer_token(request)
    if token is None:
        token = (await read_json(request)).get("token")
        if not isinstance(token, str):
            raise BadInput("token is required (Authorization: Bearer, or in the body)")
    claims = state["sessions"].claims(token)
    state["sessions"].revoke(claims["jti"], claims["exp"])
    await state["board"].revoke_token(claims["jti"], claims["exp"], state["sessions"].clock())
    logger.info("logout of %s", claims["srn"], extra={"srn": claims["srn"], "action": "logout"})
    return JSONResponse({"success": True, "message": "Logged out"})


# -- handlers: admins ----------------------------------------------------------------------------------------


async def forgive_no_show(request: Request[State]) -> Response:
    """An admin forgives a member's no-show ({"srn", "date", "slot_id"} beside the admin's credentials)."""
    state = request.state
    ask = await parse(request, slot=True)
    who = ask.data.get("srn")
    if not isinstance(who, str) or not who.strip():
        raise BadInput("srn is required")
    admin = await srn_of(state, ask)
    member = who.strip().upper()
    await state["board"].forgive_no_show(admin, member, ask.date, ask.slot_id, "http")
    logger.info("no-show of %s on slot %d on %s forgiven by %s", member, ask.slot_id, ask.date, admin,
                extra={"srn": admin, "slot": ask.slot_id, "date": ask.date, "action": "forgive"})
    return JSONResponse({"success": True, "message": f"No-show of {member} on slot {ask.slot_id} forgiven",
                         "slot_id": ask.slot_id})


async def admin_history(request: Request[State]) -> Response:
    """The change log, newest first, for admins: filter by date range (from, to), srn and action; paged."""
    ask = await parse(request, slot=False)
    data, board = ask.data, request.state["board"]
    page, page_size = page_field(data, "page", 1, 1_000_000), page_field(data, "page_size", 50, 500)
    since = None if data.get("from") is None else board.resolve(data["from"])
    until = None if data.get("to") is None else board.resolve(data["to"])
    who = data.get("srn")
    if who is not None and not isinstance(who, str):
        raise BadInput("srn must be a string")
    action = data.get("action")
    if action is not None and (not isinstance(action, str) or not re.fullmatch(r"[a-z_]{1,32}", action)):
        raise BadInput('action must be an event\'s action, e.g. "book", "cancel" or "no_show"')
    srn = await srn_of(request.state, ask)
    total, events = await board.history(srn, since, until, who and who.strip().upper(), page, page_size, action)
    return JSONResponse(
        {"success": True, "events": events, "total": total, "page": page, "page_size": page_size}
    )


def roster_route(add: bool) -> Callable[[Request[State]], Any]:
    """POST /admin/members/add and /admin/members/remove: one SRN or many (see roster_of)."""

    async def endpoint(request: Request[State]) -> Response:
        state, token = request.state, bearer_token(request)
        data, srns = roster_of(await read_body(request), token)
        admin = await srn_of(state, ask_of(state["board"], data, token, address_of(request), slot=False))
        changed = await state["board"].change_roster(admin, srns, add, "http")
        verb, already = ("added", "already on the roster") if add else ("removed", "not on the roster")
        logger.info("%d member(s) %s by %s", len(changed), verb, admin, extra={"srn": admin, "action": "roster"})
        return JSONResponse({"success": True, "message": f"{len(changed)} member(s) {verb}; "
                             f"{len(srns) - len(changed)} {already}", verb: changed,
                             "unchanged": [srn for srn in srns if srn not in set(changed)]})

    endpoint.__name__ = "roster_add" if add else "roster_remove"
    return endpoint


async def admin_members(request: Request[State]) -> Response:
    """The roster, by SRN, paged; ``search``: a part of the SRN."""
    ask = await parse(request, slot=False)
    data, board = ask.data, request.state["board"]
    page, page_size = page_field(data, "page", 1, 1_000_000), page_field(data, "page_size", 100, 500)
    search = data.get("search", "")
    if not isinstance(search, str) or len(search) > 32:
        raise BadInput("search must be a part of an SRN")
    admin = await srn_of(request.state, ask)
    total, members = await board.members(admin, roster_srn(search), page, page_size)
    return JSONResponse({"success": True, "membership": request.state["settings"].membership, "total": total,
                         "page": page, "page_size": page_size, "members": members})


async def admin_suspend(request: Request[State]) -> Response:
    """Bar a member from booking until a date (``until``: the day it ends) or until lifted, with a reason
    their refusals show. It cancels nothing unless ``cancel_bookings`` is true: the answer lists what remains."""
    ask = await parse(request, slot=False)
    srn, until, reason, cancel = suspension_of(ask.data)
    admin = await srn_of(request.state, ask)
    remaining, cancelled = await request.state["board"].suspend(admin, srn, until, reason, "http",
                                                                cancel_bookings=cancel)
    logger.info("%s suspended by %s", srn, admin, extra={"srn": admin, "action": "suspend"})
    message = f"{srn} is suspended " + (f"until {until}" if until else "until lifted")
    if cancelled:
        message += f"; {len(cancelled)} booking(s) of theirs cancelled"
    if remaining:
        message += f"; {len(remaining)} booking(s) of theirs remain (send cancel_bookings: true to cancel them)"
    return JSONResponse({"success": True, "message": message, "srn": srn, "until": until, "reason": reason,
                         "bookings": remaining, "cancelled": cancelled})


def admin_role_route(grant: bool) -> Callable[[Request[State]], Any]:
    """POST /admin/admins/grant and /admin/admins/revoke (owners only): ``{"srn": ...}``."""

    async def endpoint(request: Request[State]) -> Response:
        ask = await parse(request, slot=False)
        srn = member_field(ask.data)
        owner = await srn_of(request.state, ask)
        await request.state["board"].set_admin(owner, srn, grant, "http")
        logger.info("admin role %s %s by %s", "granted to" if grant else "revoked from", srn, owner,
                    extra={"srn": owner, "action": "admin_grant" if grant else "admin_revoke"})
        return JSONResponse({"success": True, "srn": srn, "message": f"{srn} is an admin now" if grant else
                             f"{srn} is no longer an admin"})

    endpoint.__name__ = "admin_grant" if grant else "admin_revoke"
    return endpoint


async def admin_admins(request: Request[State]) -> Response:
    """The owners (ADMIN_SRNS) and the admins they granted (admins, with a Bearer token or credentials)."""
    ask = await parse(request, slot=False)
    listed = await request.state["board"].admin_list(await srn_of(request.state, ask))
    return JSONResponse({"success": True, **listed})


EXPORT_KINDS = ("bookings", "events", "usage", "no_shows")
EXPORT_COLUMNS = {
    "bookings": ("date", "slot_id", "start_time", "end_time", "srn", "booked_at", "checked_in", "series"),
    "events": ("id", "at", "srn", "action", "date", "slot_id", "via", "note", "series"),
    "no_shows": ("id", "at", "srn", "date", "slot_id", "note", "forgiven"),
    "usage": ("srn", *db.USAGE_COLUMNS),
}


def csv_line(values: tuple[Any, ...] | list[Any]) -> str:
    """One CSV record as RFC 4180 has it: CRLF, fields quoted where they need it."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(["" if value is None else value for value in values])
    return out.getvalue()


REPORTS_AT_ONCE = 2  # per worker: each streams from the reports' own reader, holding about a chunk in memory


async def admin_export(request: Request[State]) -> Response:
    """A report for a date range (``from``, ``to``: the slots' dates) for a spreadsheet: every booking or
    history event, the no-shows, or a per-member usage table; CSV (UTF-8, a header row, streamed, no page
    cap) or, for usage and no-shows, JSON. Times carry their UTC offset."""
    ask = await parse(request, slot=False)
    data, board = ask.data, request.state["board"]
    kind, form = data.get("kind"), data.get("format", "csv")
    if kind not in EXPORT_KINDS:
        raise BadInput('kind must be "bookings", "events", "usage" or "no_shows"')
    if form not in ("csv", "json") or (form == "json" and kind in ("bookings", "events")):
        raise BadInput('format must be "csv" (any kind) or "json" (usage and no_shows)')
    if data.get("from") is None or data.get("to") is None:
        raise Missing("from and to are required (YYYY-MM-DD)")
    since, until = parse_date(data["from"]), parse_date(data["to"])
    admin = await srn_of(request.state, ask)
    name = f"rero-{kind}-{since}-{until}"
    reports = request.state["reports"]
    if reports.locked():
        raise HTTPException(503, f"{REPORTS_AT_ONCE} reports are being prepared; try again in a moment",
                            headers={"Retry-After": "5"})
    permit = Permit(reports)
    await reports.acquire()  # (at once: it was not locked)
    try:
        response = await export_report(board, admin, kind, form, since, until, name)
    except BaseException:
        permit.release()
        raise
    if not isinstance(response, ReportStream):
        permit.release()
        return response
    response.permit = permit
    return response


class Permit:
    """One place of a semaphore, given back once, whichever way its holder ends."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self.semaphore, self.held = semaphore, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.semaphore.release()


class ReportStream(StreamingResponse):
    """A streamed report, which holds its place among REPORTS_AT_ONCE until it is sent or its reader goes."""

    permit: Permit | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.permit is not None:
                self.permit.release()


async def export_report(board: Board, admin: str, kind: str, form: str, since: str, until: str,
                        name: str) -> Response:
    """admin_export's answer: made here, or a ReportStream made as it is sent."""

    def record(row: tuple[Any, ...]) -> list[Any]:
        if kind == "bookings":
            date, slot_id, srn, booked_at, checked_in, series = row
            return [date, slot_id, *db.slot_times(slot_id), srn, board.with_offset(booked_at), bool(checked_in),
                    series]
        if kind == "events":
            return [row[0], board.with_offset(row[1]), *row[2:]]
        return [row[0], board.with_offset(row[1]), *row[2:6], bool(row[6])]

    if kind == "usage":
        table = await board.usage(admin, since, until)
        if form == "json":
            return JSONResponse({"success": True, "kind": kind, "from": since, "to": until,
                                 "members": [{"srn": srn, **counts} for srn, counts in table.items()]})
        text = csv_line(EXPORT_COLUMNS[kind]) + "".join(csv_line([srn, *counts.values()])
                                                        for srn, counts in table.items())
        return Response(text.encode(), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="{name}.csv"'})
    chunks = await board.export(admin, kind, since, until)
    logger.info("%s export (%s to %s) by %s", kind, since, until, admin, extra={"srn": admin, "action": "export"})
    if form == "json":
        rows = [dict(zip(EXPORT_COLUMNS[kind], record(row), strict=True)) async for chunk in chunks for row in chunk]
        return JSONResponse({"success": True, "kind": kind, "from": since, "to": until, "no_shows": rows})

    async def lines() -> AsyncIterator[bytes]:
        yield csv_line(EXPORT_COLUMNS[kind]).encode()
        async for chunk in chunks:
            yield "".join(csv_line(record(row)) for row in chunk).encode()

    return ReportStream(lines(), media_type="text/csv; charset=utf-8",
                             headers={"content-disposition": f'attachment; filename="{name}.csv"'})


async def admin_unsuspend(request: Request[State]) -> Response:
    ask = await parse(request, slot=False)
    srn = member_field(ask.data)
    admin = await srn_of(request.state, ask)
    await request.state["board"].unsuspend(admin, srn, "http")
    logger.info("%s unsuspended by %s", srn, admin, extra={"srn": admin, "action": "unsuspend"})
    return JSONResponse({"success": True, "message": f"{srn} may book again", "srn": srn})


# -- handlers: series, an admin's recurring closures and reservations ----------------------------------------


ROSTER_SRN = re.compile(r"PES[0-9][A-Z0-9]{5,20}")  # a PESU SRN, e.g. PES1UG20CS001, as the roster takes it
ROSTER_ERRORS_SHOWN = 20  # bad lines named in one refusal


def roster_srn(value: str) -> str:
    """An SRN as a club's form export writes it, forgiven its case and spaces."""
    return "".join(value.split()).upper()


def roster_rows(text: str) -> list[tuple[str, str | None]]:
    """(where, SRN or None) for each SRN-bearing line of a CSV or plain-text list: one SRN a line, or a
    form export whose header row names an SRN column (any column whose name holds "srn"). Without such a
    header, a line's SRN is its one non-empty field, or its one field that looks like an SRN."""
    rows = [row for row in csv.reader(text.splitlines())]
    column = None
    first = next((n for n, row in enumerate(rows) if any(cell.strip() for cell in row)), len(rows))
    if first < len(rows):
        names = [cell.strip().lower() for cell in rows[first]]
        column = next((n for n, name in enumerate(names) if "srn" in name), None)
    found: list[tuple[str, str | None]] = []
    for n, row in enumerate(rows):
        if n < first or (column is not None and n == first) or not any(cell.strip() for cell in row):
            continue
        if column is not None:
            cells = [row[column]] if column < len(row) else []
        else:
            cells = [cell for cell in row if cell.strip()]
            if len(cells) > 1:
                cells = [cell for cell in cells if ROSTER_SRN.fullmatch(roster_srn(cell))] or cells
        srn = roster_srn(cells[0]) if len(cells) == 1 else None
        found.append((f"line {n + 1}", srn if srn and ROSTER_SRN.fullmatch(srn) else None))
    return found


def roster_of(body: bytes, token: str | None) -> tuple[dict[str, Any], list[str]]:
    """The credentials and the SRNs of a roster change: a JSON object ({"srns": [...] or "text"} beside the
    admin's username and password), or with a Bearer token a JSON list or a CSV/plain-text body. Every bad
    line is named (422) and nothing is applied; duplicates count once."""
    data: dict[str, Any] = {}
    entries: Any = None
    stripped = body.strip()
    if stripped[:1] in (b"{", b"["):
        try:
            parsed = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            raise HTTPException(400, "Request body must be valid JSON") from None
        if isinstance(parsed, dict):
            data, entries = parsed or {"srns": None}, parsed.get("srns", parsed.get("srn"))
        else:
            entries = parsed
    else:
        try:
            entries = stripped.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise BadInput("The body must be UTF-8 text: one SRN a line, or a CSV with an SRN column") from None
    if not data and token is None:  # (an object without credentials is answered as every route answers it)
        raise HTTPException(401, "A Bearer token is required with a list or CSV body (POST /auth/login gives one)")
    if isinstance(entries, str):
        rows = roster_rows(entries)
    elif isinstance(entries, list):
        rows = [(f"item {n + 1}", roster_srn(entry) if isinstance(entry, str) and ROSTER_SRN.fullmatch(
            roster_srn(entry)) else None) for n, entry in enumerate(entries)]
    else:
        raise Missing("srns is required: a list of SRNs, or the text of a CSV export")
    bad = [where for where, srn in rows if srn is None]
    if bad:
        shown = ", ".join(bad[:ROSTER_ERRORS_SHOWN]) + (f" and {len(bad) - ROSTER_ERRORS_SHOWN} more"
                                                         if len(bad) > ROSTER_ERRORS_SHOWN else "")
        raise BadInput(f"Not an SRN (like PES1UG20CS001) at {shown}; nothing was changed")
    srns = list(dict.fromkeys(srn for _, srn in rows if srn is not None))
    if not srns:
        raise BadInput("No SRNs in the request")
    return data, srns


def suspension_of(data: dict[str, Any]) -> tuple[str, str | None, str | None, bool]:
    """(srn, until, reason, cancel_bookings) of POST /admin/suspend, checked."""
    srn = member_field(data)
    until = None if data.get("until") is None else parse_date(data["until"])
    reason = data.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 200 or CONTROL_CHARACTERS.search(reason)):
        raise BadInput("reason must be a line of text of at most 200 characters")
    cancel = data.get("cancel_bookings", False)
    if not isinstance(cancel, bool):
        raise BadInput("cancel_bookings must be true or false")
    return srn, until, (reason or "").strip() or None, cancel


def reason_of(data: dict[str, Any]) -> str | None:
    """Why an admin closes a slot ("Soldering workshop"): shown to everyone, so one short line of text."""
    reason = data.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 100 or CONTROL_CHARACTERS.search(reason)):
        raise BadInput("reason must be a line of text of at most 100 characters")
    return (reason or "").strip() or None


def member_field(data: dict[str, Any], name: str = "srn") -> str:
    """A member's SRN from the field ``name``, as the roster writes it."""
    srn = data.get(name)
    if srn is None:
        raise Missing(f"{name} is required")
    if not isinstance(srn, str) or not SRN.fullmatch(roster_srn(srn)):
        raise BadInput(f"{name} must be a member's SRN")
    return roster_srn(srn)


async def admin_series(request: Request[State]) -> Response:
    """Close (or reserve for a member) the same slots on chosen weekdays between two dates; with
    ``dry_run``, what would happen, changing nothing."""
    state = request.state
    ask = await parse(request, slot=False)
    spec = series_of(ask.data)
    admin = await srn_of(state, ask)
    result = await state["board"].add_series(admin, via="http", **spec)
    done = [step for step in result.steps if step[2] in ("closed", "reserved")]
    conflicts = [step for step in result.steps if step[2] == "conflict"]
    verb = "closed" if spec["action"] == "close" else f"reserved for {spec['srn']}"
    summary = (f"{len(done)} slot(s) {verb} over {len({s[0] for s in done})} date(s); {len(conflicts)} conflict(s)"
               f" left with their members; {len(result.steps) - len(done) - len(conflicts)} skipped")
    dates: dict[str, list[dict[str, Any]]] = {}
    for date, slot_id, outcome, member in result.steps:
        step: dict[str, Any] = {"slot_id": slot_id, "result": outcome}
        if outcome in ("conflict", "already_theirs"):
            step["booked_by"] = member
        dates.setdefault(date, []).append(step)
    if not spec["dry_run"]:
        logger.info("series %d by %s: %s", result.series, admin, summary,
                    extra={"srn": admin, "action": "series", "via": "http"})
    return JSONResponse({
        "success": True, "dry_run": spec["dry_run"], "series_id": None if spec["dry_run"] else result.series,
        "message": ("Dry run, nothing changed: " if spec["dry_run"] else f"Series {result.series}: ") + summary,
        "done": len(done), "conflicts": len(conflicts), "skipped": len(result.steps) - len(done) - len(conflicts),
        "dates": [{"date": date, "slots": steps} for date, steps in dates.items()],
    })


async def admin_series_cancel(request: Request[State]) -> Response:
    """Cancel what is left of a series: its slots that have not started are freed (``{"series_id": 3}``)."""
    state = request.state
    ask = await parse(request, slot=False)
    series = ask.data.get("series_id")
    if not isinstance(series, int) or isinstance(series, bool) or not 1 <= series < 2**63:
        raise BadInput("series_id must be a series' id (see GET /admin/series)")
    admin = await srn_of(state, ask)
    result = await state["board"].cancel_series(admin, series, "http")
    logger.info("series %d cancelled by %s: %d slot(s) freed", series, admin, len(result.freed),
                extra={"srn": admin, "action": "series_cancel", "via": "http"})
    return JSONResponse({
        "success": True, "message": f"Series {series} cancelled: {len(result.freed)} slot(s) freed"
                                    + (f", {len(result.handed)} handed to other series" if result.handed else ""),
        "series_id": series, "freed": [{"date": date, "slot_id": slot_id} for date, slot_id in result.freed],
        "promoted": [{"date": date, "slot_id": slot_id, "srn": srn} for date, slot_id, srn in result.promoted],
        "handed_over": [{"date": date, "slot_id": slot_id, "series_id": to} for date, slot_id, to in result.handed],
    })


async def admin_series_list(request: Request[State]) -> Response:
    """Every series, newest first (admins, with a Bearer token)."""
    state = request.state
    token = bearer_token(request)
    if token is None:
        raise HTTPException(401, "A Bearer token is required (POST /auth/login gives one)")
    series = await state["board"].series_list(state["sessions"].claims(token)["srn"])
    return JSONResponse({"success": True, "series": series})


# -- handlers: calendar feeds --------------------------------------------------------------------------------


async def calendar_link(request: Request[State]) -> Response:
    """A private calendar feed URL: the member's bookings (``{"feed": "lab"}``: every slot, for admins).
    Asking again gives a new secret, and the old URL stops working."""
    state = request.state
    ask = await parse(request, slot=False)
    kind = feed_kind(ask.data)
    srn = await srn_of(state, ask)
    secret = await state["board"].link_calendar(srn, kind)
    path = f"/calendar/{secret}.ics"
    url = (state["settings"].public_url or str(request.base_url).rstrip("/")) + path
    logger.info("calendar link (%s) made for %s", kind, srn, extra={"srn": srn, "action": "calendar_link"})
    return JSONResponse({"success": True, "message": "Subscribe to this URL in your calendar app; keep it private",
                         "feed": kind, "url": url, "webcal": "webcal://" + url.partition("://")[2], "path": path})


async def calendar_unlink(request: Request[State]) -> Response:
    """Remove the member's calendar feed URL (``{"feed": "lab"}``: their lab feed): it answers 404 from now."""
    state = request.state
    ask = await parse(request, slot=False)
    kind = feed_kind(ask.data)
    srn = await srn_of(state, ask)
    removed = await state["board"].unlink_calendar(srn, kind)
    logger.info("calendar link (%s) removed for %s", kind, srn, extra={"srn": srn, "action": "calendar_unlink"})
    return JSONResponse({"success": True, "feed": kind,
                         "message": "Calendar link removed" if removed else "There was no calendar link to remove"})


def etag_matches(header: str | None, etag: str) -> bool:
    """Whether If-None-Match names this ETag (weak comparison, RFC 9110 13.1.2), or is ``*``."""
    if header is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or etag in tags


async def calendar_feed(request: Request[State]) -> Response:
    """GET /calendar/<secret>.ics: the iCalendar feed (304 while the ETag asked about is current)."""
    feed = await request.state["board"].feed(request.path_params["secret"])
    if feed is None:
        raise HTTPException(404, "No such calendar (the link was replaced or removed)")
    # private: the URL is a secret, so no shared cache keeps it; no-cache: ask (with the ETag) every time
    headers = {"etag": feed.etag, "cache-control": "private, no-cache"}
    if etag_matches(request.headers.get("if-none-match"), feed.etag):
        return Response(status_code=304, headers=headers)
    return Response(feed.body, media_type="text/calendar", headers=headers)


# -- handlers: metrics and API documentation -----------------------------------------------------------------


async def metrics(request: Request[State]) -> Response:
    state = request.state
    if not state["settings"].metrics:
        raise HTTPException(404, "Not Found")
    share = state["metrics_share"]
    own = state["metrics"].samples(state)
    if share is None:  # (":memory:": one process)
        return Response(render_metrics([(True, own)]), media_type="text/plain; version=0.0.4")

    def gather() -> list[tuple[bool, dict[str, float]]]:
        share.write(own)  # first: then no scrape, on any worker, sees this worker's counters go back
        return share.read()

    try:
        shares = await asyncio.to_thread(gather)
    except OSError as exc:
        logger.warning("metrics: cannot share through %s: %s", share.folder, exc.strerror or exc)
        shares = [(True, own)]
    return Response(render_metrics(shares), media_type="text/plain; version=0.0.4")


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi_document())


async def docs(request: Request) -> Response:
    return HTMLResponse(docs_page())


# -- live listeners: the SSE feed for curl and EventSource ---------------------------------------------------


class EventStream:
    """GET /events: every slots_update as a Server-Sent Event (``id:`` = version), starting with the current
    state; ``?date=`` watches that day instead of today. Slow readers are treated as slow sockets are.

    A plain ASGI app rather than a request handler, because the stream's sends are paced by the hub's pump.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request: Request[State] = Request(scope, receive)
        state = request.state
        board, hub = state["board"], state["hub"]
        date = watched_date(request.query_params.get("date"))  # (a SlotError is a 400)
        if not origin_allowed(state["settings"], request):
            raise HTTPException(403, "Origin not allowed")
        address = address_of(request)
        if not hub.admits(address):
            raise HTTPException(503, "Too many connections; try again later", {"Retry-After": "30"})
        headers = [(b"content-type", b"text/event-stream"), (b"x-accel-buffering", b"no")]  # nginx: no buffering
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if scope["method"] == "HEAD":  # the head a GET gets, and no stream (it had held the connection)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        peer = StreamPeer(send, address, scope.get("extensions", {}).get(DIRECT_WRITES))
        hub.join(peer)
        try:  # (from here: a failed read gives its place back too)
            hub.watch(peer, date)
            peer.send_state(await board.day(date or board.today()))
            assert peer.task is not None
            disconnected = asyncio.ensure_future(wait_for_disconnect(receive))
            try:
                # Ends when the client goes away, or when the pump ends the stream (shutdown, a slow reader).
                await asyncio.wait({peer.task, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                disconnected.cancel()
        finally:
            await hub.leave(peer)


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# -- live listeners: the WebSocket endpoint ------------------------------------------------------------------


MAX_SOCKET_MESSAGE_BYTES = 16 * 1024


class RateLimit:
    """A token bucket: ``rate`` messages a second on average, ``burst`` at once; rate 0 = no limit.

    ``refused`` counts the messages refused in a row, so a client can be warned once and then dropped.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, max(1, burst), clock
        self.tokens, self.at = float(self.burst), clock()
        self.refused = 0

    def allows(self) -> bool:
        if not self.rate:
            return True
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.refused = 0
            return True
        self.refused += 1
        return False


SOCKET_ACTIONS = {
    "book_slot": ("book", "booking_response", "booking"),
    "cancel_slot": ("cancel", "cancellation_response", "cancellation"),
    "join_waitlist": ("join", "waitlist_response", "waitlist"),
    "leave_waitlist": ("leave", "waitlist_response", "waitlist"),
    "check_in": ("check_in", "check_in_response", "check-in"),
    "leave_early": ("leave_early", "leave_early_response", "leave-early"),
}


async def slot_socket(websocket: WebSocket[State]) -> None:
    state = websocket.state
    hub, settings = state["hub"], state["settings"]
    address = address_of(websocket)
    if not origin_allowed(settings, websocket):
        await websocket.close(1008)  # before the handshake: the page gets HTTP 403
        return
    await websocket.accept()
    if not hub.admits(address):
        logger.warning("refusing a socket from %s: too many connections", address)
        await websocket.close(1013, "Too many connections; try again later")
        return
    peer = SocketPeer(websocket, address)
    hub.join(peer)
    bucket = RateLimit(settings.ws_rate_per_second, settings.ws_rate_burst)
    try:
        peer.send_state(await today_of(state))  # (inside: a failed read gives its place back too)
        while peer.close_code is None:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if not bucket.allows():
                if bucket.refused == 1:
                    hub.reply(peer, {"type": "error", "message": "Too many messages; slow down"})
                elif bucket.refused > settings.ws_rate_burst:  # it went on: another burst, unread warnings
                    logger.warning("closing a socket from %s that kept flooding", address)
                    peer.close(1008)
                continue
            text = message.get("text")
            if text is None:
                hub.reply(peer, {"type": "error", "message": "Binary frames are not supported; send JSON text"})
            elif len(text) > MAX_SOCKET_MESSAGE_BYTES:
                peer.close(1009)
            else:
                await on_message(state, peer, text)
        else:  # we are closing it: what it is owed goes first, then the close frame; nothing more is read
            await hub.wait_closed(peer)
    finally:
        await hub.leave(peer)


async def on_message(state: State, peer: SocketPeer, text: str) -> None:
    """Answer one client message; a bad one gets an ``error`` reply and the socket stays open."""
    hub, board = state["hub"], state["board"]

    def error(message: str) -> None:
        hub.reply(peer, {"type": "error", "message": message})

    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return error("Invalid JSON format")
    if not isinstance(data, dict):
        return error('Message must be a JSON object with a "type"')
    kind = data.get("type")
    if kind == "get_slots":
        try:
            date = watched_date(data.get("date"))
        except SlotError as exc:
            return error(str(exc))
        hub.watch(peer, date)  # watch that day from now on; without a date, watch today
        return hub.reply_state(peer, await board.day(date or board.today()))
    if kind == "identify":
        token = data.get("token")
        try:
            ask = ask_of(board, data, None if token is None else str(token), peer.address, slot=False)
            if ask.token is not None:  # the token checked once: whose it is, and until when
                claims = state["sessions"].claims(ask.token)
                srn, peer.jti, peer.expires = claims["srn"], claims["jti"], claims["exp"]
            else:
                srn, peer.jti = await srn_of(state, ask), None
        except BadInput as exc:
            return error(str(exc))
        except REFUSED as exc:
            message = socket_sentence(exc, booking=False)
            return hub.reply(peer, {"type": "identify_response", "success": False, "message": message})
        hub.identify(peer, srn)
        return hub.reply(peer, {"type": "identify_response", "success": True, "srn": srn,
                                "message": f"Messages for {srn} will come here too"})
    if not isinstance(kind, str) or kind not in SOCKET_ACTIONS:
        return error(f"Unknown message type: {preview(kind)[:64]}")

    action, response_type, noun = SOCKET_ACTIONS[kind]
    token = data.get("token")
    try:
        ask = ask_of(board, data, token if token is None else str(token), peer.address, slot=True)
    except Missing:  # the original's sentence, whichever field it is
        return error(f"Missing slot_id, username, or password in {noun} request")
    except (BadInput, SlotError) as exc:
        return error(str(exc))

    def respond(ok: bool, message: str) -> None:
        hub.reply(peer, {"type": response_type, "success": ok, "message": message, "slot_id": ask.slot_id})

    try:
        srn = await srn_of(state, ask)
        # The broadcast this causes goes out after the reply below: the fan-out runs once this task yields,
        # and it leaves to the pump any listener with replies waiting, so the booker hears first.
        message = await change(state, action, ask, srn, via="websocket")
    except REFUSED as exc:
        return respond(False, socket_sentence(exc, booking=True))
    respond(True, message)


# -- the route table, and the API documentation keyed by it --------------------------------------------------


ROUTES = [  # the routes pages poll most come first: Starlette tries each in turn (a regex match each)
    Route("/slots", SlotList(), methods=["GET"]),
    Route("/my-bookings", my_bookings, methods=["POST"]),
    Route("/book-slot", slot_route("book"), methods=["POST"]),
    Route("/cancel-slot", slot_route("cancel"), methods=["POST"]),
    Route("/auth/login", login, methods=["POST"]),
    Route("/now", now, methods=["GET"]),
    Route("/me", me, methods=["GET"]),
    Route("/check-in", slot_route("check_in"), methods=["POST"]),
    Route("/leave-early", slot_route("leave_early"), methods=["POST"]),
    Route("/waitlist/join", slot_route("join"), methods=["POST"]),
    Route("/waitlist/leave", slot_route("leave"), methods=["POST"]),
    Route("/health", health),
    Route("/", root),
    Route("/stats", stats),
    Route("/auth/logout", logout, methods=["POST"]),
    Route("/admin/close-slot", slot_route("close"), methods=["POST"]),
    Route("/admin/open-slot", slot_route("open"), methods=["POST"]),
    Route("/admin/history", admin_history, methods=["POST"]),
    Route("/admin/forgive-no-show", forgive_no_show, methods=["POST"]),
    Route("/admin/series", admin_series, methods=["POST"]),
    Route("/admin/series", admin_series_list, methods=["GET"]),
    Route("/admin/series/cancel", admin_series_cancel, methods=["POST"]),
    Route("/admin/members", admin_members, methods=["POST"]),
    Route("/admin/members/add", roster_route(add=True), methods=["POST"]),
    Route("/admin/members/remove", roster_route(add=False), methods=["POST"]),
    Route("/admin/suspend", admin_suspend, methods=["POST"]),
    Route("/admin/unsuspend", admin_unsuspend, methods=["POST"]),
    Route("/admin/export", admin_export, methods=["POST"]),
    Route("/admin/admins", admin_admins, methods=["POST"]),
    Route("/admin/admins/grant", admin_role_route(grant=True), methods=["POST"]),
    Route("/admin/admins/revoke", admin_role_route(grant=False), methods=["POST"]),
    Route("/calendar/link", calendar_link, methods=["POST"]),
    Route("/calendar/unlink", calendar_unlink, methods=["POST"]),
    Route("/calendar/{secret}.ics", calendar_feed, methods=["GET"]),
    Route("/events", EventStream(), methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
    WebSocketRoute("/slot-booking", slot_socket),
]


def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


STRING, INTEGER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
NULLABLE_STRING = {"type": ["string", "null"]}
USERNAME = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"\S"}
PASSWORD = {"type": "string", "minLength": 1, "maxLength": 256, "format": "password"}
DATE = {"type": "string", "format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"}


SCHEMAS: dict[str, Any] = {
    "Error": _obj(["detail"], detail=STRING),
    "Credentials": _obj([], username=USERNAME, password=PASSWORD),
    "SlotRequest": _obj(["slot_id"], slot_id={"oneOf": [INTEGER, {"type": "string", "pattern": "^[0-9]{1,6}$"}],
                                              "examples": [9]},
                        date=DATE, username=USERNAME, password=PASSWORD,
                        reason={"type": "string", "maxLength": 100, "description": "admins closing a slot: why"},
                        **{"for": {**STRING, "description": "admins, on /book-slot and /cancel-slot: the member "
                                                            "they book or cancel for"}}),
    "HistoryRequest": _obj([], username=USERNAME, password=PASSWORD, **{"from": DATE, "to": DATE},
                           srn=STRING, action=STRING, page={"type": "integer", "minimum": 1},
                           page_size={"type": "integer", "minimum": 1, "maximum": 500}),
    "Slot": _obj(["id", "start_time", "end_time", "is_booked", "booked_by", "booked_at", "closed", "status",
                  "waiting", "checked_in", "date"],
                 id=INTEGER, start_time=STRING, end_time=STRING, is_booked=BOOLEAN, booked_by=NULLABLE_STRING,
                 booked_at=NULLABLE_STRING, closed=BOOLEAN, reason=NULLABLE_STRING,
                 status={"enum": ["available", "booked", "closed", "started", "not_open"]}, waiting=INTEGER,
                 checked_in=BOOLEAN, date=STRING),
    "NowSlot": {"type": ["object", "null"],
                "required": ["date", "id", "start_time", "end_time", "holder", "checked_in"],
                "properties": {"date": STRING, "id": INTEGER, "start_time": STRING, "end_time": STRING,
                               "holder": NULLABLE_STRING, "checked_in": BOOLEAN}},
    "Slots": _obj(["slots", "available_slots", "booked_slots"], slots={"type": "array", "items": _ref("Slot")},
                  available_slots={"type": "array", "items": INTEGER}, booked_slots={"type": "array", "items": INTEGER}),
    "Root": _obj(["message", "websocket_endpoint", "active_connections", "booked_slots"], message=STRING,
                 websocket_endpoint=STRING, active_connections=INTEGER, booked_slots={"type": "array", "items": INTEGER}),
    "DatabaseSummary": _obj(["total_slots", "booked_slots", "available_slots", "database_path"], total_slots=INTEGER,
                            booked_slots=INTEGER, available_slots=INTEGER, database_path=STRING),
    "Health": _obj(["status", "timestamp", "active_connections", "total_slots", "booked_slots_count",
                    "available_slots_count", "database"], status=STRING, timestamp=STRING,
                   active_connections=INTEGER, total_slots=INTEGER, booked_slots_count=INTEGER,
                   available_slots_count=INTEGER, database=_ref("DatabaseSummary")),
    "Stats": _obj(["database", "websocket", "slots"], database=_ref("DatabaseSummary"),
                  websocket=_obj(["active_connections"], active_connections=INTEGER),
                  slots=_obj(["total", "booked", "available"], total=INTEGER, booked=INTEGER, available=INTEGER)),
    "Login": _obj(["success", "message", "user", "token", "expires_in"], success=BOOLEAN, message=STRING,
                  user=_obj(["srn"], srn=STRING, name=NULLABLE_STRING, prn=NULLABLE_STRING, program=NULLABLE_STRING,
                            branch=NULLABLE_STRING, campus=NULLABLE_STRING),
                  token=STRING, expires_in=INTEGER),
    "Done": _obj(["success", "message"], success=BOOLEAN, message=STRING),
    "Now": _obj(["now", "current", "next"], now=STRING, current=_ref("NowSlot"), next=_ref("NowSlot")),
    "Me": _obj(["srn", "holds_current_slot", "current", "next_booking", "lately"], srn=STRING,
               holds_current_slot=BOOLEAN, current=_ref("NowSlot"), next_booking={"type": ["object", "null"]},
               lately={"type": "array", "items": _obj(["action", "at", "date", "slot_id", "by"], action=STRING,
                                                      at=STRING, date=STRING, slot_id=INTEGER,
                                                      by=NULLABLE_STRING)}),
    "TokenBody": _obj([], token=STRING),
    "SlotDone": _obj(["success", "message", "slot_id"], success=BOOLEAN, message=STRING, slot_id=INTEGER),
    "MyBookings": _obj(["success", "bookings", "total_bookings", "waitlist"], success=BOOLEAN,
                       total_bookings=INTEGER,
                       bookings={"type": "array", "items": _obj(["id", "start_time", "end_time", "booked_at", "date"],
                                                                id=INTEGER, start_time=STRING, end_time=STRING,
                                                                booked_at=STRING, date=STRING)},
                       waitlist={"type": "array", "items": _obj(["id", "start_time", "end_time", "date", "position"],
                                                                id=INTEGER, start_time=STRING, end_time=STRING,
                                                                date=STRING, position=INTEGER)}),
    "History": _obj(["success", "events", "total", "page", "page_size"], success=BOOLEAN, total=INTEGER,
                    page=INTEGER, page_size=INTEGER,
                    events={"type": "array", "items": _obj(["id", "at", "srn", "action", "date", "slot_id", "via",
                                                            "note", "series"],
                                                           id=INTEGER, at=STRING, srn=NULLABLE_STRING, action=STRING,
                                                           date=NULLABLE_STRING, slot_id={"type": ["integer", "null"]},
                                                           via=STRING, note=NULLABLE_STRING,
                                                           series={"type": ["integer", "null"]})}),
    "SeriesRequest": _obj(["action", "slots", "weekdays", "from", "until"], username=USERNAME, password=PASSWORD,
                          action={"enum": ["close", "reserve"]},
                          slots={"type": "array", "items": INTEGER, "minItems": 1, "examples": [[14, 15]]},
                          weekdays={"type": "array", "minItems": 1, "examples": [["tue", "thu"]], "items": {
                              "type": "string", "description": "mon ... sun, or the day's full name, in any case"}},
                          **{"from": DATE, "until": DATE},
                          srn={**STRING, "description": "required for reserve: the member the slots are held for"},
                          title={"type": "string", "maxLength": 100}, dry_run=BOOLEAN),
    "SeriesDone": _obj(["success", "dry_run", "series_id", "message", "done", "conflicts", "skipped", "dates"],
                       success=BOOLEAN, dry_run=BOOLEAN, series_id={"type": ["integer", "null"]}, message=STRING,
                       done=INTEGER, conflicts=INTEGER, skipped=INTEGER,
                       dates={"type": "array", "items": _obj(["date", "slots"], date=STRING, slots={
                           "type": "array", "items": _obj(["slot_id", "result"], slot_id=INTEGER, result={"enum": [
                               "closed", "reserved", "conflict", "already_closed", "already_theirs", "started"]},
                               booked_by=NULLABLE_STRING)})}),
    "SeriesCancelRequest": _obj(["series_id"], username=USERNAME, password=PASSWORD, series_id=INTEGER),
    "SeriesCancelled": _obj(["success", "message", "series_id", "freed", "promoted", "handed_over"], success=BOOLEAN,
                            message=STRING, series_id=INTEGER,
                            freed={"type": "array", "items": _obj(["date", "slot_id"], date=STRING, slot_id=INTEGER)},
                            promoted={"type": "array", "items": _obj(["date", "slot_id", "srn"], date=STRING,
                                                                     slot_id=INTEGER, srn=STRING)},
                            handed_over={"type": "array", "items": _obj(["date", "slot_id", "series_id"], date=STRING,
                                                                        slot_id=INTEGER, series_id=INTEGER)}),
    "SeriesList": _obj(["success", "series"], success=BOOLEAN, series={"type": "array", "items": _obj(
        ["id", "action", "srn", "slots", "weekdays", "from", "until", "title", "created_by", "created_at",
         "cancelled_by", "cancelled_at", "upcoming"],
        id=INTEGER, action=STRING, srn=NULLABLE_STRING, slots={"type": "array", "items": INTEGER},
        weekdays={"type": "array", "items": STRING}, **{"from": STRING}, until=STRING, title=NULLABLE_STRING,
        created_by=STRING, created_at=STRING, cancelled_by=NULLABLE_STRING, cancelled_at=NULLABLE_STRING,
        upcoming={**INTEGER, "description": "its slots still held that have not started"})}),
    "CalendarRequest": _obj([], username=USERNAME, password=PASSWORD, feed={"enum": ["member", "lab"]}),
    "CalendarLink": _obj(["success", "message", "feed", "url", "webcal", "path"], success=BOOLEAN, message=STRING,
                         feed={"enum": ["member", "lab"]}, url=STRING, webcal=STRING, path=STRING),
    "CalendarUnlinked": _obj(["success", "message", "feed"], success=BOOLEAN, message=STRING,
                             feed={"enum": ["member", "lab"]}),
    "MembersRequest": _obj([], username=USERNAME, password=PASSWORD, search=STRING,
                           page={"type": "integer", "minimum": 1},
                           page_size={"type": "integer", "minimum": 1, "maximum": 500}),
    "Members": _obj(["success", "membership", "total", "page", "page_size", "members"], success=BOOLEAN,
                    membership={"enum": ["open", "roster"]}, total=INTEGER, page=INTEGER, page_size=INTEGER,
                    members={"type": "array", "items": _obj(
                        ["srn", "added_by", "added_at", "suspended"], srn=STRING, added_by=STRING, added_at=STRING,
                        suspended={"type": ["object", "null"]})}),
    "RosterRequest": _obj([], username=USERNAME, password=PASSWORD,
                          srns={"oneOf": [{"type": "array", "items": STRING}, STRING]}),
    "RosterDone": _obj(["success", "message", "unchanged"], success=BOOLEAN, message=STRING,
                       added={"type": "array", "items": STRING}, removed={"type": "array", "items": STRING},
                       unchanged={"type": "array", "items": STRING}),
    "MemberRequest": _obj(["srn"], username=USERNAME, password=PASSWORD, srn=STRING),
    "ExportRequest": _obj(["from", "to", "kind"], username=USERNAME, password=PASSWORD, **{"from": DATE, "to": DATE},
                          kind={"enum": ["bookings", "events", "usage", "no_shows"]},
                          format={"enum": ["csv", "json"]}),
    "Export": _obj(["success", "kind", "from", "to"], success=BOOLEAN, kind=STRING, **{"from": STRING, "to": STRING},
                   members={"type": "array", "items": {"type": "object"}},
                   no_shows={"type": "array", "items": {"type": "object"}}),
    "Admins": _obj(["success", "owners", "admins"], success=BOOLEAN, owners={"type": "array", "items": STRING},
                   admins={"type": "array", "items": _obj(["srn", "granted_by", "granted_at"], srn=STRING,
                                                          granted_by=STRING, granted_at=STRING)}),
    "SuspendRequest": _obj(["srn"], username=USERNAME, password=PASSWORD, srn=STRING, until=DATE,
                           reason={"type": "string", "maxLength": 200}, cancel_bookings=BOOLEAN),
    "Suspended": _obj(["success", "message", "srn", "until", "reason", "bookings", "cancelled"], success=BOOLEAN,
                      message=STRING, srn=STRING, until=NULLABLE_STRING, reason=NULLABLE_STRING,
                      bookings={"type": "array", "items": {"type": "object"}},
                      cancelled={"type": "array", "items": {"type": "object"}}),
}


ERRORS = {
    "400": "Not JSON, or the rules refuse (the detail says which rule)",
    "401": "Invalid credentials, or an invalid or expired token",
    "403": "Admins only",
    "413": "Body over 64 KiB",
    "422": "A field is missing or of the wrong kind",
    "429": "Too many failed logins for this username or address (see Retry-After)",
    "503": "PESU could not be asked; the password was not judged",
}


SOCKET_PROTOCOL = """Live updates: WebSocket `/slot-booking`. On connect the server sends the day's state:
`{"type": "slots_update", "data": {Slots, "date", "version"}, "timestamp"}`. Client messages (JSON text):
`{"type": "get_slots", "date"?}` (watch that day), `{"type": %s, "slot_id", "date"?, "username",
"password"}` or with `"token"` instead of username and password, and `{"type": "identify", "token"}` (or
username and password). Answers: `{"type": %s, "success", "message", "slot_id"}`,
`{"type": "identify_response", "success", "srn"?, "message"}`, or
`{"type": "error", "message"}` for a bad message (the socket stays open). An identified socket also gets
`{"type": "booking_promoted" | "booking_released", "date", "slot_id", "message"}` for its member.
Close codes: 1009 message over
16 KiB, 1008 too slow a reader or a flood, 1013 too many connections, 1001 server shutting down.
The same slots_update messages stream as Server-Sent Events from `GET /events`.""" % (
    " | ".join(f'"{kind}"' for kind in SOCKET_ACTIONS),
    " | ".join(dict.fromkeys(f'"{answer}"' for _, answer, _ in SOCKET_ACTIONS.values())))


def json_answer(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def operation(summary: str, answer: str, errors: tuple[str, ...] = (), body: str | None = None,
              secured: bool = False, body_required: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": json_answer(answer)}}
    for code in errors:
        op["responses"][code] = json_answer("Error", ERRORS[code])
    if body:
        op["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": _ref(body)}}}
    if secured:
        op["security"] = [{}, {"bearer": []}]  # username and password in the body, or a Bearer token
    return op


MEMBER_ERRORS = ("400", "401", "413", "422", "429", "503")
ADMIN_ERRORS = ("400", "401", "403", "413", "422", "429", "503")
DATE_QUERY = [{"name": "date", "in": "query", "required": False, "schema": DATE}]
# Each route's entry in the OpenAPI document, keyed by (method, path) as ROUTES has them: a route without
# one, or one without a route, fails test_every_route_has_its_documentation by name.
DOCS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/slots"): {**operation("A day's slots (today without ?date)", "Slots", ("400",)),
                        "parameters": DATE_QUERY},
    ("POST", "/my-bookings"): operation("Your bookings that have not ended", "MyBookings", MEMBER_ERRORS,
                                        "Credentials", secured=True),
    ("POST", "/book-slot"): operation("Book a slot", "SlotDone", MEMBER_ERRORS, "SlotRequest", secured=True),
    ("POST", "/cancel-slot"): operation("Cancel your booking (the slot goes to the first in its waitlist who "
                                        "may take it)", "SlotDone", MEMBER_ERRORS, "SlotRequest", secured=True),
    ("POST", "/auth/login"): operation("Check PESU credentials; returns a session token", "Login", MEMBER_ERRORS,
                                       "Credentials", secured=True),
    ("GET", "/now"): operation("Who holds the lab now, and next (poll it every second)", "Now"),
    ("GET", "/me"): {**operation("Whose token this is; whether they hold the slot under way; their next booking",
                                 "Me", ("401",)), "security": [{"bearer": []}]},
    ("POST", "/check-in"): operation("Check in to your slot (from 10 min before to 15 min after its start)",
                                     "SlotDone", MEMBER_ERRORS, "SlotRequest", secured=True),
    ("POST", "/leave-early"): operation("Give up the slot under way that you hold: the rest of it goes to the first "
                                        "in line, or is free", "SlotDone", MEMBER_ERRORS, "SlotRequest",
                                        secured=True),
    ("POST", "/waitlist/join"): operation("Wait in line for a booked slot (a free one is booked at once)",
                                          "SlotDone", MEMBER_ERRORS, "SlotRequest", secured=True),
    ("POST", "/waitlist/leave"): operation("Leave a slot's waitlist", "SlotDone", MEMBER_ERRORS, "SlotRequest",
                                           secured=True),
    ("GET", "/health"): operation("Health and today's counts", "Health"),
    ("GET", "/"): operation("Service summary", "Root"),
    ("GET", "/stats"): operation("Counts and open sockets", "Stats"),
    ("POST", "/auth/logout"): operation("Revoke a session token", "Done", ("400", "401", "413", "422"),
                                        "TokenBody", secured=True),
    ("POST", "/admin/close-slot"): operation("Close a free slot (admins)", "SlotDone", ADMIN_ERRORS, "SlotRequest",
                                             secured=True),
    ("POST", "/admin/open-slot"): operation("Reopen a closed slot (admins)", "SlotDone", ADMIN_ERRORS,
                                            "SlotRequest", secured=True),
    ("POST", "/admin/history"): operation("The change log, newest first (admins)", "History", ADMIN_ERRORS,
                                          "HistoryRequest", secured=True),
    ("POST", "/admin/forgive-no-show"): operation("Forgive a member's no-show (admins); body: srn, date, slot_id",
                                                  "SlotDone", ADMIN_ERRORS, "SlotRequest", secured=True),
    ("POST", "/admin/series"): operation("Close, or reserve for a member, the same slots on chosen weekdays between "
                                         "two dates (admins; dry_run: what would happen)", "SeriesDone",
                                         ADMIN_ERRORS, "SeriesRequest", secured=True),
    ("GET", "/admin/series"): {**operation("Every series, newest first (admins)", "SeriesList", ("401", "403")),
                               "security": [{"bearer": []}]},
    ("POST", "/admin/members"): operation("The club's roster, by SRN (admins); search: a part of an SRN", "Members",
                                          ADMIN_ERRORS, "MembersRequest", secured=True),
    ("POST", "/admin/members/add"): operation("Add members to the roster (admins): {srns: [...]}, or with a Bearer "
                                              "token a JSON list or a CSV/plain-text body", "RosterDone",
                                              ADMIN_ERRORS, "RosterRequest", secured=True),
    ("POST", "/admin/members/remove"): operation("Remove members from the roster (admins), as add takes them",
                                                 "RosterDone", ADMIN_ERRORS, "RosterRequest", secured=True),
    ("POST", "/admin/suspend"): operation("Suspend a member until a date or until lifted (admins)", "Suspended",
                                          ADMIN_ERRORS, "SuspendRequest", secured=True),
    ("POST", "/admin/admins"): operation("The owners (ADMIN_SRNS) and the admins they granted (admins)", "Admins",
                                         ADMIN_ERRORS, "Credentials", secured=True),
    ("POST", "/admin/admins/grant"): operation("Grant a member the admin role (owners)", "Done", ADMIN_ERRORS,
                                               "MemberRequest", secured=True),
    ("POST", "/admin/admins/revoke"): operation("Revoke a granted admin role (owners)", "Done", ADMIN_ERRORS,
                                                "MemberRequest", secured=True),
    ("POST", "/admin/export"): {**operation("A report for a date range (admins): bookings, events, usage or no_shows;"
                                            " CSV, or JSON for usage and no_shows", "Export", ADMIN_ERRORS,
                                            "ExportRequest", secured=True),
                                "responses": {**operation("", "Export", ADMIN_ERRORS)["responses"], "200": {
                                    "description": "CSV (RFC 4180, UTF-8, a header row), or JSON",
                                    "content": {"text/csv": {"schema": STRING},
                                                "application/json": {"schema": _ref("Export")}}}}},
    ("POST", "/admin/unsuspend"): operation("Lift a member's suspension (admins)", "Done", ADMIN_ERRORS,
                                            "MemberRequest", secured=True),
    ("POST", "/admin/series/cancel"): operation("Cancel what is left of a series: its slots that have not started "
                                                "are freed (admins)", "SeriesCancelled", ADMIN_ERRORS,
                                                "SeriesCancelRequest", secured=True),
    ("POST", "/calendar/link"): operation("A private calendar feed URL for your bookings (feed=lab: every slot, "
                                          "admins); asking again replaces it", "CalendarLink", ADMIN_ERRORS,
                                          "CalendarRequest", secured=True, body_required=False),
    ("POST", "/calendar/unlink"): operation("Remove your calendar feed URL", "CalendarUnlinked", MEMBER_ERRORS,
                                            "CalendarRequest", secured=True, body_required=False),
    ("GET", "/calendar/{secret}.ics"): {
        "summary": "An iCalendar feed (RFC 5545); the URL is its only key. 304 for a current If-None-Match",
        "parameters": [{"name": "secret", "in": "path", "required": True, "schema": STRING},
                       {"name": "If-None-Match", "in": "header", "required": False, "schema": STRING}],
        "responses": {"200": {"description": "The feed", "headers": {"ETag": {"schema": STRING}},
                              "content": {"text/calendar": {"schema": STRING}}},
                      "304": {"description": "Not modified since the ETag given"},
                      "404": json_answer("Error", "No such feed (never made, replaced or removed)")}},
    ("GET", "/events"): {"summary": "slots_update messages as Server-Sent Events (id = version)",
                         "parameters": DATE_QUERY,
                         "responses": {"200": {"description": "An endless event stream",
                                               "content": {"text/event-stream": {"schema": STRING}}},
                                       "400": json_answer("Error", ERRORS["400"]),
                                       "503": json_answer("Error", "Too many connections")}},
    ("GET", "/metrics"): {"summary": "Prometheus metrics (METRICS=1; 404 otherwise)",
                          "responses": {"200": {"description": "Prometheus text format",
                                                "content": {"text/plain": {"schema": STRING}}},
                                        "404": json_answer("Error", "Metrics are off")}},
    ("GET", "/openapi.json"): {"summary": "This document", "responses": {"200": {
        "description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}},
    ("GET", "/docs"): {"summary": "Interactive API documentation", "responses": {"200": {
        "description": "HTML", "content": {"text/html": {"schema": STRING}}}}},
}


def route_methods(route: Route) -> list[str]:
    """The methods a route answers as its documentation names them (HEAD comes with GET)."""
    return sorted((route.methods or {"GET"}) - {"HEAD"})


@functools.cache  # fixed for the life of the process: built on first request, not at start-up
def openapi_document() -> dict[str, Any]:
    """The HTTP API as OpenAPI 3.1, route by route in ROUTES' order; the WebSocket protocol is in the
    description (OpenAPI has no sockets)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        if isinstance(route, Route):
            for method in route_methods(route):
                paths.setdefault(route.path, {})[method.lower()] = DOCS[method, route.path]
    return {
        "openapi": "3.1.0",
        "info": {"title": "rero-slots", "version": __version__, "description": SOCKET_PROTOCOL},
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>rero-slots API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"><h1>rero-slots API</h1>
<p>The interactive page needs the Swagger UI from a CDN, which could not be loaded. The routes
(full detail in <a href="/openapi.json">/openapi.json</a>):</p><ul>%s</ul></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>if (window.SwaggerUIBundle) SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""


@functools.cache
def docs_page() -> str:
    """Swagger UI from a CDN; until (or unless) it loads, the page lists the routes in plain HTML."""
    items = "".join(
        f"<li><code>{method.upper()} {html.escape(path)}</code>: {html.escape(op['summary'])}</li>"
        for path, ops in openapi_document()["paths"].items() for method, op in ops.items()
    )
    items += "<li><code>WebSocket /slot-booking</code>: live updates, booking and cancelling</li>"
    return DOCS_PAGE % items


# -- start-up ------------------------------------------------------------------------------------------------


SWITCH_INTERVAL = 0.0001  # seconds; see lifespan


async def housekeeping(board: Board, hub: Hub, sessions: Sessions, interval: float) -> None:
    """Every ``interval``, hand what the board's housekeeping found (Board.poll) to those it concerns: the
    new day to the hub, signed-out tokens to the sessions, notices to the members' sockets."""
    while True:
        await asyncio.sleep(interval)
        try:
            found = await board.poll()
            if found.today is not None:
                hub.roll_over(found.today)
            for date, slot_id, holder, promoted in found.released:
                logger.info("released slot %d on %s: %s did not check in%s", slot_id, date, holder,
                            f"; {promoted} had it from the waitlist" if promoted else "",
                            extra={"srn": holder, "slot": slot_id, "date": date, "action": "no_show"})
            for jti, expires in found.signed_out:
                sessions.revoke(jti, expires)
            for action, srn, date, slot_id in found.notices:
                hub.tell(srn, notice(action, date, slot_id), sessions.live)
            if found.error is not None:
                raise found.error
        except Exception:  # a locked or busy database must not end the housekeeping
            logger.exception("could not read the database for changes")


def notice(action: str, date: str, slot_id: int) -> dict[str, Any]:
    """The personal message for an event (db.NOTICES): a promotion from a waitlist, a release (as a no-show,
    or not counted as one for a member moved up late), an admin's cancellation of their booking."""
    if action == "promote":
        return {"type": "booking_promoted", "date": date, "slot_id": slot_id,
                "message": f"Slot {slot_id} on {date} is yours: it came free and you were first in line"}
    if action == "cancel":
        return {"type": "booking_cancelled", "date": date, "slot_id": slot_id,
                "message": f"Your booking of slot {slot_id} on {date} was cancelled by an admin"}
    released = f"Your booking of slot {slot_id} on {date} was released: you did not check in in time"
    if action == "release":
        released += " (not counted as a no-show: the slot came to you from the waitlist late)"
    return {"type": "booking_released", "date": date, "slot_id": slot_id, "message": released}


def close_sockets_on_sigterm(hub: Hub) -> Callable[[], None]:
    """Chain onto the server's SIGTERM handler so open sockets hear 1001 (going away) before it stops.

    Uvicorn itself would close them with 1012; clients expect 1001 when the club's server shuts down.
    Returns the function that puts the previous handler back.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        return lambda: None
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(hub.close_all, 1001)
        previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    pesu_timer: Callable[[], float] | None = None,
) -> Starlette:
    """Build the app; tests pass their own settings, a fake PESU transport and clock."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        configure_logging(settings.log_level, settings.log_format)
        # The database thread needs the GIL back after every SQLite call; by default it may wait 5 ms for
        # an event loop busy broadcasting. 0.1 ms keeps a booking's commit quick under that load.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        budget = fd_budget(raise_fd_limit(), settings.pesu_max_concurrency, settings.max_connections)
        door = Door(budget.connections, settings.request_timeout, settings.send_timeout)
        hub = Hub(settings.send_timeout, settings.max_backlog, budget.listeners, settings.max_connections_per_address)
        store = SlotStore(settings.database_path, settings.hours)
        board = Board(store, settings.rules(), clock, watched=hub.watching,  # (days kept however many are read)
                      on_change=lambda day: hub.broadcast(day, board.today()))
        await board.open()
        guard_store = db.GuardStore(settings.database_path)
        await guard_store.open()
        hub.start(settings.heartbeat_seconds)
        seconds = lambda: clock().timestamp()  # noqa: E731
        secret = settings.session_secret.encode() or os.urandom(32)
        sessions = Sessions(secret, settings.session_minutes * 60, seconds)
        guard = Guard(guard_store, settings.login_fails_per_username, settings.login_fail_window_minutes * 60,
                      settings.login_fails_per_address, seconds, max_delay=settings.login_max_delay_seconds,
                      stale=pesu.stale_after(settings.pesu_timeout))
        counters = Metrics()
        timeout = pesu.client_timeout(settings.pesu_timeout)
        async with pesu.clients(budget.pesu_places, transport=transport, timeout=timeout) as client:
            checker = PesuChecker(client, settings.pesu_auth_url, settings.cache_minutes * 60, timer=pesu_timer,
                                  deadline=pesu.check_deadline(settings.pesu_timeout), guard=guard,
                                  max_concurrency=budget.pesu_places, max_queue=settings.pesu_max_queue,
                                  on_upstream=counters.observe_upstream)
            watcher = asyncio.create_task(housekeeping(board, hub, sessions, settings.watch_interval))
            share = MetricsShare(settings.database_path) if settings.metrics and settings.database_path != ":memory:" \
                else None
            # (not the address: uvicorn names the one it really listens on, whichever way it was started)
            logger.info("rero-slots %s: database %s, PESU %s", __version__, os.path.abspath(settings.database_path),
                        public_url(settings.pesu_auth_url))
            if not settings.session_secret:
                logger.info("SESSION_SECRET is not set: tokens end when this process does (see README)")
            logger.info("open files allowed: %d; connections at most %d, of which listeners at most %d;"
                        " PESU checks at most %d at once", *budget)
            restore_sigterm = close_sockets_on_sigterm(hub)
            state: State = {"settings": settings, "board": board, "door": door, "hub": hub, "pesu": checker,
                            "sessions": sessions, "metrics": counters, "metrics_share": share,
                            "reports": asyncio.Semaphore(REPORTS_AT_ONCE)}
            sharing = None if share is None else asyncio.create_task(share_metrics(state, share))
            try:
                yield state
            finally:
                restore_sigterm()
                watcher.cancel()
                if sharing is not None:
                    sharing.cancel()
                hub.close_all(1001)
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await guard_store.close()
                await store.close()
                sys.setswitchinterval(switch_interval)

    middleware = [Middleware(Edge, cors_origins=settings.cors_origins)]
    return Starlette(
        routes=ROUTES,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, **dict.fromkeys(REFUSALS, refused), Exception: server_error},
    )


SETTINGS = Settings.from_env()
app = create_app(SETTINGS)


# -- serving under uvicorn: the seam -------------------------------------------------------------------------
#
# The guarded protocols below subclass uvicorn's and rely on these internals of theirs (requirements.txt
# starts at the first release that has them all, and test_the_uvicorn_internals_we_rely_on_are_there
# names any that an upgrade takes away):
# - both HTTP protocols: ``cycle`` (None until a whole head; its ``more_body``, ``response_complete`` and
#   ``scope``), ``on_response_complete`` (the cycle's callback, looked up on the protocol), ``client``,
#   ``app_state``, ``handle_websocket_upgrade`` (no argument for httptools, the h11 event for h11) and
#   ``transport.set_protocol`` on upgrade;
# - httptools: ``on_header(name, value)`` for headers and trailers, ``pipeline`` (requests sent ahead);
#   for the /events chunks written straight (EventWire), the cycle's ``response_started``,
#   ``chunked_encoding``, ``response_complete``, ``disconnected``, ``flow`` and ``transport``, ``send``
#   framing a chunk as we do, and ``disconnected`` and the flow's ``write_paused`` changed only in the
#   protocol's ``pause_writing``, ``resume_writing`` and ``connection_lost`` (where we tell the listener;
#   our connection_lost also tells the request being answered), and ``response_complete`` only in
#   ``send`` (run by the stream's pump, which is not idle while it sends) before ``on_response_complete``
#   (where we tell the listener);
# - sans-I/O WebSockets: ``close_sent``, ``read_paused``, ``client``, and ``send`` waiting on ``writable``
#   (cleared by ``pause_writing``) before it writes anything: a send cut off by a zero timeout wrote nothing;
#   for the direct writes, ``conn`` (websockets' ServerProtocol, made in __init__ from ``config``, and
#   replaced there with our deflate offer), ``handshake_complete``, ``disconnected``, ``initial_response``,
#   ``transport``, and ``scope`` built in ``handle_connect`` before the app's task first runs; ``close_sent``
#   only ever assigned as an attribute (ours is a property that tells the listener), ``disconnected`` set in
#   ``connection_lost``, and ``writable`` changed only in ``pause_writing``, ``resume_writing`` and
#   ``connection_lost`` (the hooks where we tell the listener its writes stopped or flow again); where it
#   writes a close frame without ``close_sent`` (answering the peer's close, ``shutdown``), it closes the
#   transport in the same step, which the fan-out's ``is_closing()`` sees;
# - with WORKERS > 1, ``Config.bind_socket`` and ``supervisors.Multiprocess`` (its ``run`` and ``processes``,
#   each with ``exitcode``), and ``config.STARTUP_FAILURE``: uvicorn.run returns normally, so exits 0, when a
#   worker fails to start.


RESERVED_FDS = 64  # descriptors kept for the database, the listening socket, logs and pipes, besides PESU's


class Budget(NamedTuple):
    """How the open-file limit is shared: connections in all, of which listeners, and PESU checks at once."""

    files: int
    connections: int
    listeners: int
    pesu_places: int


def fd_budget(files: int, pesu_max: int, max_listeners: int) -> Budget:
    """Connections in all stay below the open-file limit ``files``, beside RESERVED_FDS and a socket for each
    PESU check (at most a quarter of the rest); listeners leave a tenth of the connections for HTTP, and
    stay within MAX_CONNECTIONS (``max_listeners``, 0: no cap of its own)."""
    pesu_places = min(pesu_max, max(1, (files - RESERVED_FDS) // 4))
    connections = max(16, files - RESERVED_FDS - pesu_places)
    listeners = connections - max(8, connections // 10)
    if max_listeners:
        listeners = min(listeners, max_listeners)
    return Budget(files, connections, listeners, pesu_places)


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit (the common soft 1024 would run out
    long before MAX_CONNECTIONS); returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Door:
    """Every TCP connection of this process, counted where uvicorn makes them, so descriptors never run out.

    - At most ``limit`` connections (below the open-file limit). One more evicts, in this order: the oldest
      connection that is not being answered (no whole request yet: an idle, trickling or slow-body one, or
      keep-alive between requests); a listener whose close has been sent (a refused or dropped socket
      waiting for its peer's close frame); the newest listener of the address that holds the most. If
      there is none (every connection is being answered), the newcomer is closed at once.
    - A connection that is not being answered is closed once it has waited ``request_timeout``: whole
      requests (head and body) arrive within that, and keep-alive lasts no longer, however slowly the next
      head trickles in.
    - A connection whose peer stops reading, so that our writes back up, is aborted after ``stall_timeout``:
      closing it politely would wait for a reader that never comes, and hold its descriptor for ever.
    """

    def __init__(self, limit: int, request_timeout: float, stall_timeout: float) -> None:
        self.limit = limit
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout
        self.open: dict[asyncio.BaseProtocol, asyncio.Transport] = {}  # oldest first
        self.waiting: dict[asyncio.BaseProtocol, asyncio.TimerHandle] = {}  # not being answered, oldest first
        self.stalled: dict[asyncio.BaseProtocol, asyncio.TimerHandle] = {}
        self.listeners: dict[str, dict[asyncio.BaseProtocol, None]] = {}  # by client address, oldest first
        self.address: dict[asyncio.BaseProtocol, str] = {}  # of each listener
        self.refused = 0  # connections closed at once, or evicted, for want of room

    def enter(self, protocol: asyncio.BaseProtocol, transport: asyncio.Transport, *, requested: bool) -> None:
        if len(self.open) >= self.limit and not self._evict():
            self.refused += 1
            cut(transport)
            return
        self.open[protocol] = transport
        if not requested:
            self.wait(protocol)

    def _evict(self) -> bool:
        victim = next(iter(self.waiting), None)
        if victim is None:
            victim = next((p for mine in self.listeners.values() for p in mine if closing(p)), None)
        if victim is None and self.listeners:
            victim = next(reversed(max(self.listeners.values(), key=len)))
        if victim is None:
            return False
        self.refused += 1
        cut(self.open[victim])
        self.leave(victim)
        return True

    def wait(self, protocol: asyncio.BaseProtocol) -> None:
        """The connection is not being answered (it is made, or its last answer is complete): it has
        ``request_timeout`` to send a whole request."""
        if protocol in self.open and protocol not in self.waiting:
            loop = asyncio.get_running_loop()
            self.waiting[protocol] = loop.call_later(self.request_timeout, self._expire, protocol)
            self._unlisten(protocol)  # (an /events stream that ended, its connection kept alive)

    def _expire(self, protocol: asyncio.BaseProtocol) -> None:
        if self.waiting.pop(protocol, None) is not None and protocol in self.open:
            cut(self.open[protocol])

    def answering(self, protocol: asyncio.BaseProtocol) -> None:
        """A whole request (head and body) has come: it is being answered, and no longer times out here."""
        timer = self.waiting.pop(protocol, None)
        if timer is not None:
            timer.cancel()

    def listen(self, protocol: asyncio.BaseProtocol, address: str) -> None:
        """The connection is a listener (a WebSocket, an /events stream) of that client address."""
        if protocol in self.open and protocol not in self.address:
            self.address[protocol] = address
            self.listeners.setdefault(address, {})[protocol] = None

    def leave(self, protocol: asyncio.BaseProtocol) -> None:
        """The connection closed, or was handed to another protocol (a WebSocket upgrade)."""
        self.open.pop(protocol, None)
        for timers in (self.waiting, self.stalled):
            timer = timers.pop(protocol, None)
            if timer is not None:
                timer.cancel()
        self._unlisten(protocol)

    def _unlisten(self, protocol: asyncio.BaseProtocol) -> None:
        address = self.address.pop(protocol, None)
        if address is not None:
            mine = self.listeners[address]
            del mine[protocol]
            if not mine:
                del self.listeners[address]

    def stall(self, protocol: asyncio.BaseProtocol) -> None:
        """Our writes to this connection back up (the transport paused writing)."""
        transport = self.open.get(protocol)
        if transport is not None and protocol not in self.stalled:
            self.stalled[protocol] = asyncio.get_running_loop().call_later(self.stall_timeout, cut, transport)

    def flowing(self, protocol: asyncio.BaseProtocol) -> None:
        timer = self.stalled.pop(protocol, None)
        if timer is not None:
            timer.cancel()


def cut(transport: asyncio.BaseTransport) -> None:
    """Close a connection at once with a reset: what we had not sent yet is dropped, rather than left to
    the kernel to deliver for minutes to a peer that does not read (SO_LINGER 0, then abort)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


def closing(protocol: asyncio.BaseProtocol) -> bool:
    """Whether a listener is only waiting to be closed: a WebSocket whose close frame we have sent (uvicorn
    then waits up to 10 s for the peer's), or a connection already closing."""
    transport = getattr(protocol, "transport", None)
    return getattr(protocol, "close_sent", False) or (transport is not None and transport.is_closing())


def door_of(protocol: Any) -> Door | None:
    """The Door of the app this protocol serves (in its lifespan state); None before start-up finishes."""
    return protocol.app_state.get("door")


class Counted:
    """What both guarded protocols do: enter the Door when a connection is made, leave it when lost, and
    tell it when our writes to the peer back up and when they flow again. (A mixin: ``super()`` is uvicorn's
    protocol.)"""

    requested = False  # whether a connection already carries a whole request when it reaches us
    listener: Peer | None = None  # the hub's peer whose states are written straight to this connection
    app_state: dict[str, Any]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        door = door_of(self)
        if door is not None:
            door.enter(self, transport, requested=self.requested)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        door = door_of(self)
        if door is not None:
            door.leave(self)  # type: ignore[arg-type]
        super().connection_lost(exc)  # type: ignore[misc]
        self.tell_listener()
        self.listener = None  # (no cycle left for the collector)

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        door = door_of(self)
        if door is not None:
            door.stall(self)  # type: ignore[arg-type]
        self.tell_listener()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        door = door_of(self)
        if door is not None:
            door.flowing(self)  # type: ignore[arg-type]
        self.tell_listener()

    def tell_listener(self) -> None:
        """What the listener's straight path depends on changed (our writes stopped or flow, a close)."""
        if self.listener is not None:
            self.listener.reckon()

    def listening(self) -> None:
        """Tell the Door this connection is a listener, and of which client address."""
        door, client = door_of(self), getattr(self, "client", None)
        if door is not None:
            door.listen(self, client[0] if client else "")  # type: ignore[arg-type]


LISTENER_SEND_BUFFER = 64 * 1024  # bytes of kernel send buffer for a connection that listens for long
STREAM_PATHS = ("/events",)  # HTTP responses that last as long as the reader listens


DIRECT_WRITES = "rero.direct_writes"  # the ASGI scope extension that hands SocketPeer our protocol
WINDOW_BITS = 12  # permessage-deflate's window, as uvicorn's own offer has it
DEFLATE_SETTINGS = {"memLevel": 5}


class Frames:
    """One state as the wire carries it, built once for every listener: the plain text frame, and (only
    once a listener needs them) the frame deflated on its own, which any listener that agreed to
    server_no_context_takeover inflates alike, and the /events chunk."""

    def __init__(self, day: Day) -> None:
        self.day = day
        self.payload = day.update_text.encode()
        self.plain = text_frame(self.payload)
        self._deflated: bytes | None = None
        self._chunk: bytes | None = None

    @property
    def deflated(self) -> bytes:
        if self._deflated is None:
            encoder = zlib.compressobj(wbits=-WINDOW_BITS, **DEFLATE_SETTINGS)
            data = encoder.compress(self.payload) + encoder.flush(zlib.Z_SYNC_FLUSH)
            self._deflated = text_frame(data[:-4], rsv1=True)  # (less the sync flush's empty block, RFC 7692)
        return self._deflated

    @property
    def chunk(self) -> bytes:
        """The Server-Sent Event as one chunk of a chunked HTTP response, as uvicorn's send frames a body."""
        if self._chunk is None:
            event = self.day.event_bytes
            self._chunk = b"%x\r\n%s\r\n" % (len(event), event)
        return self._chunk


def text_frame(payload: bytes, rsv1: bool = False) -> bytes:
    """A whole, unmasked WebSocket text frame (RFC 6455 5.2), as a server sends one: what websockets'
    send_text writes, less its per-call work. Uncompressed (RSV1 clear) it is valid with permessage-deflate
    agreed too; ``rsv1``: the payload is deflated (RFC 7692)."""
    first = 0xC1 if rsv1 else 0x81
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", first, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 126, size)
    else:
        head = struct.pack("!BBQ", first, 127, size)
    return head + payload


def keep_send_buffer_small(transport: asyncio.BaseTransport) -> None:
    """A long-lived listener gets a small kernel send buffer: otherwise the kernel grows it to megabytes
    (tcp_wmem) for a reader that stopped reading, and our send timeout starts only once that is full."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LISTENER_SEND_BUFFER)


MAX_HEAD_BYTES = 16 * 1024  # a request head (request line and headers), as h11 allows: past it, 431
HEAD_PIECE = 2048  # bytes handed to the parser at a time, so a head is measured before it is parsed
MAX_PIPELINED = 16  # requests sent ahead on one connection while one is answered (browsers send none)


class GuardedHttp(Counted, AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol (httptools, or h11 where it is missing), counted by the Door, with request
    heads of at most MAX_HEAD_BYTES and at most MAX_PIPELINED requests queued behind the one answered.

    httptools keeps every header of a head (and every trailer of a chunked body) as Python objects until
    it ends, with no limit: one connection sending header lines for ever grew the process by 9 bytes per
    byte sent. Here data reaches the parser HEAD_PIECE bytes at a time; the bytes of a head are counted
    before each piece, and trailers as they are parsed: past the limit a head is answered 431 and closed,
    whatever the parser (trailers: cut, their request under way). Requests sent ahead are parsed, and
    kept, 256 KiB at a time: a client
    sending small GETs for ever grew the process by 120 MB a second, so past MAX_PIPELINED it is cut.

    When such a connection is lost, httptools tells only the newest request (the last one sent ahead)
    that its client went: the one being answered never heard, and an /events stream with a request sent
    behind it kept its listener's place in the hub for ever. Here the request being answered is told too.
    """

    head_bytes = 0  # of the request head being received (while no request is in progress)
    trailer_bytes = 0  # of the trailers of the chunked body being received
    running: Any = None  # (httptools) the cycle answered last (until the next head); those sent ahead wait

    def on_headers_complete(self) -> None:
        """(httptools) A whole head: its request is answered now, or waits behind the one that is."""
        super().on_headers_complete()
        if not self.pipeline:
            self.running = self.cycle

    def connection_lost(self, exc: Exception | None) -> None:
        running = self.running
        if running is not None and running is not self.cycle and not running.response_complete:
            running.disconnected = True  # (what uvicorn does for self.cycle alone)
            running.message_event.set()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        for start in range(0, len(data), HEAD_PIECE):
            cycle = self.cycle
            if cycle is None or not cycle.more_body:  # what comes now is a request head
                self.head_bytes += min(HEAD_PIECE, len(data) - start)
            if self.head_bytes > MAX_HEAD_BYTES or self.trailer_bytes > MAX_HEAD_BYTES:
                return self._refuse_head()
            super().data_received(data[start:start + HEAD_PIECE])
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # answered 400, or upgraded to a WebSocket (which takes the rest as uvicorn does)
            if self.cycle is not cycle:  # a head ended in that piece
                self.head_bytes = self.trailer_bytes = 0
                if len(getattr(self, "pipeline", ())) > MAX_PIPELINED:
                    return cut(self.transport)
                if self.cycle.scope.get("path") in STREAM_PATHS and self.cycle.scope.get("method") == "GET":
                    keep_send_buffer_small(self.transport)
                    self.listening()
                    if DIRECT_CHUNKS and not self.pipeline:  # (started now; one sent ahead goes through ASGI)
                        self.cycle.scope.setdefault("extensions", {})[DIRECT_WRITES] = EventWire(self, self.cycle)
        self._tell_door()

    def on_header(self, name: bytes, value: bytes) -> None:
        """(httptools) A header, or a trailer of a chunked body: those are counted here."""
        if self.cycle is not None and self.cycle.more_body:
            self.trailer_bytes += len(name) + len(value) + 4
            if self.trailer_bytes > MAX_HEAD_BYTES:
                return  # not kept; the connection is refused (cut) before the next piece
        super().on_header(name, value)

    def on_response_complete(self) -> None:
        pipeline = getattr(self, "pipeline", ())
        upcoming = pipeline[-1][0] if pipeline else None  # (the next one sent ahead, which starts now)
        super().on_response_complete()
        if upcoming is not None and all(cycle is not upcoming for cycle, _ in pipeline):
            self.running = upcoming
        self.tell_listener()  # (a stream is the only response under way while it lasts: it ended)
        self.listener = None
        self._tell_door()

    def _tell_door(self) -> None:
        """Whether this connection is being answered (a whole request, not answered yet) or waits."""
        door, cycle = door_of(self), self.cycle
        if door is None or self.transport.is_closing():
            return
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            door.answering(self)
        else:  # nothing asked, a body still coming (perhaps behind requests sent ahead), or kept alive
            door.wait(self)

    def _refuse_head(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            cut(self.transport)  # a response is under way: there is no place for another one
            return
        body = b'{"detail":"Request header fields too large"}'
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()

    def handle_websocket_upgrade(self, *args: Any) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            # sent ahead behind a response under way (an /events stream: for ever): the WebSocket would take
            # the connection from under it, and the stream would never hear of its end
            return cut(self.transport)
        door = door_of(self)
        if door is not None:
            door.leave(self)  # the WebSocket protocol that takes over the connection enters it anew
        super().handle_websocket_upgrade(*args)


# httptools frames a chunk as we do; h11 (where httptools is missing) frames its own: those streams go through ASGI
DIRECT_CHUNKS = AutoHTTPProtocol.__name__ == "HttpToolsProtocol"


class EventWire:
    """An /events response on our HTTP protocol, for the hub to write a state's chunk to straight away, as
    the response's own send would (same framing, same transport): once its head is out and chunked, while
    our writes flow (not paused by a reader that stopped reading), and until it is complete or cut off.
    Then it is the same bytes in the same order with uvicorn's own writes, as for GuardedWebSocket."""

    frame = "chunk"

    def __init__(self, protocol: GuardedHttp, cycle: Any) -> None:
        self.protocol, self.cycle, self.transport = protocol, cycle, cycle.transport

    @property
    def flowing(self) -> bool:
        cycle = self.cycle
        return (cycle.response_started and cycle.chunked_encoding is True and not cycle.response_complete
                and not cycle.disconnected and not cycle.flow.write_paused)

    def listen(self, peer: Peer) -> None:
        self.protocol.listener = peer


PONG_BACKLOG = 64 * 1024  # bytes of our own writes waiting for a peer, past which we stop reading from it


class GuardedWebSocket(Counted, WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol (its default with websockets installed), counted by the Door,
    with back-pressure on what the peer makes us write.

    uvicorn answers every ping with a pong as it reads it, without waiting for the peer to read them, so
    a client that sends pings and never reads grew our memory without bound. Here, once our unsent writes
    pass PONG_BACKLOG we stop reading from that peer until they drain, and the Door aborts it if they do not
    drain within its stall timeout: one such client costs at most one read (256 KiB) past PONG_BACKLOG.
    """

    requested = True  # it was an HTTP request first
    held_back = False  # reading paused by us, for our writes to drain

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        keep_send_buffer_small(transport)
        self.listening()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.ws_per_message_deflate:  # no context kept either way: one deflate serves everyone
            self.conn = ServerProtocol(
                extensions=[ServerPerMessageDeflateFactory(
                    server_no_context_takeover=True, client_no_context_takeover=True,
                    server_max_window_bits=WINDOW_BITS, client_max_window_bits=WINDOW_BITS,
                    compress_settings=DEFLATE_SETTINGS)],
                max_size=self.config.ws_max_size, logger=logging.getLogger("uvicorn.error"))

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if not self.close_sent:  # (accepted: the app's task has been made, not run, so it sees this)
            self.scope["extensions"][DIRECT_WRITES] = self
            # (agreed in accept(), above) the shared deflated frame uses a 2^WINDOW_BITS window: a client that
            # asked for a smaller one gets the plain frame instead (an uncompressed message is always valid)
            if any(getattr(extension, "local_max_window_bits", 0) >= WINDOW_BITS
                   for extension in self.conn.extensions):
                self.frame = "deflated"

    frame = "plain"  # which of a state's Frames it is written: "deflated" once it agreed to our compression

    _close_sent = False

    @property
    def flowing(self) -> bool:
        """Whether a state's frame may be written to the transport now, as uvicorn's send would once
        writable: the connection is open, our writes flow (not paused by a reader that stopped reading) and
        no close has begun (close_sent: ours went out; the fan-out also asks the transport whether it is
        closing, as after the peer's close frame is answered). Then it is the same bytes, in the same order
        with uvicorn's own writes (a send writes at once once it runs, and the hub writes only to a peer none
        of whose sends is under way); otherwise the listener's pump sends it through ASGI, with its timeout."""
        return not (self._close_sent or self.disconnected or not self.handshake_complete
                    or not self.writable.is_set() or self.initial_response is not None)

    @property  # type: ignore[override]
    def close_sent(self) -> bool:
        return self._close_sent

    @close_sent.setter
    def close_sent(self, value: bool) -> None:
        """(uvicorn sets it wherever it sends a close frame or a refusal, in the step that writes it: no
        state of ours can come in between)"""
        self._close_sent = value
        self.tell_listener()

    def listen(self, peer: Peer) -> None:
        self.listener = peer

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.transport.is_closing() and self.transport.get_write_buffer_size() > PONG_BACKLOG:
            self.held_back = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.held_back:
            self.held_back = False
            if not self.read_paused:  # uvicorn's own pause (a message the app has not taken yet) stays
                self.transport.resume_reading()


def uvicorn_log_config(form: str) -> dict[str, Any]:
    """Uvicorn's own logging set-up, with every line as JSON from the first one when LOG_FORMAT=json."""
    from uvicorn.config import LOGGING_CONFIG

    if form != "json":
        return LOGGING_CONFIG
    return {**LOGGING_CONFIG, "formatters": {name: {"()": JsonFormatter} for name in LOGGING_CONFIG["formatters"]}}


def server_options(settings: Settings) -> dict[str, Any]:
    """How uvicorn must serve this app (``python app.py``, and the tests' servers): the guarded protocols,
    the socket message cap, and a short graceful shutdown."""
    return {
        "http": GuardedHttp,
        "ws": GuardedWebSocket,
        "ws_max_size": MAX_SOCKET_MESSAGE_BYTES,
        # Off unless asked for: each socket would deflate every state again with a compressor of its own
        # (about 45 KiB more per idle socket, and 1.5x the time to reach 1000 of them).
        "ws_per_message_deflate": settings.ws_compression,
        "ws_ping_interval": settings.ws_ping_seconds or None,
        "ws_ping_timeout": settings.ws_ping_seconds or None,
        "timeout_graceful_shutdown": 5,
    }


# -- logging and metrics -------------------------------------------------------------------------------------


LOG_FIELDS = ("srn", "username", "address", "slot", "date", "action", "via", "route", "status", "duration")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and whichever LOG_FIELDS the line carries."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((name, record.__dict__[name]) for name in LOG_FIELDS if name in record.__dict__)
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            address, method, path, _, status = record.args  # uvicorn's access line, as fields
            line.update(address=address, route=f"{method} {path}", status=status)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def public_url(url: str) -> str:
    """A URL fit for a log line: any user:password@ taken out."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class TextFormatter(logging.Formatter):
    """A plain line per record, with control characters escaped: a username with a newline in it cannot
    forge a line of its own (a traceback, added after the message, keeps its newlines)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """UTC, with its offset (as JSON lines have it): "2026-11-24T03:45:02.118+00:00"."""
        return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return CONTROL_CHARACTERS.sub(lambda m: m.group().encode("unicode_escape").decode(), line)


class NoFrames(logging.Filter):
    """Drops the websockets library's frame-by-frame debug lines ("< TEXT ...", "> TEXT ..."), which uvicorn
    sends to its error log at LOG_LEVEL=debug: a frame carries a member's password or token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in ("< %s", "> %s")


FEED_PATH = re.compile(r"/calendar/([^/'\"?\r\n]+)", re.IGNORECASE)  # what follows, mistyped or not, may be a secret
SECRET_LIKE = re.compile(r"[A-Za-z0-9_-]{40,}")  # a feed's secret is 43 of these, wherever a mistyped URL put it


def hide_feed_secret(text: str) -> str:
    text = FEED_PATH.sub(lambda m: m.group() if m.group(1) in ("link", "unlink") else "/calendar/<secret>.ics", text)
    return SECRET_LIKE.sub("<secret>", text)


class HideFeedSecrets(logging.Filter):
    """A calendar feed's URL is its secret: uvicorn's access lines and its trace of each request's scope
    show ``/calendar/<secret>.ics`` instead (an access line keeps its fields, for LOG_FORMAT=json)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            record.args = tuple(hide_feed_secret(arg) if isinstance(arg, str) else arg for arg in record.args)
        else:
            message = record.getMessage()
            hidden = hide_feed_secret(message)
            if hidden != message:
                record.msg, record.args = hidden, ()
        return True


def configure_logging(level: str, form: str = "text") -> None:
    """Our own log lines at LOG_LEVEL, beside uvicorn's; with LOG_FORMAT=json, uvicorn's lines as well."""
    logger.setLevel(5 if level == "trace" else level.upper())  # uvicorn's TRACE is 5
    frames = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, NoFrames) for f in frames.filters):
        frames.addFilter(NoFrames())
    for name in ("uvicorn.access", "uvicorn.asgi", "uvicorn.error"):
        paths = logging.getLogger(name)
        if not any(isinstance(f, HideFeedSecrets) for f in paths.filters):
            paths.addFilter(HideFeedSecrets())
    formatter = JsonFormatter() if form == "json" else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not logger.handlers and not logging.getLogger().handlers:  # leave a host's own logging set-up alone
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    if form == "json":
        for name in ("rero", "uvicorn", "uvicorn.error", "uvicorn.access"):
            for handler in logging.getLogger(name).handlers:
                handler.setFormatter(formatter)


UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


# name: (type, help); the order /metrics lists them in
FAMILIES = {
    "rero_workers": ("gauge", "Worker processes of the service that answered this scrape's round."),
    "rero_open_sockets": ("gauge", "Open WebSockets."),
    "rero_open_listeners": ("gauge", "Open WebSockets and /events streams."),
    "rero_open_connections": ("gauge", "TCP connections."),
    "rero_connections_refused_total": ("counter", "Connections closed at once or evicted for want of room."),
    "rero_slot_changes_total": ("counter", "Bookings, cancellations, closings and reopenings, by route kind."),
    "rero_logins_total": ("counter", "Password checks by result."),
    "rero_pesu_upstream_seconds": ("histogram", "Time PESU took to answer."),
    "rero_auth_cache_total": ("counter", "Password checks answered from the cache, or not."),
    "rero_broadcasts_total": ("counter", "Broadcast rounds."),
    "rero_broadcast_seconds_total": ("counter", "Time spent handing states to listeners."),
    "rero_broadcast_direct_writes_total": ("counter", "States written straight to an idle listener's socket."),
}
METRICS_EVERY = 1.0  # seconds between a worker's writes of its share, when it changed


class Metrics:
    """Counters and one histogram, in the Prometheus text format. Labels are kinds and results, never
    members: nothing here names an SRN. Each worker keeps its own; a scrape describes the whole service
    (see MetricsShare), whichever worker answers it."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.upstream = [0] * (len(UPSTREAM_BUCKETS) + 1)
        self.upstream_sum = 0.0

    def count(self, name: str, labels: str) -> None:
        self.counts[name, labels] += 1

    def observe_upstream(self, seconds: float) -> None:
        self.upstream_sum += seconds
        self.upstream[bisect.bisect_left(UPSTREAM_BUCKETS, seconds)] += 1

    def samples(self, state: State) -> dict[str, float]:
        """This process's series ("name{labels}": value), in FAMILIES' order."""
        hub, pesu_ = state["hub"], state["pesu"]
        series: dict[str, float] = {
            "rero_workers": 1,
            "rero_open_sockets": hub.sockets,
            "rero_open_listeners": len(hub.peers),
            "rero_open_connections": len(state["door"].open),
            "rero_connections_refused_total": state["door"].refused,
        }
        for name in ("rero_slot_changes_total", "rero_logins_total"):
            series.update({f"{name}{{{labels}}}": n for (metric, labels), n in sorted(self.counts.items())
                           if metric == name})
        total = 0
        for bound, n in zip([*map(str, UPSTREAM_BUCKETS), "+Inf"], self.upstream):
            total += n
            series[f'rero_pesu_upstream_seconds_bucket{{le="{bound}"}}'] = total
        series.update({
            "rero_pesu_upstream_seconds_sum": round(self.upstream_sum, 6),
            "rero_pesu_upstream_seconds_count": total,
            'rero_auth_cache_total{result="hit"}': pesu_.cache_hits,
            'rero_auth_cache_total{result="miss"}': pesu_.cache_misses,
            "rero_broadcasts_total": hub.rounds,
            "rero_broadcast_seconds_total": round(hub.round_seconds, 6),
            "rero_broadcast_direct_writes_total": hub.direct_writes,
        })
        return series


def render_metrics(shares: list[tuple[bool, dict[str, float]]]) -> str:
    """The Prometheus text of the whole service: each series summed over the workers' shares (``alive``:
    whether that worker still runs; a worker gone counts in the counters, which must never go back, but
    not in the gauges)."""
    summed: dict[str, float] = {}
    for alive, series in shares:
        for key, value in series.items():
            family = key.split("{", 1)[0].removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            if alive or FAMILIES.get(family, ("gauge",))[0] != "gauge":
                summed[key] = summed.get(key, 0) + value
    lines = []
    for family, (kind, help_) in FAMILIES.items():
        lines += [f"# HELP {family} {help_}", f"# TYPE {family} {kind}"]
        for key, value in summed.items():
            if key == family or key.startswith((family + "{", family + "_bucket", family + "_sum", family + "_count")):
                lines.append(f"{key} {round(value, 6) if isinstance(value, float) else value}")
    return "\n".join(lines) + "\n"


class MetricsShare:
    """Each worker's metrics in a small file of its own, in a folder beside the database
    (``rero.db-metrics/PID``), so that whichever worker answers a scrape sums them all: with WORKERS=2,
    successive scrapes would otherwise alternate between two workers' counters under the same names.

    Only this service's workers count (the files of one supervisor's children: their parent's pid); a
    scrape first writes its own worker's file, then reads them all, so two scrapes served by two workers
    never see a counter go back. Files of a former run are removed by the first worker that sees them."""

    def __init__(self, database_path: str) -> None:
        self.folder = Path(database_path + "-metrics")
        self.pid, self.parent = os.getpid(), os.getppid()
        self.written: dict[str, float] | None = None
        self.writing = threading.Lock()

    def write(self, series: dict[str, float]) -> None:
        with self.writing:  # (scrapes write from threads of their own: one temporary file at a time)
            self._write(series)

    def _write(self, series: dict[str, float]) -> None:
        if series == self.written:
            return
        self.folder.mkdir(mode=0o700, exist_ok=True)
        temporary = self.folder / f".{self.pid}"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(orjson.dumps({"parent": self.parent, "series": series}))
        os.replace(temporary, self.folder / str(self.pid))
        self.written = series

    def read(self) -> list[tuple[bool, dict[str, float]]]:
        shares = []
        for path in self.folder.iterdir() if self.folder.is_dir() else ():
            if path.name.startswith("."):
                continue
            try:
                share = orjson.loads(path.read_bytes())
                pid = int(path.name)
            except (OSError, ValueError):
                continue
            if share.get("parent") != self.parent:  # another run's, or another service's
                with contextlib.suppress(OSError):
                    if not alive(pid):
                        path.unlink()
                continue
            shares.append((pid == self.pid or alive(pid), share.get("series") or {}))
        return shares


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (someone else's process)
        return True
    return True


async def share_metrics(state: State, share: MetricsShare) -> None:
    """Write this worker's share every METRICS_EVERY while it changes, so other workers' scrapes see it (a
    folder it cannot write is logged once, not every second)."""
    failing = False
    while True:
        await asyncio.sleep(METRICS_EVERY)
        try:
            await asyncio.to_thread(share.write, state["metrics"].samples(state))
            failing = False
        except OSError as exc:
            if not failing:
                logger.warning("metrics: cannot write %s: %s", share.folder, exc.strerror or exc)
            failing = True


# -- command line --------------------------------------------------------------------------------------------


USAGE = """usage: python app.py            run the server (settings from the environment; see README)
       python app.py backup PATH  copy the live database to PATH (safe while the server runs)
       python app.py check        check the database's integrity; print its schema version and counts
       python app.py upgrade ORIGINAL.db [--date YYYY-MM-DD]
                                  bring the original system's bookings in (safe while the server runs)"""


def maintain(argv: list[str]) -> int:
    """``backup PATH`` and ``check``, on DATABASE_PATH; the exit status says whether all is well."""
    path = SETTINGS.database_path
    try:
        if argv[0] == "backup" and len(argv) == 2:
            started = time.perf_counter()
            count = db.backup(path, argv[1])
            print(f"backed up {path} to {argv[1]}: {count} booking(s), {time.perf_counter() - started:.2f}s")
            return 0
        if argv == ["check"]:
            report = db.check(path)
            print(f"{path}: integrity {'ok' if report['ok'] else 'FAILED: ' + '; '.join(report['integrity'])}")
            schema = report["schema"] or "none (the original system's database, not yet upgraded)"
            print(f"schema version {schema}; {report['bookings']} booking(s) and "
                  f"{report['closed_slots']} closed slot(s) over {report['days']} day(s); {report['events']} event(s)")
            return 0 if report["ok"] else 1
        if argv[0] == "upgrade" and (len(argv) == 2 or (len(argv) == 4 and argv[2] == "--date")):
            return upgrade(path, argv[1], argv[3] if len(argv) == 4 else None)
    except FileNotFoundError as exc:
        print(f"no database at {exc.args[0] if exc.args else path}" + (" (DATABASE_PATH)" if not exc.args or
                                                                        exc.args[0] == path else ""), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (sqlite3.Error, ValueError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    print(USAGE, file=sys.stderr)
    return 2


def upgrade(path: str, original: str, date: str | None) -> int:
    """``upgrade ORIGINAL.db``: back the database up beside itself, then bring the original's bookings in,
    one line each; the running workers see the commit within a poll and broadcast it."""
    now = datetime.now(SETTINGS.rules().timezone)
    today, stamp = now.date().isoformat(), now.strftime("%Y-%m-%d %H:%M:%S")
    try:
        if date is not None and parse_date(date) < today:
            raise SlotError("in the past")
    except SlotError:
        print(f"--date must be a date (YYYY-MM-DD) from today ({today}) on", file=sys.stderr)
        return 2
    if Path(original).exists() and Path(path).exists() and Path(original).resolve() == Path(path).resolve():
        print(f"{original} is DATABASE_PATH itself: it is upgraded when the server starts on it", file=sys.stderr)
        return 2
    done = db.brought_in(path, original)  # (not the original's, or unreadable: said before any backup)
    if done is not None:
        print(f"{original}: its bookings were brought in at {done}: nothing changed")
        return 0
    if Path(path).exists():
        copy = db.reserve(f"{path}.before-upgrade-{now:%Y%m%d-%H%M%S}")  # (two in one second: two copies)
        print(f"backed up {path} to {copy}: {db.backup(path, copy)} booking(s)")

    async def bring_in() -> list[str]:
        store = SlotStore(path, SETTINGS.hours)
        await store.open(today, stamp)
        try:
            return await store.bring_in(original, date, today, stamp, now.isoformat(timespec="seconds"))
        finally:
            await store.close()

    for line in asyncio.run(bring_in()):
        print(line)
    return 0


def preflight(settings: Settings) -> None:
    """Stop with one line naming the setting if the address or the database cannot be used: uvicorn would
    otherwise log "serving" first and fail later, and a worker would fail with a traceback."""
    try:
        socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise SystemExit(f"HOST={settings.host!r} cannot be used: {exc.strerror or exc}") from None
    try:  # (as uvicorn will bind it: taken, not this host's, or a port below 1024 for a user)
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, settings.port))
    except OSError as exc:
        raise SystemExit(f"HOST={settings.host!r} PORT={settings.port} cannot be used: {exc.strerror or exc}") from None
    now = datetime.now(settings.rules().timezone)
    try:
        db.prepare(settings.database_path, settings.hours, now.date().isoformat(), now.strftime("%Y-%m-%d %H:%M:%S"))
    except (OSError, sqlite3.Error, ValueError) as exc:
        reason = str(exc)
        if isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        raise SystemExit(f"DATABASE_PATH={settings.database_path!r} cannot be used: {reason}") from None


def serve(settings: Settings) -> int:
    """Run uvicorn as ``python app.py`` does; the exit status: 0 after a clean stop, STARTUP_FAILURE (3) if
    the server, or any one of its workers, failed to start (so systemd's Restart=on-failure acts)."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        app if settings.workers == 1 else "app:app",  # workers import it themselves; one process need not again
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(settings.log_format),
        **server_options(settings),
    )
    if settings.workers == 1:
        server = uvicorn.Server(config)
        server.run()
        return 0 if server.started else STARTUP_FAILURE
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    failed = [process.pid for process in supervisor.processes if process.exitcode == STARTUP_FAILURE]
    if failed:
        print(f"rero-slots did not start: worker {failed[0]} failed to start (its error is above)", file=sys.stderr)
        return STARTUP_FAILURE
    return 0


def main(argv: list[str]) -> None:
    if argv:
        raise SystemExit(maintain(argv))
    preflight(SETTINGS)

    if SETTINGS.workers > 1 and not SETTINGS.session_secret:
        # One random secret for all the workers (they inherit the environment), so a token from one
        # is good on the others; it still dies with this process.
        os.environ["SESSION_SECRET"] = os.urandom(32).hex()
    raise SystemExit(serve(SETTINGS))


if __name__ == "__main__":
    main(sys.argv[1:])

