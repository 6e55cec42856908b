"""rero-slots: the web face (HTTP routes), the socket hub, and start-up.

Run with ``python app.py`` (reads HOST, PORT, WORKERS, ... from the environment) or ``uvicorn app:app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypedDict

import httpx
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import pesu
from db import SlotStore
from pesu import AuthUnavailable, InvalidCredentials, PesuChecker
from slots import Board, SlotError

logger = logging.getLogger("rero")

MAX_BODY_BYTES = 64 * 1024
MAX_SOCKET_MESSAGE_BYTES = 16 * 1024


# -- configuration ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything configurable, read once from the environment at start-up (tests build their own)."""

    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "info"
    workers: int = 1
    pesu_auth_url: str = pesu.DEFAULT_URL
    cache_minutes: float = 30
    pesu_timeout: float = pesu.TIMEOUT_SECONDS
    database_path: str = "data/rero.db"
    cors_origins: tuple[str, ...] = ("*",)
    slot_start_hour: int = 3
    slot_end_hour: int = 15
    send_timeout: float = 10.0  # a socket whose send takes longer than this is dropped
    max_backlog: int = 64  # replies waiting for a socket that does not read, before it is dropped
    watch_interval: float = 0.1  # how often to look for changes made by other worker processes

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def get(name: str, cast: Callable[[str], Any], default: Any) -> Any:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            try:
                return cast(raw.strip())
            except ValueError:
                raise SystemExit(f"{name}={raw!r} is not a valid value") from None

        settings = cls(
            host=get("HOST", str, cls.host),
            port=get("PORT", int, cls.port),
            log_level=get("LOG_LEVEL", str.lower, cls.log_level),
            workers=get("WORKERS", int, cls.workers),
            pesu_auth_url=get("PESU_AUTH_URL", str, cls.pesu_auth_url),
            cache_minutes=get("CACHE_DURATION_MINUTES", float, cls.cache_minutes),
            database_path=get("DATABASE_PATH", str, cls.database_path),
            cors_origins=get(
                "CORS_ORIGINS", lambda v: tuple(o.strip() for o in v.split(",") if o.strip()), cls.cors_origins
            ),
            slot_start_hour=get("SLOT_START_HOUR", int, cls.slot_start_hour),
            slot_end_hour=get("SLOT_END_HOUR", int, cls.slot_end_hour),
        )
        if not 0 <= settings.slot_start_hour < settings.slot_end_hour <= 24:
            raise SystemExit("SLOT_START_HOUR and SLOT_END_HOUR must satisfy 0 <= start < end <= 24")
        return settings

    @property
    def hours(self) -> range:
        return range(self.slot_start_hour, self.slot_end_hour)


# -- responses and input -----------------------------------------------------------------------------------


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"detail": "Internal Server Error"}, 500)


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, refusing (413) anything over MAX_BODY_BYTES before reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes)")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HTTPException(400, "Request body must be valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "Request body must be a JSON object")
    return data


class BadInput(ValueError):
    """A request field that is missing or of the wrong kind; str() says which and why."""


def slot_id_of(data: dict[str, Any]) -> int:
    value = data.get("slot_id")
    if value is None:
        raise BadInput("slot_id is required")
    # Accept 5 and "5" (the original's pydantic did); refuse true, 5.5, "abc" and absurd lengths.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 6:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BadInput("slot_id must be an integer")


def credentials_of(data: dict[str, Any]) -> tuple[str, str]:
    username, password = data.get("username"), data.get("password")
    if username is None or password is None:
        raise BadInput("username and password are required")
    if not isinstance(username, str) or not username.strip() or len(username) > 64:
        raise BadInput("username must be a non-empty string")
    if not isinstance(password, str) or not password or len(password) > 256:
        raise BadInput("password must be a non-empty string")
    return username.strip(), password


# -- the socket hub ----------------------------------------------------------------------------------------


class Peer:
    """One open socket and what is waiting to be sent to it.

    Replies to this client queue in order; the slot state does not queue at all: only the newest
    ``slots_update`` waits, so a slow reader gets the latest state instead of a backlog of stale ones.
    Only the peer's own pump task writes to the socket, so a slow reader can only ever stall itself.
    """

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.replies: deque[str] = deque()
        self.latest: str | None = None
        self.close_code: int | None = None
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def send_state(self, text: str) -> None:
        self.latest = text
        self.wake.set()

    def close(self, code: int) -> None:
        if self.close_code is None:
            self.close_code = code
            self.wake.set()


class Hub:
    """The set of open sockets; broadcasts are encoded once and handed to every socket's own pump."""

    def __init__(self, send_timeout: float, max_backlog: int) -> None:
        self.peers: set[Peer] = set()
        self.send_timeout = send_timeout
        self.max_backlog = max_backlog

    def join(self, websocket: WebSocket) -> Peer:
        peer = Peer(websocket)
        peer.task = asyncio.create_task(self._pump(peer))
        self.peers.add(peer)
        return peer

    async def leave(self, peer: Peer) -> None:
        self.peers.discard(peer)
        if peer.task is not None:
            peer.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await peer.task

    def broadcast(self, text: str) -> None:
        for peer in self.peers:
            peer.send_state(text)

    def reply(self, peer: Peer, message: dict[str, Any]) -> None:
        if len(peer.replies) >= self.max_backlog:
            logger.warning("dropping a socket that stopped reading (%d replies waiting)", len(peer.replies))
            self.peers.discard(peer)
            peer.close(1008)
            return
        peer.replies.append(orjson.dumps(message).decode())
        peer.wake.set()

    def close_all(self, code: int) -> None:
        for peer in list(self.peers):
            self.peers.discard(peer)
            peer.close(code)

    async def _pump(self, peer: Peer) -> None:
        websocket = peer.websocket
        try:
            while True:
                await peer.wake.wait()
                peer.wake.clear()
                while peer.close_code is None and (peer.replies or peer.latest is not None):
                    if peer.replies:
                        text = peer.replies.popleft()
                    else:
                        text, peer.latest = peer.latest, None  # type: ignore[assignment]
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races
                    # with a completed send, leaving this task alive after its socket has gone.
                    async with asyncio.timeout(self.send_timeout):
                        await websocket.send_text(text)
                if peer.close_code is not None:
                    await websocket.close(peer.close_code)
                    return
        except asyncio.TimeoutError:
            logger.warning("dropping a socket that took over %.1fs to accept a message", self.send_timeout)
            self.peers.discard(peer)
            with contextlib.suppress(Exception):
                await websocket.close(1008)
        except (OSError, RuntimeError) as exc:  # the peer went away mid-send; its endpoint cleans up
            logger.debug("send failed: %r", exc)
            self.peers.discard(peer)


# -- application state ----------------------------------------------------------------------------------------


class State(TypedDict):
    settings: Settings
    board: Board
    hub: Hub
    pesu: PesuChecker
    store: SlotStore


async def authenticate(state: State, username: str, password: str) -> dict[str, Any]:
    """The member's PESU profile, or an HTTPException saying why not (401 or 503)."""
    try:
        return await state["pesu"].check(username, password)
    except InvalidCredentials:
        logger.info("login refused for %s", username)
        raise HTTPException(401, "Invalid credentials") from None
    except AuthUnavailable as exc:
        logger.warning("PESU auth unavailable: %s", exc)
        raise HTTPException(503, "Authentication service unavailable") from None


def db_summary(state: State) -> dict[str, Any]:
    board = state["board"]
    return {
        "total_slots": len(board.slots),
        "booked_slots": len(board.booked),
        "available_slots": len(board.available),
        "database_path": state["settings"].database_path,
    }


# -- HTTP handlers --------------------------------------------------------------------------------------------


async def root(request: Request[State]) -> Response:
    state = request.state
    return JSONResponse(
        {
            "message": "Slot Booking API is running",
            "websocket_endpoint": "/slot-booking",
            "active_connections": len(state["hub"].peers),
            "booked_slots": state["board"].booked,
        }
    )


async def health(request: Request[State]) -> Response:
    state = request.state
    board = state["board"]
    return JSONResponse(
        {
            "status": "healthy",
            "timestamp": board.clock().isoformat(),
            "active_connections": len(state["hub"].peers),
            "total_slots": len(board.slots),
            "booked_slots_count": len(board.booked),
            "available_slots_count": len(board.available),
            "database": db_summary(state),
        }
    )


async def stats(request: Request[State]) -> Response:
    state = request.state
    summary = db_summary(state)
    return JSONResponse(
        {
            "database": summary,
            "websocket": {"active_connections": len(state["hub"].peers)},
            "slots": {
                "total": summary["total_slots"],
                "booked": summary["booked_slots"],
                "available": summary["available_slots"],
            },
        }
    )


async def list_slots(request: Request[State]) -> Response:
    state = request.state
    return Response(state["board"].slots_json, media_type="application/json")


async def parse(request: Request[State], *, slot: bool) -> tuple[int, str, str]:
    """slot_id (0 when not asked for), username, password from a JSON body; 400/422 if they are not there."""
    data = await read_json(request)
    try:
        slot_id = slot_id_of(data) if slot else 0
        username, password = credentials_of(data)
    except BadInput as exc:
        raise HTTPException(422, str(exc)) from None
    return slot_id, username, password


async def login(request: Request[State]) -> Response:
    state = request.state
    _, username, password = await parse(request, slot=False)
    profile = await authenticate(state, username, password)
    return JSONResponse({"success": True, "message": "Login successful", "user": profile})


async def book_slot(request: Request[State]) -> Response:
    state = request.state
    slot_id, username, password = await parse(request, slot=True)
    profile = await authenticate(state, username, password)
    await change(state, "book", slot_id, profile["srn"], via="http")
    return JSONResponse({"success": True, "message": f"Slot {slot_id} booked successfully", "slot_id": slot_id})


async def cancel_slot(request: Request[State]) -> Response:
    state = request.state
    slot_id, username, password = await parse(request, slot=True)
    profile = await authenticate(state, username, password)
    await change(state, "cancel", slot_id, profile["srn"], via="http")
    return JSONResponse(
        {"success": True, "message": f"Slot {slot_id} booking cancelled successfully", "slot_id": slot_id}
    )


async def my_bookings(request: Request[State]) -> Response:
    state = request.state
    _, username, password = await parse(request, slot=False)
    profile = await authenticate(state, username, password)
    bookings = await state["board"].bookings_of(profile["srn"])
    return JSONResponse({"success": True, "bookings": bookings, "total_bookings": len(bookings)})


async def change(state: State, action: str, slot_id: int, srn: str, *, via: str) -> None:
    """Book or cancel, then tell every socket; a refusal is a 400 with the rules' own sentence."""
    board = state["board"]
    try:
        changed = await (board.book if action == "book" else board.cancel)(slot_id, srn)
    except SlotError as exc:
        raise HTTPException(400, str(exc)) from None
    logger.info("%s slot %d by %s via %s", action, slot_id, srn, via)
    if changed:
        state["hub"].broadcast(board.update_text)


# -- the WebSocket endpoint ------------------------------------------------------------------------------------

SOCKET_ACTIONS = {
    "book_slot": ("book", "booking_response", "booking", "Slot {} booked successfully"),
    "cancel_slot": ("cancel", "cancellation_response", "cancellation", "Slot {} booking cancelled successfully"),
}


async def slot_socket(websocket: WebSocket[State]) -> None:
    state = websocket.state
    await websocket.accept()
    hub = state["hub"]
    peer = hub.join(websocket)
    peer.send_state(state["board"].update_text)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                hub.reply(peer, {"type": "error", "message": "Binary frames are not supported; send JSON text"})
            elif len(text) > MAX_SOCKET_MESSAGE_BYTES:
                peer.close(1009)
            else:
                await on_message(state, peer, text)
    finally:
        await hub.leave(peer)


async def on_message(state: State, peer: Peer, text: str) -> None:
    """Answer one client message; a bad one gets an ``error`` reply and the socket stays open."""
    hub = state["hub"]
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return hub.reply(peer, {"type": "error", "message": "Invalid JSON format"})
    if not isinstance(data, dict):
        return hub.reply(peer, {"type": "error", "message": "Message must be a JSON object with a \"type\""})
    kind = data.get("type")
    if kind == "get_slots":
        return peer.send_state(state["board"].update_text)
    if not isinstance(kind, str) or kind not in SOCKET_ACTIONS:
        shown = kind if isinstance(kind, str) else orjson.dumps(kind).decode()
        return hub.reply(peer, {"type": "error", "message": f"Unknown message type: {shown[:64]}"})

    action, response_type, noun, success = SOCKET_ACTIONS[kind]
    if any(data.get(name) is None for name in ("slot_id", "username", "password")):
        return hub.reply(
            peer, {"type": "error", "message": f"Missing slot_id, username, or password in {noun} request"}
        )
    try:
        slot_id = slot_id_of(data)
        username, password = credentials_of(data)
    except BadInput as exc:
        return hub.reply(peer, {"type": "error", "message": str(exc)})

    def respond(ok: bool, message: str) -> None:
        hub.reply(peer, {"type": response_type, "success": ok, "message": message, "slot_id": slot_id})

    try:
        profile = await authenticate(state, username, password)
        await change(state, action, slot_id, profile["srn"], via="websocket")
    except HTTPException as exc:
        if exc.status_code == 401:
            return respond(False, "Authentication failed. Invalid credentials.")
        if exc.status_code == 503:
            return respond(False, "Authentication service unavailable. Please try again later.")
        return respond(False, str(exc.detail))
    respond(True, success.format(slot_id))


# -- lifetime ------------------------------------------------------------------------------------------------


async def watch_other_workers(store: SlotStore, board: Board, hub: Hub, interval: float) -> None:
    """Pick up changes committed by other worker processes on the same file, and broadcast them."""
    while True:
        await asyncio.sleep(interval)
        try:
            snapshot = await store.changed_elsewhere()
        except Exception:  # a locked or busy database must not end the watch
            logger.exception("could not read the database for changes")
            continue
        if snapshot is not None and board.apply(snapshot):
            hub.broadcast(board.update_text)


def configure_logging(level: str) -> None:
    """Our own log lines at LOG_LEVEL, beside uvicorn's, in the same plain format."""
    logger.setLevel(level.upper())
    if not logger.handlers and not logging.getLogger().handlers:  # leave a host's own logging set-up alone
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


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
    clock: Callable[[], datetime] = datetime.now,
    pesu_timer: Callable[[], float] | None = None,
) -> Starlette:
    """Build the app; tests pass their own settings, a fake PESU transport and clock."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        configure_logging(settings.log_level)
        store = SlotStore(settings.database_path, settings.hours)
        board = Board(store, settings.hours, clock)
        board.apply(await store.open())
        hub = Hub(settings.send_timeout, settings.max_backlog)
        timeout = httpx.Timeout(settings.pesu_timeout, connect=min(5.0, settings.pesu_timeout))
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            checker = PesuChecker(
                client,
                settings.pesu_auth_url,
                settings.cache_minutes * 60,
                timer=pesu_timer,
                deadline=1.5 * settings.pesu_timeout,
            )
            watcher = asyncio.create_task(watch_other_workers(store, board, hub, settings.watch_interval))
            restore_sigterm = close_sockets_on_sigterm(hub)
            try:
                yield {"settings": settings, "board": board, "hub": hub, "pesu": checker, "store": store}
            finally:
                restore_sigterm()
                watcher.cancel()
                hub.close_all(1001)
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await store.close()

    routes = [
        Route("/", root),
        Route("/health", health),
        Route("/slots", list_slots),
        Route("/stats", stats),
        Route("/auth/login", login, methods=["POST"]),
        Route("/book-slot", book_slot, methods=["POST"]),
        Route("/cancel-slot", cancel_slot, methods=["POST"]),
        Route("/my-bookings", my_bookings, methods=["POST"]),
        WebSocketRoute("/slot-booking", slot_socket),
    ]
    wildcard = "*" in settings.cors_origins
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=["*"] if wildcard else list(settings.cors_origins),
            allow_credentials=not wildcard,  # browsers refuse credentials with "*", and so do we
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )


SETTINGS = Settings.from_env()
app = create_app(SETTINGS)


def main(argv: list[str]) -> None:
    import uvicorn

    uvicorn.run(
        "app:app",
        host=SETTINGS.host,
        port=SETTINGS.port,
        workers=SETTINGS.workers,
        log_level=SETTINGS.log_level,
        ws_max_size=MAX_SOCKET_MESSAGE_BYTES,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
