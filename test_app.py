"""rero-slots, tested the way members and the club's admin meet it: real uvicorn on loopback, real
WebSocket clients, real SQLite files. Only PESU is fake, and only at the HTTP level: a small server on
loopback (``FakePesu``) or an ``httpx.MockTransport``, so the real client code runs.

The sections follow README.md's order, each opening with its own helpers; what several share (the club's
constants, the clock, the fake PESU, ``running`` and ``Service``, whose ``state`` is the one way into the
app's state) comes first.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import hashlib
import inspect
import logging
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import icalendar  # test-only: a maintained parser judges the calendar feeds we emit
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

import app as app_module
import db
from app import Hub, Peer, Settings, create_app
from pesu import AuthUnavailable, InvalidCredentials, PesuChecker
from slots import Day

pytestmark = pytest.mark.filterwarnings("error")
HERE = Path(__file__).parent
PASSWORD = "correct-horse-battery"  # every fake member's password; grep'd for in logs and the database
USERS = {f"PES1UG20CS{i:03d}": f"Member {i}" for i in range(1, 201)}
ALICE, BOB = "PES1UG20CS001", "PES1UG20CS002"
CAROL = "PES1UG20CS003"
IST = ZoneInfo("Asia/Kolkata")
TODAY = "2026-11-24"  # the club's day in the tests, whose clock starts at 01:00 IST: every slot still ahead
TOMORROW = "2026-11-25"


# -- shared by every section: the clock, a fake PESU on loopback, the service under test ---------------------


class Clock:
    """The time as the app sees it, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, local: str) -> None:
        """Set the club's wall-clock time, e.g. "2026-11-24 09:10"."""
        self.now = datetime.fromisoformat(local).replace(tzinfo=IST)


class FakePesu:
    """pesu-auth as seen over HTTP. Usernames pick the behaviour: DOWN* answers 503, SLOW* hangs, GARBAGE*
    answers HTML, OLDAPI* refuses the old way (200 + status false), LAG* takes a second; known users with
    PASSWORD succeed."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.delay = 0.0  # seconds every answer takes, set by a test (and put back)
        self.active = self.peak = 0  # checks in flight now, and the most at once

    async def authenticate(self, request: Request) -> Response:
        body = await request.json()
        username, password = body["username"], body["password"]
        self.calls.append(username)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await self.answer(username, password)
        finally:
            self.active -= 1

    async def answer(self, username: str, password: str) -> Response:
        if username.startswith("DOWN"):
            return JSONResponse({"detail": "bad gateway"}, 503)
        if username.startswith("SLOW"):
            await asyncio.sleep(5)
        if username.startswith("LAG"):  # slow, but well within every timeout
            await asyncio.sleep(1)
        if username.startswith("GARBAGE"):
            return Response("<html>sleeping</html>", 200, media_type="text/html")
        if username.startswith("OLDAPI"):
            return JSONResponse({"status": False, "message": "Invalid username or password"})
        if username.upper() in USERS and password == PASSWORD:
            srn = username.upper()
            profile = {"name": USERS[srn], "prn": srn, "srn": srn, "program": "Bachelor of Technology",
                       "branch": "Computer Science and Engineering", "campus": "RR", "phone": "99999"}
            return JSONResponse({"status": True, "profile": profile, "message": "Login successful."})
        return JSONResponse({"status": False, "message": "Invalid username or password"}, 401)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/authenticate", self.authenticate, methods=["POST"])])


class ServerThread:
    """An ASGI app under real uvicorn on a free loopback port, in a background thread."""

    def __init__(self, asgi_app: Any, send_buffer: int = 0, **options: Any) -> None:
        self.sock = socket.socket()
        if send_buffer:  # connections accepted inherit it: a host short of memory, where writes back up soon
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.app = asgi_app
        config = uvicorn.Config(asgi_app, log_level="warning", **{**app_module.server_options(Settings()), **options})
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            assert self.thread.is_alive(), "server thread died during start-up"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not shut down within 10 s"
        assert not self.server.lifespan.shutdown_failed, "the app's shutdown failed (see the log)"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/slot-booking"


@pytest.fixture(scope="session")
def fake_pesu() -> Iterator[tuple[FakePesu, str]]:
    fake = FakePesu()
    with ServerThread(fake.app()) as server:
        yield fake, f"{server.url}/authenticate"


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 11, 24, 1, 0, tzinfo=IST))


@pytest.fixture
def settings(tmp_path: Path, fake_pesu: tuple[FakePesu, str]) -> Settings:
    return Settings(database_path=str(tmp_path / "data" / "rero.db"), pesu_auth_url=fake_pesu[1],
                    pesu_timeout=0.5, send_timeout=0.5)


class Service:
    """The app under test, with an HTTP client and WebSocket helpers."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=10)
        self.stack = contextlib.ExitStack()  # sockets opened by the test, closed when it ends

    def sockets(self, n: int = 1) -> list[ClientConnection]:
        return [self.socket() for _ in range(n)]

    def socket(self) -> ClientConnection:
        ws = self.stack.enter_context(ws_connect(self.server.ws_url, open_timeout=5, close_timeout=1))
        assert receive(ws)["type"] == "slots_update"  # every socket starts with the current state
        return ws

    def book(self, slot_id: Any, username: str = ALICE, password: str = PASSWORD) -> httpx.Response:
        return self.http.post("/book-slot", json=body(slot_id, username, password=password))

    def cancel(self, slot_id: Any, username: str = ALICE) -> httpx.Response:
        return self.http.post("/cancel-slot", json=body(slot_id, username))

    def slots(self) -> dict[str, Any]:
        return self.http.get("/slots").json()

    @property
    def state(self) -> Any:
        """The app's state (settings, board, hub, ...), as its lifespan made it: the one way in for tests."""
        return self.server.server.lifespan.state


@contextlib.contextmanager
def running(settings: Settings, clock: Clock | None = None, **options: Any) -> Iterator[Service]:
    clock = clock or Clock(datetime(2026, 11, 24, 1, 0, tzinfo=IST))
    with ServerThread(create_app(settings, clock=clock), **{**app_module.server_options(settings), **options}) as server:
        service = Service(server)
        try:
            yield service
        finally:
            service.stack.close()
            service.http.close()


@pytest.fixture
def service(settings: Settings, clock: Clock) -> Iterator[Service]:
    with running(settings, clock) as service:
        yield service


def receive(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    return orjson.loads(ws.recv(timeout=timeout))


def send(ws: ClientConnection, message: Any) -> dict[str, Any]:
    ws.send(orjson.dumps(message).decode())
    return receive(ws)


def receive_until(ws: ClientConnection, kind: str, timeout: float = 5) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        message = receive(ws, max(0.01, deadline - time.monotonic()))
        if message["type"] == kind:
            return message


def booked(update: dict[str, Any]) -> list[int]:
    return update["data"]["booked_slots"]


def body(slot_id: int | None = None, username: str = ALICE, **fields: Any) -> dict[str, Any]:
    data = {"username": username, "password": PASSWORD, **fields}
    if slot_id is not None:
        data["slot_id"] = slot_id
    return data


DEEP = b"[" * 300 + b"]" * 300  # JSON nested deeper than orjson encodes again


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked WebSocket frame (text unless told), as a browser sends it (payload under 126 bytes)."""
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def raw_socket_that_never_reads(port: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads: the worst browser tab."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /slot-booking HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    sock.settimeout(5)
    assert sock.recv(12) == b"HTTP/1.1 101"
    return sock


def login(service: Service, username: str = ALICE) -> str:
    response = service.http.post("/auth/login", json={"username": username, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return response.json()["token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def waitlist(service: Service, action: str, slot_id: int, username: str, **fields: Any) -> httpx.Response:
    return service.http.post(f"/waitlist/{action}", json=body(slot_id, username, **fields))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Output:
    """What a process wrote (stdout and stderr), in a file: a pipe nobody reads until the end fills up at
    LOG_LEVEL=trace, and the server then waits on its own log. read() waits for the process to end."""

    def __init__(self, proc: subprocess.Popen[bytes], path: Path) -> None:
        self.proc, self.path = proc, path

    def read(self) -> bytes:
        self.proc.wait(10)
        return self.path.read_bytes()

    def close(self) -> None:
        pass


@contextlib.contextmanager
def process(settings: Settings, files: int = 0, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python app.py`` in its own process, as a club would run it (with ``files``: at most that many open
    files, soft and hard, as on a host that allows no more)."""
    port = free_port()
    environ = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "DATABASE_PATH": settings.database_path,
               "PESU_AUTH_URL": settings.pesu_auth_url, "LOG_LEVEL": "warning", **env}
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))) if files else None
    log = Path(settings.database_path).parent.parent / f"process-{port}.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, str(HERE / "app.py")], env=environ, cwd=HERE, start_new_session=True,
                                stdout=sink, stderr=subprocess.STDOUT, preexec_fn=limit)
    proc.stdout = Output(proc, log)  # type: ignore[assignment]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "process died"
            assert time.monotonic() < deadline, "server did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.05)
        yield proc, url
    finally:
        with contextlib.suppress(ProcessLookupError):  # the workers too: a killed parent leaves them serving
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def real_tomorrow() -> str:
    """Tomorrow in the club's time zone: the processes below run on the real clock, and tomorrow's slots
    are all still ahead whatever the hour."""
    return (datetime.now(IST) + timedelta(days=1)).date().isoformat()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes this connection within so many seconds (what it sent is read and dropped)."""
    deadline = time.monotonic() + within
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if sock.recv(1 << 20) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            pass
    return False


def link(service: Service, username: str = ALICE, feed: str = "member") -> str:
    """Ask for a calendar link; the feed's path."""
    response = service.http.post("/calendar/link", json=body(username=username, feed=feed))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["url"] == service.server.url + answer["path"] and answer["feed"] == feed
    assert answer["webcal"] == "webcal://" + answer["url"].removeprefix("http://")
    return answer["path"]


def parse_feed(response: httpx.Response) -> icalendar.Calendar:
    """A feed as a calendar app reads it, after checking it is RFC 5545 text: CRLF line ends only, and no
    line over 75 octets (longer ones folded, never inside a UTF-8 character)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/calendar; charset=utf-8"
    raw = response.content
    assert raw.endswith(b"\r\n") and b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    for line in raw.split(b"\r\n")[:-1]:
        assert len(line) <= 75, line
        line.decode()  # each physical line is whole UTF-8 on its own
    return icalendar.Calendar.from_ical(raw)


def events_of(calendar: icalendar.Calendar) -> dict[str, icalendar.Event]:
    """The feed's events by UID, after checking what RFC 5545 requires of each, which the parser does not."""
    events = calendar.walk("VEVENT")
    for event in events:
        assert {"UID", "DTSTAMP", "DTSTART", "DTEND", "SUMMARY", "STATUS", "SEQUENCE"} <= event.keys()
        assert str(event["DTSTAMP"].to_ical().decode()).endswith("Z")  # in UTC
        for alarm in event.walk("VALARM"):
            assert {"ACTION", "TRIGGER", "DESCRIPTION"} <= alarm.keys()
    by_uid = {str(event["UID"]): event for event in events}
    assert len(by_uid) == len(events)  # one event per (date, slot)
    return by_uid


def uid(date: str, slot_id: int, srn: str = ALICE) -> str:
    """A member's event's UID: the same for a (date, slot) whatever becomes of it, and no other member's."""
    return f"{date}-slot{slot_id:02d}-{hashlib.sha256(srn.encode()).hexdigest()[:12]}@rero-slots"


def series(service: Service, username: str = CAROL, **fields: Any) -> httpx.Response:
    return service.http.post("/admin/series", json=body(username=username, **fields))


def statuses(service: Service, date: str) -> set[str]:
    return {slot["status"] for slot in service.http.get("/slots", params={"date": date}).json()["slots"]}


def at_once(requests: list[tuple[str, str, dict[str, Any], str]]) -> list[httpx.Response]:
    """POST every (url, path, body, token) at the same instant."""
    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as client:
            return await asyncio.gather(*(client.post(url + path, json=data, headers=bearer(token))
                                          for url, path, data, token in requests))

    return asyncio.run(all_at_once())


# -- quick start and configuration ---------------------------------------------------------------------------


def test_settings_come_from_the_environment() -> None:
    settings = Settings.from_env({"PORT": "9001", "DATABASE_PATH": "/srv/rero.db", "CACHE_DURATION_MINUTES": "5",
                                  "CORS_ORIGINS": "https://a.example, https://b.example", "SLOT_START_HOUR": "8",
                                  "SLOT_END_HOUR": "20", "WORKERS": "4", "LOG_LEVEL": "DEBUG"})
    assert settings.port == 9001 and settings.database_path == "/srv/rero.db" and settings.cache_minutes == 5
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.hours == range(8, 20) and settings.workers == 4 and settings.log_level == "debug"
    defaults = Settings.from_env({})
    assert (defaults.host, defaults.port, defaults.database_path) == ("0.0.0.0", 8000, "data/rero.db")
    assert defaults.pesu_auth_url == "https://pesu-auth.onrender.com/authenticate"
    with pytest.raises(SystemExit):
        Settings.from_env({"PORT": "eighty"})
    with pytest.raises(SystemExit):
        Settings.from_env({"SLOT_START_HOUR": "15", "SLOT_END_HOUR": "3"})


@pytest.mark.parametrize("name, value", [
    ("LOG_LEVEL", "warn"), ("PORT", "70000"), ("CACHE_DURATION_MINUTES", "-5"), ("WS_RATE_PER_SECOND", "nan"),
    ("SEND_TIMEOUT_SECONDS", "inf"), ("WORKERS", "0"), ("METRICS", "2"), ("PESU_AUTH_URL", "not-a-url"),
    ("SLOT_END_HOUR", "25"), ("LOGIN_FAIL_WINDOW_MINUTES", "0"),
])
def test_a_bad_setting_stops_start_up_with_one_line_naming_it(name: str, value: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        Settings.from_env({name: value})
    assert str(stopped.value).startswith(f"{name}={value!r}")


@pytest.mark.parametrize("name, value", [("HOST", "no-such-host.invalid"),
                                         ("DATABASE_PATH", "/etc/hostname/rero.db"), ("LOG_LEVEL", "warn")])
def test_python_app_py_refuses_a_bad_setting_without_a_traceback(settings: Settings, name: str, value: str) -> None:
    env = {**os.environ, "DATABASE_PATH": settings.database_path, "PORT": str(free_port()), name: value}
    ran = subprocess.run([sys.executable, str(HERE / "app.py")], env=env, cwd=HERE, capture_output=True,
                         text=True, timeout=30)
    assert ran.returncode != 0 and "Traceback" not in ran.stderr + ran.stdout
    assert ran.stderr.strip().count("\n") == 0 and ran.stderr.startswith(f"{name}={value!r}")


def test_an_unsupported_python_is_told_in_one_line() -> None:
    pretend = ("import runpy, sys; sys.version_info = (3, 10, 13, 'final', 0); "
               "runpy.run_path('app.py', run_name='__main__')")
    ran = subprocess.run([sys.executable, "-c", pretend], cwd=HERE, capture_output=True, text=True, timeout=30)
    assert ran.returncode == 1 and ran.stderr.strip().startswith("rero-slots needs Python 3.11 or newer")
    assert "Traceback" not in ran.stderr


def test_every_setting_is_in_the_readmes_table() -> None:
    """Each setting names its variable once, in Settings; README's configuration table lists them all."""
    from dataclasses import fields
    table = (HERE / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names = [spec.metadata["env"] for spec in fields(Settings) if "env" in spec.metadata]
    assert len(names) == len(set(names)) and [name for name in names if f"| `{name}` |" not in table] == []


def test_the_quick_starts_club_file_sets_what_it_says_for_the_shell_and_for_systemd(tmp_path: Path) -> None:
    quick = (HERE / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick.split("cat > club.env <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    lines = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Z_]+=[^\s#]+", line) for line in lines), lines  # (systemd: no comment after a value)
    (tmp_path / "club.env").write_text(block + "\n")
    shell = subprocess.run(["sh", "-c", "set -a && . ./club.env && set +a && env"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=10, env={"PATH": os.environ["PATH"]})
    environ = dict(line.split("=", 1) for line in shell.stdout.splitlines() if "=" in line)
    club = Settings.from_env(environ)
    assert (club.hours, club.timezone, club.membership) == (range(9, 21), "Asia/Kolkata", "roster")
    assert club.admin_srns and ALICE not in club.admin_srns  # an example admin, not the example member
    assert Settings.from_env({}).hours == range(3, 15)  # the original's defaults stay
    assert '"status": "started"' in quick and "every slot of that day shows as started" in " ".join(quick.split())


def test_slot_hours_follow_the_settings(settings: Settings) -> None:
    with running(replace(settings, slot_start_hour=8, slot_end_hour=10)) as service:
        slots = service.slots()["slots"]
        assert [(s["id"], s["start_time"], s["end_time"]) for s in slots] == [(8, "08:00", "09:00"),
                                                                               (9, "09:00", "10:00")]
        assert service.book(3).status_code == 400


# -- days, the booking window and limits ---------------------------------------------------------------------


def test_a_booking_belongs_to_a_day_and_no_date_means_today(service: Service) -> None:
    assert service.book(9).status_code == 200
    assert service.http.post("/book-slot", json=body(9, BOB, date=TOMORROW)).status_code == 200
    today = service.slots()
    assert today["booked_slots"] == [9] and today["date"] == TODAY
    assert today["slots"][6]["booked_by"] == ALICE and today["slots"][6]["date"] == TODAY
    tomorrow = service.http.get("/slots", params={"date": TOMORROW}).json()
    assert tomorrow["booked_slots"] == [9] and tomorrow["slots"][6]["booked_by"] == BOB
    assert tomorrow["slots"][6]["date"] == TOMORROW
    assert service.http.post("/cancel-slot", json=body(9, BOB, date=TOMORROW)).status_code == 200
    assert service.slots()["booked_slots"] == [9]


@pytest.mark.parametrize("value", ["2026-13-01", "tomorrow", "24-11-2026", "2026-11-24T10:00", "", 20261124])
def test_a_malformed_date_is_400(service: Service, value: Any) -> None:
    response = service.http.post("/book-slot", json=body(9, date=value))
    assert response.status_code == 400 and "use YYYY-MM-DD" in response.json()["detail"]
    assert service.http.get("/slots", params={"date": str(value)}).status_code == 400
    assert service.slots()["booked_slots"] == []


def test_bookings_open_seven_days_ahead_and_not_in_the_past(service: Service) -> None:
    assert service.http.post("/book-slot", json=body(9, date="2026-12-01")).status_code == 200
    response = service.http.post("/book-slot", json=body(9, date="2026-12-02"))
    assert response.status_code == 400 and response.json() == {"detail": "Bookings open 7 days ahead"}
    response = service.http.post("/book-slot", json=body(9, date="2026-11-23"))
    assert response.status_code == 400 and response.json() == {"detail": "2026-11-23 is in the past"}


def test_a_slot_stays_bookable_for_30_minutes_after_it_starts(service: Service, clock: Clock) -> None:
    clock.set("2026-11-24 09:29")
    assert service.book(9).status_code == 200
    clock.set("2026-11-24 09:30")
    response = service.book(9, BOB)
    assert response.status_code == 400  # taken anyway; the time rule is checked first on a free slot:
    response = service.book(8, BOB)
    assert response.json() == {"detail": "Slot 8 on 2026-11-24 has already started"}
    assert service.book(10, BOB).status_code == 200


def test_a_booking_can_be_cancelled_until_its_slot_starts(service: Service, clock: Clock) -> None:
    service.book(10)
    service.book(11)
    clock.set("2026-11-24 09:59")
    assert service.cancel(10).status_code == 200
    clock.set("2026-11-24 11:00")
    response = service.cancel(11)
    assert response.status_code == 400
    assert response.json() == {"detail": "Slot 11 on 2026-11-24 has already started and can no longer be cancelled"}
    assert service.slots()["booked_slots"] == [11]


def test_a_socket_watches_today_or_the_day_it_asks_for(service: Service) -> None:
    today_watcher, tomorrow_watcher = service.sockets(2)
    switched = send(tomorrow_watcher, {"type": "get_slots", "date": TOMORROW})
    assert switched["type"] == "slots_update" and switched["data"]["date"] == TOMORROW
    reply = send(tomorrow_watcher, {"type": "book_slot", "slot_id": 12, "date": TOMORROW, "username": ALICE,
                                    "password": PASSWORD})
    assert reply == {"type": "booking_response", "success": True, "message": "Slot 12 booked successfully",
                     "slot_id": 12}
    update = receive(tomorrow_watcher)
    assert update["data"]["date"] == TOMORROW and booked(update) == [12]
    service.book(4)
    update = receive(today_watcher)
    assert update["data"]["date"] == TODAY and booked(update) == [4]  # and nothing about tomorrow before it
    with pytest.raises(TimeoutError):
        receive(tomorrow_watcher, 0.3)  # today's change is not sent to a socket watching tomorrow
    error = send(today_watcher, {"type": "get_slots", "date": "someday"})
    assert error["type"] == "error" and "use YYYY-MM-DD" in error["message"]


def test_at_midnight_sockets_watching_today_get_the_new_day(service: Service, clock: Clock) -> None:
    service.http.post("/book-slot", json=body(3, date=TOMORROW))
    today_watcher, fixed = service.sockets(2)
    send(fixed, {"type": "get_slots", "date": TODAY})
    clock.set("2026-11-24 23:59:59")
    for watcher in (today_watcher, fixed):  # the day is over: nothing in it can be booked
        late = receive(watcher)["data"]
        assert late["date"] == TODAY and late["available_slots"] == []
        assert {s["status"] for s in late["slots"]} == {"started"}
    clock.set("2026-11-25 00:00:01")
    update = receive(today_watcher, 5)
    assert update["data"]["date"] == TOMORROW and booked(update) == [3]
    with pytest.raises(TimeoutError):
        receive(fixed, 0.3)  # it asked for 2026-11-24 by name, and keeps it
    assert service.slots()["date"] == TOMORROW


def test_the_new_day_is_broadcast_even_if_its_first_read_fails(service: Service, clock: Clock) -> None:
    board = service.state["board"]
    read_day, failed = board.store.day, []

    async def busy_once(date: str) -> Any:
        if date == TOMORROW and not failed:
            failed.append(date)
            raise sqlite3.OperationalError("database is locked")
        return await read_day(date)

    board.store.day = busy_once
    watcher = service.socket()
    clock.set("2026-11-25 00:00:01")
    update = receive_until(watcher, "slots_update")
    while update["data"]["date"] != TOMORROW:
        update = receive_until(watcher, "slots_update")
    assert failed == [TOMORROW] and update["data"]["available_slots"] == list(range(3, 15))


def test_a_slot_that_can_no_longer_be_booked_never_looks_bookable(service: Service, clock: Clock) -> None:
    watcher = service.socket()
    clock.set("2026-11-24 09:31")  # slot 9 began more than 30 minutes ago, and nobody booked it
    update = receive(watcher)["data"]
    nine, ten = update["slots"][6], update["slots"][7]
    assert (nine["id"], nine["status"], nine["is_booked"], nine["booked_by"]) == (9, "started", True, None)
    assert (ten["id"], ten["status"], ten["is_booked"]) == (10, "available", False)
    assert update["available_slots"] == list(range(10, 15)) and update["booked_slots"] == []
    assert service.slots() == {key: update[key] for key in ("slots", "available_slots", "booked_slots", "date")}
    assert service.book(9).status_code == 400  # what the original client would have offered
    assert service.book(10).status_code == 200
    assert booked(receive(watcher)) == [10]
    clock.set("2026-11-24 11:31")  # slot 10 is booked (and stays so); slot 11's time ran out
    later = receive(watcher)["data"]
    assert [s["status"] for s in later["slots"]][6:10] == ["started", "booked", "started", "available"]
    assert later["available_slots"] == [12, 13, 14] and later["booked_slots"] == [10]

    past = service.http.get("/slots", params={"date": "2026-11-23"}).json()
    assert past["available_slots"] == [] and {s["status"] for s in past["slots"]} == {"started"}
    last_open = service.http.get("/slots", params={"date": "2026-12-01"}).json()
    assert last_open["available_slots"] == list(range(3, 15))  # 7 days ahead: bookable
    unopened = service.http.get("/slots", params={"date": "2026-12-02"}).json()
    assert unopened["available_slots"] == [] and {s["status"] for s in unopened["slots"]} == {"not_open"}
    assert all(s["is_booked"] for s in unopened["slots"])
    refused = service.http.post("/book-slot", json=body(5, date="2026-12-02"))
    assert refused.status_code == 400 and refused.json() == {"detail": "Bookings open 7 days ahead"}


def test_slots_without_a_date_follow_the_clubs_clock_across_midnight(service: Service, clock: Clock) -> None:
    for local, date in [("2026-11-24 23:59:59", TODAY), ("2026-11-25 00:00:00", TOMORROW),
                        ("2026-11-24 18:29:59", TODAY),  # a clock set back to the day before
                        ("2026-11-25 05:29:59", TOMORROW)]:
        clock.set(local)
        assert service.slots()["date"] == date, local


def test_daily_and_upcoming_limits(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, max_bookings_per_day=2, max_upcoming_bookings=3), clock) as service:
        assert service.book(3).status_code == 200
        assert service.book(4).status_code == 200
        response = service.book(5)
        assert response.status_code == 400
        assert response.json() == {"detail": "Daily limit reached: at most 2 booking(s) per day"}
        assert service.http.post("/book-slot", json=body(5, date=TOMORROW)).status_code == 200
        response = service.http.post("/book-slot", json=body(6, date=TOMORROW))
        assert response.json() == {"detail": "Limit reached: at most 3 upcoming booking(s)"}
        assert service.book(5, BOB).status_code == 200  # limits are per member
        clock.set("2026-11-24 03:00")  # slot 3 has started: no longer upcoming
        assert service.http.post("/book-slot", json=body(6, date=TOMORROW)).status_code == 200


# -- admins and history --------------------------------------------------------------------------------------


def test_admins_close_and_reopen_slots_and_cancel_anyones_booking(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, admin_srns=frozenset({BOB})), clock) as service:
        watcher = service.socket()
        service.book(9)
        receive(watcher)
        response = service.http.post("/admin/close-slot", json=body(11))
        assert response.status_code == 403 and response.json() == {"detail": "Admins only"}
        assert service.http.post("/admin/open-slot", json=body(11)).status_code == 403

        response = service.http.post("/admin/close-slot", json=body(11, BOB))
        assert response.json() == {"success": True, "message": "Slot 11 closed", "slot_id": 11}
        update = receive(watcher)
        closed = update["data"]["slots"][8]
        assert closed["id"] == 11 and closed["closed"] is True and closed["status"] == "closed"
        assert closed["is_booked"] is True and closed["booked_by"] is None  # original clients: not bookable
        assert 11 not in update["data"]["available_slots"] and 11 not in booked(update)
        assert service.book(11).json() == {"detail": "Slot 11 on 2026-11-24 is closed"}
        assert service.http.post("/admin/close-slot", json=body(9, BOB)).json() == {
            "detail": "Slot 9 on 2026-11-24 is booked by PES1UG20CS001; cancel the booking first"}

        assert service.http.post("/admin/open-slot", json=body(11, BOB)).status_code == 200
        assert receive(watcher)["data"]["slots"][8]["closed"] is False
        assert service.book(11).status_code == 200
        receive(watcher)

        assert service.cancel(9, BOB).status_code == 200  # the admin cancels Alice's booking
        assert booked(receive(watcher)) == [11]
        assert service.cancel(11, BOB).status_code == 200
        assert service.slots()["booked_slots"] == []


def test_history_records_every_change_for_admins(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, admin_srns=frozenset({BOB})), clock) as service:
        service.book(3)
        with ws_connect(service.server.ws_url) as ws:
            receive(ws)
            send(ws, {"type": "cancel_slot", "slot_id": 3, "username": ALICE, "password": PASSWORD})
        service.http.post("/book-slot", json=body(4, BOB, date=TOMORROW))
        service.http.post("/admin/close-slot", json=body(5, BOB))
        service.http.post("/admin/open-slot", json=body(5, BOB))

        assert service.http.post("/admin/history", json=body()).status_code == 403
        log = service.http.post("/admin/history", json=body(username=BOB)).json()
        assert log["total"] == 5 and log["page"] == 1
        events = [(e["action"], e["srn"], e["date"], e["slot_id"], e["via"]) for e in log["events"]]
        assert events == [
            ("open", BOB, TODAY, 5, "http"),
            ("close", BOB, TODAY, 5, "http"),
            ("book", BOB, TOMORROW, 4, "http"),
            ("cancel", ALICE, TODAY, 3, "websocket"),
            ("book", ALICE, TODAY, 3, "http"),
        ]
        assert log["events"][-1]["at"] == "2026-11-24T01:00:00+05:30"  # club time, with its offset

        alice = service.http.post("/admin/history", json=body(username=BOB, srn=ALICE.lower())).json()
        assert [e["action"] for e in alice["events"]] == ["cancel", "book"]
        ahead = service.http.post("/admin/history", json=body(username=BOB, **{"from": TOMORROW})).json()
        assert [e["slot_id"] for e in ahead["events"]] == [4]
        page2 = service.http.post("/admin/history", json=body(username=BOB, page=2, page_size=2)).json()
        assert [e["action"] for e in page2["events"]] == ["book", "cancel"] and page2["total"] == 5
        assert service.http.post("/admin/history", json=body(username=BOB, page=0)).status_code == 422


def test_a_closed_slot_says_why_to_everyone_and_the_refusal_names_it(settings: Settings) -> None:
    with running(replace(settings, admin_srns=frozenset({CAROL}))) as service:
        watcher = service.socket()
        closed = service.http.post("/admin/close-slot", json=body(14, CAROL, reason=" Soldering workshop "))
        assert closed.status_code == 200
        slot = service.slots()["slots"][11]
        assert (slot["is_booked"], slot["booked_by"], slot["closed"], slot["reason"]) == (True, None, True,
                                                                                          "Soldering workshop")
        assert receive_until(watcher, "slots_update")["data"]["slots"][11]["reason"] == "Soldering workshop"
        with service.http.stream("GET", "/events") as stream:
            data = next(line for line in stream.iter_lines() if line.startswith("data: "))
            assert orjson.loads(data[6:])["data"]["slots"][11]["reason"] == "Soldering workshop"
        refusal = f"Slot 14 on {TODAY} is closed: Soldering workshop"
        assert service.book(14).json() == {"detail": refusal}
        assert send(service.socket(), {"type": "book_slot", "slot_id": 14, "username": ALICE,
                                       "password": PASSWORD})["message"] == refusal
        assert service.http.post("/admin/open-slot", json=body(14, CAROL)).status_code == 200
        assert service.slots()["slots"][11]["reason"] is None and service.book(14).status_code == 200
        assert service.http.post("/admin/close-slot", json=body(13, CAROL, reason="x" * 101)).status_code == 422
        assert service.http.post("/admin/close-slot", json=body(12, CAROL)).status_code == 200  # a reason is optional
        assert service.slots()["slots"][9]["reason"] is None and service.book(12).json() == {
            "detail": f"Slot 12 on {TODAY} is closed"}
        assert series(service, **TUESDAYS).status_code == 200  # a series' closures say its title
        assert service.slots()["slots"][10]["reason"] == "Arduino workshop"
        assert service.book(13).json() == {"detail": f"Slot 13 on {TODAY} is closed: Arduino workshop"}


def test_history_filters_by_action_and_a_members_history_shows_what_admins_did_to_their_bookings(
        settings: Settings) -> None:
    admin = "PES1UG20CS010"
    with running(replace(settings, admin_srns=frozenset({admin}))) as service:
        assert service.book(9).status_code == 200 and service.book(10, username=BOB).status_code == 200
        assert service.cancel(9, username=admin).status_code == 200  # an admin cancels Alice's booking

        def history(**filters: Any) -> list[tuple[str, str, int]]:
            answer = service.http.post("/admin/history", json=body(username=admin, **filters))
            assert answer.status_code == 200, answer.text
            return [(e["action"], e["srn"], e["slot_id"]) for e in answer.json()["events"]]

        assert history(srn=ALICE) == [("cancel", admin, 9), ("book", ALICE, 9)]
        assert history(action="book") == [("book", BOB, 10), ("book", ALICE, 9)]
        assert history(action="cancel", srn=BOB) == []
        assert history(action="no_show") == []
        bad = service.http.post("/admin/history", json=body(username=admin, action="DROP TABLE"))
        assert bad.status_code == 422


# -- who may book: the roster and suspensions ----------------------------------------------------------------


ADMIN = "PES1UG20CS010"
NOT_A_MEMBER = "Only ReRo lab members can book; ask an admin to add {}"


def roster(service: Service, action: str, srns: Any, admin: str = ADMIN) -> httpx.Response:
    """An admin changes the roster with a JSON body: {"srns": [...]} beside their credentials."""
    return service.http.post(f"/admin/members/{action}", json=body(username=admin, srns=srns))


def test_with_a_roster_only_its_members_take_part_and_everyone_still_sees_the_slots(settings: Settings,
                                                                                     clock: Clock) -> None:
    with running(replace(settings, membership="roster", admin_srns=frozenset({ADMIN})), clock) as service:
        assert service.http.get("/slots").status_code == 200 and service.http.get("/now").status_code == 200
        refused = service.book(9)
        assert refused.status_code == 403 and refused.json() == {"detail": NOT_A_MEMBER.format(ALICE)}
        ws = service.socket()
        reply = send(ws, {"type": "book_slot", "slot_id": 9, "username": ALICE, "password": PASSWORD})
        assert reply["success"] is False and reply["message"] == NOT_A_MEMBER.format(ALICE)
        assert waitlist(service, "join", 9, ALICE).status_code == 403
        link = service.http.post("/calendar/link", json=body())
        assert link.status_code == 403 and link.json()["detail"] == NOT_A_MEMBER.format(ALICE)
        assert service.book(8, username=ADMIN).status_code == 200  # admins need not be on it

        added = roster(service, "add", [ALICE, "pes1ug20cs002 "])
        assert added.status_code == 200, added.text
        assert added.json() == {"success": True, "message": "2 member(s) added; 0 already on the roster",
                                "added": [ALICE, BOB], "unchanged": []}
        assert roster(service, "add", [ALICE]).json()["message"] == "0 member(s) added; 1 already on the roster"
        assert service.book(9).status_code == 200 and service.book(10).status_code == 200
        assert waitlist(service, "join", 9, BOB).status_code == 200

        assert roster(service, "remove", [ALICE, BOB]).json()["removed"] == [ALICE, BOB]
        assert service.book(11).status_code == 403
        assert service.cancel(9).status_code == 200  # what they hold they may still give up ...
        assert service.slots()["slots"][6]["booked_by"] is None  # ... and the line skips a removed member
        clock.set("2026-11-24 10:00")
        check_in = service.http.post("/check-in", json=body(10))
        assert check_in.status_code == 403 and check_in.json()["detail"] == NOT_A_MEMBER.format(ALICE)
        history = service.http.post("/admin/history", json=body(username=ADMIN)).json()["events"]
        assert [(e["action"], e["srn"], e["note"]) for e in history if e["action"].startswith("member")][:2] == [
            ("member_remove", BOB, f"by {ADMIN}"), ("member_remove", ALICE, f"by {ADMIN}")]


FORM_EXPORT = """Timestamp,Full name,SRN,Email
2026/11/20 10:01,Alice,pes1ug20cs001 ,alice@example.org
2026/11/20 10:02,Bob,PES1UG20CS002,bob@example.org
2026/11/20 10:05,"Bob, again", PES1UG20 CS002,bob@example.org
"""


def test_a_roster_comes_from_a_form_export_with_its_mistakes_forgiven_or_named(settings: Settings) -> None:
    with running(replace(settings, membership="roster", admin_srns=frozenset({ADMIN}))) as service:
        token = login(service, ADMIN)
        added = service.http.post("/admin/members/add", content=FORM_EXPORT.encode(),
                                  headers={**bearer(token), "content-type": "text/csv"})
        assert added.status_code == 200 and added.json()["added"] == [ALICE, BOB]
        plain = "\ufeffPES1UG20CS003\n\n  pes1ug20cs004\r\n".encode()  # a BOM, a blank line, Windows ends
        assert service.http.post("/admin/members/add", content=plain, headers=bearer(token)).json()["added"] == [
            CAROL, "PES1UG20CS004"]
        bad = "PES1UG20CS005\nnot an srn\nPES1UG20CS006\n,,\nPES1UG20CS007,PES1UG20CS008\n"
        refused = service.http.post("/admin/members/add", content=bad.encode(), headers=bearer(token))
        assert refused.status_code == 422 and refused.json() == {
            "detail": "Not an SRN (like PES1UG20CS001) at line 2, line 5; nothing was changed"}
        items = roster(service, "add", ["PES1UG20CS005", 7, "x"])
        assert items.status_code == 422 and "at item 2, item 3; nothing" in items.json()["detail"]
        no_token = service.http.post("/admin/members/add", content=b"PES1UG20CS005")
        assert no_token.status_code == 401

        listed = service.http.post("/admin/members", json=body(username=ADMIN, page_size=3)).json()
        assert (listed["membership"], listed["total"]) == ("roster", 4)
        assert [m["srn"] for m in listed["members"]] == [ALICE, BOB, CAROL]
        assert listed["members"][0]["added_by"] == ADMIN and listed["members"][0]["suspended"] is None
        found = service.http.post("/admin/members", json=body(username=ADMIN, search="cs00 4")).json()
        assert [m["srn"] for m in found["members"]] == ["PES1UG20CS004"]
        assert service.http.post("/admin/members", json=body(username=ADMIN, search="%")).json()["total"] == 0


def test_only_admins_change_or_read_the_roster_or_suspend_anyone(settings: Settings) -> None:
    with running(replace(settings, membership="roster", admin_srns=frozenset({ADMIN}))) as service:
        assert roster(service, "add", [ALICE]).status_code == 200
        token = login(service, ALICE)
        for path, fields in [("/admin/members/add", {"srns": [ALICE]}), ("/admin/members/remove", {"srns": [ALICE]}),
                             ("/admin/members", {}), ("/admin/suspend", {"srn": BOB}), ("/admin/unsuspend", {"srn": BOB}),
                             ("/admin/admins", {}), ("/admin/export", {"kind": "events", "from": TODAY, "to": TODAY})]:
            answer = service.http.post(path, json=body(**fields))
            assert answer.status_code == 403 and answer.json() == {"detail": "Admins only"}, path
            assert service.http.post(path, json=body(password="wrong", **fields)).status_code in (401, 429), path
        csv_body = service.http.post("/admin/members/remove", content=b"PES1UG20CS001", headers=bearer(token))
        assert csv_body.status_code == 403
        grant = service.http.post("/admin/admins/grant", json=body(srn=ALICE))
        assert grant.status_code == 403 and grant.json() == {"detail": "Owners only (ADMIN_SRNS)"}
        huge = "".join(f"PES1UG20CS{n % 1000:03d}\n" for n in range(100_000)).encode()  # a 100,000-line import
        refused = service.http.post("/admin/members/add", content=huge, headers=bearer(login(service, ADMIN)))
        assert refused.status_code == 413  # refused by its length, before it is read
        assert service.book(9).status_code == 200  # nothing changed


def test_a_suspended_member_is_told_why_until_when_and_what_remains(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, admin_srns=frozenset({ADMIN})), clock) as service:
        assert service.book(9).status_code == 200 and service.book(10).status_code == 200
        suspend = service.http.post("/admin/suspend", json=body(username=ADMIN, srn=ALICE.lower(),
                                                                 until="2026-11-26", reason="Left the lab unlocked"))
        answer = suspend.json()
        assert suspend.status_code == 200 and (answer["until"], answer["reason"]) == ("2026-11-26",
                                                                                       "Left the lab unlocked")
        assert [b["id"] for b in answer["bookings"]] == [9, 10] and answer["cancelled"] == []
        assert answer["message"] == (f"{ALICE} is suspended until 2026-11-26; 2 booking(s) of theirs remain"
                                     " (send cancel_bookings: true to cancel them)")
        refusal = f"{ALICE} is suspended until 2026-11-26: Left the lab unlocked"
        refused = service.book(11)
        assert refused.status_code == 403 and refused.json() == {"detail": refusal}
        ws = service.socket()
        assert send(ws, {"type": "book_slot", "slot_id": 11, "username": ALICE, "password": PASSWORD})[
            "message"] == refusal
        assert service.book(11, username=BOB).status_code == 200  # nobody else is touched

        again = service.http.post("/admin/suspend", json=body(username=ADMIN, srn=ALICE, cancel_bookings=True)).json()
        assert [b["id"] for b in again["cancelled"]] == [9, 10] and again["bookings"] == [] and again["until"] is None
        assert service.slots()["booked_slots"] == [11]
        assert service.book(12).json() == {"detail": f"{ALICE} is suspended until an admin lifts it"}

        lift = service.http.post("/admin/unsuspend", json=body(username=ADMIN, srn=ALICE))
        assert lift.status_code == 200 and service.book(12).status_code == 200
        assert service.http.post("/admin/unsuspend", json=body(username=ADMIN, srn=ALICE)).json() == {
            "detail": f"{ALICE} is not suspended"}
        for fields, detail in [({"srn": ALICE, "until": TODAY}, "until (2026-11-24) must be after today: it is the"
                                " day bookings open to them again"),
                               ({"srn": ADMIN}, f"{ADMIN} is an admin; admins cannot be suspended")]:
            assert service.http.post("/admin/suspend", json=body(username=ADMIN, **fields)).json() == {
                "detail": detail}
        assert service.http.post("/admin/suspend", json=body(username=ADMIN)).status_code == 422

        service.http.post("/admin/suspend", json=body(username=ADMIN, srn=ALICE, until=TOMORROW))
        assert service.book(13).status_code == 403
        clock.set("2026-11-25 01:00")  # the day it ends: they may book again
        assert service.book(13).status_code == 200
        history = service.http.post("/admin/history", json=body(username=ADMIN, srn=ALICE)).json()["events"]
        assert [e["action"] for e in history if "suspend" in e["action"]] == ["suspend", "unsuspend", "suspend",
                                                                             "suspend"]


def test_a_member_removed_while_their_tabs_book_at_the_same_instant_is_refused_from_the_removal_on(
        settings: Settings) -> None:
    """Four tabs on two processes book slot after slot while an admin removes their member: no booking of
    theirs is made after the removal commits, on either process, and none is refused before it."""
    env = {"MEMBERSHIP": "roster", "ADMIN_SRNS": ADMIN, "SESSION_SECRET": "a secret both workers share",
           "BOOKING_DAYS_AHEAD": "30"}
    first_day = datetime.now(IST).date() + timedelta(days=1)
    with process(settings, **env) as (_, first), process(settings, **env) as (_, second):
        def token_of(url: str, username: str) -> str:
            return httpx.post(f"{url}/auth/login", json={"username": username, "password": PASSWORD}).json()["token"]

        admin = token_of(first, ADMIN)
        assert httpx.post(f"{first}/admin/members/add", json={"srns": [ALICE]}, headers=bearer(admin)).is_success
        token, barrier = token_of(second, ALICE), threading.Barrier(5)

        def tab(n: int) -> list[int]:
            with httpx.Client(base_url=(first, second)[n % 2], timeout=10, headers=bearer(token)) as client:
                barrier.wait()
                return [client.post("/book-slot", json={"slot_id": slot_id, "date": (
                    first_day + timedelta(days=d)).isoformat()}).status_code
                    for d in range(29) for slot_id in range(3 + 3 * n, 6 + 3 * n)]

        def remove() -> int:
            barrier.wait()
            time.sleep(0.15)  # while the tabs are booking
            return httpx.post(f"{first}/admin/members/remove", json={"srns": [ALICE]},
                              headers=bearer(admin)).status_code

        with ThreadPoolExecutor(5) as pool:
            removal = pool.submit(remove)
            tabs = list(pool.map(tab, range(4)))
        assert removal.result() == 200
        for codes in tabs:  # each tab: booked until the removal, refused from it on
            assert set(codes) <= {200, 403} and codes == sorted(codes), codes
        made = sum(codes.count(200) for codes in tabs)
        assert 0 < made < 4 * 3 * 29, "the removal did not land while the tabs were booking"
        history = httpx.post(f"{second}/admin/history", json={"page_size": 500}, headers=bearer(admin)).json()
        removed = next(e["id"] for e in history["events"] if e["action"] == "member_remove")
        booked = [e["id"] for e in history["events"] if e["action"] == "book" and e["srn"] == ALICE]
        assert len(booked) == made and max(booked) < removed


def test_owners_grant_and_revoke_admins_at_run_time_and_every_worker_follows_within_a_second(
        settings: Settings) -> None:
    env = {"ADMIN_SRNS": ADMIN, "SESSION_SECRET": "a secret both workers share"}
    day = real_tomorrow()
    with process(settings, **env) as (_, first), process(settings, **env) as (_, second):
        def token_of(username: str) -> dict[str, str]:
            return bearer(httpx.post(f"{first}/auth/login", json={"username": username,
                                                                  "password": PASSWORD}).json()["token"])

        owner, bob = token_of(ADMIN), token_of(BOB)

        def close(url: str, slot_id: int) -> int:
            return httpx.post(f"{url}/admin/close-slot", json={"slot_id": slot_id, "date": day}, headers=bob).status_code

        def within_a_second(url: str, slot_id: int, status: int) -> float:
            started = time.monotonic()
            while close(url, slot_id) != status:
                assert time.monotonic() - started < 1, f"{url} still answers otherwise after a second"
                time.sleep(0.02)
            return time.monotonic() - started

        assert close(second, 3) == 403
        granted = httpx.post(f"{first}/admin/admins/grant", json={"srn": BOB}, headers=owner)
        assert granted.status_code == 200 and granted.json()["message"] == f"{BOB} is an admin now"
        assert close(first, 3) == 200  # at once where it was granted ...
        within_a_second(second, 4, 200)  # ... and on the other worker within a second
        as_admin = httpx.post(f"{second}/admin/admins/grant", json={"srn": CAROL}, headers=bob)
        assert as_admin.status_code == 403 and as_admin.json() == {"detail": "Owners only (ADMIN_SRNS)"}
        assert httpx.post(f"{first}/admin/admins/grant", json={"srn": BOB}, headers=owner).json() == {
            "detail": f"{BOB} is already an admin"}
        assert httpx.post(f"{first}/admin/admins/revoke", json={"srn": ADMIN}, headers=owner).json() == {
            "detail": f"{ADMIN} is an owner (ADMIN_SRNS): the role comes from the settings"}
        listed = httpx.post(f"{second}/admin/admins", headers=bob).json()
        assert listed["owners"] == [ADMIN] and [a["srn"] for a in listed["admins"]] == [BOB]

        assert httpx.post(f"{second}/admin/admins/revoke", json={"srn": BOB}, headers=owner).status_code == 200
        assert close(second, 5) == 403  # the same token, refused at once where it was revoked ...
        within_a_second(first, 5, 403)  # ... and on the other worker within a second
        history = httpx.post(f"{first}/admin/history", json={"srn": BOB}, headers=owner).json()["events"]
        assert [(e["action"], e["note"]) for e in history if e["action"].startswith("admin")] == [
            ("admin_revoke", f"by {ADMIN}"), ("admin_grant", f"by {ADMIN}")]


def test_an_admin_books_and_cancels_for_a_member_and_both_names_are_kept(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, admin_srns=frozenset({ADMIN}), max_bookings_per_day=1), clock) as service:
        booked = service.http.post("/book-slot", json=body(9, ADMIN, **{"for": "pes1ug20cs001"}))
        assert booked.status_code == 200 and booked.json()["message"] == f"Slot 9 booked successfully for {ALICE}"
        assert service.slots()["slots"][6]["booked_by"] == ALICE
        mine = service.http.post("/my-bookings", json=body()).json()["bookings"]
        assert [(b["id"], b["date"]) for b in mine] == [(9, TODAY)]
        assert service.http.post("/book-slot", json=body(10, ADMIN, **{"for": ALICE})).status_code == 400  # her limit
        assert service.http.post("/book-slot", json=body(10, BOB, **{"for": ALICE})).json() == {
            "detail": "Admins only"}
        assert service.http.post("/waitlist/join", json=body(10, ADMIN, **{"for": ALICE})).status_code == 422
        assert service.http.post("/book-slot", json=body(10, ADMIN, **{"for": "bad-srn!"})).status_code == 422
        path = service.http.post("/calendar/link", json=body()).json()["path"]
        assert len(events_of(parse_feed(service.http.get(path)))) == 1  # on her feed, as her own
        clock.set("2026-11-24 09:10")  # it has started: she could not cancel it now, an admin can for her
        cancelled = service.http.post("/cancel-slot", json=body(9, ADMIN, **{"for": ALICE}))
        assert cancelled.status_code == 200 and cancelled.json()["message"].endswith(f"for {ALICE}")
        history = service.http.post("/admin/history", json=body(username=ADMIN, srn=ALICE)).json()["events"]
        assert [(e["action"], e["srn"], e["note"]) for e in history[:2]] == [
            ("cancel", ALICE, f"by {ADMIN}"), ("book", ALICE, f"by {ADMIN}")]
        assert str(events_of(parse_feed(service.http.get(path)))[uid(TODAY, 9)]["STATUS"]) == "CANCELLED"


def export(service: Service, kind: str, form: str = "csv", **fields: Any) -> httpx.Response:
    return service.http.post("/admin/export", json=body(username=ADMIN, kind=kind, format=form,
                                                        **{"from": TODAY, "to": TOMORROW, **fields}))


def csv_rows(response: httpx.Response) -> list[list[str]]:
    """A CSV answer as a spreadsheet reads it, after checking it is RFC 4180 text with a header row."""
    import csv
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert "attachment" in response.headers["content-disposition"]
    text = response.content.decode("utf-8")
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")
    return list(csv.reader(text.splitlines()))


def test_an_admin_takes_the_terms_reports_to_a_spreadsheet(settings: Settings, clock: Clock) -> None:
    rules = replace(settings, admin_srns=frozenset({ADMIN}), checkin_required=True, no_show_limit=5)
    with running(rules, clock) as service:
        assert service.book(9).status_code == 200 and service.book(10).status_code == 200
        assert waitlist(service, "join", 9, BOB).status_code == 200
        assert service.http.post("/book-slot", json=body(11, BOB, date=TOMORROW)).is_success
        reason = 'Soldering, "advanced"\u00e9'  # a comma, quotes and UTF-8, as a spreadsheet must read them
        assert service.http.post("/admin/close-slot", json=body(12, ADMIN, date=TOMORROW, reason=reason)).is_success
        clock.set("2026-11-24 08:30")
        assert service.cancel(9).status_code == 200  # within the hour before its start: late; Bob has it now
        clock.set("2026-11-24 09:05")
        assert service.http.post("/check-in", json=body(9, BOB)).status_code == 200
        clock.set("2026-11-24 10:16")  # Alice does not come to slot 10
        deadline = time.monotonic() + 3
        while service.slots()["slots"][7]["booked_by"] is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        bookings = csv_rows(export(service, "bookings"))
        assert bookings[0] == ["date", "slot_id", "start_time", "end_time", "srn", "booked_at", "checked_in", "series"]
        assert [row[:5] + row[6:7] for row in bookings[1:]] == [[TODAY, "9", "09:00", "10:00", BOB, "True"],
                                                                [TOMORROW, "11", "11:00", "12:00", BOB, "False"]]
        assert all(row[5].endswith("+05:30") for row in bookings[1:])  # times carry their offset

        events = csv_rows(export(service, "events"))
        history = service.http.post("/admin/history", json=body(username=ADMIN, **{"from": TODAY, "to": TOMORROW})
                                    ).json()
        assert len(events) - 1 == history["total"] and events[1][1].endswith("+05:30")
        assert {row[3] for row in events[1:]} >= {"book", "join", "cancel", "promote", "check_in", "no_show"}
        assert [row[7] for row in events[1:] if row[3] == "close"] == [reason]

        usage = export(service, "usage", "json").json()["members"]
        alice, bob = (next(m for m in usage if m["srn"] == srn) for srn in (ALICE, BOB))
        assert (alice["hours_booked"], alice["no_shows"], alice["late_cancels"]) == (0, 1, 1)
        assert (bob["hours_booked"], bob["hours_checked_in"], bob["lines_joined"], bob["promoted"]) == (2, 1, 1, 1)
        table = csv_rows(export(service, "usage"))
        assert table[0] == ["srn", *db.USAGE_COLUMNS] and [ALICE, "0", "0", "1", "0", "1", "0", "0"] in table

        no_show = service.http.post("/admin/export", json=body(username=ADMIN, kind="no_shows", format="json",
                                                               **{"from": TODAY, "to": TODAY})).json()["no_shows"]
        assert [(n["srn"], n["slot_id"], n["forgiven"]) for n in no_show] == [(ALICE, 10, False)]
        assert service.http.post("/admin/forgive-no-show", json=body(10, ADMIN, srn=ALICE)).status_code == 200
        assert csv_rows(export(service, "no_shows"))[1][-1] == "True"

        assert service.http.post("/admin/export", json=body(kind="usage", **{"from": TODAY, "to": TODAY})
                                 ).json() == {"detail": "Admins only"}
        assert export(service, "usage", to="2026-11-01").json() == {"detail": f"to (2026-11-01) is before from ({TODAY})"}
        assert export(service, "ledger").status_code == 422 and export(service, "events", "json").status_code == 422
        assert export(service, "events", to=None).status_code == 422
        decade = export(service, "events", **{"from": "2020-01-01", "to": "2030-12-31"})  # ten years: streamed
        assert len(csv_rows(decade)) == len(events) + 1  # (and one more: the forgive)


# -- waitlists, check-in, no-shows and who holds the lab now -------------------------------------------------


@contextlib.contextmanager
def held(executor: ThreadPoolExecutor) -> Iterator[None]:
    """One of the store's database threads kept busy, as a read of years of history keeps it."""
    release = threading.Event()
    busy = executor.submit(release.wait, 30)
    try:
        yield
    finally:
        release.set()
        busy.result()


def test_reports_never_hold_up_members_a_revoke_or_more_than_two_places(settings: Settings) -> None:
    """The attack: an admin's ten-year reports, looping, kept the one reader busy: /me took 13 s for
    everyone, and a revoked admin kept the role for as long as the reports queued."""
    with running(replace(settings, admin_srns=frozenset({ADMIN}))) as service, ThreadPoolExecutor(4) as pool:
        assert service.http.post("/admin/admins/grant", json=body(username=ADMIN, srn=BOB)).status_code == 200
        assert service.book(9).status_code == 200
        store = service.state["board"].store
        with held(store._reports):  # reports in progress: they wait for their own thread, not the reader
            slow = [pool.submit(export, service, kind) for kind in ("events", "usage")]
            deadline = time.monotonic() + 5
            while not service.state["reports"].locked():  # both have their places
                assert time.monotonic() < deadline
                time.sleep(0.01)
            third = export(service, "bookings")  # a third is told to come back
            assert third.status_code == 503 and third.headers["retry-after"] == "5" and "2 reports" in third.json()["detail"]
            token = login(service)
            assert service.http.get("/me", headers=bearer(token), timeout=3).status_code == 200
            assert service.http.post("/admin/history", json=body(username=ADMIN), timeout=3).status_code == 200
            assert service.http.post("/admin/admins/revoke", json=body(username=ADMIN, srn=BOB),
                                     timeout=3).status_code == 200
            assert service.http.post("/admin/close-slot", json=body(12, BOB), timeout=3).status_code == 403
        assert [len(csv_rows(answer.result())) for answer in slow] == [4, 2]  # (header rows included)
        assert export(service, "bookings").status_code == 200  # the places are given back
        with held(store._reports), service.http.stream(
                "POST", "/admin/export", json=body(username=ADMIN, kind="events", **{"from": TODAY, "to": TODAY})):
            pass  # a reader that goes away before the report begins gives its place back too
        assert [export(service, "bookings").status_code for _ in range(3)] == [200] * 3


def test_an_export_ends_where_its_admins_role_is_revoked(settings: Settings) -> None:
    with running(replace(settings, admin_srns=frozenset({ADMIN}))) as service:
        assert service.http.post("/admin/admins/grant", json=body(username=ADMIN, srn=BOB)).status_code == 200
        with contextlib.closing(sqlite3.connect(settings.database_path)) as conn, conn:
            conn.executemany("INSERT INTO events (at, srn, action, date, slot_id, via) VALUES (?, ?, 'book', ?, 9, 'http')",
                             [(f"{TODAY} 01:00:00", f"PES1UG20CS{n % 1000:03d}", TODAY) for n in range(60_000)])
        with service.http.stream("POST", "/admin/export", json=body(username=BOB, kind="events",
                                                                   **{"from": TODAY, "to": TODAY})) as stream:
            parts = stream.iter_bytes()
            first = next(parts)
            assert service.http.post("/admin/admins/revoke", json=body(username=ADMIN, srn=BOB)).status_code == 200
            rest = b"".join(parts)
        rows = (first + rest).count(b"\n") - 1
        assert 0 < rows < 60_000  # it stopped: the rows already read went, no more


def test_a_member_in_line_gets_the_slot_when_its_booking_is_cancelled(settings: Settings) -> None:
    with running(replace(settings, admin_srns=frozenset({"PES1UG20CS010"}))) as service:
        watcher = service.socket()
        assert service.book(9).status_code == 200
        receive(watcher)
        joined = waitlist(service, "join", 9, BOB)
        assert joined.json() == {"success": True, "message": "You are number 1 in line for slot 9 on 2026-11-24",
                                 "slot_id": 9}
        assert waitlist(service, "join", 9, CAROL).json()["message"].startswith("You are number 2 in line")
        nine = receive_until(watcher, "slots_update")
        while nine["data"]["slots"][6]["waiting"] != 2:
            nine = receive_until(watcher, "slots_update")
        assert nine["data"]["slots"][6]["booked_by"] == ALICE and BOB not in orjson.dumps(nine).decode()
        places = service.http.post("/my-bookings", json=body(username=CAROL)).json()["waitlist"]
        assert places == [{"id": 9, "start_time": "09:00", "end_time": "10:00", "date": TODAY, "position": 2}]

        assert service.cancel(9).status_code == 200  # Alice lets it go: Bob, first in line, has it at once
        slot = service.slots()["slots"][6]
        assert (slot["booked_by"], slot["waiting"]) == (BOB, 1)
        assert service.http.post("/my-bookings", json=body(username=CAROL)).json()["waitlist"][0]["position"] == 1
        mine = service.http.post("/my-bookings", json=body(username=BOB)).json()
        assert [b["id"] for b in mine["bookings"]] == [9] and mine["waitlist"] == []
        admin = "PES1UG20CS010"
        history = service.http.post("/admin/history", json=body(username=admin)).json()["events"]
        assert [(e["action"], e["srn"]) for e in history[:2]] == [("promote", BOB), ("cancel", ALICE)]

        assert waitlist(service, "leave", 9, CAROL).status_code == 200
        assert service.cancel(9, username=BOB).status_code == 200
        assert service.slots()["slots"][6]["status"] == "available"  # nobody left in line


def test_a_release_found_just_before_a_failed_read_is_still_logged_and_told(settings: Settings, clock: Clock,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Board.poll hands over what it found before a read failed: the release is logged, its holder told."""
    with running(replace(settings, checkin_required=True), clock) as service:
        store = service.state["board"].store
        release, read_changes, released_rows, failed = store.release_no_shows, store.changes_since, [], []

        async def releasing(*args: Any) -> Any:
            released_rows.extend(await release(*args))
            return released_rows

        async def busy_once_after_a_release(*args: Any) -> Any:
            if released_rows and not failed:
                failed.append(True)
                raise sqlite3.OperationalError("database is locked")
            return await read_changes(*args)

        store.release_no_shows, store.changes_since = releasing, busy_once_after_a_release
        tab = service.socket()
        assert send(tab, {"type": "identify", "username": ALICE, "password": PASSWORD})["success"] is True
        assert service.book(10).status_code == 200
        clock.set("2026-11-24 10:16")  # Alice does not come to slot 10
        released = receive_until(tab, "booking_released")
        assert failed == [True] and (released["slot_id"], released["date"]) == (10, TODAY)
        assert sum("did not check in" in record.getMessage() for record in caplog.records) == 1


def test_personal_messages_reach_every_tab_of_that_member_and_nobody_else(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, checkin_required=True), clock) as service:
        bob_token = login(service, BOB)
        bob_tabs, alice_tab = service.sockets(2), service.socket()
        assert send(bob_tabs[0], {"type": "identify", "token": bob_token})["srn"] == BOB
        assert send(bob_tabs[1], {"type": "identify", "username": BOB, "password": PASSWORD})["success"] is True
        assert send(alice_tab, {"type": "identify", "username": ALICE, "password": PASSWORD})["srn"] == ALICE
        refused = send(service.socket(), {"type": "identify", "username": ALICE, "password": "wrong"})
        assert refused == {"type": "identify_response", "success": False, "message": "Invalid credentials"}

        assert service.book(12).status_code == 200 and waitlist(service, "join", 12, BOB).status_code == 200
        assert service.cancel(12).status_code == 200
        for tab in bob_tabs:
            promoted = receive_until(tab, "booking_promoted")
            assert promoted == {"type": "booking_promoted", "date": TODAY, "slot_id": 12,
                                "message": "Slot 12 on 2026-11-24 is yours: it came free and you were first in line"}
        assert service.book(10).status_code == 200
        clock.set("2026-11-24 10:16")  # Alice does not come to slot 10
        released = receive_until(alice_tab, "booking_released")
        assert (released["slot_id"], released["date"]) == (10, TODAY)
        for tab in bob_tabs:  # nothing of Alice's reaches Bob
            with pytest.raises(TimeoutError):
                receive_until(tab, "booking_released", timeout=0.3)
        fresh = login(service, BOB)  # (the first token has expired by now)
        assert send(bob_tabs[0], {"type": "identify", "token": fresh})["success"] is True
        assert service.http.post("/auth/logout", headers=bearer(fresh)).status_code == 200
        assert service.book(11).status_code == 200 and waitlist(service, "join", 11, BOB).status_code == 200
        assert service.cancel(11).status_code == 200
        assert receive_until(bob_tabs[1], "booking_promoted")["slot_id"] == 11  # signed in by password: still
        with pytest.raises(TimeoutError):  # identified with the token he signed out: no more
            receive_until(bob_tabs[0], "booking_promoted", timeout=0.5)


def test_a_tab_identified_with_a_token_hears_nothing_personal_once_it_is_signed_out_or_expired(
        settings: Settings, clock: Clock) -> None:
    with running(settings, clock) as service:
        signed_out, expired, by_password = service.sockets(3)
        token = login(service, BOB)  # good until 02:00
        assert send(signed_out, {"type": "identify", "token": token})["success"] is True
        assert service.http.post("/auth/logout", headers=bearer(token)).status_code == 200
        clock.set("2026-11-24 02:30")
        # another sign-out, after the first token's expiry: the list of signed-out tokens forgets the first
        assert service.http.post("/auth/logout", headers=bearer(login(service, CAROL))).status_code == 200
        assert send(expired, {"type": "identify", "token": login(service, BOB)})["success"] is True  # until 03:30
        assert send(by_password, {"type": "identify", "username": BOB, "password": PASSWORD})["success"] is True
        clock.set("2026-11-24 03:31")
        assert service.book(12).status_code == 200 and waitlist(service, "join", 12, BOB).status_code == 200
        assert service.cancel(12).status_code == 200
        assert receive_until(by_password, "booking_promoted")["slot_id"] == 12
        for tab in (signed_out, expired):
            with pytest.raises(TimeoutError):
                receive_until(tab, "booking_promoted", timeout=0.5)


def test_a_promotion_on_one_process_is_told_on_the_other(settings: Settings) -> None:
    day = real_tomorrow()
    with process(settings) as (_, first), process(settings) as (_, second):
        with ws_connect(second.replace("http", "ws") + "/slot-booking", open_timeout=5) as tab:
            receive(tab)
            assert send(tab, {"type": "identify", "username": BOB, "password": PASSWORD})["success"] is True
            seat = {"slot_id": 9, "date": day, "password": PASSWORD}
            assert httpx.post(f"{first}/book-slot", json={**seat, "username": ALICE}).status_code == 200
            assert httpx.post(f"{second}/waitlist/join", json={**seat, "username": BOB}).status_code == 200
            assert httpx.post(f"{first}/cancel-slot", json={**seat, "username": ALICE}).status_code == 200
            assert receive_until(tab, "booking_promoted", timeout=3)["slot_id"] == 9


def test_lines_for_slots_that_have_ended_no_longer_count_against_a_member(settings: Settings, clock: Clock) -> None:
    with running(settings, clock) as service:
        for slot in (4, 5, 6, 12):
            assert service.book(slot, username=BOB).status_code == 200
        for slot in (4, 5, 6):
            assert waitlist(service, "join", slot, ALICE).status_code == 200
        assert waitlist(service, "join", 12, ALICE).status_code == 400  # three lines already
        clock.set("2026-11-24 07:00")  # those three slots are over
        assert waitlist(service, "join", 12, ALICE).status_code == 200


def test_waitlist_limits_and_refusals(settings: Settings) -> None:
    with running(replace(settings, waitlist_per_slot=2, waitlist_per_member=1)) as service:
        assert service.book(9).status_code == 200 and service.book(10).status_code == 200
        assert waitlist(service, "join", 9, ALICE).json() == {"detail": "You already hold slot 9 on 2026-11-24"}
        assert waitlist(service, "join", 9, BOB).status_code == 200
        assert waitlist(service, "join", 9, BOB).json() == {"detail": "You are already in line for slot 9 on 2026-11-24"}
        assert waitlist(service, "join", 10, BOB).json() == {"detail": "You can wait for at most 1 slots at once"}
        assert waitlist(service, "join", 9, CAROL).status_code == 200
        full = waitlist(service, "join", 9, "PES1UG20CS004")
        assert full.status_code == 400 and full.json() == {"detail": "The waitlist for slot 9 on 2026-11-24 is full (2 waiting)"}
        assert waitlist(service, "leave", 10, BOB).json() == {"detail": "You are not in line for slot 10 on 2026-11-24"}
        free = waitlist(service, "join", 11, BOB)  # a free slot is simply booked
        assert free.json()["message"] == "Slot 11 was free, and is now booked for you"
        assert service.slots()["slots"][8]["booked_by"] == BOB
        ws = service.socket()
        reply = send(ws, {"type": "leave_waitlist", "slot_id": 9, "username": BOB, "password": PASSWORD})
        assert reply == {"type": "waitlist_response", "success": True, "message": "Left the waitlist for slot 9",
                         "slot_id": 9}


def test_the_first_in_line_over_their_limits_is_passed_over(settings: Settings) -> None:
    with running(replace(settings, max_bookings_per_day=1)) as service:
        assert service.book(9).status_code == 200
        assert service.book(12, username=BOB).status_code == 200  # Bob holds his one booking of the day
        assert waitlist(service, "join", 9, BOB).status_code == 200
        assert waitlist(service, "join", 9, CAROL).status_code == 200
        assert service.cancel(9).status_code == 200
        slot = service.slots()["slots"][6]
        assert (slot["booked_by"], slot["waiting"]) == (CAROL, 1)  # Bob keeps his place, over his limit


def test_a_cancellation_racing_a_join_never_leaves_the_joiner_with_neither(settings: Settings) -> None:
    day = real_tomorrow()
    with process(settings) as (_, first), process(settings) as (_, second):
        def post(url: str, path: str, member: str, slot: int) -> int:
            return httpx.post(f"{url}{path}", json={"slot_id": slot, "date": day, "username": member,
                                                    "password": PASSWORD}).status_code

        with ThreadPoolExecutor(2) as pool:
            for slot in range(3, 15):
                assert post(first, "/book-slot", ALICE, slot) == 200
                codes = list(pool.map(post, (first, second), ("/cancel-slot", "/waitlist/join"), (ALICE, BOB),
                                      (slot, slot)))
                assert codes == [200, 200]
                answer = httpx.post(f"{second}/my-bookings", json={"username": BOB, "password": PASSWORD}).json()
                held = [b["id"] for b in answer["bookings"] if b["date"] == day]
                waiting = [p["id"] for p in answer["waitlist"] if p["date"] == day]
                assert slot in held and slot not in waiting  # it was his, by the line or by a free slot


def test_a_promotion_on_one_process_respects_limits_met_on_the_other(settings: Settings) -> None:
    day = real_tomorrow()
    rules = {"MAX_BOOKINGS_PER_DAY": "1"}
    with process(settings, **rules) as (_, first), process(settings, **rules) as (_, second):
        def post(url: str, path: str, member: str, slot: int) -> int:
            return httpx.post(f"{url}{path}", json={"slot_id": slot, "date": day, "username": member,
                                                    "password": PASSWORD}).status_code

        assert post(first, "/book-slot", ALICE, 9) == 200
        assert post(second, "/waitlist/join", BOB, 9) == 200 and post(second, "/waitlist/join", CAROL, 9) == 200
        assert post(second, "/book-slot", BOB, 12) == 200  # Bob's one booking of the day, on the other process
        assert post(first, "/cancel-slot", ALICE, 9) == 200
        slot = httpx.get(f"{first}/slots", params={"date": day}).json()["slots"][6]  # the process that wrote
        assert (slot["booked_by"], slot["waiting"]) == (CAROL, 1)


def test_two_members_joining_for_the_last_place_in_line_across_two_processes(settings: Settings) -> None:
    day = real_tomorrow()
    line = {"WAITLIST_PER_SLOT": "1", "WAITLIST_PER_MEMBER": "0"}
    with process(settings, **line) as (_, first), process(settings, **line) as (_, second):
        def post(url: str, path: str, member: str, slot: int) -> httpx.Response:
            return httpx.post(f"{url}{path}", json={"slot_id": slot, "date": day, "username": member,
                                                    "password": PASSWORD})

        with ThreadPoolExecutor(2) as pool:
            for slot in range(3, 15):
                assert post(first, "/book-slot", ALICE, slot).status_code == 200
                answers = list(pool.map(post, (first, second), ("/waitlist/join",) * 2, (BOB, CAROL), (slot, slot)))
                assert sorted(a.status_code for a in answers) == [200, 400]
                assert "is full (1 waiting)" in next(a for a in answers if a.status_code == 400).json()["detail"]


def test_a_holder_who_leaves_early_hands_the_rest_to_the_line_or_frees_it(settings: Settings, clock: Clock) -> None:
    with running(settings, clock) as service:
        assert service.book(9).status_code == 200 and waitlist(service, "join", 9, BOB).status_code == 200
        assert service.book(11, username=CAROL).status_code == 200
        carol = link(service, CAROL)
        early = service.http.post("/leave-early", json=body(9))
        assert early.status_code == 400 and "not under way" in early.json()["detail"]
        clock.set("2026-11-24 09:00")
        assert service.http.post("/check-in", json=body(9)).status_code == 200
        clock.set("2026-11-24 09:40")  # past the grace: only the line can have the rest of it
        assert service.http.post("/leave-early", json=body(9, BOB)).status_code == 400  # not his
        left = service.http.post("/leave-early", json=body(9))
        assert left.status_code == 200 and left.json()["message"] == "Left slot 9 early: the rest of it is for others"
        now = service.http.get("/now").json()["current"]
        assert (now["id"], now["holder"], now["checked_in"]) == (9, BOB, False)
        clock.set("2026-11-24 11:10")
        tab = service.socket()  # over the socket alike
        assert send(tab, {"type": "leave_early", **body(11, CAROL)}) == {
            "type": "leave_early_response", "success": True, "slot_id": 11,
            "message": "Left slot 11 early: the rest of it is for others"}
        assert service.http.get("/now").json()["current"]["holder"] is None  # nobody holds the lab
        assert str(events_of(parse_feed(service.http.get(carol)))[uid(TODAY, 11, CAROL)]["STATUS"]) == "CANCELLED"
        assert service.slots()["slots"][8]["status"] == "available"  # within the grace: anyone may have it
        assert service.book(11, username=ALICE).status_code == 200


def test_the_holder_checks_in_and_the_lab_knows_who_holds_it_now(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, admin_srns=frozenset({"PES1UG20CS010"})), clock) as service:
        assert service.book(9).status_code == 200 and service.book(10, username=BOB).status_code == 200
        early = service.http.post("/check-in", json=body(9))
        assert early.status_code == 400 and early.json() == {"detail": "Check-in for slot 9 on 2026-11-24 opens at 08:50"}
        clock.set("2026-11-24 08:50")
        assert service.http.post("/check-in", json=body(9, BOB)).json() == {
            "detail": "Slot 9 on 2026-11-24 is booked by someone else"}
        assert service.http.post("/check-in", json=body(9)).json() == {
            "success": True, "message": "Slot 9 checked in", "slot_id": 9}
        assert service.http.post("/check-in", json=body(9)).json() == {"detail": "Slot 9 on 2026-11-24 is already checked in"}
        assert service.slots()["slots"][6]["checked_in"] is True

        clock.set("2026-11-24 09:20")
        now = service.http.get("/now").json()
        assert now["current"] == {"date": TODAY, "id": 9, "start_time": "09:00", "end_time": "10:00", "holder": ALICE,
                                  "checked_in": True}
        assert now["next"]["id"] == 10 and now["next"]["holder"] == BOB and now["next"]["checked_in"] is False
        alice, bob = login(service), login(service, BOB)
        assert service.book(13).status_code == 200
        assert service.http.get("/me", headers=bearer(alice)).json() == {
            "srn": ALICE, "holds_current_slot": True, "current": now["current"], "next_booking": {
                "id": 13, "start_time": "13:00", "end_time": "14:00", "booked_at": "2026-11-24 09:20:00",
                "date": TODAY}, "lately": []}  # the next one, not the one under way; nothing done to her bookings
        mine = service.http.get("/me", headers=bearer(bob)).json()
        assert mine["holds_current_slot"] is False and mine["next_booking"]["id"] == 10
        assert service.http.get("/me").status_code == 401

        clock.set("2026-11-24 10:16")  # Bob never came, but check-in is not required: he keeps the slot
        assert service.http.post("/check-in", json=body(10, BOB)).json() == {
            "detail": "Check-in for slot 10 on 2026-11-24 closed at 10:15"}
        assert service.http.post("/check-in", json=body(10, "PES1UG20CS010")).status_code == 200  # an admin may
        clock.set("2026-11-24 14:30")
        assert service.http.get("/now").json()["next"] == {"date": TOMORROW, "id": 3, "start_time": "03:00",
                                                          "end_time": "04:00", "holder": None, "checked_in": False}


def test_a_no_show_is_released_and_the_next_in_line_gets_the_slot(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, checkin_required=True, admin_srns=frozenset({"PES1UG20CS010"})), clock) as service:
        watcher = service.socket()
        assert service.book(9).status_code == 200 and waitlist(service, "join", 9, BOB).status_code == 200
        assert service.book(11, username=CAROL).status_code == 200
        clock.set("2026-11-24 11:05")
        assert service.http.post("/check-in", json=body(11, CAROL)).status_code == 200
        clock.set("2026-11-24 09:14")
        time.sleep(0.3)
        assert service.slots()["slots"][6]["booked_by"] == ALICE  # not yet
        clock.set("2026-11-24 09:15")  # the deadline: released within a watch or two
        deadline = time.monotonic() + 3
        while service.slots()["slots"][6]["booked_by"] != BOB:
            assert time.monotonic() < deadline, "the no-show was not released"
            time.sleep(0.05)
        update = receive_until(watcher, "slots_update")
        while update["data"]["slots"][6]["booked_by"] != BOB:
            update = receive_until(watcher, "slots_update")
        clock.set("2026-11-24 11:30")
        time.sleep(0.3)
        assert service.slots()["slots"][8]["booked_by"] == CAROL  # checked in: kept
        history = service.http.post("/admin/history", json=body(username="PES1UG20CS010")).json()["events"]
        actions = [(e["action"], e["srn"], e["slot_id"]) for e in history]
        assert actions.count(("no_show", ALICE, 9)) == 1 and ("promote", BOB, 9) in actions


def test_a_member_moved_up_late_is_released_but_never_counted_and_every_automatic_action_reaches_them(
        settings: Settings, clock: Clock) -> None:
    admin = "PES1UG20CS010"
    rules = replace(settings, checkin_required=True, no_show_limit=1, admin_srns=frozenset({admin}))
    with running(rules, clock) as service:
        bob_tab, alice_tab = service.socket(), service.socket()
        for tab, srn in ((bob_tab, BOB), (alice_tab, ALICE)):  # (a token would expire before the morning)
            assert send(tab, {"type": "identify", "username": srn, "password": PASSWORD})["success"] is True
        bob_feed, alice_feed = link(service, BOB), link(service)
        assert service.book(9).status_code == 200 and waitlist(service, "join", 9, BOB).status_code == 200
        assert service.book(10, username=CAROL).status_code == 200 and service.book(12).status_code == 200
        clock.set("2026-11-24 08:30")
        assert service.cancel(9).status_code == 200  # Bob moves up half an hour before the start
        assert receive_until(bob_tab, "booking_promoted")["slot_id"] == 9
        clock.set("2026-11-24 09:15")  # he does not come: released, but it was not his choice of hour
        released = receive_until(bob_tab, "booking_released")
        assert released["slot_id"] == 9 and "not counted as a no-show" in released["message"]
        assert service.book(11, username=BOB).status_code == 200  # not barred by NO_SHOW_LIMIT=1
        clock.set("2026-11-24 10:15")  # Carol booked 10 herself and does not come: that one counts
        deadline = time.monotonic() + 3
        while service.slots()["slots"][7]["booked_by"] is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "no-show" in service.book(13, username=CAROL).json()["detail"]

        assert service.cancel(12, username=admin).status_code == 200  # an admin cancels Alice's booking
        cancelled = receive_until(alice_tab, "booking_cancelled")
        assert cancelled == {"type": "booking_cancelled", "date": TODAY, "slot_id": 12,
                             "message": f"Your booking of slot 12 on {TODAY} was cancelled by an admin"}
        lately = service.http.get("/me", headers=bearer(login(service, BOB))).json()["lately"]
        assert [(e["action"], e["slot_id"]) for e in lately] == [("release", 9), ("promote", 9)]
        assert lately[0]["at"].endswith("+05:30")
        alice = service.http.get("/me", headers=bearer(login(service, ALICE))).json()["lately"]
        assert [(e["action"], e["slot_id"], e["by"]) for e in alice] == [("cancel", 12, admin)]
        assert all(e["by"] is None for e in lately)  # the service did those on its own
        for feed, slot, srn in ((bob_feed, 9, BOB), (alice_feed, 12, ALICE)):  # and their calendars say so
            assert str(events_of(parse_feed(service.http.get(feed)))[uid(TODAY, slot, srn)]["STATUS"]) == "CANCELLED"
        no_shows = service.http.post("/admin/export", json=body(username=admin, kind="usage", format="json",
                                                                **{"from": TODAY, "to": TODAY})).json()["members"]
        assert {m["srn"]: m["no_shows"] for m in no_shows}.get(BOB, 0) == 0


def test_members_with_too_many_no_shows_cannot_book_until_they_age_or_are_forgiven(settings: Settings,
                                                                                   clock: Clock) -> None:
    admin = "PES1UG20CS010"
    rules = replace(settings, checkin_required=True, no_show_limit=2, no_show_window_days=30,
                    admin_srns=frozenset({admin}))
    with running(rules, clock) as service:
        for slot, late in ((5, "2026-11-24 05:16"), (6, "2026-11-24 06:16")):
            assert service.book(slot).status_code == 200
            clock.set(late)
            deadline = time.monotonic() + 3
            while service.slots()["slots"][slot - 3]["booked_by"] is not None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        refused = service.book(9)
        assert refused.status_code == 400
        assert refused.json()["detail"] == ("2 no-show(s) in the last 30 days: no new bookings until 2026-12-24 "
                                            "(an admin can forgive one)")
        assert waitlist(service, "join", 9, ALICE).status_code == 400
        assert service.book(10, username=BOB).status_code == 200
        barred = waitlist(service, "join", 10, ALICE)  # nor queue for a booked one
        assert barred.status_code == 400 and "no new bookings until 2026-12-24" in barred.json()["detail"]
        history = service.http.post("/admin/history", json=body(username=admin, srn=ALICE)).json()["events"]
        assert [e["action"] for e in history if e["action"] == "no_show"] == ["no_show", "no_show"]
        forgive = {"srn": ALICE, "date": TODAY, "slot_id": 5}
        assert service.http.post("/admin/forgive-no-show", json={**forgive, **body(username=BOB)}).status_code == 403
        assert service.http.post("/admin/forgive-no-show", json={**forgive, **body(username=admin)}).status_code == 200
        again = service.http.post("/admin/forgive-no-show", json={**forgive, **body(username=admin)})
        assert again.status_code == 400 and "no no-show on slot 5" in again.json()["detail"]
        for odd in ({"date": "0001-01-01"}, {"slot_id": 9223372036854775808}, {"slot_id": 99}):
            answer = service.http.post("/admin/forgive-no-show", json={**forgive, **body(username=admin), **odd})
            assert answer.status_code in (400, 422) and "detail" in answer.json()
        assert service.book(9).status_code == 200  # one no-show left: under the limit


def test_a_late_check_in_racing_the_release_exactly_one_wins_and_the_holder_is_told(settings: Settings,
                                                                                     clock: Clock) -> None:
    with running(replace(settings, checkin_required=True), clock) as service:
        tab = service.socket()
        assert send(tab, {"type": "identify", "username": ALICE, "password": PASSWORD})["success"] is True
        for slot in range(3, 9):
            assert service.book(slot).status_code == 200
            clock.set(f"2026-11-24 {slot:02d}:14:59.990")
            with ThreadPoolExecutor(1) as pool:
                checking = pool.submit(service.http.post, "/check-in", json=body(slot))
                time.sleep(0.01 * (slot % 3))  # the deadline passes just before, during or after
                clock.set(f"2026-11-24 {slot:02d}:15:00")
                answer = checking.result()
            time.sleep(0.3)  # a watch or two
            held = service.slots()["slots"][slot - 3]
            if answer.status_code == 200:  # the check-in won: the booking stays, nobody was released
                assert held["booked_by"] == ALICE and held["checked_in"] is True
            else:  # the release won: the check-in was refused, and the holder heard why
                assert held["booked_by"] is None
                assert answer.json()["detail"] in (f"Slot {slot} on {TODAY} is not booked",
                                                   f"Check-in for slot {slot} on {TODAY} closed at {slot:02d}:15")
                assert receive_until(tab, "booking_released")["slot_id"] == slot


def test_a_booking_handed_on_or_made_after_the_start_gets_its_own_check_in_window(settings: Settings,
                                                                                  clock: Clock) -> None:
    with running(replace(settings, checkin_required=True, admin_srns=frozenset({"PES1UG20CS010"})), clock) as service:
        assert service.book(9).status_code == 200
        assert waitlist(service, "join", 9, BOB).status_code == 200
        assert waitlist(service, "join", 9, CAROL).status_code == 200
        clock.set("2026-11-24 09:15")  # Alice did not come: Bob has it, with 15 minutes to check in
        deadline = time.monotonic() + 3
        while service.slots()["slots"][6]["booked_by"] != BOB:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        clock.set("2026-11-24 09:16")
        time.sleep(0.3)
        slot = service.slots()["slots"][6]
        assert (slot["booked_by"], slot["waiting"]) == (BOB, 1)  # no cascade down the line
        clock.set("2026-11-24 09:25")
        assert service.http.post("/check-in", json=body(9, BOB)).status_code == 200
        clock.set("2026-11-24 10:20")  # a booking made 20 minutes after the start (within the grace)
        assert service.book(10, username=CAROL).status_code == 200
        clock.set("2026-11-24 10:21")
        time.sleep(0.3)
        assert service.slots()["slots"][7]["booked_by"] == CAROL  # not released at once
        clock.set("2026-11-24 10:35")
        deadline = time.monotonic() + 3
        while service.slots()["slots"][7]["booked_by"] is not None:
            assert time.monotonic() < deadline, "its own window ran out, and it was kept"
            time.sleep(0.05)
        history = service.http.post("/admin/history", json=body(username="PES1UG20CS010")).json()["events"]
        assert [(e["action"], e["srn"]) for e in history if e["action"] == "no_show"] == [("no_show", CAROL),
                                                                                         ("no_show", ALICE)]
        other_day = service.http.post("/check-in", json=body(5, "PES1UG20CS010", date=TOMORROW))
        assert other_day.status_code == 400  # not even an admin checks in a booking days ahead


def test_a_late_bookings_check_in_window_counts_from_its_second(settings: Settings, clock: Clock) -> None:
    """A booking made at 09:20:57 with a one-minute window may check in until 09:21:57, not 09:21:00."""
    with running(replace(settings, checkin_required=True, checkin_minutes=1), clock) as service:
        clock.set("2026-11-24 09:20:57")
        assert service.book(9).status_code == 200
        clock.set("2026-11-24 09:21:30")
        time.sleep(0.3)  # the watcher looks every 100 ms
        assert service.slots()["slots"][6]["booked_by"] == ALICE, "released before its minute was up"
        clock.set("2026-11-24 09:21:58")
        deadline = time.monotonic() + 3
        while service.slots()["slots"][6]["booked_by"] is not None:
            assert time.monotonic() < deadline, "not released once its minute was up"
            time.sleep(0.05)


def test_a_deadline_missed_while_the_server_was_down_is_released_after_the_restart(settings: Settings,
                                                                                   clock: Clock) -> None:
    with running(settings, clock) as service:
        assert service.book(9).status_code == 200
    clock.set("2026-11-24 09:40")  # it was down from before 09:15 until now
    with running(replace(settings, checkin_required=True), clock) as service:
        deadline = time.monotonic() + 3
        while service.slots()["slots"][6]["booked_by"] is not None:
            assert time.monotonic() < deadline, "the missed no-show was not released"
            time.sleep(0.05)


def test_a_no_show_is_released_exactly_once_by_two_processes(settings: Settings) -> None:
    """Real processes run on the real clock: pick a time zone in which it is now between 7 and 53 minutes
    past the hour, and put in bookings of that hour made before it began (as a member would have booked
    them), so their check-in (5 minutes) has closed. Both processes watch; the database decides."""
    minute = datetime.now(timezone.utc).minute
    zone, local = min(((z, (minute + o) % 60) for z, o in (("UTC", 0), ("Asia/Kolkata", 30), ("Asia/Kathmandu", 45))),
                      key=lambda zl: abs(zl[1] - 30))
    assert 7 <= local <= 53  # one of the three offsets always lands there
    env = {"TIMEZONE": zone, "SLOT_START_HOUR": "0", "SLOT_END_HOUR": "24", "BOOKING_GRACE_MINUTES": "55",
           "CHECKIN_MINUTES": "5", "CHECKIN_REQUIRED": "1", "ADMIN_SRNS": "PES1UG20CS010"}
    with process(settings, **env) as (_, first), process(settings, **env) as (_, second):
        now = datetime.now(ZoneInfo(zone))
        today, hour = now.date().isoformat(), now.hour
        for member in (ALICE, BOB, CAROL):  # each holds the hour in turn and is released as a no-show
            with contextlib.closing(sqlite3.connect(settings.database_path, timeout=10)) as conn:
                conn.execute("INSERT INTO bookings (date, slot_id, booked_by, booked_at) VALUES (?, ?, ?, ?)",
                             (today, hour, member, f"{today} 00:00:00"))
                conn.execute("INSERT INTO events (at, srn, action, date, slot_id, via) VALUES (?, ?, 'book', ?, ?,"
                             " 'http')", (f"{today} 00:00:00", member, today, hour))
                conn.commit()
            deadline = time.monotonic() + 5
            while True:
                with contextlib.closing(sqlite3.connect(settings.database_path, timeout=10)) as conn:
                    if conn.execute("SELECT COUNT(*) FROM bookings WHERE date = ? AND slot_id = ?",
                                    (today, hour)).fetchone()[0] == 0:
                        break
                assert time.monotonic() < deadline, "the no-show was not released"
                time.sleep(0.05)
        events = httpx.post(f"{first}/admin/history", json={"username": "PES1UG20CS010", "password": PASSWORD}).json()
    released = [(e["srn"], e["slot_id"]) for e in events["events"] if e["action"] == "no_show"]
    assert sorted(released) == [(ALICE, hour), (BOB, hour), (CAROL, hour)]


# -- series: a term of workshops in one call -----------------------------------------------------------------


TUESDAYS = {"action": "close", "slots": [13, 14], "weekdays": ["tue"], "from": "2026-11-24", "until": "2027-02-23",
            "title": "Arduino workshop"}


def test_an_admin_closes_a_term_of_tuesdays_in_one_call(settings: Settings, clock: Clock) -> None:
    clock.set("2026-11-24 13:20")  # Tuesday, 13:00 has started
    with running(replace(settings, admin_srns=frozenset({CAROL})), clock) as service:
        assert service.http.post("/book-slot", json=body(14, date="2026-12-01")).status_code == 200
        version = service.http.post("/admin/history", json=body(username=CAROL)).json()["total"]

        dry = series(service, **TUESDAYS, dry_run=True)
        assert dry.status_code == 200, dry.text
        plan = dry.json()
        assert plan["dry_run"] is True and plan["series_id"] is None
        assert plan["done"] == 2 * 14 - 2 and plan["conflicts"] == 1 and plan["skipped"] == 1
        assert plan["message"].startswith("Dry run, nothing changed: 26 slot(s) closed over 14 date(s)")
        assert [day["date"] for day in plan["dates"]][:3] == ["2026-11-24", "2026-12-01", "2026-12-08"]
        assert plan["dates"][0]["slots"] == [{"slot_id": 13, "result": "started"}, {"slot_id": 14, "result": "closed"}]
        assert plan["dates"][1]["slots"] == [{"slot_id": 13, "result": "closed"},
                                             {"slot_id": 14, "result": "conflict", "booked_by": ALICE}]
        assert service.http.post("/admin/history", json=body(username=CAROL)).json()["total"] == version
        assert service.http.get("/slots", params={"date": "2026-12-01"}).json()["available_slots"] == [
            s for s in range(3, 15) if s != 14]  # Alice's
        assert "closed" not in statuses(service, "2026-12-08")

        watcher = service.socket()
        assert send(watcher, {"type": "get_slots", "date": "2026-12-08"})["data"]["date"] == "2026-12-08"
        done = series(service, **TUESDAYS)
        answer = done.json()
        assert done.status_code == 200 and answer["dates"] == plan["dates"] and answer["series_id"] >= 1
        update = receive_until(watcher, "slots_update")  # the day watched is broadcast as it changes
        assert update["data"]["date"] == "2026-12-08"
        assert [s["status"] for s in update["data"]["slots"] if s["id"] in (13, 14)] == ["closed", "closed"]
        far = service.http.get("/slots", params={"date": "2027-02-23"}).json()  # beyond BOOKING_DAYS_AHEAD
        assert [s["status"] for s in far["slots"] if s["id"] in (13, 14)] == ["closed", "closed"]
        alice = service.http.get("/slots", params={"date": "2026-12-01"}).json()["slots"]
        assert [(s["status"], s["booked_by"]) for s in alice if s["id"] in (13, 14)] == [("closed", None),
                                                                                         ("booked", ALICE)]
        listed = service.http.get("/admin/series", headers=bearer(login(service, CAROL))).json()["series"]
        assert listed == [{"id": answer["series_id"], "action": "close", "srn": None, "slots": [13, 14],
                           "weekdays": ["tue"], "from": "2026-11-24", "until": "2027-02-23",
                           "title": "Arduino workshop", "created_by": CAROL, "created_at": "2026-11-24T13:20:00+05:30",
                           "cancelled_by": None, "cancelled_at": None, "upcoming": 26}]
        steps = service.http.post("/admin/history", json=body(username=CAROL, page_size=500)).json()["events"]
        mine = [e for e in steps if e["series"] == answer["series_id"]]
        assert [e["action"] for e in mine].count("close") == 26 and [e["action"] for e in mine].count("series") == 1
        assert next(e for e in mine if e["action"] == "series_skip")["note"] == f"booked by {ALICE}"

        clock.set("2026-12-01 13:30")  # a week on; 13:00 on the 1st has started
        cancel = service.http.post("/admin/series/cancel", json=body(username=CAROL, series_id=answer["series_id"]))
        assert cancel.status_code == 200, cancel.text
        assert cancel.json()["message"] == f"Series {answer['series_id']} cancelled: 24 slot(s) freed"
        assert service.http.get("/slots", params={"date": "2026-12-08"}).json()["available_slots"] == list(range(3, 15))
        assert "closed" not in statuses(service, "2027-02-23")
        past = service.http.get("/slots", params={"date": "2026-12-01"}).json()["slots"]
        assert past[10]["status"] == "closed"  # 13:00 on the 1st had started: what is past stays as it was
        again = service.http.post("/admin/series/cancel", json=body(username=CAROL, series_id=answer["series_id"]))
        assert again.status_code == 400 and again.json()["detail"].endswith("is already cancelled")
        listed = service.http.get("/admin/series", headers=bearer(login(service, CAROL))).json()["series"]
        assert listed[0]["cancelled_by"] == CAROL and listed[0]["upcoming"] == 0


def test_a_series_reserves_slots_for_a_member_outside_their_limits(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, admin_srns=frozenset({CAROL}), max_upcoming_bookings=1), clock) as service:
        assert service.http.post("/admin/close-slot", json=body(9, CAROL, date="2026-11-26")).status_code == 200
        reserve = {"action": "reserve", "srn": BOB.lower(), "slots": [9, 10], "weekdays": ["wed", "thu"],
                   "from": TOMORROW, "until": "2026-11-26", "title": "Soldering class"}
        answer = series(service, **reserve).json()
        assert answer["done"] == 3 and answer["message"].startswith(f"Series 1: 3 slot(s) reserved for {BOB}")
        assert answer["dates"][1] == {"date": "2026-11-26", "slots": [{"slot_id": 9, "result": "already_closed"},
                                                                      {"slot_id": 10, "result": "reserved"}]}
        assert service.http.get("/slots", params={"date": TOMORROW}).json()["slots"][6]["booked_by"] == BOB
        assert service.book(11, BOB).status_code == 200  # reserved slots do not count against his own limit
        assert service.book(12, BOB).json()["detail"].startswith("Limit reached")
        assert service.book(5).status_code == 200
        mine = series(service, action="reserve", srn=ALICE, slots=[5], weekdays=["tue"],
                      **{"from": TODAY, "until": TODAY})
        assert mine.json()["dates"] == [{"date": TODAY, "slots": [{"slot_id": 5, "result": "already_theirs",
                                                                   "booked_by": ALICE}]}]
        steps = service.http.post("/admin/history", json=body(username=CAROL)).json()["events"]
        assert [(e["action"], e["note"], e["series"]) for e in steps[:2]] == [
            ("series_skip", f"already booked by {ALICE}", 2), ("series", f"reserve for {ALICE} slots 5 on tue from "
                                                                         f"{TODAY} until {TODAY}", 2)]

        assert waitlist(service, "join", 10, ALICE, date="2026-11-26").status_code == 200
        path = link(service, BOB)
        feed = events_of(parse_feed(service.http.get(path)))
        assert str(feed[uid(TOMORROW, 9, BOB)]["SUMMARY"]) == "ReRo lab: slot 09:00-10:00 (Soldering class)"
        assert len(feed) == 4  # three reserved for him, and his own
        lab = events_of(parse_feed(service.http.get(link(service, CAROL, "lab"))))
        assert str(lab[f"{TOMORROW}-slot10-lab@rero-slots"]["SUMMARY"]) == (
            f"ReRo lab: slot 10:00-11:00 booked by {BOB} (Soldering class)")

        clock.set(f"{TOMORROW} 08:52")  # Bob checks in early for 09:00, then the series is cancelled
        assert service.http.post("/check-in", json=body(9, BOB, date=TOMORROW)).status_code == 200
        cancel = service.http.post("/admin/series/cancel", json=body(username=CAROL, series_id=1)).json()
        assert cancel["freed"] == [{"date": TOMORROW, "slot_id": 10}, {"date": "2026-11-26", "slot_id": 10}]
        assert cancel["promoted"] == [{"date": "2026-11-26", "slot_id": 10, "srn": ALICE}]  # the waitlist's turn
        day = service.http.get("/slots", params={"date": TOMORROW}).json()["slots"]
        assert (day[6]["booked_by"], day[6]["checked_in"], day[7]["status"]) == (BOB, True, "available")
        assert service.http.get("/slots", params={"date": "2026-11-26"}).json()["slots"][7]["booked_by"] == ALICE
        feed = events_of(parse_feed(service.http.get(path)))  # what Bob no longer holds, his calendar drops
        assert [str(feed[uid(date, 10, BOB)]["STATUS"]) for date in (TOMORROW, "2026-11-26")] == ["CANCELLED"] * 2
        assert str(feed[uid(TOMORROW, 9, BOB)]["STATUS"]) == "CONFIRMED"


@pytest.mark.parametrize(("fields", "status", "detail"), [
    ({"action": "open"}, 422, 'action must be "close" or "reserve"'),
    ({"slots": []}, 422, "slots must be a list of slot ids, e.g. [14, 15]"),
    ({"slots": [14, True]}, 422, "slots must be a list of slot ids, e.g. [14, 15]"),
    ({"slots": "14"}, 422, "slots must be a list of slot ids, e.g. [14, 15]"),
    ({"slots": [99]}, 400, "Slot 99 does not exist"),
    ({"weekdays": ["tues"]}, 422, 'weekdays must be a list of "mon", "tue", "wed", "thu", "fri", "sat", "sun"'),
    ({"weekdays": []}, 422, 'weekdays must be a list of "mon", "tue", "wed", "thu", "fri", "sat", "sun"'),
    ({"from": None}, 422, "from and until are required (YYYY-MM-DD)"),
    ({"until": "2026-02-30"}, 400, "Invalid date '2026-02-30': use YYYY-MM-DD"),
    ({"from": "2026-11-23"}, 400, "2026-11-23 is in the past"),
    ({"until": "2026-11-20", "from": "2026-11-25"}, 400, "until (2026-11-20) is before from (2026-11-25)"),
    ({"until": "2028-01-01"}, 400, "A series may reach at most 366 days ahead"),
    ({"until": "2026-11-25", "weekdays": ["fri"]}, 400, "No fri from 2026-11-24 until 2026-11-25"),
    ({"srn": ALICE}, 422, "srn is only for reserve"),
    ({"action": "reserve"}, 422, "srn is required for reserve: the member's SRN"),
    ({"action": "reserve", "srn": "PES1\nUG"}, 422, "srn is required for reserve: the member's SRN"),
    ({"title": "x" * 101}, 422, "title must be a line of text of at most 100 characters"),
    ({"title": "a\nb"}, 422, "title must be a line of text of at most 100 characters"),
    ({"dry_run": "yes"}, 422, "dry_run must be true or false"),
    ({"from": orjson.loads(DEEP)}, 400, "Invalid date '[...]': use YYYY-MM-DD"),
])
def test_a_bad_series_is_refused_and_changes_nothing(settings: Settings, clock: Clock, fields: dict[str, Any],
                                                     status: int, detail: str) -> None:
    with running(replace(settings, admin_srns=frozenset({CAROL})), clock) as service:
        response = series(service, **{**TUESDAYS, **fields})
        assert (response.status_code, response.json()) == (status, {"detail": detail})
        assert service.http.get("/admin/series", headers=bearer(login(service, CAROL))).json()["series"] == []


def test_series_are_for_admins(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, admin_srns=frozenset({CAROL})), clock) as service:
        assert series(service, ALICE, **TUESDAYS).json() == {"detail": "Admins only"}
        assert series(service, ALICE, **TUESDAYS, dry_run=True).status_code == 403
        token = login(service)
        assert service.http.get("/admin/series", headers=bearer(token)).status_code == 403
        assert service.http.get("/admin/series").status_code == 401
        assert series(service, **TUESDAYS).status_code == 200
        assert service.http.post("/admin/series/cancel", json=body(series_id=1)).status_code == 403
        response = service.http.post("/admin/series/cancel", json=body(username=CAROL, series_id=2))
        assert (response.status_code, response.json()) == (400, {"detail": "Series 2 does not exist"})
        for bad in ("1", None, True, 0, 2**70):
            response = service.http.post("/admin/series/cancel", json=body(username=CAROL, series_id=bad))
            assert response.status_code == 422, bad
        assert service.http.get("/slots", params={"date": "2026-12-01"}).json()["slots"][11]["status"] == "closed"


def test_a_series_racing_members_on_two_processes_never_takes_an_acknowledged_booking(settings: Settings) -> None:
    day = real_tomorrow()
    weekday = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[datetime.fromisoformat(day).weekday()]
    env = {"SESSION_SECRET": "a-shared-secret-for-this-test", "ADMIN_SRNS": CAROL}
    with process(settings, **env) as (_, a), process(settings, **env) as (_, b), ws_connect(
            b.replace("http", "ws") + "/slot-booking", open_timeout=5) as watcher:
        receive(watcher)
        assert send(watcher, {"type": "get_slots", "date": day})["data"]["date"] == day
        members = [srn for srn in USERS if srn != CAROL][:60]
        tokens = {srn: httpx.post(f"{a}/auth/login", json={"username": srn, "password": PASSWORD}).json()["token"]
                  for srn in [*members, CAROL]}
        close = {"action": "close", "slots": list(range(5, 15)), "weekdays": [weekday], "from": day, "until": day}
        bookings = [((a, b)[i % 2], "/book-slot", {"slot_id": 5 + i % 10, "date": day}, tokens[srn])
                    for i, srn in enumerate(members)]
        answers = at_once([*bookings[:30], (a, "/admin/series", close, tokens[CAROL]), *bookings[30:]])
        made = answers.pop(30)
        assert made.status_code == 200, made.text
        steps = {step["slot_id"]: step for step in made.json()["dates"][0]["slots"]}
        with contextlib.closing(sqlite3.connect(settings.database_path)) as conn:  # what was committed
            rows = conn.execute("SELECT slot_id, booked_by, closed FROM bookings WHERE date = ?", (day,)).fetchall()
        final = {slot_id: {"booked_by": holder, "status": "closed" if closed else "booked"}
                 for slot_id, holder, closed in rows}
        for slot_id in range(5, 15):
            winners = [request[3] for request, answer in zip(bookings, answers, strict=True)
                       if request[2]["slot_id"] == slot_id and answer.status_code == 200]
            assert len(winners) <= 1
            if steps[slot_id]["result"] == "closed":  # the series came first: nobody was told "booked"
                assert winners == [] and final[slot_id]["status"] == "closed"
            else:  # a member came first: the series left the slot to them, and said so
                holder = next(srn for srn, token in tokens.items() if token == winners[0])
                assert steps[slot_id] == {"slot_id": slot_id, "result": "conflict", "booked_by": holder}
                assert final[slot_id]["booked_by"] == holder
        while [(s["status"], s["booked_by"]) for s in receive_until(watcher, "slots_update")["data"]["slots"]][2:] != [
                (final[slot_id]["status"], final[slot_id]["booked_by"]) for slot_id in range(5, 15)]:
            pass  # the other process broadcast the day as the series and the members changed it

        series_id = made.json()["series_id"]
        cancels = at_once([(url, "/admin/series/cancel", {"series_id": series_id}, tokens[CAROL]) for url in (a, b)])
        assert sorted(c.status_code for c in cancels) == [200, 400]  # freed once
        freed = next(c for c in cancels if c.status_code == 200).json()["freed"]
        assert sorted(f["slot_id"] for f in freed) == [s for s in range(5, 15) if steps[s]["result"] == "closed"]
        for url in (a, b):
            deadline = time.monotonic() + 5
            while any(s["status"] == "closed" for s in httpx.get(f"{url}/slots", params={"date": day}).json()["slots"]):
                assert time.monotonic() < deadline
                time.sleep(0.05)

        links = at_once([((a, b)[i % 2], "/calendar/link", {}, tokens[ALICE]) for i in range(40)])
        paths = [answer.json()["path"] for answer in links]
        assert len(set(paths)) == 40
        working = [path for path in paths if httpx.get(a + path).status_code == 200]
        assert len(working) == 1 and httpx.get(b + working[0]).status_code == 200  # one link, on both


def test_cancelling_a_series_hands_its_slots_to_another_that_asked_for_them(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, admin_srns=frozenset({CAROL})), clock) as service:
        wednesdays = {"slots": [9], "weekdays": ["wed"], "from": TOMORROW, "until": "2026-12-02"}
        assert series(service, action="close", **wednesdays).json()["done"] == 2
        workshop = series(service, action="reserve", srn=BOB, title="Workshop", **wednesdays).json()
        assert [step for day in workshop["dates"] for step in day["slots"]] == [
            {"slot_id": 9, "result": "already_closed"}] * 2
        cancel = service.http.post("/admin/series/cancel", json=body(username=CAROL, series_id=1)).json()
        assert cancel["freed"] == [] and cancel["handed_over"] == [
            {"date": TOMORROW, "slot_id": 9, "series_id": 2}, {"date": "2026-12-02", "slot_id": 9, "series_id": 2}]
        assert cancel["message"] == "Series 1 cancelled: 0 slot(s) freed, 2 handed to other series"
        assert service.http.get("/slots", params={"date": TOMORROW}).json()["slots"][6]["booked_by"] == BOB
        listed = service.http.get("/admin/series", headers=bearer(login(service, CAROL))).json()["series"]
        assert [(s["id"], s["cancelled_by"], s["upcoming"]) for s in listed] == [(2, None, 2), (1, CAROL, 0)]
        steps = service.http.post("/admin/history", json=body(username=CAROL)).json()["events"]
        assert (steps[1]["action"], steps[1]["series"], steps[1]["note"]) == (
            "reserve", 2, f"series 1 was cancelled; for {BOB}")
        cancel = service.http.post("/admin/series/cancel", json=body(username=CAROL, series_id=2)).json()
        assert len(cancel["freed"]) == 2 and cancel["handed_over"] == []
        assert service.http.get("/slots", params={"date": TOMORROW}).json()["slots"][6]["status"] == "available"

        # a slot a series held and gave up (its member cancelled it) is not handed back to it later
        tomorrow_only = {"weekdays": ["wed"], "from": TOMORROW, "until": TOMORROW}
        assert series(service, action="reserve", srn=BOB, slots=[10], **tomorrow_only).json()["done"] == 1  # 3
        assert service.http.post("/cancel-slot", json=body(10, BOB, date=TOMORROW)).status_code == 200
        assert series(service, action="close", slots=[10], **tomorrow_only).json()["done"] == 1  # 4
        cancel = service.http.post("/admin/series/cancel", json=body(username=CAROL, series_id=4)).json()
        assert cancel["freed"] == [{"date": TOMORROW, "slot_id": 10}] and cancel["handed_over"] == []

        # a slot handed to a series that closes it: whoever waited in its line is told by their calendar
        assert series(service, action="reserve", srn=BOB, slots=[11], **tomorrow_only).json()["done"] == 1  # 5
        assert waitlist(service, "join", 11, ALICE, date=TOMORROW).status_code == 200
        assert series(service, action="close", slots=[11], **tomorrow_only).json()["conflicts"] == 1  # 6
        alice = link(service)
        cancel = service.http.post("/admin/series/cancel", json=body(username=CAROL, series_id=5)).json()
        assert cancel["handed_over"] == [{"date": TOMORROW, "slot_id": 11, "series_id": 6}]
        left = service.http.post("/admin/history", json=body(username=CAROL, srn=ALICE)).json()["events"][0]
        assert (left["action"], left["note"], left["series"]) == ("leave", "the slot went to series 6", 6)
        assert str(events_of(parse_feed(service.http.get(alice)))[uid(TOMORROW, 11)]["STATUS"]) == "CANCELLED"


# -- calendar feeds ------------------------------------------------------------------------------------------


def test_a_member_subscribes_to_their_bookings_and_waitlist_places(settings: Settings, clock: Clock) -> None:
    with running(settings, clock) as service:
        assert service.http.post("/book-slot", json=body(9, date=TOMORROW)).status_code == 200
        assert service.book(5).status_code == 200
        assert service.book(6, BOB).status_code == 200
        assert waitlist(service, "join", 6, ALICE).status_code == 200
        path = link(service)
        calendar = parse_feed(service.http.get(path))
        assert calendar["X-WR-CALNAME"] == "ReRo lab: my slots"
        zone = calendar.walk("VTIMEZONE")
        assert [str(z["TZID"]) for z in zone] == ["Asia/Kolkata"]
        events = events_of(calendar)
        assert set(events) == {uid(TOMORROW, 9), uid(TODAY, 5), uid(TODAY, 6)}
        nine = events[uid(TOMORROW, 9)]
        assert nine["DTSTART"].params["TZID"] == "Asia/Kolkata"
        assert nine.decoded("DTSTART") == datetime(2026, 11, 25, 9, tzinfo=IST)
        assert nine.decoded("DTEND") == datetime(2026, 11, 25, 10, tzinfo=IST)
        assert str(nine["SUMMARY"]) == "ReRo lab: slot 09:00-10:00" and str(nine["STATUS"]) == "CONFIRMED"
        alarms = nine.walk("VALARM")
        assert len(alarms) == 1 and alarms[0].decoded("TRIGGER") == -timedelta(minutes=15)
        assert str(alarms[0]["ACTION"]) == "DISPLAY"
        place = events[uid(TODAY, 6)]
        assert str(place["STATUS"]) == "TENTATIVE" and "number 1 in line" in str(place["SUMMARY"])
        assert not place.walk("VALARM")  # no reminder for a slot that is not yours (yet)
        assert str(place["TRANSP"]) == "TRANSPARENT" and str(nine["TRANSP"]) == "OPAQUE"  # only yours is busy

        # Bob cancels: the slot Alice waited for is hers, under the same UID
        assert service.cancel(6, BOB).status_code == 200
        # Alice cancels 09:00 tomorrow: it stays in her feed, cancelled, so her calendar drops it
        assert service.http.post("/cancel-slot", json=body(9, date=TOMORROW)).status_code == 200
        events = events_of(parse_feed(service.http.get(path)))
        six = events[uid(TODAY, 6)]
        assert str(six["STATUS"]) == "CONFIRMED" and six.walk("VALARM")
        assert six.decoded("SEQUENCE") > place.decoded("SEQUENCE")  # a revision: calendar apps take it
        assert six.decoded("DTSTAMP") >= place.decoded("DTSTAMP")
        nine = events[uid(TOMORROW, 9)]
        assert str(nine["STATUS"]) == "CANCELLED" and not nine.walk("VALARM")
        assert nine.decoded("DTSTART") == datetime(2026, 11, 25, 9, tzinfo=IST)

        clock.set("2026-12-02 09:00")  # a week and a day on: the cancellation has gone, the bookings stay
        assert set(events_of(parse_feed(service.http.get(path)))) == {
            uid(TODAY, 5), uid(TODAY, 6)}
        clock.set("2026-12-25 09:00")  # over 30 days on: past bookings have gone too
        assert events_of(parse_feed(service.http.get(path))) == {}


def test_asking_again_rotates_the_link_and_unlink_removes_it(service: Service, settings: Settings) -> None:
    first = link(service)
    assert service.http.get(first).status_code == 200
    second = link(service)
    assert second != first and len(second) == len("/calendar/.ics") + 43
    response = service.http.get(first)
    assert response.status_code == 404 and response.json() == {
        "detail": "No such calendar (the link was replaced or removed)"}
    assert service.http.get(second).status_code == 200
    bob = link(service, BOB)  # each member has their own
    assert service.http.post("/calendar/unlink", json=body()).json() == {
        "success": True, "feed": "member", "message": "Calendar link removed"}
    assert service.http.get(second).status_code == 404 and service.http.get(bob).status_code == 200
    again = service.http.post("/calendar/unlink", json=body())
    assert again.json()["message"] == "There was no calendar link to remove"
    for guess in ("/calendar/" + "A" * 43 + ".ics", "/calendar/x.ics", "/calendar/" + "A" * 5000 + ".ics",
                  "/calendar/..%2F..%2Fetc.ics", "/calendar/link.ics"):
        response = service.http.get(guess)
        assert response.status_code == 404 and response.json()["detail"], guess  # JSON, like every error
    with contextlib.closing(sqlite3.connect(settings.database_path)) as conn:
        stored = conn.execute("SELECT secret_hash, srn, kind FROM calendar_links").fetchall()
    secret = bob.removeprefix("/calendar/").removesuffix(".ics")
    assert stored == [(hashlib.sha256(secret.encode()).hexdigest(), BOB, "member")]  # only a hash
    files = list(Path(settings.database_path).parent.iterdir())
    assert not any(secret.encode() in path.read_bytes() for path in files)


def test_the_last_slot_of_a_day_ending_at_midnight_ends_at_24_00_everywhere(settings: Settings) -> None:
    with running(replace(settings, slot_end_hour=24)) as service:
        assert service.book(23).status_code == 200
        slot = next(s for s in service.slots()["slots"] if s["id"] == 23)
        mine = service.http.post("/my-bookings", json=body(None)).json()["bookings"]
        summary = str(next(iter(events_of(parse_feed(service.http.get(link(service)))).values()))["SUMMARY"])
    assert (slot["start_time"], slot["end_time"]) == ("23:00", "24:00")
    assert [(b["start_time"], b["end_time"]) for b in mine] == [("23:00", "24:00")]
    assert "23:00-24:00" in summary, summary  # the feed had "23:00-00:00"


def test_a_feed_answers_304_until_something_changes(service: Service) -> None:
    path = link(service)
    first = service.http.get(path)
    etag = first.headers["etag"]
    assert etag.startswith('"') and first.headers["cache-control"] == "private, no-cache"
    again = service.http.get(path, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert service.http.get(path, headers={"If-None-Match": f'"other", W/{etag}'}).status_code == 304
    assert service.http.get(path, headers={"If-None-Match": '"other"'}).status_code == 200
    assert service.http.head(path).headers["etag"] == etag
    assert service.book(9, BOB).status_code == 200  # someone else's booking: Alice's feed is the same
    assert service.http.get(path, headers={"If-None-Match": etag}).status_code == 304
    assert service.book(9).status_code == 400 and service.book(10).status_code == 200
    changed = service.http.get(path, headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag


def test_the_lab_feed_is_for_admins(settings: Settings, clock: Clock) -> None:
    with running(replace(settings, admin_srns=frozenset({CAROL})), clock) as service:
        response = service.http.post("/calendar/link", json=body(feed="lab"))
        assert response.status_code == 403 and response.json() == {"detail": "Admins only"}
        assert service.http.post("/calendar/link", json=body(feed="everything")).status_code == 422
        assert service.book(9).status_code == 200
        assert service.http.post("/book-slot", json=body(10, BOB, date=TOMORROW)).status_code == 200
        assert service.http.post("/admin/close-slot", json=body(14, CAROL)).status_code == 200
        assert service.http.post("/admin/close-slot", json=body(13, CAROL)).status_code == 200
        assert service.http.post("/admin/open-slot", json=body(13, CAROL)).status_code == 200
        lab = link(service, CAROL, "lab")
        mine = link(service, CAROL)
        assert lab != mine and service.http.get(mine).status_code == 200  # an admin has both
        calendar = parse_feed(service.http.get(lab))
        assert calendar["X-WR-CALNAME"] == "ReRo lab: all slots"
        events = {uid: (str(e["STATUS"]), str(e["SUMMARY"])) for uid, e in events_of(calendar).items()}
        assert events == {
            f"{TODAY}-slot09-lab@rero-slots": ("CONFIRMED", f"ReRo lab: slot 09:00-10:00 booked by {ALICE}"),
            f"{TOMORROW}-slot10-lab@rero-slots": ("CONFIRMED", f"ReRo lab: slot 10:00-11:00 booked by {BOB}"),
            f"{TODAY}-slot14-lab@rero-slots": ("CONFIRMED", "ReRo lab: slot 14:00-15:00 closed"),
            f"{TODAY}-slot13-lab@rero-slots": ("CANCELLED", "ReRo lab: slot 13:00-14:00 (cancelled)"),
        }
    with running(settings, clock) as service:  # Carol is no longer an admin: her lab feed is closed
        assert service.http.get(lab).status_code == 404
        assert service.http.get(mine).status_code == 200


def test_feed_times_are_right_across_a_change_to_summer_time(settings: Settings) -> None:
    london = ZoneInfo("Europe/London")
    clock = Clock(datetime(2027, 3, 22, 8, 0, tzinfo=london))  # Monday; the clocks go forward on the 28th
    with running(replace(settings, timezone="Europe/London", booking_days_ahead=14), clock) as service:
        for date in ("2027-03-26", "2027-03-29", "2027-04-01"):
            assert service.http.post("/book-slot", json=body(9, date=date)).status_code == 200
        calendar = parse_feed(service.http.get(link(service)))
    zone = calendar.walk("VTIMEZONE")[0]
    assert str(zone["TZID"]) == "Europe/London"
    ours = zone.to_tz()  # the rules as our VTIMEZONE states them, read by the library
    for event in calendar.walk("VEVENT"):
        start = event.decoded("DTSTART")
        local = start.replace(tzinfo=None)
        assert local.hour == 9
        assert local.replace(tzinfo=ours).utcoffset() == local.replace(tzinfo=london).utcoffset()
    offsets = {event.decoded("DTSTART").date().isoformat(): event.decoded("DTSTART").utcoffset()
               for event in calendar.walk("VEVENT")}
    assert offsets == {"2027-03-26": timedelta(0), "2027-03-29": timedelta(hours=1), "2027-04-01": timedelta(hours=1)}
    for moment in (datetime(2027, 10, 31, 0, 30), datetime(2027, 10, 31, 1, 30), datetime(2027, 12, 31, 12)):
        assert moment.replace(tzinfo=ours).utcoffset() == moment.replace(tzinfo=london).utcoffset()


@pytest.mark.parametrize("name", ["America/New_York", "Australia/Sydney", "Europe/Dublin", "Asia/Kolkata"])
def test_the_feeds_time_zone_says_what_zoneinfo_says(name: str) -> None:
    """The VTIMEZONE we write, read back by the library, gives every instant of three years the offset the
    tz database gives it; and summer is daylight time, even in Dublin (whose tz data calls winter the
    exception)."""
    import slots

    zone = ZoneInfo(name)
    text = "\r\n".join(["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:test", *slots.vtimezone(zone, 2026, 2028),
                         "END:VCALENDAR", ""])
    ours = icalendar.Calendar.from_ical(text).walk("VTIMEZONE")[0]
    rules = ours.to_tz()
    moment = datetime(2026, 1, 1, tzinfo=timezone.utc)
    while moment.year < 2029:
        assert moment.astimezone(rules).utcoffset() == moment.astimezone(zone).utcoffset(), moment
        moment += timedelta(minutes=30)
    summer = datetime(2027, 7, 1, 12) if zone.key != "Australia/Sydney" else datetime(2027, 1, 1, 12)
    kinds = {(part.name, part.decoded("TZOFFSETTO")) for part in ours.subcomponents}
    expected = "DAYLIGHT" if summer.replace(tzinfo=zone).dst() or zone.key == "Europe/Dublin" else "STANDARD"
    assert (expected, summer.replace(tzinfo=zone).utcoffset()) in kinds


def test_long_names_are_folded_at_75_octets_and_the_reminder_follows_the_setting(settings: Settings) -> None:
    club = "ರೋಬೋಟಿಕ್ಸ್ ಲ್ಯಾಬ್, PES; \\ Robotics"  # Kannada: 3 octets a character; and what TEXT must escape
    with running(replace(settings, club_name=club, calendar_reminder_minutes=0)) as service:
        assert service.book(9).status_code == 200
        response = service.http.get(link(service))
    calendar = parse_feed(response)  # every physical line at most 75 octets, whole characters
    assert b"\r\n " in response.content  # ... because long lines were folded
    event = next(iter(events_of(calendar).values()))
    assert str(event["SUMMARY"]) == f"{club}: slot 09:00-10:00"
    assert not event.walk("VALARM")  # CALENDAR_REMINDER_MINUTES=0: no reminder


def test_rotated_and_guessed_feeds_are_kept_within_a_byte_budget(settings: Settings, clock: Clock,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import slots

    monkeypatch.setattr(slots, "FEED_CACHE_BYTES", 256 * 1024)
    with running(replace(settings, admin_srns=frozenset({CAROL})), clock) as service:
        every_day = {"action": "close", "slots": list(range(3, 15)), "weekdays": list(slots.WEEKDAYS),
                     "from": TOMORROW, "until": "2027-01-31"}
        assert series(service, **every_day).status_code == 200
        sizes = []
        for _ in range(12):  # an admin who keeps asking for a new link to a big feed
            sizes.append(len(service.http.get(link(service, CAROL, "lab")).content))
        mine = link(service, ALICE)
        assert service.http.get(mine).status_code == 200
        feeds = service.state["board"].feeds
        kept = feeds[hashlib.sha256(mine.split("/")[-1].removesuffix(".ics").encode()).hexdigest()]
        for n in range(2000):  # a guessing flood: none of it is kept, and the member's feed stays
            assert service.http.get(f"/calendar/{n:043d}.ics").status_code == 404
        assert min(sizes) > 64 * 1024  # each feed is big: twelve of them would not fit
        assert all(entry[1] is not None for entry in feeds.values()) and kept in feeds.values()
        assert sum(slots.FEED_ENTRY_BYTES + len(entry[1].body) for entry in feeds.values()) <= 256 * 1024
        assert service.http.get(link(service, CAROL, "lab")).status_code == 200


def test_simultaneous_fetches_of_one_feed_share_one_build(settings: Settings, clock: Clock) -> None:
    with running(settings, clock) as service:
        path = link(service)
        store = service.state["board"].store
        builds = 0
        read = store.feed

        async def slow_read(*args: Any) -> Any:
            nonlocal builds
            builds += 1
            await asyncio.sleep(0.2)  # a member with a long history: every fetch meanwhile waits for this one
            return await read(*args)

        token = login(service)
        time.sleep(0.3)  # (the login guard's commits, which the watcher takes for a change, are in)
        store.feed = slow_read
        response = service.http.post("/book-slot", json={"slot_id": 9}, headers=bearer(token))
        assert response.status_code == 200  # the feed changed: the next fetch builds it anew
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda _: httpx.get(service.server.url + path, timeout=10), range(50)))
        assert {answer.status_code for answer in answers} == {200}
        assert len({answer.headers["etag"] for answer in answers}) == 1
        assert builds == 1


def test_building_a_feed_costs_the_same_however_long_the_clubs_history(tmp_path: Path) -> None:
    """A member's feed reads their own slots and the last week's removals, through indexes: a club's
    year of other members' changes in the same weeks adds nothing, nor do 20,000 of the member's own. The
    same for another worker's look at what changed since it last looked."""

    async def steps(store: db.SlotStore, call: Any) -> int:
        count = 0

        def tick() -> int:
            nonlocal count
            count += 1
            return 0

        connections = {store.conn, getattr(store, "reader", store.conn)}  # long reads have their own
        for conn in connections:
            conn.set_progress_handler(tick, 10)  # one tick per 10 SQLite instructions
        try:
            await call()
        finally:
            for conn in connections:
                conn.set_progress_handler(None, 0)
        return count

    async def costs(history: int) -> tuple[int, int]:
        path = str(tmp_path / f"rero-{history}.db")
        store = db.SlotStore(path, range(3, 15))
        version = await store.open(TODAY, "2026-11-24 01:00:00")
        with contextlib.closing(sqlite3.connect(path)) as other:
            other.executemany(
                "INSERT INTO events (at, srn, action, date, slot_id, via) VALUES (?, ?, ?, ?, ?, 'http')",
                [("2026-11-01 10:00:00", f"PES{n}", ("book", "cancel", "join")[n % 3],
                  f"2026-11-{1 + n % 23:02d}", 3 + n % 12) for n in range(history)],  # November, before today
            )
            other.execute("INSERT INTO calendar_links VALUES ('hash', ?, 'member', '2026-11-24 01:00:00')", (ALICE,))
            other.execute("INSERT INTO calendar_links VALUES ('lab', ?, 'lab', '2026-11-24 01:00:00')", (CAROL,))
            for slot_id in (5, 6, 7):  # Alice's own: three bookings, one cancelled
                other.execute("INSERT INTO bookings (date, slot_id, booked_by, booked_at) VALUES (?, ?, ?, ?)",
                              (TOMORROW, slot_id, ALICE, "2026-11-23 09:00:00"))
                other.execute("INSERT INTO events (at, srn, action, date, slot_id, via) VALUES"
                              " ('2026-11-23 09:00:00', ?, 'book', ?, ?, 'http')", (ALICE, TOMORROW, slot_id))
            other.executemany(  # and her own history: a book/cancel loop on one slot, in the feed's window
                "INSERT INTO events (at, srn, action, date, slot_id, via) VALUES (?, ?, ?, ?, 8, 'http')",
                [("2026-11-23 09:30:00", ALICE, ("book", "cancel")[n % 2], TOMORROW) for n in range(history)])
            other.execute("INSERT INTO events (at, srn, action, date, slot_id, via) VALUES"
                          " ('2026-11-23 10:00:00', ?, 'cancel', ?, 8, 'http')", (ALICE, TOMORROW))
            other.commit()
            await store.changes_since(version, 0)  # take in the history, as a worker's watcher would
            version = (await store.day(TODAY))[0]
            other.execute("INSERT INTO events (at, srn, action, date, slot_id, via) VALUES"
                          " ('2026-11-24 01:00:00', ?, 'book', ?, 5, 'http')", (BOB, TODAY))
            other.commit()
        feed = await steps(store, lambda: store.feed("hash", "2026-10-25", TODAY, "2027-05-25", "2026-11-17"))
        look = await steps(store, lambda: store.changes_since(version, 0))
        mine = await steps(store, lambda: store.history("2026-11-01", None, BOB, 50, 0))  # (Alice's counts hers)
        lab = await steps(store, lambda: store.feed("lab", "2026-10-25", TODAY, "2027-05-25", "2026-11-17"))
        await store.close()
        return feed, look, mine, lab

    quiet, busy = asyncio.run(costs(0)), asyncio.run(costs(20_000))
    assert quiet[0] > 0 and busy[0] <= quiet[0] + 10 and busy[1] <= quiet[1] + 10, (quiet, busy)
    assert busy[2] <= quiet[2] + 10, (quiet, busy)  # an admin reading one member's history
    assert busy[3] <= quiet[3] * 1.5, (quiet, busy)  # the lab's feed: a step down the index per slot


# -- the HTTP API, as in the README, and its documentation ---------------------------------------------------


def conforms(value: Any, schema: dict[str, Any], document: dict[str, Any], where: str = "$") -> None:
    """Assert value matches schema (the JSON Schema subset the document uses: $ref, type, properties,
    required, items)."""
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
             "integer": int, "number": (int, float)}
    allowed = schema.get("type")
    if allowed is not None:
        names = allowed if isinstance(allowed, list) else [allowed]
        ok = any(isinstance(value, kinds[name]) and not (name in ("integer", "number") and isinstance(value, bool))
                 for name in names)
        assert ok, f"{where}: {value!r} is not {allowed}"
    if isinstance(value, dict):
        for name in schema.get("required", []):
            assert name in value, f"{where}: {name} missing"
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                conforms(value[name], sub, document, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            conforms(item, schema["items"], document, f"{where}[{i}]")


def test_root_health_stats_and_slots_show_twelve_free_slots(service: Service) -> None:
    root = service.http.get("/").json()
    assert root == {"message": "Slot Booking API is running", "websocket_endpoint": "/slot-booking",
                    "active_connections": 0, "booked_slots": []}
    slots = service.slots()
    assert [s["id"] for s in slots["slots"]] == list(range(3, 15))
    assert slots["slots"][0] == {"id": 3, "start_time": "03:00", "end_time": "04:00", "is_booked": False,
                                 "booked_by": None, "booked_at": None, "closed": False, "reason": None,
                                 "status": "available", "waiting": 0, "checked_in": False, "date": TODAY}
    assert slots["slots"][-1]["start_time"] == "14:00" and slots["slots"][-1]["end_time"] == "15:00"
    assert slots["available_slots"] == list(range(3, 15)) and slots["booked_slots"] == []
    health = service.http.get("/health").json()
    assert health["status"] == "healthy" and health["total_slots"] == 12
    assert health["booked_slots_count"] == 0 and health["available_slots_count"] == 12
    assert health["database"]["database_path"].endswith("rero.db")
    stats = service.http.get("/stats").json()
    assert stats["slots"] == {"total": 12, "booked": 0, "available": 12}
    assert stats["websocket"] == {"active_connections": 0}


def test_login_returns_the_profile(service: Service) -> None:
    response = service.http.post("/auth/login", json={"username": ALICE, "password": PASSWORD})
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True and body["message"] == "Login successful"
    assert body["user"] == {"name": "Member 1", "srn": ALICE, "prn": ALICE, "program": "Bachelor of Technology",
                            "branch": "Computer Science and Engineering", "campus": "RR"}


@pytest.mark.parametrize("username", [ALICE, "OLDAPI123"])
@pytest.mark.parametrize("route", ["/auth/login", "/book-slot", "/cancel-slot", "/my-bookings"])
def test_wrong_password_is_401_on_every_route(service: Service, route: str, username: str) -> None:
    response = service.http.post(route, json={"slot_id": 5, "username": username, "password": "wrong"})
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid credentials"}


@pytest.mark.parametrize("username", ["DOWN1", "SLOW1", "GARBAGE1"])
def test_pesu_trouble_is_503_never_invalid_credentials(service: Service, username: str) -> None:
    for route in ("/auth/login", "/book-slot"):
        response = service.http.post(route, json={"slot_id": 5, "username": username, "password": PASSWORD})
        assert response.status_code == 503
        assert response.json() == {"detail": "Authentication service unavailable"}
    assert service.slots()["booked_slots"] == []


def test_unreachable_pesu_is_503(settings: Settings) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with running(replace(settings, pesu_auth_url=f"http://127.0.0.1:{port}/authenticate")) as service:
        response = service.http.post("/auth/login", json={"username": ALICE, "password": PASSWORD})
    assert response.status_code == 503


def test_book_cancel_and_my_bookings(service: Service) -> None:
    response = service.book(5)
    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "Slot 5 booked successfully", "slot_id": 5}
    slot = service.slots()["slots"][2]
    assert slot["id"] == 5 and slot["is_booked"] is True and slot["booked_by"] == ALICE and slot["booked_at"]
    assert service.slots()["booked_slots"] == [5]

    mine = service.http.post("/my-bookings", json={"username": ALICE, "password": PASSWORD}).json()
    assert mine["success"] is True and mine["total_bookings"] == 1
    assert mine["bookings"] == [{"id": 5, "start_time": "05:00", "end_time": "06:00",
                                 "booked_at": slot["booked_at"], "date": TODAY}]
    assert slot["booked_at"] == "2026-11-24 01:00:00"

    response = service.cancel(5)
    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "Slot 5 booking cancelled successfully", "slot_id": 5}
    assert service.slots()["booked_slots"] == []


def test_second_booker_is_told_slot_is_taken(service: Service) -> None:
    assert service.book(9).status_code == 200
    response = service.book(9, BOB)
    assert response.status_code == 400
    assert response.json() == {"detail": "Slot 9 is not available"}
    assert service.slots()["slots"][6]["booked_by"] == ALICE


def test_only_your_own_booking_can_be_cancelled(service: Service) -> None:
    service.book(9)
    response = service.cancel(9, BOB)
    assert response.status_code == 400 and "only cancel your own" in response.json()["detail"]
    response = service.cancel(10)
    assert response.status_code == 400 and response.json() == {"detail": "Slot 10 is not booked"}
    assert service.slots()["booked_slots"] == [9]


@pytest.mark.parametrize("slot_id", [99, 2, 15, -1, 0, 10**18])
def test_no_such_slot_is_400(service: Service, slot_id: int) -> None:
    for call in (service.book, service.cancel):
        response = call(slot_id)
        assert response.status_code == 400
        assert response.json() == {"detail": f"Slot {slot_id} does not exist"}


def test_a_slot_id_too_big_for_any_integer_is_refused(service: Service) -> None:
    response = service.book(10**30)
    assert response.status_code == 422 and response.json() == {"detail": "slot_id must be an integer"}


def test_slot_id_may_be_a_numeric_string_as_in_the_original(service: Service) -> None:
    assert service.book("7").json()["slot_id"] == 7


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b"not json", 400, "Request body must be valid JSON"),
        (b"", 401, "Sign in: send username and password, or Authorization: Bearer TOKEN"),  # no credentials at all
        (b"[1, 2]", 400, "Request body must be a JSON object"),
        (b"null", 400, "Request body must be a JSON object"),
        (b'{"username": "PES1UG20CS001", "password": "x"}', 422, "slot_id is required"),
        (b'{"slot_id": 5, "password": "x"}', 422, "username and password are required"),
        (b'{"slot_id": "abc", "username": "a", "password": "x"}', 422, "slot_id must be an integer"),
        (b'{"slot_id": 5.5, "username": "a", "password": "x"}', 422, "slot_id must be an integer"),
        (b'{"slot_id": true, "username": "a", "password": "x"}', 422, "slot_id must be an integer"),
        (b'{"slot_id": [5], "username": "a", "password": "x"}', 422, "slot_id must be an integer"),
        (b'{"slot_id": 5, "username": 12, "password": "x"}', 422, "username must be a non-empty string"),
        (b'{"slot_id": 5, "username": "a", "password": ""}', 422, "password must be a non-empty string"),
        (b'{"slot_id": 5, "username": "a", "password": "x", "date": 20261125}', 400,
         "Invalid date '20261125': use YYYY-MM-DD"),
        (b'{"slot_id": 5, "username": "a", "password": "x", "date": ' + DEEP + b"}", 400,
         "Invalid date '[...]': use YYYY-MM-DD"),
    ],
)
def test_malformed_bodies_get_a_clear_error_and_change_nothing(
    service: Service, fake_pesu: tuple[FakePesu, str], body: bytes, status: int, detail: str
) -> None:
    calls = len(fake_pesu[0].calls)
    for route in ("/book-slot", "/cancel-slot"):
        response = service.http.post(route, content=body, headers={"content-type": "application/json"})
        assert response.status_code == status
        assert response.json() == {"detail": detail}
    assert service.slots()["booked_slots"] == []
    assert len(fake_pesu[0].calls) == calls  # refused before anyone asked PESU


def test_body_over_64_kib_is_413(service: Service) -> None:
    padding = "x" * (64 * 1024)
    response = service.http.post("/book-slot", json={"slot_id": 5, "username": ALICE, "password": PASSWORD,
                                                      "padding": padding})
    assert response.status_code == 413 and "too large" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming too
        yield b'{"padding": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    response = service.http.post("/book-slot", content=chunks())
    assert response.status_code == 413
    assert service.slots()["booked_slots"] == []


def test_unknown_route_and_method_are_json(service: Service) -> None:
    assert service.http.get("/nope").json() == {"detail": "Not Found"}
    response = service.http.get("/book-slot")
    assert response.status_code == 405 and response.json() == {"detail": "Method Not Allowed"}


def test_my_bookings_lists_upcoming_bookings_across_days(service: Service, clock: Clock) -> None:
    service.http.post("/book-slot", json=body(4, date="2026-11-26"))
    service.http.post("/book-slot", json=body(12, date=TOMORROW))
    service.book(5)
    service.book(7)
    clock.set("2026-11-24 06:15")  # slot 5 has ended, 7 is ahead
    mine = service.http.post("/my-bookings", json=body()).json()
    assert [(b["date"], b["id"]) for b in mine["bookings"]] == [(TODAY, 7), (TOMORROW, 12), ("2026-11-26", 4)]
    assert mine["total_bookings"] == 3


def test_every_route_has_its_documentation() -> None:
    """The API docs are keyed by the route table: a route added without its entry is named here."""
    routes = {(method, route.path) for route in app_module.ROUTES if isinstance(route, Route)
              for method in app_module.route_methods(route)}
    assert not routes - set(app_module.DOCS), f"routes without documentation: {sorted(routes - set(app_module.DOCS))}"
    assert not set(app_module.DOCS) - routes, f"documentation of no route: {sorted(set(app_module.DOCS) - routes)}"
    for kind in app_module.SOCKET_ACTIONS:  # and the socket protocol names every message the socket takes
        assert f'"{kind}"' in app_module.SOCKET_PROTOCOL, kind


def test_the_openapi_document_covers_every_route_and_real_answers_match_it(settings: Settings) -> None:
    with running(replace(settings, metrics=True, admin_srns=frozenset({ALICE}))) as service:
        document = service.http.get("/openapi.json").json()
        assert document["openapi"].startswith("3.1") and "/slot-booking" in document["info"]["description"]
        http_routes = {route.path for route in service.server.app.routes if isinstance(route, Route)}
        assert http_routes == set(document["paths"])

        token = login(service)
        calls = [
            ("get", "/", {}), ("get", "/health", {}), ("get", "/stats", {}), ("get", "/slots", {}),
            ("get", "/slots", {"params": {"date": "nope"}}),
            ("post", "/book-slot", {"json": body(5)}), ("post", "/book-slot", {"json": body(5)}),
            ("post", "/book-slot", {"json": {"slot_id": 5}}), ("post", "/book-slot", {"content": b"{"}),
            ("post", "/cancel-slot", {"json": body(5, BOB, password="wrong")}),
            ("post", "/my-bookings", {"headers": bearer(token)}),
            ("post", "/admin/close-slot", {"json": body(6)}), ("post", "/admin/open-slot", {"json": body(6)}),
            ("post", "/admin/history", {"json": body()}), ("post", "/admin/history", {"json": body(username=BOB)}),
            ("post", "/auth/login", {"json": body(username="DOWN1")}),
            ("post", "/admin/series", {"json": body(action="close", slots=[12], weekdays=["wed"],
                                                     **{"from": TOMORROW, "until": TOMORROW})}),
            ("post", "/admin/series", {"json": body(action="close", slots=[12], weekdays=["wed"])}),
            ("get", "/admin/series", {"headers": bearer(token)}), ("get", "/admin/series", {}),
            ("post", "/admin/series/cancel", {"json": body(series_id=1)}),
            ("post", "/admin/series/cancel", {"json": body(series_id=1)}),
            ("post", "/calendar/link", {"json": body(username=BOB, feed="lab")}),
            ("post", "/calendar/unlink", {"json": body()}),
            ("post", "/calendar/link", {"json": body()}),
            ("post", "/auth/logout", {"headers": bearer(token)}),
            ("post", "/auth/logout", {"headers": bearer(token)}),
        ]
        seen = set()
        for method, path, options in calls:
            response = service.http.request(method, path, **options)
            declared = document["paths"][path][method]["responses"]
            assert str(response.status_code) in declared, f"{method} {path} answered {response.status_code}"
            schema = declared[str(response.status_code)]["content"]["application/json"]["schema"]
            conforms(response.json(), schema, document, f"{method} {path} {response.status_code}")
            seen.add(response.status_code)
        assert seen >= {200, 400, 401, 403, 422, 503}
        feed = service.http.get(service.http.post("/calendar/link", json=body()).json()["path"])
        declared = document["paths"]["/calendar/{secret}.ics"]["get"]["responses"]
        assert feed.headers["content-type"].split(";")[0] in declared["200"]["content"]
        assert "304" in declared and service.http.get(feed.request.url, headers={"If-None-Match": feed.headers["etag"]}
                                                      ).status_code == 304
        missing = service.http.get("/calendar/" + "A" * 43 + ".ics")
        conforms(missing.json(), declared["404"]["content"]["application/json"]["schema"], document, "feed 404")

        page = service.http.get("/docs")
        assert page.status_code == 200 and "swagger-ui" in page.text
        assert "<code>POST /book-slot</code>" in page.text  # the plain list, for when the CDN is unreachable
        assert service.http.get("/metrics").headers["content-type"].startswith("text/plain")


# -- sessions and limits: tokens, and guessing slowed --------------------------------------------------------


@pytest.fixture
def slow_pesu(fake_pesu: tuple[FakePesu, str]) -> Iterator[FakePesu]:
    """The fake PESU, answering after 0.3 s for this test only."""
    fake = fake_pesu[0]
    fake.delay, fake.peak = 0.3, 0
    try:
        yield fake
    finally:
        fake.delay = 0.0


def logins_at_once(url: str, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None) -> list[httpx.Response]:
    """POST /auth/login with every body at the same instant."""
    async def all_at_once() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            return await asyncio.gather(*(client.post("/auth/login", json=b, headers=headers) for b in bodies))

    return asyncio.run(all_at_once())


LOGINS_AT_ONCE = """
import asyncio, json, sys
import httpx
url, bodies, headers = json.load(sys.stdin)
async def main():
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=None)) as client:
        answers = await asyncio.gather(*(client.post("/auth/login", json=b, headers=headers) for b in bodies))
    print(json.dumps([a.status_code for a in answers]))
asyncio.run(main())
"""


def logins_at_once_elsewhere(url: str, bodies: list[dict[str, Any]], headers: dict[str, str]) -> subprocess.Popen[str]:
    """POST /auth/login with every body at the same instant, from another process (an attacker's machine):
    its statuses, as JSON, are what the process prints."""
    child = subprocess.Popen([sys.executable, "-c", LOGINS_AT_ONCE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdin is not None
    child.stdin.write(orjson.dumps([url, bodies, headers]).decode())
    child.stdin.close()
    return child


def test_a_login_token_works_instead_of_the_password(service: Service) -> None:
    answer = service.http.post("/auth/login", json={"username": ALICE, "password": PASSWORD}).json()
    assert answer["user"]["srn"] == ALICE and answer["expires_in"] == 3600
    token = answer["token"]
    assert PASSWORD not in token and ALICE.encode() in base64.urlsafe_b64decode(token.split(".")[0] + "==")

    booked_ = service.http.post("/book-slot", json={"slot_id": 5}, headers=bearer(token))
    assert booked_.status_code == 200 and service.slots()["booked_slots"] == [5]
    mine = service.http.post("/my-bookings", headers=bearer(token))  # no body at all
    assert [b["id"] for b in mine.json()["bookings"]] == [5]
    who = service.http.post("/auth/login", headers=bearer(token)).json()
    assert who["user"] == {"srn": ALICE} and who["token"] == token and 0 < who["expires_in"] <= 3600

    ws = service.socket()
    reply = send(ws, {"type": "cancel_slot", "slot_id": 5, "token": token})
    assert reply["type"] == "cancellation_response" and reply["success"] is True
    assert service.slots()["booked_slots"] == []


def test_tampered_expired_and_revoked_tokens_are_refused(service: Service, clock: Clock) -> None:
    token = login(service)
    claims, signature = token.split(".")
    forged = base64.urlsafe_b64encode(orjson.dumps({"srn": BOB, "exp": 9999999999, "jti": "x"})).decode()
    refused = {"detail": "Invalid or expired token"}
    for bad in (claims + "." + signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB"),
                forged.rstrip("=") + "." + signature, "not-a-token", "a.b"):
        response = service.http.post("/book-slot", json={"slot_id": 5}, headers=bearer(bad))
        assert (response.status_code, response.json()) == (401, refused)
    basic = service.http.post("/my-bookings", headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"})
    assert basic.status_code == 401
    ws = service.socket()
    reply = send(ws, {"type": "book_slot", "slot_id": 5, "token": "not-a-token"})
    assert reply["success"] is False and reply["message"] == "Invalid or expired token"

    # revoked: logout, and the token is dead for the rest of its life
    other = login(service)
    assert service.http.post("/auth/logout", headers=bearer(other)).json()["success"] is True
    assert service.http.post("/my-bookings", headers=bearer(other)).status_code == 401
    assert service.http.post("/auth/logout", headers=bearer(other)).status_code == 401
    assert service.http.post("/my-bookings", headers=bearer(token)).status_code == 200  # others live on

    clock.set("2026-11-24 02:01")  # 61 minutes after it was issued
    assert service.http.post("/my-bookings", headers=bearer(token)).json() == refused
    assert service.slots()["booked_slots"] == []


def test_a_token_signed_out_on_one_worker_is_refused_by_another(settings: Settings) -> None:
    secret = {"SESSION_SECRET": "a-shared-secret-for-this-test"}
    with process(settings, **secret) as (_, url_a), process(settings, **secret) as (_, url_b):
        token = httpx.post(f"{url_a}/auth/login", json={"username": ALICE, "password": PASSWORD}).json()["token"]
        assert httpx.post(f"{url_b}/my-bookings", headers=bearer(token)).status_code == 200
        assert httpx.post(f"{url_b}/auth/logout", headers=bearer(token)).status_code == 200
        deadline = time.monotonic() + 5
        while httpx.post(f"{url_a}/my-bookings", headers=bearer(token)).status_code != 401:
            assert time.monotonic() < deadline, "worker A still accepts the revoked token"
            time.sleep(0.05)


def test_a_token_signed_out_stays_refused_after_a_restart(settings: Settings) -> None:
    secret = {"SESSION_SECRET": "a-shared-secret-for-this-test"}
    with process(settings, **secret) as (_, url):
        token = httpx.post(f"{url}/auth/login", json={"username": ALICE, "password": PASSWORD}).json()["token"]
        assert httpx.post(f"{url}/auth/logout", headers=bearer(token)).status_code == 200
    with process(settings, **secret) as (_, url):
        deadline = time.monotonic() + 5
        while httpx.post(f"{url}/my-bookings", headers=bearer(token)).status_code != 401:
            assert time.monotonic() < deadline, "the restarted app accepts a token signed out before"
            time.sleep(0.05)


def test_guesses_sent_at_the_same_instant_reach_pesu_at_most_five_times(
    settings: Settings, slow_pesu: FakePesu
) -> None:
    before = slow_pesu.calls.count(BOB)
    guesses = [{"username": BOB, "password": f"guess-{i}"} for i in range(300)]
    with running(replace(settings, pesu_timeout=5)) as service:
        answers = logins_at_once(service.server.url, guesses)
        assert slow_pesu.calls.count(BOB) - before == 5
        assert sorted({a.status_code for a in answers}) == [401, 429]
        assert all(a.headers["Retry-After"] == "1" for a in answers if a.status_code == 429)
        right = service.http.post("/auth/login", json={"username": BOB, "password": PASSWORD})
        assert right.status_code == 429  # the right password, after them, waits its turn like any guess


def test_guessing_is_slowed_per_address_and_never_locks_the_member_out(
    service: Service, clock: Clock, fake_pesu: tuple[FakePesu, str]
) -> None:
    def attempt(password: str, address: str = "203.0.113.5", username: str = BOB) -> httpx.Response:
        return service.http.post("/auth/login", json={"username": username, "password": password},
                                 headers={"X-Forwarded-For": address})

    assert attempt(PASSWORD, "198.51.100.7").status_code == 200  # Bob signed in earlier, from home
    for i in range(5):  # someone on the campus address guesses at Bob's SRN (it is public in booked_by)
        assert attempt(f"guess-{i}").status_code == 401
    asked = len(fake_pesu[0].calls)
    waits = []
    for i in range(7):  # each further guess must wait twice as long as the last, up to 30 s
        refused = attempt(f"more-{i}")
        assert refused.status_code == 429 and "try again in" in refused.json()["detail"]
        waits.append(int(refused.headers["Retry-After"]))
        clock.now += timedelta(seconds=waits[-1])
        assert attempt(f"more-{i}").status_code == 401
    assert waits == [1, 2, 4, 8, 16, 30, 30]
    assert len(fake_pesu[0].calls) == asked + 7  # a refused attempt never reaches PESU

    assert attempt(PASSWORD).status_code == 200  # a remembered password is never slowed
    assert service.book(5, username=BOB).status_code == 200
    assert attempt("new-password", "198.51.100.7").status_code == 401  # nor is any other address
    # Bob, on the campus address, with a password PESU has not confirmed here yet: in at the next turn
    assert attempt("not-cached-yet").status_code == 429
    clock.now += timedelta(seconds=30)
    assert attempt(PASSWORD.upper()).status_code == 401  # (his typo: it takes the turn, and the next waits)
    clock.now += timedelta(seconds=30)
    assert attempt(PASSWORD, username=BOB.lower()).status_code == 200  # the same member, however spelt


def test_one_address_cannot_spray_a_password_over_many_members(service: Service, clock: Clock,
                                                                fake_pesu: tuple[FakePesu, str]) -> None:
    before = len(fake_pesu[0].calls)
    sprayed = [f"PES1UG21EC{i:03d}" for i in range(150)]
    answers = [service.http.post("/auth/login", json={"username": s, "password": "Summer2026!"}) for s in sprayed]
    assert [a.status_code for a in answers] == [401] * 100 + [429] * 50
    assert len(fake_pesu[0].calls) - before == 100
    assert int(answers[-1].headers["Retry-After"]) <= 10  # the bucket refills: 100 per 15 minutes
    clock.now += timedelta(minutes=15)
    assert service.http.post("/auth/login", json={"username": ALICE, "password": PASSWORD}).status_code == 200


def test_two_hundred_members_behind_one_address_with_typos_are_never_slowed(service: Service, clock: Clock) -> None:
    statuses = []
    for i, member in enumerate(USERS):  # a lab evening: a member arrives every 3 s, some mistype twice
        clock.now += timedelta(seconds=3)
        for typo in range(i % 3):
            statuses.append(service.http.post("/auth/login", json={"username": member, "password": f"typo{typo}"})
                            .status_code)
        statuses.append(service.http.post("/auth/login", json={"username": member, "password": PASSWORD}).status_code)
    assert len(USERS) == 200 and 429 not in statuses and statuses.count(200) == 200


def test_members_signing_in_at_the_same_moment_behind_one_address_are_not_refused(
    settings: Settings, slow_pesu: FakePesu
) -> None:
    with running(replace(settings, pesu_timeout=5)) as service:  # the whole lab opens the page at once
        answers = logins_at_once(service.server.url, [{"username": m, "password": PASSWORD} for m in USERS])
    assert [a.status_code for a in answers] == [200] * 200


def test_a_rush_of_honest_logins_gets_in_within_two_checks_beside_a_flood_of_guesses(
    settings: Settings, fake_pesu: tuple[FakePesu, str]
) -> None:
    """200 members signing in at one instant while PESU takes 2 s per check, just after 400 wrong passwords
    from another address: 20 checks at a time made the last member wait 10 checks, and the guesses took
    the queue. Now 200 run at once, and one address holds at most half of places and queue: two checks."""
    fake = fake_pesu[0]
    fake.delay = 2.0
    try:
        with running(replace(settings, pesu_timeout=5)) as service:
            url = service.server.url
            guesses = [{"username": f"PES1UG21EC{i:03d}", "password": "guess"} for i in range(400)]
            guessing = logins_at_once_elsewhere(url, guesses, {"X-Forwarded-For": "10.1.2.3"})
            deadline = time.monotonic() + 10
            while fake.active < 20:  # the guesses are in before the members
                assert time.monotonic() < deadline and guessing.poll() is None, "the guesses never reached PESU"
                time.sleep(0.01)
            started = time.monotonic()
            answers = logins_at_once(url, [{"username": m, "password": PASSWORD} for m in USERS])
            took = time.monotonic() - started
            assert guessing.stdout is not None
            flood = orjson.loads(guessing.stdout.read())
            guessing.wait(30)
            guessing.stdout.close()
        assert [a.status_code for a in answers] == [200] * 200
        assert took < 8, f"the last member waited {took:.1f} s for checks of 2 s"  # (three would be 6 s)
        assert set(flood) <= {401, 429, 503} and flood.count(503) >= 200  # an address's half: 200 of 400
        assert fake.peak <= 200
    finally:
        fake.delay = 0.0


def test_a_login_flood_queues_for_pesu_and_members_with_tokens_keep_booking(settings: Settings,
                                                                            slow_pesu: FakePesu) -> None:
    tight = replace(settings, pesu_max_concurrency=2, pesu_max_queue=8, login_fails_per_address=0,
                    pesu_timeout=0.8)  # a check takes 0.3 s (limit 1.2 s); the last in the queue waits 1.2 s more
    with running(tight) as service:
        token = login(service)
        flood = [{"username": member, "password": PASSWORD} for member in list(USERS)[1:61]]
        results: list[list[httpx.Response]] = []
        flooding = threading.Thread(target=lambda: results.append(logins_at_once(service.server.url, flood)))
        flooding.start()
        time.sleep(0.1)
        assert service.http.get("/health").status_code == 200
        assert service.http.post("/book-slot", json={"slot_id": 5}, headers=bearer(token)).status_code == 200
        flooding.join(30)
        answered = [a for a in results[0] if a.status_code == 200]
        busy = [a for a in results[0] if a.status_code == 503]
        assert len(answered) >= 5  # one address holds half of two places and eight in the queue (and any
        # that came as places freed)
        assert len(answered) + len(busy) == 60 and len(busy) >= 30  # the rest at once, none timed out
        assert all(a.headers["Retry-After"] == "5" for a in busy)  # "busy", not "PESU is down" (30)
        assert busy[0].json()["detail"] == "Authentication service unavailable"
        assert slow_pesu.peak == 2


def test_two_hundred_tabs_signing_in_with_the_same_right_password_at_once(settings: Settings,
                                                                          slow_pesu: FakePesu) -> None:
    with running(replace(settings, pesu_timeout=5)) as service:
        answers = logins_at_once(service.server.url, [{"username": BOB, "password": PASSWORD}] * 200)
    assert [a.status_code for a in answers] == [200] * 200


def test_the_guess_limit_holds_across_two_processes(settings: Settings, slow_pesu: FakePesu) -> None:
    before = slow_pesu.calls.count(BOB)
    with process(settings, PESU_TIMEOUT_SECONDS="5") as (_, first), process(settings, PESU_TIMEOUT_SECONDS="5") as (_, second):
        guesses = [{"username": BOB, "password": f"guess-{i}"} for i in range(100)]
        at_once: list[list[httpx.Response]] = []
        threads = [threading.Thread(target=lambda url=url: at_once.append(logins_at_once(url, guesses)))
                   for url in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert slow_pesu.calls.count(BOB) - before <= 5
    assert sorted({a.status_code for answers in at_once for a in answers}) == [401, 429]


def test_signing_out_does_bounded_work_however_many_tokens_were_signed_out(service: Service, clock: Clock,
                                                                          settings: Settings) -> None:
    for _ in range(40):
        assert service.http.post("/auth/logout", headers=bearer(login(service))).status_code == 200
    clock.now += timedelta(minutes=61)  # every one of them has expired
    for _ in range(2):
        assert service.http.post("/auth/logout", headers=bearer(login(service))).status_code == 200
    with contextlib.closing(sqlite3.connect(settings.database_path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM revoked_tokens").fetchone()[0] == 40 + 2 - 2 * 16
        plan = conn.execute("EXPLAIN QUERY PLAN SELECT id FROM revoked_tokens WHERE expires <= 1").fetchall()
    assert "USING COVERING INDEX" in str(plan)  # expired ids are found through an index, not a scan


# -- sessions and limits: the PESU checker on its own, against httpx.MockTransport ---------------------------


def pesu_transport(calls: list[str], answer: Any = None) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        assert body["profile"] is True
        calls.append(body["username"])
        await asyncio.sleep(0.05)
        if answer is not None:
            return answer
        if body["password"] == PASSWORD:
            return httpx.Response(200, json={"status": True, "profile": {"srn": body["username"], "name": "A"}})
        return httpx.Response(401, json={"status": False})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("url, username, cause", [
    ("http://pesu.invalid/authenticate", ALICE, "ConnectError: "),  # the resolver's own words follow
    (None, "SLOW" + ALICE, "ReadTimeout after 0.5 s"),
    (None, "DOWN" + ALICE, "HTTP 503"),
])
def test_pesu_trouble_is_logged_with_its_url_and_cause(settings: Settings, caplog: pytest.LogCaptureFixture,
                                                       url: str | None, username: str, cause: str) -> None:
    with running(replace(settings, pesu_auth_url=url or settings.pesu_auth_url)) as service:
        answer = service.http.post("/auth/login", json={"username": username, "password": PASSWORD})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "30"
    warning = next(r.getMessage() for r in caplog.records if "PESU auth unavailable" in r.getMessage())
    assert (url or settings.pesu_auth_url) in warning and cause in warning and PASSWORD not in warning


def test_successful_logins_are_cached_until_the_ttl_passes() -> None:
    async def scenario() -> None:
        calls: list[str] = []
        now = [0.0]
        async with httpx.AsyncClient(transport=pesu_transport(calls)) as client:
            checker = PesuChecker(client, "http://pesu/authenticate", ttl_seconds=1800, timer=lambda: now[0])
            assert (await checker.check(ALICE, PASSWORD))["srn"] == ALICE
            await checker.check(ALICE, PASSWORD)
            assert calls == [ALICE]
            now[0] = 1799
            await checker.check(ALICE, PASSWORD)
            assert calls == [ALICE]
            now[0] = 1801
            await checker.check(ALICE, PASSWORD)
            assert calls == [ALICE, ALICE]
            assert all(PASSWORD.encode() not in key and ALICE.encode() not in key for key in checker.cache)

    asyncio.run(scenario())


def test_refusals_are_not_cached_and_simultaneous_checks_share_one_call() -> None:
    async def scenario() -> None:
        calls: list[str] = []
        async with httpx.AsyncClient(transport=pesu_transport(calls)) as client:
            checker = PesuChecker(client, "http://pesu/authenticate")
            for _ in range(2):
                with pytest.raises(InvalidCredentials):
                    await checker.check(ALICE, "wrong")
            assert calls == [ALICE, ALICE]
            results = await asyncio.gather(*(checker.check(BOB, PASSWORD) for _ in range(20)))
            assert all(r["srn"] == BOB for r in results)
            assert calls.count(BOB) == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(500, text="oops"),
        httpx.Response(502, json={"status": False}),
        httpx.Response(200, text="<html>"),
        httpx.Response(200, json={"status": True}),  # success without a profile
        httpx.Response(200, json=["status", True]),
        httpx.Response(403, json={"status": False}),
    ],
)
def test_anything_but_a_clear_answer_means_unavailable(answer: httpx.Response) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(transport=pesu_transport([], answer)) as client:
            with pytest.raises(AuthUnavailable):
                await PesuChecker(client, "http://pesu/authenticate").check(ALICE, PASSWORD)

    asyncio.run(scenario())


def test_a_deeply_nested_or_huge_answer_from_pesu_is_unavailable_and_read_only_up_to_1_mib() -> None:
    read = [0]

    async def endless() -> Any:
        chunk = b"[" * 65536
        while True:  # 400 MiB and more, if anyone kept reading
            read[0] += len(chunk)
            yield chunk

    answers = [httpx.Response(200, content=b"[" * 100_000 + b"]" * 100_000),
               httpx.Response(200, content=b'{"status": true, "profile": ' * 5000),
               httpx.Response(200, content=endless())]

    async def scenario() -> None:
        for answer in answers:
            async with httpx.AsyncClient(transport=pesu_transport([], answer)) as client:
                with pytest.raises(AuthUnavailable):
                    await PesuChecker(client, "http://pesu/authenticate").check(ALICE, PASSWORD)

    asyncio.run(scenario())
    assert read[0] <= 1024 * 1024 + 65536


def test_a_new_password_accepted_by_pesu_retires_the_old_one_here() -> None:
    current = {"password": PASSWORD}

    async def handler(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        if body["password"] == current["password"]:
            return httpx.Response(200, json={"status": True, "profile": {"srn": ALICE}})
        return httpx.Response(401, json={"status": False})

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            checker = PesuChecker(client, "http://pesu/authenticate")
            await checker.check(ALICE, PASSWORD)
            await checker.check(ALICE.lower(), PASSWORD)  # the same member and password, spelt otherwise
            current["password"] = "changed-at-pesu"
            await checker.check(ALICE, PASSWORD)  # still remembered: nothing here knows yet
            await checker.check(ALICE, "changed-at-pesu")
            for spelling in (ALICE, ALICE.lower()):
                with pytest.raises(InvalidCredentials):
                    await checker.check(spelling, PASSWORD)
            await checker.check(ALICE, "changed-at-pesu")

    asyncio.run(scenario())


def test_a_token_with_a_non_ascii_signature_is_a_bad_token(service: Service) -> None:
    token = login(service)
    forged = token[:-2] + "é"
    response = service.http.post("/my-bookings", headers={"Authorization": b"Bearer " + forged.encode()})
    assert response.status_code == 401 and response.json()["detail"] == "Invalid or expired token"
    ws = service.socket()
    reply = send(ws, {"type": "book_slot", "slot_id": 5, "token": forged})
    assert reply["success"] is False and reply["message"] == "Invalid or expired token"
    assert send(ws, {"type": "get_slots"})["type"] == "slots_update"  # the socket stays open


# -- the WebSocket protocol ----------------------------------------------------------------------------------


BAD_MESSAGES = [
    ("{not json", "Invalid JSON format"),
    ("null", 'Message must be a JSON object with a "type"'),
    ("[1, 2]", 'Message must be a JSON object with a "type"'),
    ("42", 'Message must be a JSON object with a "type"'),
    ('"book_slot"', 'Message must be a JSON object with a "type"'),
    ('{"type": null}', "Unknown message type: null"),
    ('{"type": "launch_rocket"}', "Unknown message type: launch_rocket"),
    ('{"type": ' + DEEP.decode() + "}", "Unknown message type: [...]"),
    ('{"type": "get_slots", "date": ' + DEEP.decode() + "}", "Invalid date '[...]': use YYYY-MM-DD"),
    ('{"type": "book_slot", "slot_id": 5}', "Missing slot_id, username, or password in booking request"),
    ('{"type": "cancel_slot", "username": "a", "password": "b"}',
     "Missing slot_id, username, or password in cancellation request"),
    ('{"type": "book_slot", "slot_id": "abc", "username": "a", "password": "b"}', "slot_id must be an integer"),
    ('{"type": "book_slot", "slot_id": 5.5, "username": "a", "password": "b"}', "slot_id must be an integer"),
    ('{"type": "book_slot", "slot_id": true, "username": "a", "password": "b"}', "slot_id must be an integer"),
    ('{"type": "book_slot", "slot_id": 5, "username": ["a"], "password": "b"}',
     "username must be a non-empty string"),
    ('{"type": "book_slot", "slot_id": 5, "username": "a", "password": {"p": 1}}',
     "password must be a non-empty string"),
]


def test_socket_gets_the_state_on_connect_and_on_get_slots(service: Service) -> None:
    service.book(6)
    with ws_connect(service.server.ws_url) as ws:
        first = receive(ws)
        assert first["type"] == "slots_update" and booked(first) == [6]
        assert first["data"]["available_slots"] == [3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14]
        assert first["data"]["slots"][3]["booked_by"] == ALICE and "timestamp" in first
        again = send(ws, {"type": "get_slots"})
        assert again["type"] == "slots_update" and again["data"] == first["data"]


def test_booking_over_a_socket_reaches_every_socket(service: Service) -> None:
    booker, watcher = service.sockets(2)
    response = send(booker, {"type": "book_slot", "slot_id": 9, "username": ALICE, "password": PASSWORD})
    assert response == {"type": "booking_response", "success": True, "message": "Slot 9 booked successfully",
                        "slot_id": 9}
    assert booked(receive(booker)) == [9]
    assert booked(receive(watcher)) == [9]

    response = send(booker, {"type": "cancel_slot", "slot_id": 9, "username": ALICE, "password": PASSWORD})
    assert response == {"type": "cancellation_response", "success": True,
                        "message": "Slot 9 booking cancelled successfully", "slot_id": 9}
    assert booked(receive(watcher)) == []


def test_http_bookings_reach_every_socket(service: Service) -> None:
    watchers = service.sockets(3)
    service.book(4)
    assert all(booked(receive(ws)) == [4] for ws in watchers)
    service.cancel(4)
    assert all(booked(receive(ws)) == [] for ws in watchers)


def test_socket_refusals_use_the_readmes_messages(service: Service) -> None:
    service.book(5, BOB)
    with ws_connect(service.server.ws_url) as ws:
        receive(ws)
        taken = send(ws, {"type": "book_slot", "slot_id": 5, "username": ALICE, "password": PASSWORD})
        assert taken == {"type": "booking_response", "success": False, "message": "Slot 5 is not available",
                         "slot_id": 5}
        wrong = send(ws, {"type": "book_slot", "slot_id": 6, "username": ALICE, "password": "nope"})
        assert wrong == {"type": "booking_response", "success": False,
                         "message": "Authentication failed. Invalid credentials.", "slot_id": 6}
        down = send(ws, {"type": "cancel_slot", "slot_id": 5, "username": "DOWN1", "password": "x"})
        assert down["type"] == "cancellation_response" and down["success"] is False
        assert "unavailable" in down["message"] and "Invalid credentials" not in down["message"]
        theirs = send(ws, {"type": "cancel_slot", "slot_id": 5, "username": ALICE, "password": PASSWORD})
        assert theirs["success"] is False and "only cancel your own" in theirs["message"]
    assert service.slots()["booked_slots"] == [5]


def test_bad_socket_messages_get_an_error_and_the_socket_stays_open(service: Service) -> None:
    with ws_connect(service.server.ws_url) as ws:
        receive(ws)
        for text, message in BAD_MESSAGES:
            ws.send(text)
            assert receive(ws) == {"type": "error", "message": message}, text
        ws.send(b"\x00\x01binary")
        assert receive(ws)["type"] == "error"
        # still open and working
        ok = send(ws, {"type": "book_slot", "slot_id": 3, "username": ALICE, "password": PASSWORD})
        assert ok["success"] is True
    assert service.slots()["booked_slots"] == [3]


def test_oversized_socket_message_is_closed_with_1009(service: Service) -> None:
    ws = service.socket()
    ws.send(orjson.dumps({"type": "get_slots", "padding": "x" * 20_000}).decode())
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            receive(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert service.slots()["booked_slots"] == []


def test_sockets_opened_together_on_a_new_server_each_hear_the_state_once(settings: Settings) -> None:
    # The first sockets of a process wait for the day's first read; the state it brings was broadcast to
    # the ones already waiting and then sent them again as their first state, so a client's next answer
    # was a second copy of the state.
    for _ in range(3):
        with running(settings) as service, ThreadPoolExecutor(20) as pool:
            sockets = list(pool.map(lambda _: service.stack.enter_context(ws_connect(service.server.ws_url)),
                                    range(20)))
            for ws in sockets:
                assert receive(ws)["type"] == "slots_update"
            time.sleep(0.3)
            for ws in sockets:
                with pytest.raises(TimeoutError):
                    ws.recv(timeout=0)


def test_a_socket_that_floods_is_warned_then_closed_with_1008(settings: Settings,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with running(replace(settings, ws_rate_per_second=0.5, ws_rate_burst=5)) as service:
        ws = service.socket()
        for _ in range(5):
            assert send(ws, {"type": "get_slots"})["type"] == "slots_update"
        assert send(ws, {"type": "get_slots"}) == {"type": "error", "message": "Too many messages; slow down"}
        time.sleep(2.2)  # one message allowed again
        assert send(ws, {"type": "get_slots"})["type"] == "slots_update"
        ws = service.socket()  # a full bucket
        # a burst of 60 in one write: 5 answered, a warning, 5 more refused, then the close (the rest unread)
        ws.socket.sendall(client_frame(b'{"type": "get_slots"}') * 60)
        received = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                received.append(receive(ws)["type"])
        assert received == ["slots_update"] * 5 + ["error"]  # every answer owed and the warning, then the close
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert service.socket()  # others still get in
    assert sum("kept flooding" in record.getMessage() for record in caplog.records) == 1


def test_sockets_are_not_compressed_unless_asked_for(settings: Settings) -> None:
    for compression, answer in ((False, None), (True, "permessage-deflate")):
        with running(replace(settings, ws_compression=compression)) as service:
            # websockets offers "permessage-deflate; client_max_window_bits", as Chrome and Firefox do
            with ws_connect(service.server.ws_url, open_timeout=5) as ws:
                assert ws.request is not None and ws.response is not None
                assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
                agreed = ws.response.headers.get("Sec-WebSocket-Extensions")
                assert (agreed and agreed.split(";")[0]) == answer


def test_a_dead_peer_that_never_answers_pings_is_dropped(settings: Settings) -> None:
    """A browser that vanished without closing (laptop lid shut): it reads, but never answers a ping."""
    with ServerThread(create_app(settings), ws_ping_interval=0.2, ws_ping_timeout=0.2) as server:
        dead = raw_socket_that_never_reads(server.port)
        dead.settimeout(0.05)
        stats = f"{server.url}/stats"
        assert httpx.get(stats).json()["websocket"]["active_connections"] == 1
        deadline = time.monotonic() + 10
        while httpx.get(stats).json()["websocket"]["active_connections"] != 0:
            assert time.monotonic() < deadline, "the dead peer was never dropped"
            with contextlib.suppress(TimeoutError, OSError):
                dead.recv(65536)  # drain what arrives, pings included, and never answer
        dead.close()


def test_sockets_that_come_and_go_leave_nothing_behind(service: Service) -> None:
    for _ in range(200):
        with ws_connect(service.server.ws_url) as ws:
            receive(ws)
    deadline = time.monotonic() + 5
    while service.http.get("/stats").json()["websocket"]["active_connections"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)


# -- the live feed and the real-time path: versions, coalescing, slow readers --------------------------------


def stuck_socket_slows_no_one_and_is_dropped(service: Service) -> None:
    stuck = service.stack.enter_context(contextlib.closing(raw_socket_that_never_reads(service.server.port)))
    ws = service.socket()
    assert service.http.get("/stats").json()["websocket"]["active_connections"] == 2
    # The stuck client sends thousands of requests and never reads an answer: replies pile up that the
    # server cannot deliver.
    stuck.sendall(client_frame(b'{"type": "book_slot"}') * 5000)
    def until_booked(slots: list[int]) -> None:  # (a state in between may come first, when the loop is busy)
        while booked(receive_until(ws, "slots_update")) != slots:
            pass

    for i in range(24):  # the working socket is never held up: each answer and state within receive's 5 s
        slot = 3 + i % 12
        ws.send(orjson.dumps({"type": "book_slot", **body(slot)}).decode())
        assert receive_until(ws, "booking_response")["success"] is True
        until_booked([slot])
        ws.send(orjson.dumps({"type": "cancel_slot", **body(slot)}).decode())
        assert receive_until(ws, "cancellation_response")["success"] is True
        until_booked([])
    deadline = time.monotonic() + 10
    while service.http.get("/stats").json()["websocket"]["active_connections"] != 1:
        assert time.monotonic() < deadline, "the stuck socket was never dropped"
        time.sleep(0.05)
    assert send(ws, {"type": "get_slots"})["type"] == "slots_update"


def test_a_stuck_socket_slows_no_one_and_is_dropped(settings: Settings) -> None:
    with running(replace(settings, ws_rate_per_second=0)) as service:  # the backlog, not the rate limit
        stuck_socket_slows_no_one_and_is_dropped(service)


def test_reading_many_days_does_not_grow_the_hub(service: Service) -> None:
    hub = service.state["hub"]
    watcher = service.socket()
    send(watcher, {"type": "get_slots", "date": TOMORROW})
    for offset in range(300):
        day = (datetime(2026, 11, 24) + timedelta(days=offset)).date().isoformat()
        assert service.http.get("/slots", params={"date": day}).status_code == 200
    assert set(hub.newest) <= {TODAY, TOMORROW}  # what someone watches, and nothing more
    for bad in ("0001-01-01", "9999-12-31"):
        assert service.http.get("/slots", params={"date": bad}).status_code == 400


def test_reading_other_days_pushes_no_unchanged_state_and_evicts_no_watched_day(service: Service) -> None:
    """An anonymous reader cycling through 70 other dates (more than the day cache holds), then today, over
    and over: listeners hear nothing, since nothing changed, and today never leaves memory."""
    pages = service.sockets(20)
    watcher = service.socket()
    send(watcher, {"type": "get_slots", "date": TOMORROW})
    board = service.state["board"]
    for _ in range(5):
        for offset in range(10, 80):
            day = (datetime(2026, 11, 24) + timedelta(days=offset)).date().isoformat()
            assert service.http.head("/slots", params={"date": day}).status_code == 200
        assert service.http.get("/slots").status_code == 200
        assert service.http.get("/slots", params={"date": TOMORROW}).status_code == 200
    for page in [*pages, watcher]:
        with pytest.raises(TimeoutError):
            receive(page, timeout=0.2)
    assert TODAY in board.kept and TOMORROW in board.kept
    assert service.book(9).status_code == 200  # a real change still reaches every page
    for page in pages:
        assert booked(receive(page)) == [9]


def states_until(ws: ClientConnection, slots: list[int]) -> list[str]:
    """The slots_update texts a listener gets until one shows ``slots`` booked (replies are skipped)."""
    texts = []
    while True:
        text = ws.recv(timeout=5)
        assert isinstance(text, str)
        if orjson.loads(text)["type"] == "slots_update":
            texts.append(text)
            if booked(orjson.loads(text)) == slots:
                return texts


@pytest.mark.parametrize("protocol", ["ours", "uvicorn's"])
@pytest.mark.parametrize("compression", [False, True])
def test_written_straight_or_sent_every_listener_gets_the_same_states_in_order(
        settings: Settings, protocol: str, compression: bool) -> None:
    """Under python app.py an idle listener's state is one frame, built once and written to its socket; a
    listener with a reply queued, or whose reads lag, goes through its pump; under bare uvicorn every state
    is sent through ASGI. Either way the same texts, versions only growing, ending on the newest."""
    options = {} if protocol == "ours" else {"ws": app_module.WebSocketsSansIOProtocol}
    with running(replace(settings, ws_compression=compression), **options) as service:
        idle = service.sockets(3)
        plain = service.stack.enter_context(ws_connect(service.server.ws_url, compression=None, open_timeout=5))
        receive(plain)
        busy = service.socket()  # asks for the state between changes: replies queued while a round goes out
        for slot in range(3, 15):
            assert service.book(slot).status_code == 200
            busy.send('{"type": "get_slots"}')
        everything = list(range(3, 15))
        seen = [states_until(ws, everything) for ws in [*idle, plain]]
        for texts in [*seen, states_until(busy, everything)]:
            versions = [orjson.loads(text)["data"]["version"] for text in texts]
            assert versions == sorted(versions) and len(set(versions)) >= 1
        newest = {texts[-1] for texts in seen}
        assert len(newest) == 1  # every listener holds the very same state, byte for byte
        hub = service.state["hub"]
        assert (hub.direct_writes > 0) == (protocol == "ours")


def raw_events_reader_that_never_reads(port: int) -> socket.socket:
    """An /events client that sends its request and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


@pytest.mark.parametrize("kind", ["socket", "events"])
def test_a_listener_whose_reads_lag_leaves_the_straight_path_until_it_reads_again(settings: Settings,
                                                                                   kind: str) -> None:
    """The fan-out writes straight only to a listener whose writes flow: once one that stopped reading has
    its writes paused, its states wait in its pump (back-pressure, the stall timeout); once it reads them all
    it is written straight again, and holds the newest state like everyone else."""
    with running(replace(settings, send_timeout=30)) as service:
        opener = raw_socket_that_never_reads if kind == "socket" else raw_events_reader_that_never_reads
        lagging = service.stack.enter_context(contextlib.closing(opener(service.server.port)))
        reader = service.socket()
        hub = service.state["hub"]
        port = lagging.getsockname()[1]
        deadline = time.monotonic() + 5
        while not (peer := next((peer for peer in hub.peers if peer.wire is not None and port in (
                getattr(peer.wire, "client", None) or peer.wire.protocol.client)), None)):
            assert time.monotonic() < deadline, "the lagging listener never joined"
            time.sleep(0.01)
        assert peer.direct is peer.wire.transport
        for change in range(400):  # book and cancel until our writes to it back up
            assert (service.cancel(9) if change % 2 else service.book(9)).status_code == 200
            if not peer.wire.flowing:
                break
        assert not peer.wire.flowing, "the lagging listener's writes never backed up"
        assert peer.direct is None  # so no state is written past the transport's limit
        def newest_with(slot: int) -> int:
            """The version of the state in which the reader first sees slot booked."""
            while slot not in booked(state := receive_until(reader, "slots_update")):
                pass
            return state["data"]["version"]

        def lagging_reads_until(version: int) -> None:
            seen = b""
            while not (versions := re.findall(rb'"version":(\d+)', seen)) or int(versions[-1]) < version:
                seen = seen[-64:] + lagging.recv(65536)

        assert service.book(11).status_code == 200
        lagging.settimeout(5)
        lagging_reads_until(newest_with(11))  # it reads everything at last
        deadline = time.monotonic() + 5
        while peer.direct is None:  # (its pump's last send finishes, and its writes flow)
            assert time.monotonic() < deadline, "the listener never went back to the straight path"
            time.sleep(0.01)
        before = hub.direct_writes
        assert service.book(10).status_code == 200
        lagging_reads_until(newest_with(10))
        assert hub.direct_writes - before == 2  # the newest state, straight to both


def test_an_events_reader_dropped_for_not_reading_is_not_written_straight_once_it_reads(settings: Settings) -> None:
    """Dropped, it is closing: when it reads again it gets the end of the stream, and its peer is never
    again one to write to straight away (a round that began before the drop would have written after the
    end)."""
    with running(replace(settings, send_timeout=0.5)) as service:
        lagging = service.stack.enter_context(contextlib.closing(
            raw_events_reader_that_never_reads(service.server.port)))
        hub = service.state["hub"]
        service.state["door"].stall_timeout = 30  # (its connection is not aborted meanwhile)
        deadline = time.monotonic() + 5
        while not (peer := next((peer for peer in hub.peers if isinstance(peer.wire, app_module.EventWire)), None)):
            assert time.monotonic() < deadline, "the reader never joined"
            time.sleep(0.01)
        change = 0
        while peer.wire.flowing:  # change after change until our writes to it back up
            assert (service.cancel(9) if change % 2 else service.book(9)).status_code == 200
            change += 1
            assert change < 400, "the reader's writes never backed up"
        assert (service.cancel(9) if change % 2 else service.book(9)).status_code == 200  # its pump's, now
        while peer in hub.peers:  # and nothing more is owed it when it is dropped for not reading
            assert time.monotonic() < deadline + 5, "the reader was never dropped"
            time.sleep(0.01)
        lagging.settimeout(5)
        seen = b""
        while not seen.endswith(b"\r\n0\r\n\r\n"):  # it reads at once: the stream's end comes
            seen = seen[-16:] + lagging.recv(65536)
        assert peer.direct is None


class RawEvents:
    """An /events reader on a plain socket that takes the chunked body apart strictly: each chunk its size
    in hex, CRLF, that many bytes, CRLF; and each chunk one whole event."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.buffer = b""
        self.heartbeats = 0
        head = self.take(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()

    def take(self, end: bytes) -> bytes:
        while end not in self.buffer:
            self.buffer += self.sock.recv(65536)
        taken, self.buffer = self.buffer.split(end, 1)
        return taken

    def chunk(self) -> bytes:
        size = int(self.take(b"\r\n"), 16)
        while len(self.buffer) < size + 2:
            self.buffer += self.sock.recv(65536)
        chunk, after, self.buffer = self.buffer[:size], self.buffer[size:size + 2], self.buffer[size + 2:]
        assert after == b"\r\n" and chunk.endswith(b"\n\n"), chunk
        return chunk

    def events_until(self, slots: list[int]) -> list[tuple[int, bytes]]:
        """The (id, data) of the events until one shows ``slots`` booked (heartbeats are counted)."""
        events = []
        while True:
            chunk = self.chunk()
            if chunk == b": keep-alive\n\n":
                self.heartbeats += 1
            else:
                id_line, data_line, _, _ = chunk.split(b"\n")
                assert id_line.startswith(b"id: ") and data_line.startswith(b"data: ")
                events.append((int(id_line[4:]), data_line[6:]))
                if booked(orjson.loads(data_line[6:])) == slots:
                    return events


@pytest.mark.parametrize("protocol", ["ours", "uvicorn's"])
def test_an_events_reader_gets_each_state_as_one_whole_chunk_written_straight_or_sent(
        settings: Settings, protocol: str) -> None:
    """Under python app.py an idle /events reader's state is one chunk, built once and written to its
    connection, between the heartbeats its pump sends; under bare uvicorn every state is sent through ASGI.
    Either way whole chunks, ids only growing, ending on the very state the hub holds."""
    options = {} if protocol == "ours" else {"http": app_module.AutoHTTPProtocol}
    with running(replace(settings, heartbeat_seconds=0.005), **options) as service:
        reader = RawEvents(service.server.port)
        service.stack.enter_context(contextlib.closing(reader.sock))
        hub = service.state["hub"]
        before = hub.direct_writes
        for slot in range(3, 15):
            assert service.book(slot).status_code == 200
            time.sleep(0.01)  # (heartbeats come in between)
        events = reader.events_until(list(range(3, 15)))
        assert reader.heartbeats
        ids = [id for id, _ in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        (newest,) = hub.newest.values()
        assert events[-1] == (newest.version, newest.update_text.encode())  # byte for byte
        assert (hub.direct_writes > before) == (protocol == "ours")


class BrowserSocket:
    """A socket that offers what Chrome and Firefox offer (permessage-deflate; client_max_window_bits) and
    reads the frames as they come, inflating each message on its own, as the agreed no-context-takeover
    lets it."""

    def __init__(self, port: int, offer: str = "permessage-deflate; client_max_window_bits",
                 window_bits: int = 15) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.window_bits = window_bits  # what this client keeps to inflate: a strict window (zlib's is lenient)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /slot-booking HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Extensions: {offer}\r\n\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(65536)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        self.head = head.decode()

    def message(self) -> tuple[bool, dict[str, Any]]:
        """The next message: whether it came deflated, and what it says."""
        while True:
            if len(self.buffer) >= 2:
                first, size = self.buffer[0], self.buffer[1] & 0x7F
                start = 2 + {126: 2, 127: 8}.get(size, 0)
                if len(self.buffer) >= start:
                    if size >= 126:
                        size = int.from_bytes(self.buffer[2:start], "big")
                    if len(self.buffer) >= start + size:
                        payload, self.buffer = self.buffer[start:start + size], self.buffer[start + size:]
                        assert first & 0x8F == 0x81  # a whole text frame
                        if first & 0x40:  # RSV1: deflated, on its own
                            payload = zlib.decompressobj(wbits=-self.window_bits).decompress(
                                payload + b"\x00\x00\xff\xff")
                        return bool(first & 0x40), orjson.loads(payload)
            self.buffer += self.sock.recv(65536)


def test_a_compressing_browser_gets_each_state_deflated_once_and_it_inflates_to_what_the_plain_get(
        settings: Settings) -> None:
    with running(replace(settings, ws_compression=True)) as service:
        browser = BrowserSocket(service.server.port)
        assert "permessage-deflate" in browser.head and "server_no_context_takeover" in browser.head
        assert "client_no_context_takeover" in browser.head  # no window kept on either side
        others = [BrowserSocket(service.server.port) for _ in range(3)]
        plain = service.stack.enter_context(ws_connect(service.server.ws_url, compression=None, open_timeout=5))
        python = service.stack.enter_context(ws_connect(service.server.ws_url, open_timeout=5))  # websockets' offer
        for ws in (plain, python):
            receive(ws)
        for listener in (browser, *others):
            assert listener.message()[1]["type"] == "slots_update"
        hub = service.state["hub"]
        before = hub.direct_writes
        for slot in (5, 6, 7):
            assert service.book(slot).status_code == 200
            states = [listener.message() for listener in (browser, *others)]
            assert all(deflated for deflated, _ in states)
            texts = {orjson.dumps(state).decode() for _, state in states}
            assert {orjson.dumps(receive_until(ws, "slots_update")).decode() for ws in (plain, python)} == texts
            assert len(texts) == 1 and booked(states[0][1])[-1] == slot
        assert hub.direct_writes - before >= 3 * 6  # straight to every idle listener
        small = BrowserSocket(service.server.port, "permessage-deflate; server_max_window_bits=9", window_bits=9)
        assert "server_max_window_bits=9" in small.head and small.message()[1]["type"] == "slots_update"
        assert service.book(8).status_code == 200  # it asked for a smaller window than the shared frame's
        deflated, state = small.message()
        assert not deflated and booked(state)[-1] == 8  # so it gets the plain frame, which it reads as is
        for listener in (browser, *others, small):
            listener.sock.close()


def test_every_slots_update_carries_a_version_that_only_grows(service: Service) -> None:
    booker, watcher = service.sockets(2)
    first = send(watcher, {"type": "get_slots"})["data"]["version"]
    versions = [first]
    for slot in (3, 4):
        service.book(slot)
        versions.append(receive(watcher)["data"]["version"])
    send(booker, {"type": "cancel_slot", "slot_id": 3, "username": ALICE, "password": PASSWORD})
    versions.append(receive(watcher)["data"]["version"])
    assert versions == sorted(set(versions)) and len(versions) == 4


def test_a_slow_listener_gets_the_newest_state_not_a_backlog() -> None:
    """Coalescing: while a listener cannot keep up, only the newest state waits for it."""

    async def scenario() -> None:
        gate, got = asyncio.Event(), []

        class SlowReader(Peer):
            async def deliver_day(self, day: Day) -> None:
                await gate.wait()
                got.append(day.version)

        hub = Hub(send_timeout=5, max_backlog=64)
        hub.start()
        hub.join(SlowReader("127.0.0.1"))
        for version in range(1, 101):
            hub.broadcast(Day(TODAY, version, 0, [], None, [], [], [], b"", "", b""), TODAY)
            await asyncio.sleep(0)  # let the pump pick up the first one and stall on it
        gate.set()
        for _ in range(200):  # the next fan-out round brings the newest state
            await asyncio.sleep(0.005)
            if len(got) > 1:
                break
        assert len(got) == 2 and got[1] == 100  # the one in flight, then straight to the newest
        hub.close_all(1001)

    asyncio.run(scenario())


def test_a_listener_that_vanishes_mid_broadcast_is_dropped_and_the_rest_still_hear() -> None:
    async def scenario() -> None:
        got: list[int] = []

        class Gone(Peer):
            async def deliver_day(self, day: Day) -> None:
                raise WebSocketDisconnect(1006)  # what Starlette raises when the client went away

        class Reader(Peer):
            async def deliver_day(self, day: Day) -> None:
                got.append(day.version)

        hub = Hub(send_timeout=5, max_backlog=64)
        hub.start()
        gone, reader = Gone("127.0.0.1"), Reader("127.0.0.1")
        hub.join(gone)
        hub.join(reader)
        for version in (1, 2):
            hub.broadcast(Day(TODAY, version, 0, [], None, [], [], [], b"", "", b""), TODAY)
            for _ in range(100):
                await asyncio.sleep(0.001)
                if got and got[-1] == version:
                    break
        assert got == [1, 2] and hub.peers == {reader}
        assert hub.fan_out_task is not None and not hub.fan_out_task.done()
        hub.close_all(1001)

    asyncio.run(scenario())


def test_what_readme_says_of_tokens_feeds_links_and_series_is_what_a_reader_gets(settings: Settings,
                                                                                  clock: Clock) -> None:
    readme = " ".join((HERE / "README.md").read_text().split())
    with running(replace(settings, admin_srns=frozenset({ADMIN})), clock) as service:
        # "curl -X POST /auth/login -H "Authorization: Bearer $TOKEN"   # whose token, time left"
        assert '-H "Authorization: Bearer $TOKEN" # whose token, time left' in readme
        token = login(service)
        clock.set("2026-11-24 01:10")
        whose = service.http.post("/auth/login", headers=bearer(token))
        assert whose.status_code == 200 and whose.json()["user"] == {"srn": ALICE}
        assert whose.json()["token"] == token and whose.json()["expires_in"] == 3000  # the same token, time left
        # "POST /calendar/link (signed in)": with neither credentials nor a body, a 401 (it was a 400)
        assert "`POST /calendar/link` (signed in)" in readme
        for content in (b"", b" \r\n"):
            refused = service.http.post("/calendar/link", content=content)
            assert refused.status_code == 401 and "Bearer" in refused.json()["detail"], refused.text
        # "version grows with every change (it is the number of the newest entry in the history)"
        assert "`version` grows with every change (it is the number of the newest entry in the history)" in readme
        with httpx.stream("GET", f"{service.server.url}/events", timeout=5) as stream:
            lines = stream.iter_lines()
            next(lines), next(lines), next(lines)
            service.http.post("/book-slot", json=body(6, date=TOMORROW))  # another day's entry comes first
            service.book(5, username=BOB)
            id_line, data_line = next(lines), next(lines)
        newest = service.http.post("/admin/history", json=body(username=ADMIN)).json()["events"][0]
        assert (newest["action"], newest["slot_id"]) == ("book", 5)
        assert int(id_line[4:]) == orjson.loads(data_line[6:])["data"]["version"] == newest["id"]
        # the series dry run, as printed
        example = readme.split("# the Arduino workshop", 1)[1].split("-d '", 1)[1].split("'", 1)[0]
        request = orjson.loads(example.replace("ADMIN_SRN", ADMIN).replace("ADMIN_PASSWORD", PASSWORD))
        answer = service.http.post("/admin/series", json=request).json()
        assert f'"message":"{answer["message"]}"' in readme.replace('", "', '","')
        assert f'"done":{answer["done"]},"conflicts":{answer["conflicts"]},"skipped":{answer["skipped"]}' in readme
        clock.set("2027-01-01 09:00")  # and as README says it would be, had a member booked slot 14 on 5 January
        assert service.http.post("/book-slot", json=body(14, date="2027-01-05")).status_code == 200
        request["username"] = ADMIN
        again = service.http.post("/admin/series", json={**request, "password": PASSWORD}).json()
        first = orjson.dumps(again["dates"][0]).decode()
        assert (again["done"], again["conflicts"]) == (67, 1) and first in readme.replace(", ", ",").replace(": ", ":")


def test_the_events_feed_streams_slots_updates_for_curl(service: Service) -> None:
    with httpx.stream("GET", f"{service.server.url}/events", timeout=5) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"] == "text/event-stream"
        lines = stream.iter_lines()

        def event() -> tuple[int, dict[str, Any]]:
            id_line, data_line, blank = next(lines), next(lines), next(lines)
            assert id_line.startswith("id: ") and data_line.startswith("data: ") and blank == ""
            return int(id_line[4:]), orjson.loads(data_line[6:])

        version, first = event()  # the current state, at once
        assert first["type"] == "slots_update" and booked(first) == [] and first["data"]["version"] == version
        service.http.post("/book-slot", json=body(6, date=TOMORROW))  # another day: not on this feed
        service.book(5)
        newer, update = event()
        assert newer > version and booked(update) == [5] and update["data"]["date"] == TODAY
    tomorrow = service.http.get("/events", params={"date": "not-a-date"})
    assert tomorrow.status_code == 400 and "YYYY-MM-DD" in tomorrow.json()["detail"]


def test_the_events_feed_sends_a_heartbeat_while_nothing_changes(settings: Settings) -> None:
    with running(replace(settings, heartbeat_seconds=0.2)) as service:
        with httpx.stream("GET", f"{service.server.url}/events", timeout=5) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("id: ") and next(lines).startswith("data: ") and next(lines) == ""
            started = time.monotonic()
            assert next(lines) == ": keep-alive" and next(lines) == ""  # a comment EventSource ignores
            assert time.monotonic() - started < 1


def test_an_eventsource_reconnecting_with_last_event_id_starts_from_the_current_state(service: Service) -> None:
    service.book(5)
    service.cancel(5)
    service.book(7)
    headers = {"Last-Event-ID": "1"}  # it missed everything since version 1
    with httpx.stream("GET", f"{service.server.url}/events", headers=headers, timeout=5) as stream:
        lines = stream.iter_lines()
        id_line, data_line = next(lines), next(lines)
    current = orjson.loads(data_line[6:])
    assert booked(current) == [7] and int(id_line[4:]) == current["data"]["version"] >= 3


def test_an_events_reader_that_stops_reading_is_closed_and_counted_until_then(settings: Settings) -> None:
    with running(replace(settings, max_connections=1)) as service:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        stuck.connect(("127.0.0.1", service.server.port))
        stuck.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        client = service.http
        client.headers.update(bearer(login(service)))
        for _ in range(100):  # change after change, each a few KiB to every listener: 600 KiB in all
            assert client.post("/book-slot", json={"slot_id": 5}).status_code == 200
            assert client.post("/cancel-slot", json={"slot_id": 5}).status_code == 200
            with client.stream("GET", "/events") as events:  # (a stream, should it be let in)
                status = events.status_code
            if status != 503:  # room for another: only once the stuck reader's connection is gone
                assert closed_by_server(stuck, within=0.1), "the stuck reader stopped counting while open"
                break
        else:
            time.sleep(1.5)  # it still reads nothing: dropped after 0.5 s, its connection aborted 0.5 s later
            assert closed_by_server(stuck, within=1)
        deadline = time.monotonic() + 5
        while True:
            with client.stream("GET", "/events") as events:
                if events.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the stuck reader still counts after it was closed"
            time.sleep(0.1)
        stuck.close()


def test_head_of_the_events_feed_is_its_head_alone_and_the_connection_goes_on(service: Service) -> None:
    with contextlib.closing(socket.create_connection(("127.0.0.1", service.server.port), timeout=5)) as sock:
        sock.sendall(b"HEAD /events HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        seen = b""
        while seen.count(b"HTTP/1.1 200") < 2:  # (it had held the connection as a listener for ever)
            seen += sock.recv(65536)
        head, health = seen.split(b"\r\n\r\n", 1)
        assert b"text/event-stream" in head and health.startswith(b"HTTP/1.1 200")
    assert not service.state["hub"].open


@pytest.mark.parametrize("kind", ["socket", "events"])
def test_a_listener_whose_first_read_fails_gives_its_place_back(settings: Settings, kind: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with running(replace(settings, max_connections_per_address=1)) as service:
        board, hub = service.state["board"], service.state["hub"]

        async def broken(date: str) -> Day:
            raise OSError("disk I/O error")

        board.day = broken
        try:
            with contextlib.suppress(httpx.HTTPError, WebSocketException, TimeoutError):
                if kind == "events":
                    with service.http.stream("GET", "/events") as events:
                        events.read()
                else:
                    with ws_connect(service.server.ws_url, open_timeout=5) as ws:
                        ws.recv(timeout=5)
        finally:
            del board.day
        deadline = time.monotonic() + 5
        while hub.open:
            assert time.monotonic() < deadline, "the failed listener still holds its place"
            time.sleep(0.01)
        service.socket()  # the address may listen again (and hears the state)


UPGRADE = (b"GET /slot-booking HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.mark.parametrize("behind", ["a request in the same write", "a request after the head", "an upgrade"])
def test_an_events_reader_that_sent_a_request_behind_it_and_went_gives_its_place_back(settings: Settings,
                                                                                      behind: str) -> None:
    """httptools tells only the newest request of a connection that its client went: an /events stream
    with a request sent ahead behind it never heard, and kept its place among the listeners for ever. A
    WebSocket upgrade sent behind it would take the connection from under the stream: it is cut."""
    with running(replace(settings, max_connections_per_address=1)) as service:
        hub = service.state["hub"]
        for _ in range(3):
            gone = socket.create_connection(("127.0.0.1", service.server.port), timeout=5)
            stream = b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n"
            health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            gone.sendall(stream + health if behind == "a request in the same write" else stream)
            assert gone.recv(12) == b"HTTP/1.1 200"  # the stream has begun
            if behind != "a request in the same write":
                deadline = time.monotonic() + 5
                while not any(isinstance(peer.wire, app_module.EventWire) for peer in hub.peers):
                    assert time.monotonic() < deadline, "the stream is not written straight"
                    time.sleep(0.01)
                gone.sendall(health if behind == "a request after the head" else UPGRADE)
            if behind == "an upgrade":
                assert closed_by_server(gone, within=5)
            gone.close()
            assert service.book(9).status_code == 200 and service.cancel(9).status_code == 200
            deadline = time.monotonic() + 5
            while hub.open:
                assert time.monotonic() < deadline, "the gone reader still holds its place"
                time.sleep(0.01)
        with service.http.stream("GET", "/events") as events:  # the address may listen again
            assert events.status_code == 200


# -- how it keeps bookings safe: at the same instant, across workers, through crashes ------------------------


def test_many_simultaneous_bookers_exactly_one_wins(service: Service) -> None:
    users = list(USERS)[:30]
    barrier = threading.Barrier(len(users))

    def attempt(username: str) -> int:
        with httpx.Client(base_url=service.server.url, timeout=10) as client:
            client.post("/auth/login", json={"username": username, "password": PASSWORD})  # warm the cache
            barrier.wait()
            return client.post("/book-slot", json={"slot_id": 8, "username": username,
                                                   "password": PASSWORD}).status_code

    with ThreadPoolExecutor(len(users)) as pool:
        codes = list(pool.map(attempt, users))
    assert sorted(codes) == [200] + [400] * (len(users) - 1)
    winner = users[codes.index(200)]
    assert service.slots()["slots"][5]["booked_by"] == winner


def test_bookings_survive_a_restart(settings: Settings) -> None:
    with running(settings) as service:
        service.book(11)
        service.book(12, BOB)
        service.cancel(12, BOB)
    assert Path(settings.database_path).exists()  # the data/ folder was made on first run
    with running(settings) as service:
        assert service.slots()["booked_slots"] == [11]
        assert service.slots()["slots"][8]["booked_by"] == ALICE


def test_only_the_srn_is_stored_never_a_password(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"), running(settings) as service:
        token = login(service)
        service.http.post("/auth/logout", headers=bearer(token))
        service.book(5)
        service.http.post("/book-slot", json={"slot_id": 6, "username": BOB, "password": "wrong-" + PASSWORD})
        with ws_connect(service.server.ws_url) as ws:
            receive(ws)
            send(ws, {"type": "book_slot", "slot_id": 7, "username": ALICE, "password": PASSWORD})
    files = [p for p in Path(settings.database_path).parent.iterdir()]
    for path in files:
        assert PASSWORD.encode() not in path.read_bytes()
    client_side = ("websockets.client", "httpx", "httpcore")  # this test's own clients log what they send
    server_lines = [r.getMessage() for r in caplog.records if not r.name.startswith(client_side)]
    assert any("book slot 5 on 2026-11-24 by PES1UG20CS001" in line for line in server_lines)
    assert not any(PASSWORD in line or token in line or token.split(".")[1] in line for line in server_lines)
    assert not any(token.split(".")[1].encode() in path.read_bytes() for path in files)
    assert "Member 1" not in b"".join(p.read_bytes() for p in files).decode(errors="replace")


def test_two_processes_on_one_file_book_each_slot_once_and_hear_each_other(settings: Settings) -> None:
    day = real_tomorrow()
    with process(settings) as (_, url_a), process(settings) as (_, url_b), contextlib.ExitStack() as stack:
        watcher = stack.enter_context(ws_connect(url_a.replace("http", "ws") + "/slot-booking"))
        receive(watcher)
        assert send(watcher, {"type": "get_slots", "date": day})["data"]["date"] == day
        users = list(USERS)[:20]
        barrier = threading.Barrier(len(users))

        def attempt(i: int) -> int:
            url = (url_a, url_b)[i % 2]
            with httpx.Client(base_url=url, timeout=10) as client:
                client.post("/auth/login", json={"username": users[i], "password": PASSWORD})
                barrier.wait()
                return client.post("/book-slot", json={"slot_id": 10, "date": day, "username": users[i],
                                                       "password": PASSWORD}).status_code

        with ThreadPoolExecutor(len(users)) as pool:
            codes = list(pool.map(attempt, range(len(users))))
        assert sorted(codes) == [200] + [400] * (len(users) - 1)

        # a booking made on B reaches a socket connected to A, and both serve the same state
        httpx.post(f"{url_b}/book-slot", json={"slot_id": 13, "date": day, "username": ALICE, "password": PASSWORD})
        while booked(receive_until(watcher, "slots_update")) != [10, 13]:
            pass
        assert httpx.get(f"{url_a}/slots", params={"date": day}).json()["booked_slots"] == [10, 13]
        assert httpx.get(f"{url_b}/slots", params={"date": day}).json()["booked_slots"] == [10, 13]


def test_a_daily_limit_holds_across_two_processes(settings: Settings) -> None:
    """The same member books two slots at the same instant on two processes: with a limit of one a day,
    exactly one booking gets through, every time."""
    with process(settings, MAX_BOOKINGS_PER_DAY="1") as (_, url_a), process(
        settings, MAX_BOOKINGS_PER_DAY="1"
    ) as (_, url_b):
        base = datetime.now(IST).date()
        for offset in range(1, 6):
            day = (base + timedelta(days=offset)).isoformat()
            barrier = threading.Barrier(2)

            def attempt(i: int, day: str = day) -> int:
                with httpx.Client(base_url=(url_a, url_b)[i], timeout=10) as client:
                    client.post("/auth/login", json={"username": ALICE, "password": PASSWORD})
                    barrier.wait()
                    return client.post("/book-slot", json={"slot_id": 5 + i, "date": day, "username": ALICE,
                                                           "password": PASSWORD}).status_code

            with ThreadPoolExecutor(2) as pool:
                assert sorted(pool.map(attempt, range(2))) == [200, 400]
            assert len(httpx.get(f"{url_a}/slots", params={"date": day}).json()["booked_slots"]) == 1


def test_every_page_on_every_worker_holds_every_committed_state(settings: Settings) -> None:
    day = real_tomorrow()
    with process(settings) as (_, first), process(settings) as (_, second), contextlib.ExitStack() as opened:
        pages = []
        for url in (first, second) * 10:  # twenty open pages, half on each process
            ws = opened.enter_context(ws_connect(url.replace("http", "ws") + "/slot-booking", open_timeout=5))
            receive(ws)
            assert send(ws, {"type": "get_slots", "date": day})["data"]["date"] == day
            pages.append(ws)
        latest: dict[int, dict[str, Any]] = {}

        def listen(i: int, ws: ClientConnection) -> None:
            with contextlib.suppress(ConnectionClosed):
                for message in ws:
                    latest[i] = orjson.loads(message)["data"]

        listeners = [threading.Thread(target=listen, args=(i, ws), daemon=True) for i, ws in enumerate(pages)]
        for thread in listeners:
            thread.start()

        def everyone_sees(slot: int, holder: str | None, within: float = 0.3) -> None:
            deadline = time.monotonic() + within
            while True:
                wrong = [i for i in range(len(pages)) if latest.get(i, {}).get("slots", [{}] * 12)[slot - 3]
                         .get("booked_by") != holder]
                if not wrong:
                    return
                assert time.monotonic() < deadline, f"pages {wrong} still show slot {slot} wrong"
                time.sleep(0.01)

        def book(url: str, member: str, slot: int) -> int:
            return httpx.post(f"{url}/book-slot", json={"slot_id": slot, "date": day, "username": member,
                                                         "password": PASSWORD}).status_code

        with ThreadPoolExecutor(2) as pool:
            for slot in range(3, 15):  # two members race for each slot, one through each process
                codes = list(pool.map(book, (first, second), (ALICE, BOB), (slot, slot)))
                assert sorted(codes) == [200, 400]
                winner = (ALICE, BOB)[codes.index(200)]
                everyone_sees(slot, winner)
                assert httpx.post(f"{(first, second)[codes.index(200)]}/cancel-slot", json={
                    "slot_id": slot, "date": day, "username": winner, "password": PASSWORD}).status_code == 200
                everyone_sees(slot, None)


def test_my_bookings_is_exact_the_moment_another_process_changes_them(settings: Settings) -> None:
    day = real_tomorrow()
    with process(settings) as (_, first), process(settings) as (_, second):
        def mine(url: str) -> list[int]:
            answer = httpx.post(f"{url}/my-bookings", json={"username": ALICE, "password": PASSWORD}).json()
            return [b["id"] for b in answer["bookings"] if b["date"] == day]

        def change(url: str, action: str, slot: int) -> None:
            response = httpx.post(f"{url}/{action}", json={"slot_id": slot, "date": day, "username": ALICE,
                                                           "password": PASSWORD})
            assert response.status_code == 200

        assert mine(second) == [] and mine(first) == []  # both remember "none"
        for slot in (5, 6, 7):
            change(first, "book-slot", slot)
            assert mine(second) == list(range(5, slot + 1))  # at once: no watcher tick in between
        change(second, "cancel-slot", 6)
        assert mine(first) == [5, 7] and mine(second) == [5, 7]


def test_a_generation_file_cut_short_while_the_server_runs_is_survived_and_said(settings: Settings) -> None:
    """An admin's ``cp`` over rero.db-gen truncates it: a mapped file would kill the server (SIGBUS)."""
    day, gen = real_tomorrow(), settings.database_path + "-gen"
    member = {"username": ALICE, "password": PASSWORD}
    with process(settings) as (proc, url):
        def mine() -> list[int]:
            answer = httpx.post(f"{url}/my-bookings", json=member)
            assert answer.status_code == 200
            return [b["id"] for b in answer.json()["bookings"] if b["date"] == day]

        assert mine() == []  # remembered under the generation of now
        for size in (0, 3, 1 << 20):  # cut to nothing, to less than a generation, and grown
            os.truncate(gen, size)
            assert mine() == []
        assert httpx.post(f"{url}/book-slot", json={"slot_id": 5, "date": day, **member}).status_code == 200
        os.truncate(gen, 0)
        assert mine() == [5]  # exact still: a fresh generation is no older one
        proc.terminate()
        proc.wait(10)
        assert proc.stdout is not None
        said = [line for line in proc.stdout.read().decode().splitlines() if "was cut to" in line]
    assert len(said) == 3, "\n".join(said)  # one line each time it was found short


def test_workers_starting_on_a_new_database_at_the_same_instant_all_start(tmp_path: Path) -> None:
    """Two workers switching one new file to WAL at once: SQLite refuses one at once ("database is locked",
    which no busy timeout waits out); it must wait for the other instead. (Threads: each has its own
    connection, which SQLite locks against the others as it would another process's.)"""
    failures = []
    for n in range(100):
        path = str(tmp_path / f"r{n}" / "rero.db")
        db.check_writable(path)  # as python app.py's preflight does, before the workers start
        barrier = threading.Barrier(4)

        def worker() -> None:
            async def start() -> None:
                store, guard = db.SlotStore(path, range(3, 15)), db.GuardStore(path)
                barrier.wait()
                try:
                    await store.open(TODAY, "2026-11-24 01:00:00")
                    await guard.open()
                finally:
                    await guard.close()
                    await store.close()

            try:
                asyncio.run(start())
            except Exception as exc:  # noqa: BLE001 (any failure to start is what this test counts)
                failures.append(f"round {n}: {exc!r}")

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, f"{len(failures)} of 400 starts failed, e.g. {failures[0]}"


def test_an_acknowledged_booking_survives_kill_9(settings: Settings) -> None:
    day = real_tomorrow()
    with process(settings) as (proc, url):
        assert httpx.post(f"{url}/book-slot", json={"slot_id": 14, "date": day, "username": ALICE,
                                                    "password": PASSWORD}).status_code == 200
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    with process(settings) as (_, url):
        assert httpx.get(f"{url}/slots", params={"date": day}).json()["booked_slots"] == [14]


def test_bookings_never_wait_behind_a_long_read(settings: Settings, clock: Clock) -> None:
    """A feed (or history) that takes a second to read, as on a database of millions of events, is read
    beside the bookings, not before them."""
    with running(settings, clock) as service:
        path, token = link(service), login(service)
        store = service.state["board"].store
        reader = getattr(store, "reader", store.conn)

        def crawl() -> int:
            time.sleep(0.01)  # a slow disk, 10 ms per ten steps (the GIL is free meanwhile)
            return 0

        assert service.http.post("/book-slot", json={"slot_id": 9}, headers=bearer(token)).status_code == 200
        reader.set_progress_handler(crawl, 10)
        try:
            with ThreadPoolExecutor(2) as pool:
                feed = pool.submit(httpx.get, service.server.url + path, timeout=30)
                time.sleep(0.1)
                started = time.monotonic()
                booking = service.http.post("/book-slot", json={"slot_id": 10}, headers=bearer(token))
                took = time.monotonic() - started
                assert feed.result().status_code == 200
        finally:
            reader.set_progress_handler(None, 0)
        assert booking.status_code == 200 and took < 0.3, took


# -- how it keeps bookings safe: each rule written once, its Python twin held to its SQL ---------------------


def sql_says(fragment: str, row: dict[str, Any], *params: Any) -> Any:
    """What one of db.py's SQL fragments answers for one row (its columns named as in ``row``)."""
    columns = ", ".join(f"? AS {name}" for name in row)
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        query = f"WITH row AS (SELECT {columns}) SELECT {fragment} FROM row"  # the row's ? come first
        return conn.execute(query, (*row.values(), *params)).fetchone()[0]


@pytest.mark.parametrize("booked_at", [
    None, "2026-11-24 09:20:57", "2026-11-24 08:59:59", "2026-11-24 10:00:00", "2026-11-23 23:59:59",
    "2026-11-24T09:20:57.123456", "2026-11-24 09:20", "2026-11-24 9:5:7", "2026-11-24", "2026-11-24 xx:yy:zz",
    "2026-11-24 -1:00:00", "garbage", "",
])
def test_the_check_in_deadline_in_memory_is_the_one_sql_releases_by(booked_at: str | None) -> None:
    """Board decides when check-in closes from memory; the database releases by CHECKIN_STARTS: twins."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        sql = conn.execute(f"SELECT {db.CHECKIN_STARTS} FROM (SELECT ? AS date, 9 AS slot_id, ? AS booked_at)",
                           (TODAY, booked_at)).fetchone()[0]
    assert db.checkin_starts(TODAY, 9, booked_at) == sql


@pytest.mark.parametrize("date", ["2026-11-23", TODAY, "2026-11-25"])
@pytest.mark.parametrize("now", ["08:59", "09:00", "09:01", "09:59", "10:00", "10:01"])  # around 9's start, end
def test_a_slot_has_started_and_ended_at_the_same_minute_in_sql_and_in_python(date: str, now: str) -> None:
    hour, row = int(now[:2]), {"date": date, "slot_id": 9}
    started = date < TODAY or (date == TODAY and now >= "09:00")
    ended = date < TODAY or (date == TODAY and now >= "10:00")
    assert db.not_started(date, 9, TODAY, hour) == bool(sql_says(db.NOT_STARTED, row, TODAY, TODAY, hour)) == (
        not started)
    assert db.not_ended(date, 9, TODAY, hour) == bool(sql_says(db.NOT_ENDED, row, TODAY, TODAY, hour)) == (
        not ended)


@pytest.mark.parametrize("booked_at", [None, "2026-11-24 09:20:57"])
@pytest.mark.parametrize("offset", [-60, -1, 0, 60])  # seconds from the deadline
def test_a_missed_check_in_is_missed_at_the_same_second_in_sql_and_in_python(booked_at: str | None,
                                                                             offset: int) -> None:
    closes = db.checkin_closes(TODAY, 9, booked_at, 15)
    assert closes == datetime.fromisoformat("2026-11-24 09:15" if booked_at is None else "2026-11-24 09:35:57")
    now = closes + timedelta(seconds=offset)
    second = now.hour * 3600 + now.minute * 60 + now.second
    row = {"date": TODAY, "slot_id": 9, "booked_at": booked_at}
    assert bool(sql_says(db.CHECKIN_MISSED, row, 15 * 60, second)) == (now >= closes) == (offset >= 0)


@pytest.mark.parametrize("no_shows", [1, 2, 3])  # the minute before, at and after a bar of 2
def test_the_no_show_bar_is_the_same_in_sql_and_in_python(tmp_path: Path, no_shows: int) -> None:
    """The store refuses by UNFORGIVEN no-shows counted in SQL; the refusal's sentence by db.barred."""

    async def outcomes() -> tuple[str, str]:
        store = db.SlotStore(str(tmp_path / "rero.db"), range(3, 15))
        await store.open(TODAY, "2026-11-24 01:00:00")
        with store.conn:
            for n in range(no_shows + 1):  # and one more that an admin forgave
                store.conn.execute("INSERT INTO events (at, srn, action, date, slot_id, via) VALUES"
                                   " ('2026-11-23 10:00:00', ?, 'no_show', '2026-11-23', ?, 'system')", (ALICE, 3 + n))
            forgiven = store.conn.execute("SELECT MAX(id) FROM events").fetchone()[0]
            store.conn.execute("INSERT INTO events (at, srn, action, via, note) VALUES"
                               " ('2026-11-23 11:00:00', ?, 'forgive', 'http', ?)", (BOB, f"no-show {forgiven}"))
        limits = db.Limits(0, 0, TODAY, 1, no_shows=2, no_shows_since="2026-11-01")
        line = db.LineLimits(0, 0)
        book = await store.book(TODAY, 9, ALICE, "2026-11-24 01:00:00", limits, "http")
        join = await store.join_waitlist(TODAY, 9, ALICE, "2026-11-24 01:00:00", limits, line, "http")
        assert len(await store.no_shows(ALICE, "2026-11-01")) == no_shows
        await store.close()
        return book.outcome, join.outcome

    book, join = asyncio.run(outcomes())
    assert (book == "no_shows") == (join == "no_shows") == db.barred(no_shows, 2) == (no_shows >= 2)


def test_a_place_in_line_is_counted_the_same_when_joined_and_when_listed(tmp_path: Path) -> None:
    """join_waitlist answers a position; my-bookings and feeds list it by WAITLIST_POSITION."""
    members = [f"PES1UG20CS{i:03d}" for i in range(2, 6)]

    async def positions() -> tuple[list[int], list[int], list[int]]:
        store = db.SlotStore(str(tmp_path / "rero.db"), range(3, 15))
        await store.open(TODAY, "2026-11-24 01:00:00")
        limits, line = db.Limits(0, 0, TODAY, 1), db.LineLimits(0, 0)
        await store.book(TODAY, 9, ALICE, "2026-11-24 01:00:00", limits, "http")
        joined = [(await store.join_waitlist(TODAY, 9, srn, "2026-11-24 01:00:00", limits, line, "http")).position
                  for srn in members]

        async def listed() -> list[int]:
            return [place[2] for srn in members for place in (await store.upcoming_of(srn, TODAY, 1))[1]]

        before = await listed()
        await store.leave_waitlist(TODAY, 9, members[1], "2026-11-24 01:00:00", "http")
        after = await listed()
        await store.close()
        return joined, before, after

    joined, before, after = asyncio.run(positions())
    assert joined == before == [1, 2, 3, 4]
    assert after == [1, 2, 3]  # the second left: those behind moved up


@pytest.mark.parametrize("now, bookable", [("09:29", True), ("09:30", False), ("09:31", False)])
def test_the_grace_rule_is_one_minute_for_the_slots_a_booking_and_a_handover(settings: Settings, clock: Clock,
                                                                             now: str, bookable: bool) -> None:
    """db.booking_closes decides when a slot that began stops being offered, bookable and handed on."""
    assert db.booking_closes(TODAY, 9, 30) == datetime.fromisoformat("2026-11-24 09:30")
    with running(replace(settings, admin_srns=frozenset({BOB})), clock) as service:
        assert service.book(9).status_code == 200
        assert service.http.post("/waitlist/join", json=body(9, "PES1UG20CS004")).status_code == 200
        clock.set(f"{TODAY} {now}")
        assert service.cancel(9).status_code == 400  # it has started: only an admin can cancel it now
        assert service.cancel(9, username=BOB).status_code == 200  # its line takes it while it is bookable
        assert (service.slots()["slots"][6]["booked_by"] == "PES1UG20CS004") == bookable
        assert service.cancel(9, username=BOB).status_code == (200 if bookable else 400)  # free it again
        assert service.slots()["slots"][6]["status"] == ("available" if bookable else "started")
        assert (service.book(9, username="PES1UG20CS005").status_code == 200) == bookable


# -- security: what an attacker can reach --------------------------------------------------------------------


def rss(pid: int) -> int:
    """A process's resident memory in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def answer_to(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything the server sends on this connection until it closes it (or goes quiet for ``timeout``)."""
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def closed_now(sock: socket.socket) -> bool:
    """Whether the server has closed this connection by now (what it sent is read and dropped)."""
    sock.setblocking(False)
    try:
        while sock.recv(1 << 20):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_cors_with_wildcard_never_allows_credentials(service: Service) -> None:
    response = service.http.get("/slots", headers={"origin": "https://club.example"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers


def test_cors_with_a_list_allows_only_those_origins(settings: Settings) -> None:
    with running(replace(settings, cors_origins=("https://club.example",))) as service:
        ok = service.http.get("/slots", headers={"origin": "https://club.example"})
        other = service.http.get("/slots", headers={"origin": "https://evil.example"})
    assert ok.headers["access-control-allow-origin"] == "https://club.example"
    assert ok.headers["access-control-allow-credentials"] == "true"
    assert "access-control-allow-origin" not in other.headers


def test_with_a_list_of_origins_other_pages_cannot_open_sockets_or_streams(settings: Settings) -> None:
    from websockets.exceptions import InvalidStatus

    with running(replace(settings, cors_origins=("https://club.example",))) as service:
        url = service.server.ws_url
        with ws_connect(url, origin="https://club.example", open_timeout=5) as ws:  # type: ignore[arg-type]
            assert receive(ws)["type"] == "slots_update"
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(url, origin="https://evil.example", open_timeout=5)  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
        assert service.socket()  # no Origin at all: curl, a native app, the device gateway
        evil = service.http.get("/events", headers={"origin": "https://evil.example"})
        assert evil.status_code == 403 and evil.json() == {"detail": "Origin not allowed"}
        with service.http.stream("GET", "/events", headers={"origin": "https://club.example"}) as stream:
            assert stream.status_code == 200


def test_connection_caps_refuse_the_handshake_with_1013(settings: Settings) -> None:
    def refused(service: Service) -> int:
        with ws_connect(service.server.ws_url, open_timeout=5) as ws, pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None
        return closed.value.rcvd.code

    with running(replace(settings, max_connections=2)) as service:
        first, _ = service.sockets(2)
        assert refused(service) == 1013
        assert service.http.get("/events").status_code == 503
        first.close()
        deadline = time.monotonic() + 5
        while service.http.get("/stats").json()["websocket"]["active_connections"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert service.socket()  # room again
    with running(replace(settings, max_connections_per_address=1)) as service:
        service.socket()
        assert refused(service) == 1013


def test_answers_carry_security_headers(service: Service) -> None:
    for response in (service.http.get("/slots"), service.http.post("/my-bookings", json=body()),
                     service.http.post("/book-slot", json={"slot_id": "x", "password": PASSWORD})):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cache-control"] == "no-store"
        assert PASSWORD not in response.text  # errors never echo the request


def test_idle_connections_cannot_use_up_the_file_descriptors(settings: Settings) -> None:
    with process(settings, files=256, REQUEST_TIMEOUT_SECONDS="2", LOG_LEVEL="info") as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        opened = contextlib.ExitStack()
        idle = [opened.enter_context(socket.socket()) for _ in range(400)]
        for sock in idle:  # more than the process may open: it must stay reachable all the same
            sock.connect(("127.0.0.1", port))
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert httpx.get(f"{url}/slots", timeout=5).status_code == 200
        login = httpx.post(f"{url}/auth/login", json={"username": ALICE, "password": PASSWORD}, timeout=5)
        assert login.status_code == 200
        with ws_connect(url.replace("http", "ws") + "/slot-booking", open_timeout=5) as ws:
            assert receive(ws)["type"] == "slots_update"
        with opened:
            assert all(closed_by_server(sock, within=3) for sock in idle)  # evicted, or closed after 2 s
        proc.send_signal(signal.SIGTERM)
        output = proc.stdout.read().decode() if proc.stdout else ""
    assert ("open files allowed: 256; connections at most 144, of which listeners at most 130;"
            " PESU checks at most 48 at once") in output


def test_a_request_head_is_at_most_16_kib_whatever_follows(service: Service) -> None:
    port = service.server.port
    headers = "".join(f"X-{i:06d}: y\r\n" for i in range(1000))  # 13,000 bytes of header lines
    with socket.create_connection(("127.0.0.1", port)) as sock:  # under the limit: answered
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode())
        assert answer_to(sock).startswith(b"HTTP/1.1 200")
    for keep_alive in (False, True):  # a first head, or the next one on a kept-alive connection
        with socket.create_connection(("127.0.0.1", port)) as sock:
            if keep_alive:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.settimeout(5)
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            # header lines that never end the head: before the limit, httptools kept them all (9 bytes of
            # memory per byte sent, 1 GiB in 2 s) and answered nothing
            sock.sendall(b"GET /slots HTTP/1.1\r\nHost: x\r\n")
            for i in range(200):  # 260 KB in all, unless answered first
                if select.select([sock], [], [], 0.01)[0]:
                    break
                with contextlib.suppress(OSError):
                    sock.sendall(b"".join(b"X-%06d: y\r\n" % (i * 100 + j) for j in range(100)))
            answer = answer_to(sock)
        assert i < 20, "answered only after 260 KB of head"
        head, _, body = answer.rpartition(b"\r\n\r\n")
        assert b"HTTP/1.1 431" in head, answer[:200]
        assert orjson.loads(body) == {"detail": "Request header fields too large"}
    with socket.create_connection(("127.0.0.1", port)) as sock:  # trailers of a chunked body, for ever
        sock.sendall(b"POST /book-slot HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n0\r\n")
        for i in range(200):
            if select.select([sock], [], [], 0.01)[0]:
                break
            with contextlib.suppress(OSError):
                sock.sendall(b"".join(b"X-%06d: y\r\n" % (i * 100 + j) for j in range(100)))
        assert i < 20 and closed_by_server(sock, within=1), "trailers were taken without end"
    with socket.create_connection(("127.0.0.1", port)) as sock:  # requests sent ahead, without end
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
        assert answer_to(sock).count(b"HTTP/1.1 200") < 100  # cut once 16 wait behind the one answered
    assert service.http.get("/health").status_code == 200


def test_a_client_gone_in_the_middle_of_a_chunked_body_is_no_error(service: Service,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", service.server.port)) as sock:
            sock.sendall(b"POST /book-slot HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"slo")
            time.sleep(0.1)
    assert service.http.get("/health").status_code == 200
    time.sleep(0.2)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a client that left was logged as our error"


def test_a_request_whose_body_or_next_head_never_comes_is_cut_after_the_request_timeout(settings: Settings) -> None:
    with running(replace(settings, request_timeout=1)) as service:
        port = service.server.port
        with socket.create_connection(("127.0.0.1", port)) as sock:  # a body that never comes
            sock.sendall(b"POST /book-slot HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"slot_id\": 5,")
            assert closed_by_server(sock, within=3)
        with socket.create_connection(("127.0.0.1", port)) as sock:  # the same, sent behind other requests
            sock.sendall(b"GET /slots HTTP/1.1\r\nHost: x\r\n\r\n" * 16)
            sock.settimeout(5)
            assert sock.recv(1).startswith(b"H")  # being answered; the rest wait
            sock.sendall(b"POST /book-slot HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"slot_id\": 5,")
            assert closed_by_server(sock, within=3)
        with socket.create_connection(("127.0.0.1", port)) as sock:  # keep-alive, then a head that trickles
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            cut_off = False
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 30:  # a byte every 0.1 s: uvicorn's
                try:  # own keep-alive timer starts again at each
                    sock.sendall(bytes([byte]))
                except OSError:
                    cut_off = True
                    break
                if select.select([sock], [], [], 0.1)[0]:
                    try:
                        cut_off = sock.recv(65536) == b""
                    except ConnectionResetError:
                        cut_off = True
                    break
            assert cut_off, "a trickling keep-alive head was never cut"
        assert service.http.get("/health").status_code == 200


@pytest.mark.parametrize("listener_cap", ["0", "5000"])  # none, or the default (155 here: refused with 1013)
def test_slow_bodies_and_listeners_cannot_fill_the_door(settings: Settings, listener_cap: str) -> None:
    """Connections that are not being answered, and listeners, give way to requests when the process runs
    out of room: the oldest slow body first, then a refused socket waiting for its peer's close frame, then
    the newest listener of the address holding most."""
    with process(settings, files=256, REQUEST_TIMEOUT_SECONDS="60", MAX_CONNECTIONS=listener_cap) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        with contextlib.ExitStack() as opened:
            slow = [opened.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(250)]
            for sock in slow:  # a whole head, 13 of the 100 bytes it promises, then nothing
                with contextlib.suppress(OSError):  # (unless evicted already)
                    sock.sendall(b"POST /book-slot HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                                 b'{"slot_id": 5,')
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert httpx.get(f"{url}/slots", timeout=5).status_code == 200
        with contextlib.ExitStack() as opened:
            listeners = []
            for _ in range(250):  # more than the Door holds, from one address
                sock = opened.enter_context(socket.create_connection(("127.0.0.1", port)))
                key = base64.b64encode(os.urandom(16)).decode()
                with contextlib.suppress(OSError):
                    sock.sendall(f"GET /slot-booking HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: "
                                 f"Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
                listeners.append(sock)
            time.sleep(0.5)
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            login = httpx.post(f"{url}/auth/login", json={"username": ALICE, "password": PASSWORD}, timeout=5)
            assert login.status_code == 200
            assert sum(map(closed_now, listeners)) >= 250 - 144  # the Door's room: 144 connections


def test_a_socket_that_sends_pings_and_never_reads_costs_little_and_is_dropped(settings: Settings) -> None:
    with process(settings, SEND_TIMEOUT_SECONDS="1") as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        sock = raw_socket_that_never_reads(port)
        before = rss(proc.pid)
        pings = client_frame(b"p" * 125, opcode=0x9) * 4096  # 0.5 MiB of pings, each owed a pong
        sock.settimeout(1)
        sent = 0
        with contextlib.suppress(TimeoutError, OSError):
            while sent < 64 * 1024 * 1024:  # stops when the server stops reading from us
                sock.sendall(pings)
                sent += len(pings)
        assert rss(proc.pid) - before < 8 * 1024 * 1024
        assert sent < 16 * 1024 * 1024
        assert closed_by_server(sock, within=5)
        assert httpx.get(f"{url}/health").status_code == 200
        sock.close()


# -- deployment: systemd, nginx, uvicorn, signals, logs and metrics ------------------------------------------


def test_the_readmes_nginx_snippet_passes_nginx_t(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed here")
    readme = (HERE / "README.md").read_text()
    snippet = readme.split("```nginx\n", 1)[1].split("```", 1)[0]
    (tmp_path / "nginx.conf").write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                                         f"events {{}}\nhttp {{\naccess_log off;\n{snippet}}}\n")
    checked = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert "location /events" in snippet and "proxy_buffering off" in snippet


def deployment() -> str:
    """README's Deployment section, as an admin reads it."""
    return (HERE / "README.md").read_text().split("\n## Deployment\n", 1)[1].split("\n## ", 1)[0]


def test_the_readmes_systemd_units_pass_systemd_analyze_and_rate_as_it_says(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    section = deployment()
    units = {}
    for block in section.split("```ini\n")[1:]:  # each unit, under the name README gives its file
        text = block.split("```", 1)[0]
        name = re.findall(r"/etc/systemd/system/([\w.-]+)", section[:section.index(text)])[-1]
        units[name] = text
    assert list(units) == ["rero-slots.service", "rero-slots-backup.service", "rero-slots-backup.timer"]
    unit = units["rero-slots.service"]
    for needed in ("Wants=network-online.target", "StateDirectory=rero-slots", "EnvironmentFile=/etc/rero-slots.env",
                   "LimitNOFILE=", "NoNewPrivileges=yes", "ProtectSystem=strict", "User=rero", "UMask=0077",
                   "StateDirectoryMode=0700", "Restart=on-failure"):
        assert needed in unit
    # "the fifth failure within 60 s leaves the unit failed": five starts, 2 s apart, fit in the interval
    value = lambda key: int(re.search(rf"^{key}=(\d+)", unit, re.M).group(1))  # noqa: E731
    assert value("StartLimitBurst") * (value("RestartSec") + 1) < value("StartLimitIntervalSec")
    assert f"the fifth failure within {value('StartLimitIntervalSec')} s" in " ".join(section.split())
    for name, text in units.items():  # as printed, but for the interpreter, which the README's steps make
        (tmp_path / name).write_text(text.replace("/opt/rero-slots/.venv/bin/python", sys.executable))
    checked = subprocess.run([analyze, "verify", *(str(tmp_path / name) for name in units)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    rated = subprocess.run([analyze, "security", "--offline=true", str(tmp_path / "rero-slots.service")],
                           capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for rero-slots.service: ([\d.]+) (\w+)", rated.stdout)
    assert exposure is not None, rated.stdout + rated.stderr
    assert float(exposure[1]) <= 2.5
    assert f"**Exposure {exposure[1]} ({exposure[2]})**" in section and f"{exposure[1]} {exposure[2]}" in section


def test_the_readmes_deployment_commands_work_on_a_debian_without_python_or_cron() -> None:
    section = deployment()
    commands = [line for block in re.findall(r"```(?:bash|ini)\n(.*?)```", section, re.S) for line in block.splitlines()]
    bare = [line for line in commands if re.search(r"(^|[\s;&(=])python\s", line)]
    assert not bare, bare  # Debian has python3, and the venv's own: never a bare "python"
    assert not [line for line in commands if "cron" in line]  # the backup is a systemd timer
    assert "ADMIN_SRNS=PES1UG20CS001" not in section  # the example member is no example admin
    # logrotate takes one directive a line ("weekly rotate 8 ..." on one line: "bad weekly directive")
    rotate = section.split("/etc/logrotate.d/rero-slots", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    directives = rotate.strip().splitlines()[1:-1]
    assert rotate.strip().splitlines()[0].endswith("{") and rotate.strip().endswith("}")
    assert directives and all(len(line.split()) <= 2 for line in directives), directives
    nginx = section.split("```nginx", 1)[0]
    assert "/etc/nginx/sites-available/rero-slots" in nginx and "sites-enabled" in nginx
    assert "default_server" in nginx and "nginx -t && systemctl reload nginx" in nginx


def test_sigterm_closes_sockets_with_1001_and_exits(settings: Settings) -> None:
    with process(settings) as (proc, url), contextlib.ExitStack() as stack:
        ws = stack.enter_context(ws_connect(url.replace("http", "ws") + "/slot-booking"))
        receive(ws)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            receive(ws, 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert proc.wait(5) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        assert time.monotonic() - started < 5


def test_sigterm_lets_a_request_in_flight_finish(settings: Settings) -> None:
    with process(settings) as (proc, url), ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, f"{url}/auth/login", json={"username": "LAG1", "password": "x"}, timeout=10)
        time.sleep(0.3)  # the login is now waiting on PESU
        proc.send_signal(signal.SIGTERM)
        assert in_flight.result().json() == {"detail": "Invalid credentials"}  # answered, not cut off
        assert proc.wait(5) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")


def test_the_uvicorn_internals_we_rely_on_are_there() -> None:
    """The guarded protocols' seam (listed at the head of app.py's "serving under uvicorn"): an upgrade of
    uvicorn that drops one fails here by name, rather than as a timeout somewhere else."""
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.h11_impl import RequestResponseCycle as H11Cycle
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as HttpToolsCycle
    from uvicorn.server import ServerState

    config = uvicorn.Config(app_module.app, **app_module.server_options(Settings()))
    config.load()
    missing = []
    loop = asyncio.new_event_loop()
    for protocol_class in (HttpToolsProtocol, H11Protocol, app_module.GuardedHttp, app_module.GuardedWebSocket):
        protocol = protocol_class(config=config, server_state=ServerState(), app_state={}, _loop=loop)
        names = ["app_state", "connection_made", "connection_lost", "data_received", "pause_writing",
                 "resume_writing"]
        if protocol_class is not app_module.GuardedWebSocket:
            names += ["cycle", "on_response_complete", "handle_websocket_upgrade"]
        else:
            names += ["close_sent", "read_paused", "writable", "conn", "handshake_complete", "disconnected",
                      "initial_response", "handle_connect"]
        if protocol_class is HttpToolsProtocol:
            names += ["on_header", "pipeline"]
        missing += [f"{protocol_class.__name__}.{name}" for name in names if not hasattr(protocol, name)]
    loop.close()
    for cycle_class in (HttpToolsCycle, H11Cycle):
        source = inspect.getsource(cycle_class.__init__)
        missing += [f"{cycle_class.__module__}.RequestResponseCycle.{name}" for name in
                    ("more_body", "response_complete", "on_response", "scope") if f"self.{name}" not in source]
    for protocol_class, arguments in ((HttpToolsProtocol, ["self"]), (H11Protocol, ["self", "event"])):
        if list(inspect.signature(protocol_class.handle_websocket_upgrade).parameters) != arguments:
            missing.append(f"{protocol_class.__name__}.handle_websocket_upgrade({', '.join(arguments)})")
    connect = inspect.getsource(app_module.WebSocketsSansIOProtocol.handle_connect)
    if connect.index("self.scope") > connect.index("create_task(self.run_asgi())"):
        missing.append("WebSocketsSansIOProtocol.handle_connect building the scope before the app's task")
    if "pause_writing" not in vars(app_module.WebSocketsSansIOProtocol):  # (what clears writable)
        missing.append("WebSocketsSansIOProtocol.pause_writing")
    send = inspect.getsource(app_module.WebSocketsSansIOProtocol.send)
    if not send.lstrip().split("\n", 2)[1].strip().startswith("await self.writable.wait()"):
        missing.append("WebSocketsSansIOProtocol.send waiting for writable before anything else")
    # the direct writes' flag is set again wherever what it depends on changes (the guarded protocols' hooks)
    hooks = {"__init__", "connection_made", "pause_writing", "resume_writing", "connection_lost"}
    import uvicorn.protocols.http.flow_control as flow_control
    import uvicorn.protocols.http.httptools_impl as httptools_impl

    for where, hooked in ((app_module.WebSocketsSansIOProtocol, {"writable": hooks, "disconnected": hooks}),
                          (httptools_impl, {"flow": hooks, "disconnected": hooks,
                                            "response_complete": {"__init__", "send"}}),
                          (flow_control.FlowControl, {"write_paused": hooks})):
        for function in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(where)))):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    changed = (node.value.attr if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                               and node.attr in ("set", "clear", "pause_writing", "resume_writing") else
                               node.attr if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) else None)
                    if changed in hooked and function.name not in hooked[changed]:
                        missing.append(f"{where.__name__}.{function.name} changing {changed} unhooked")
    send = inspect.getsource(HttpToolsCycle.send)  # (what an /events chunk written straight must match)
    if 'content = [b"%x\\r\\n" % len(body), body, b"\\r\\n"]' not in send:
        missing.append("httptools RequestResponseCycle.send framing a chunk as EventWire's")
    missing += [f"httptools RequestResponseCycle.{name}" for name in
                ("response_started", "chunked_encoding", "disconnected", "flow", "transport")
                if f"self.{name}" not in inspect.getsource(HttpToolsCycle)]
    from uvicorn.config import STARTUP_FAILURE  # (what serve() needs to exit non-zero with WORKERS > 1)
    from uvicorn.supervisors import Multiprocess
    from uvicorn.supervisors.multiprocess import Process

    missing += [f"Multiprocess.{name}" for name in ("run", "keep_subprocess_alive") if not hasattr(Multiprocess, name)]
    missing += [] if hasattr(Process, "exitcode") else ["supervisors.multiprocess.Process.exitcode"]
    missing += [] if hasattr(uvicorn.Config, "bind_socket") else ["Config.bind_socket"]
    if "STARTUP_FAILURE" not in inspect.getsource(Multiprocess.keep_subprocess_alive) or STARTUP_FAILURE != 3:
        missing.append("Multiprocess stopping when a worker exits with STARTUP_FAILURE")
    if "self.processes" not in inspect.getsource(Multiprocess.__init__):
        missing.append("Multiprocess.processes")
    assert not missing, f"uvicorn {uvicorn.__version__} lacks what app.py relies on: {missing}"


OFFSET = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?[+-]\d{2}:\d{2}")


def test_every_time_the_service_writes_beyond_the_originals_fields_carries_its_offset(settings: Settings,
                                                                                     clock: Clock) -> None:
    with running(replace(settings, admin_srns=frozenset({ADMIN}), membership="roster"), clock) as service:
        assert roster(service, "add", [ALICE]).status_code == 200
        assert service.http.post("/admin/admins/grant", json=body(username=ADMIN, srn=BOB)).status_code == 200
        assert series(service, ADMIN, action="close", slots=[13], weekdays=["tue"], **{"from": TODAY,
                                                                                      "until": TOMORROW}).status_code == 200
        assert service.book(9).status_code == 200
        times = [service.http.get("/now").json()["now"],
                 *(e["at"] for e in service.http.post("/admin/history", json=body(username=ADMIN)).json()["events"]),
                 service.http.post("/admin/members", json=body(username=ADMIN)).json()["members"][0]["added_at"],
                 service.http.post("/admin/admins", json=body(username=ADMIN)).json()["admins"][0]["granted_at"],
                 service.http.get("/admin/series", headers=bearer(login(service, ADMIN))).json()["series"][0][
                     "created_at"]]
        assert len(times) > 5 and all(OFFSET.fullmatch(at) and at.endswith("+05:30") for at in times), times
        slot = service.slots()["slots"][6]  # the original's own field keeps its shape
        assert slot["booked_at"] == "2026-11-24 01:00:00"


def test_text_logs_carry_their_offset(settings: Settings) -> None:
    with process(settings, LOG_LEVEL="info") as (proc, url):
        assert httpx.post(f"{url}/book-slot", json=body(7, date=real_tomorrow())).status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert proc.stdout is not None
        ours = [line for line in proc.stdout.read().decode().splitlines() if " rero: " in line]
    assert ours and all(OFFSET.fullmatch(line.split(" ", 1)[0]) and line.split(" ", 1)[0].endswith("+00:00")
                        for line in ours), ours


def test_json_logs_one_object_per_line_with_fields_and_no_secrets(settings: Settings) -> None:
    day = real_tomorrow()
    with process(settings, LOG_FORMAT="json", LOG_LEVEL="info") as (proc, url):
        httpx.post(f"{url}/book-slot", json={"slot_id": 7, "date": day, "username": ALICE, "password": PASSWORD})
        httpx.post(f"{url}/auth/login", json={"username": BOB, "password": "wrong-" + PASSWORD})
        feed = httpx.post(f"{url}/calendar/link", json={"username": ALICE, "password": PASSWORD}).json()["path"]
        assert httpx.get(f"{url}{feed}").status_code == 200
        proc.send_signal(signal.SIGTERM)
        output = proc.stdout.read().decode() if proc.stdout else ""
    lines = [orjson.loads(line) for line in output.splitlines() if line.strip()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    start = next(line for line in lines if line["message"].startswith("rero-slots "))
    assert settings.database_path in start["message"] and settings.pesu_auth_url in start["message"]
    booking = next(line for line in lines if line.get("action") == "book")
    assert (booking["srn"], booking["slot"], booking["date"], booking["level"]) == (ALICE, 7, day, "info")
    refused = next(line for line in lines if line.get("status") == 401)
    assert refused["username"] == BOB
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert any({"route": "POST /book-slot", "status": 200}.items() <= line.items() for line in access)
    assert {"route": "GET /calendar/<secret>.ics", "status": 200}.items() <= access[-1].items()
    assert feed.removeprefix("/calendar/").removesuffix(".ics") not in output
    assert PASSWORD not in output


@pytest.mark.parametrize("level", ["debug", "trace"])
def test_no_log_level_shows_a_password_or_a_token(settings: Settings, level: str) -> None:
    day = real_tomorrow()
    secret = "the-session-secret-of-this-test"
    with process(settings, LOG_LEVEL=level, SESSION_SECRET=secret) as (proc, url):
        login = httpx.post(f"{url}/auth/login", json={"username": ALICE, "password": PASSWORD}).json()
        signature = login["token"].split(".")[1]
        with ws_connect(url.replace("http", "ws") + "/slot-booking", open_timeout=5) as ws:
            receive(ws)
            assert send(ws, {"type": "book_slot", "slot_id": 7, "date": day, "username": BOB,
                             "password": PASSWORD})["success"] is True
            assert send(ws, {"type": "cancel_slot", "slot_id": 7, "date": day, "token": login["token"]})
        httpx.post(f"{url}/my-bookings", headers=bearer(login["token"]))
        feed = httpx.post(f"{url}/calendar/link", headers=bearer(login["token"])).json()["path"]
        feed_secret = feed.removeprefix("/calendar/").removesuffix(".ics")
        mistyped = [feed + "?x=1", feed.upper(), feed.removesuffix(".ics"), feed + "/", f"/{feed_secret}.ics",
                    f"/calendar//{feed_secret}.ics", f"/calendar/link/{feed_secret}.ics", f"/x?{feed_secret}",
                    f"/calendar%5C{feed_secret}.ics", f"/calendar/%20{feed_secret}.ics",
                    f"/calendar/{feed_secret[:20]}%20{feed_secret[20:]}.ics"]
        for path in (feed, *mistyped):
            httpx.get(f"{url}{path}")
        httpx.post(f"{url}/auth/logout", json={"token": login["token"]})
        proc.send_signal(signal.SIGTERM)
        output = proc.stdout.read().decode() if proc.stdout else ""
    assert "booking" in output.lower() or "book slot" in output  # the levels did log
    assert "GET /calendar/<secret>.ics" in output  # the feed's requests are logged, without their secret
    assert PASSWORD not in output and signature not in output and secret not in output
    assert feed_secret not in output and feed_secret.upper() not in output and feed_secret[20:] not in output


def test_a_username_cannot_forge_a_log_line(settings: Settings) -> None:
    forged = "nobody\n2026-11-24 01:00:00,000 INFO rero: book slot 5 by PES1UG"  # 64 characters at most
    with process(settings, LOG_LEVEL="info") as (proc, url):
        httpx.post(f"{url}/auth/login", json={"username": forged, "password": "x"})
        proc.send_signal(signal.SIGTERM)
        output = proc.stdout.read().decode() if proc.stdout else ""
    assert not any(line.startswith("2026-11-24 01:00:00,000") for line in output.splitlines())
    assert "login refused for nobody\\n2026-11-24" in output  # escaped, on the line it belongs to


def test_metrics_are_off_unless_asked_for_and_never_name_a_member(settings: Settings) -> None:
    with running(settings) as service:
        assert service.http.get("/metrics").status_code == 404
    with running(replace(settings, metrics=True, login_fails_per_username=1)) as service:
        ws = service.socket()
        service.book(5)  # PESU asked: a miss, one upstream call
        send(ws, {"type": "book_slot", "slot_id": 6, "username": ALICE, "password": PASSWORD})  # a cache hit
        service.cancel(5)
        service.http.post("/auth/login", json={"username": BOB, "password": "wrong"})
        service.http.post("/auth/login", json={"username": BOB, "password": "wrong"})  # throttled
        service.http.post("/auth/login", json={"username": "DOWN1", "password": "x"})
        response = service.http.get("/metrics")
    text = response.text
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert values["rero_open_sockets"] == "1"
    assert int(values["rero_open_connections"]) >= 2 and values["rero_connections_refused_total"] == "0"
    assert values['rero_slot_changes_total{action="book",via="http"}'] == "1"
    assert values['rero_slot_changes_total{action="book",via="websocket"}'] == "1"
    assert values['rero_slot_changes_total{action="cancel",via="http"}'] == "1"
    assert values['rero_logins_total{result="ok"}'] == "3"
    assert values['rero_logins_total{result="invalid"}'] == "1"
    assert values['rero_logins_total{result="throttled"}'] == "1"
    assert values['rero_logins_total{result="upstream_error"}'] == "1"
    assert values['rero_auth_cache_total{result="hit"}'] == "2"
    assert values['rero_pesu_upstream_seconds_bucket{le="+Inf"}'] == values["rero_pesu_upstream_seconds_count"] == "3"
    assert int(values["rero_broadcasts_total"]) >= 1
    assert ALICE not in text and BOB not in text


def scrape(url: str) -> dict[str, float]:
    """One /metrics answer's samples, on a connection of its own (so any worker may answer it)."""
    text = httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text
    return {key: float(value) for key, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                 if not line.startswith("#"))}


def test_metrics_describe_the_whole_service_whichever_worker_answers(settings: Settings) -> None:
    """With WORKERS=2 a scrape used to get one worker's counters, and the next the other's, under the same
    names: a graph of bookings went up and down."""
    day = real_tomorrow()
    booked = 'rero_slot_changes_total{action="book",via="http"}'
    with process(settings, WORKERS="2", METRICS="1", SESSION_SECRET="s" * 32) as (proc, url):
        with ThreadPoolExecutor(8) as pool:  # on many connections, so both workers book
            answers = list(pool.map(lambda slot: httpx.post(f"{url}/book-slot", json=body(slot, date=day),
                                                            headers={"Connection": "close"}), range(3, 15)))
        assert [answer.status_code for answer in answers] == [200] * 12
        deadline = time.monotonic() + 5
        while scrape(url).get(booked) != 12:  # every worker's share is in within a second
            assert time.monotonic() < deadline, scrape(url)
            time.sleep(0.1)
        with ThreadPoolExecutor(16) as pool:  # scrapes at the same instant: each still the whole service
            assert {sample[booked] for sample in pool.map(lambda _: scrape(url), range(100))} == {12}
        seen = [scrape(url) for _ in range(30)]
        assert {sample[booked] for sample in seen} == {12}  # whichever worker answered
        assert {sample["rero_workers"] for sample in seen} == {2}
        logins = [sample['rero_logins_total{result="ok"}'] for sample in seen]
        assert logins == sorted(logins) and logins[0] >= 1  # a counter never goes back
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
    files = list(Path(settings.database_path + "-metrics").iterdir())
    assert len(files) == 2 and all(oct(path.stat().st_mode & 0o777) == "0o600" for path in files)


# -- upgrading from the original, backup and check -----------------------------------------------------------


def run_app(*args: str, database: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HERE / "app.py"), *args], env={**os.environ, "DATABASE_PATH": database},
                          cwd=HERE, capture_output=True, text=True, timeout=30)


def make_database(path: Path, bookings: int = 0) -> None:
    """A database as the app leaves it, with some bookings."""
    async def build() -> None:
        store = db.SlotStore(str(path), range(3, 15))
        await store.open(TODAY, "2026-11-24 01:00:00")
        for slot_id in range(3, 3 + bookings):
            await store.book(TODAY, slot_id, ALICE, "2026-11-24 01:00:00", db.Limits(0, 0, TODAY, 1), "http")
        await store.close()

    asyncio.run(build())


def test_an_original_database_opens_with_its_bookings(settings: Settings) -> None:
    """A database made by the original system before it tracked users: no booked_by column."""
    Path(settings.database_path).parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(settings.database_path)) as conn:
        conn.execute("""CREATE TABLE slots (id INTEGER PRIMARY KEY, start_time TEXT NOT NULL,
            end_time TEXT NOT NULL, is_booked BOOLEAN DEFAULT FALSE, booked_at DATETIME DEFAULT NULL,
            created_at DATETIME DEFAULT CURRENT_TIMESTAMP, updated_at DATETIME DEFAULT CURRENT_TIMESTAMP)""")
        for hour in range(3, 15):
            conn.execute("INSERT INTO slots (id, start_time, end_time, is_booked, booked_at) VALUES (?, ?, ?, ?, ?)",
                         (hour, f"{hour:02d}:00", f"{hour + 1:02d}:00", hour in (6, 9),
                          "2025-07-28 10:15:30" if hour in (6, 9) else None))
        conn.commit()
    with running(settings) as service:
        slots = service.slots()
        assert slots["booked_slots"] == [6, 9]
        assert slots["slots"][3]["booked_at"] == "2025-07-28 10:15:30"
        assert slots["date"] == TODAY  # undated bookings became bookings on the day of migration
        assert service.book(6).status_code == 400  # still taken
        assert service.book(7).status_code == 200
    with running(replace(settings, admin_srns=frozenset({ALICE}))) as service:  # opens again, nothing doubled
        assert service.slots()["booked_slots"] == [6, 7, 9]
        log = service.http.post("/admin/history", json=body()).json()["events"]
        assert [(e["action"], e["slot_id"]) for e in log] == [("book", 7), ("migrate", 9), ("migrate", 6)]
        assert log[1]["note"] == "from the original database (booked at 2025-07-28 10:15:30)"


@pytest.mark.parametrize("tracked_users", [False, True])  # the original's first schema, and its later one
def test_upgrading_from_the_original_backend_and_back(settings: Settings, tmp_path: Path, tracked_users: bool) -> None:
    database = Path(settings.database_path)
    database.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(database)) as conn:
        conn.execute(f"""CREATE TABLE slots (id INTEGER PRIMARY KEY, start_time TEXT NOT NULL,
            end_time TEXT NOT NULL, is_booked BOOLEAN DEFAULT FALSE,
            {"booked_by TEXT DEFAULT NULL," if tracked_users else ""} booked_at DATETIME DEFAULT NULL,
            created_at DATETIME DEFAULT CURRENT_TIMESTAMP, updated_at DATETIME DEFAULT CURRENT_TIMESTAMP)""")
        for hour in range(3, 15):
            conn.execute("INSERT INTO slots (id, start_time, end_time, is_booked) VALUES (?, ?, ?, ?)",
                         (hour, f"{hour:02d}:00", f"{hour + 1:02d}:00", hour in (6, 9)))
        conn.commit()
    before = run_app("check", database=str(database))  # before the first start: the README's first step
    assert before.returncode == 0 and "integrity ok" in before.stdout
    assert "schema version none (the original system's database, not yet upgraded); 2 booking(s)" in before.stdout
    saved = run_app("backup", str(tmp_path / "before-upgrade.db"), database=str(database))
    assert saved.returncode == 0 and "2 booking(s)" in saved.stdout

    with running(settings) as service:
        assert service.slots()["booked_slots"] == [6, 9]
        assert service.book(7).status_code == 200
    after = run_app("check", database=str(database))
    assert after.returncode == 0 and "schema version 2; 3 booking(s)" in after.stdout

    with contextlib.closing(sqlite3.connect(database)) as conn:  # rolling back: what the original reads
        kept = conn.execute("SELECT id FROM slots WHERE is_booked ORDER BY id").fetchall()
    assert kept == [(6,), (9,)]  # its bookings as they were at the upgrade; 7 lives only in rero-slots


def original_database(path: Path, booked: dict[int, str]) -> None:
    """A database as the original system leaves it: its slots table, some of them booked."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("""CREATE TABLE slots (id INTEGER PRIMARY KEY, start_time TEXT NOT NULL,
            end_time TEXT NOT NULL, is_booked BOOLEAN DEFAULT FALSE, booked_by TEXT DEFAULT NULL,
            booked_at DATETIME DEFAULT NULL, created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
            updated_at DATETIME DEFAULT CURRENT_TIMESTAMP)""")
        for hour in range(3, 15):
            conn.execute("INSERT INTO slots (id, start_time, end_time, is_booked, booked_by, booked_at)"
                         " VALUES (?, ?, ?, ?, ?, ?)", (hour, f"{hour:02d}:00", f"{hour + 1:02d}:00", hour in booked,
                                                        booked.get(hour), "2025-07-28 10:15:30" if hour in booked else None))
        conn.commit()


def evening() -> tuple[str, str]:
    """A time zone where it is evening now (every slot of 3..15 has started, and midnight is hours away),
    and tomorrow's date there: how the processes below, on the real clock, are upgraded in the evening."""
    for east in range(-12, 15):
        here = datetime.now(timezone.utc) + timedelta(hours=east)
        if 18 <= here.hour <= 21:
            return f"Etc/GMT{-east:+d}", (here + timedelta(days=1)).date().isoformat()
    raise AssertionError("no evening anywhere")


def test_an_upgrade_while_two_workers_run_brings_each_original_booking_in_once(settings: Settings,
                                                                              tmp_path: Path) -> None:
    zone, tomorrow = evening()
    original = tmp_path / "original" / "rero.db"
    original.parent.mkdir()
    original_database(original, {6: ALICE, 9: BOB, 11: "PES1UG20CS004"})
    environ = {"WORKERS": "2", "TIMEZONE": zone, "SESSION_SECRET": "s" * 32}
    with process(settings, **environ) as (_, url), contextlib.ExitStack() as stack:
        taken = httpx.post(f"{url}/book-slot", json=body(11, CAROL, date=tomorrow))  # a member's own, first
        assert taken.status_code == 200, taken.text
        tabs = [stack.enter_context(ws_connect(url.replace("http", "ws") + "/slot-booking", open_timeout=5))
                for _ in range(6)]
        for tab in tabs:  # watching tomorrow
            assert receive(tab)["type"] == "slots_update"
            assert send(tab, {"type": "get_slots", "date": tomorrow})["data"]["booked_slots"] == [11]
        upgrade = [sys.executable, str(HERE / "app.py"), "upgrade", str(original)]
        run = lambda: subprocess.run(upgrade, env={**os.environ, "DATABASE_PATH": settings.database_path,  # noqa: E731
                                                   "TIMEZONE": zone}, cwd=HERE, capture_output=True, text=True,
                                     timeout=30)
        first = run()
        assert first.returncode == 0, first.stderr
        lines = first.stdout.splitlines()
        assert lines[0].startswith(f"backed up {settings.database_path} to {settings.database_path}.before-upgrade-")
        assert lines[1:] == [f"slot 6 (06:00-07:00) of {ALICE}: booked on {tomorrow}",  # not today: all started
                             f"slot 9 (09:00-10:00) of {BOB}: booked on {tomorrow}",
                             f"slot 11 (11:00-12:00) of PES1UG20CS004: left out, slot 11 on {tomorrow} is booked by"
                             f" {CAROL}"]
        for tab in tabs:  # every worker's listeners hear of it
            update = receive_until(tab, "slots_update")
            while update["data"]["booked_slots"] != [6, 9, 11]:
                update = receive_until(tab, "slots_update")
        mine = httpx.post(f"{url}/my-bookings", json=body(username=ALICE)).json()["bookings"]
        assert [(b["id"], b["date"]) for b in mine] == [(6, tomorrow)]
        second = run()
        assert second.returncode == 0 and second.stdout.splitlines() == [
            f"{original}: its bookings were brought in at {first_at(settings)}: nothing changed"]
    after = run_app("check", database=settings.database_path)
    assert "3 booking(s)" in after.stdout  # Carol's and the two brought in, once
    assert len(list(Path(settings.database_path).parent.glob("*.before-upgrade-*"))) == 1  # the second backed up nothing


def test_an_upgrade_racing_members_booking_the_same_slots_on_two_workers_gives_each_slot_once(
        settings: Settings, tmp_path: Path) -> None:
    zone, tomorrow = evening()
    original = tmp_path / "original.db"
    original_database(original, {hour: f"PES1UG20CS{hour:03d}" for hour in range(3, 15)})
    environ = {"WORKERS": "2", "TIMEZONE": zone, "SESSION_SECRET": "s" * 32}
    with process(settings, **environ) as (_, url), ThreadPoolExecutor(24) as pool:
        go = threading.Event()

        def member(n: int) -> list[int]:  # books one of slots 3 to 8 at a moment of the upgrade's run
            with httpx.Client(base_url=url, timeout=10) as client:
                token = client.post("/auth/login", json=body(username=f"PES1UG20CS{100 + n:03d}")).json()["token"]
                go.wait(30)
                time.sleep(random.uniform(0, 0.8))  # (the upgrade's process takes some 0.3-0.5 s to its commit)
                answer = client.post("/book-slot", json={"slot_id": 3 + n % 6, "date": tomorrow}, headers=bearer(token))
            return [3 + n % 6] if answer.status_code == 200 else []

        members = [pool.submit(member, n) for n in range(20)]
        time.sleep(0.5)  # (the members are signed in)
        upgrade = subprocess.Popen([sys.executable, str(HERE / "app.py"), "upgrade", str(original)], cwd=HERE,
                                   env={**os.environ, "DATABASE_PATH": settings.database_path, "TIMEZONE": zone},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        go.set()
        out, err = upgrade.communicate(timeout=60)
        backed_up, *lines = out.splitlines()
        acknowledged = {slot: f"PES1UG20CS{100 + n:03d}" for n, future in enumerate(members)
                        for slot in future.result()}
        assert upgrade.returncode == 0 and backed_up.startswith("backed up"), err
        holders = {s["id"]: s["booked_by"] for s in httpx.get(f"{url}/slots", params={"date": tomorrow}).json()["slots"]}
    assert len(lines) == 12 and all(holders[slot] for slot in range(3, 15))  # every slot held, by one
    assert len(acknowledged) == len([slot for slot in acknowledged if slot < 9])  # (members asked for 3 to 8)
    for slot, line in zip(range(3, 15), lines):
        if line.endswith(f"booked on {tomorrow}"):  # the original's member has it, and no member was told yes
            assert holders[slot] == f"PES1UG20CS{slot:03d}" and slot not in acknowledged, line
        else:  # a member booked it first: theirs, and the upgrade says it left the original's out
            assert line.endswith(f"is booked by {acknowledged[slot]}") and holders[slot] == acknowledged[slot], line


def test_an_upgrade_names_what_it_cannot_bring_in_and_a_copy_of_the_original_is_the_same_original(
        settings: Settings, tmp_path: Path) -> None:
    odd = tmp_path / "odd.db"  # what a hand-made or damaged file may hold: ids that are no slot, a blob
    with contextlib.closing(sqlite3.connect(odd)) as conn, conn:
        conn.execute("CREATE TABLE slots (id, start_time, end_time, is_booked, booked_by, booked_at)")
        conn.execute("INSERT INTO slots VALUES (NULL, '', '', 1, 'X', NULL), (1e300, '', '', 1, 'X', NULL),"
                     " (12, '', '', 1, x'00ff', NULL), (6, '', '', 1, 'PES1UG20CS001', NULL),"
                     " (9, '', '', 1, ' pes1ug20cs002 ', NULL)")
    original = odd
    run = lambda path, *more: subprocess.run(  # noqa: E731
        [sys.executable, str(HERE / "app.py"), "upgrade", str(path), *more], cwd=HERE, capture_output=True,
        text=True, timeout=30, env={**os.environ, "DATABASE_PATH": settings.database_path})
    first = run(original, "--date", real_tomorrow())
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr
    lines = first.stdout.splitlines()  # (no backup line: there was no database yet)
    assert [line for line in lines if "left out" in line and ("not a slot" in line or "not an SRN" in line)] != []
    assert len([line for line in lines if "left out" in line]) == 3  # (NULL, 1e300, a blob), each named
    assert f"slot 9 (09:00-10:00) of {BOB}: booked on {real_tomorrow()}" in lines  # spaces and case forgiven
    copy = tmp_path / "renamed.db"
    shutil.copy(original, copy)  # the same bookings under another name: already brought in
    again = run(copy, "--date", (datetime.now(IST) + timedelta(days=2)).date().isoformat())
    assert again.returncode == 0 and again.stdout.strip().endswith("nothing changed"), again.stdout
    broken = tmp_path / "broken.db"
    broken.write_text("not a database")
    said = run(broken)
    assert said.returncode == 1 and str(broken) in said.stderr and "Traceback" not in said.stderr, said.stderr
    other = tmp_path / "other.db"
    original_database(other, {7: CAROL})
    original_database(tmp_path / "third.db", {8: CAROL})
    for path in (other, tmp_path / "third.db"):  # two in one second: two copies, neither written over
        assert run(path).returncode == 0
    copies = sorted(Path(settings.database_path).parent.glob("*.before-upgrade-*"))
    assert len(copies) == 2 and all(oct(path.stat().st_mode & 0o777) == "0o600" for path in copies)
    name = str(tmp_path / "backups" / "rero.db.before-upgrade-20261204-000000")  # two in one second: two names
    assert [db.reserve(name), db.reserve(name)] == [name, name + "-2"]
    assert not [line for line in first.stdout.splitlines() if line.startswith("backed up")]


def first_at(settings: Settings) -> str:
    """When the upgrade brought an original in, as meta records it."""
    with contextlib.closing(sqlite3.connect(settings.database_path)) as conn:
        return conn.execute("SELECT value FROM meta WHERE key LIKE 'upgrade %'").fetchone()[0]


@pytest.mark.parametrize("stop", ["killed", "stopped"])
def test_start_up_refuses_an_original_copied_over_a_database_beside_files_not_its_own(
        settings: Settings, tmp_path: Path, stop: str) -> None:
    """README's old way (copy the original's file into the state folder) lost its bookings: SQLite replayed
    the -wal left beside it. Now the start refuses it, with one line, and exits non-zero."""
    with process(settings, WORKERS="2", SESSION_SECRET="s" * 32) as (proc, url):
        assert httpx.post(f"{url}/book-slot", json=body(7, date=real_tomorrow())).status_code == 200
        if stop == "killed":  # (the whole service, as a power cut would: workers left serving hold the files)
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    left = sorted(path.name for path in Path(settings.database_path).parent.iterdir())
    assert left == (["rero.db", "rero.db-gen", "rero.db-shm", "rero.db-wal"] if stop == "killed" else
                    ["rero.db", "rero.db-gen"])
    original_database(tmp_path / "original.db", {6: ALICE})
    shutil.copy(tmp_path / "original.db", settings.database_path)
    for workers in ("1", "2"):
        started = subprocess.run([sys.executable, str(HERE / "app.py")], capture_output=True, text=True, timeout=30,
                                 env={**os.environ, "DATABASE_PATH": settings.database_path, "WORKERS": workers,
                                      "PORT": str(free_port())}, cwd=HERE)
        assert started.returncode != 0 and started.stdout == ""
        said = started.stderr.strip().splitlines()
        assert len(said) == 1 and "beside it" in said[0] and "not its own" in said[0], started.stderr
        assert said[0].startswith(f"DATABASE_PATH={settings.database_path!r} cannot be used: rero.db-")
    with contextlib.closing(sqlite3.connect(tmp_path / "original.db")) as conn:  # the original's file untouched
        assert conn.execute("SELECT id, booked_by FROM slots WHERE is_booked").fetchall() == [(6, ALICE)]


def test_a_wal_is_the_databases_own_only_after_a_crash_of_that_database(tmp_path: Path) -> None:
    """The attack: another database's -wal beside ours (whose -gen is its own), or ours with -gen cut short,
    was replayed at start-up and its bookings replaced ours, "integrity ok"."""
    def opened(path: Path, slots: range) -> db.SlotStore:
        store = db.SlotStore(str(path), range(3, 15))

        async def run() -> None:
            await store.open(TODAY, "2026-11-24 01:00:00")
            for slot in slots:
                await store.book(TODAY, slot, ALICE, "2026-11-24 01:00:00", db.Limits(0, 0, TODAY, 1), "http")
        asyncio.run(run())
        return store

    ours, other = tmp_path / "ours" / "rero.db", tmp_path / "other" / "rero.db"
    store = opened(ours, range(3, 6))
    asyncio.run(store.close())  # stopped cleanly: no WAL of its own is left
    assert not Path(f"{ours}-wal").exists()
    running = opened(other, range(9, 10))  # another database, running (or killed): its WAL is there
    shutil.copy(f"{other}-wal", f"{ours}-wal")
    with pytest.raises(db.ForeignFiles, match="rero.db-wal"):
        db.check_own_files(str(ours))
    Path(f"{ours}-wal").unlink()
    db.check_own_files(str(ours))  # as it was
    crashed = tmp_path / "crashed"  # a crash of our own: the WAL, -shm and -gen as the running one left them
    crashed.mkdir()
    for suffix in ("", "-wal", "-shm", "-gen"):
        shutil.copy(f"{other}{suffix}", crashed / f"rero.db{suffix}")
    db.check_own_files(str(crashed / "rero.db"))
    with open(crashed / "rero.db-gen", "r+b") as gen:
        gen.truncate(8)  # cut short: whose the WAL is cannot be told
    with pytest.raises(db.ForeignFiles):
        db.check_own_files(str(crashed / "rero.db"))
    asyncio.run(running.close())


def test_a_start_that_fails_exits_non_zero_with_any_number_of_workers(settings: Settings, tmp_path: Path) -> None:
    """systemd's Restart=on-failure acts only on a non-zero exit; uvicorn's supervisor exits 0 when a worker
    fails to start. (A directory where the -gen file goes: the database cannot be opened.)"""
    Path(settings.database_path).parent.mkdir(parents=True)
    Path(settings.database_path + "-gen").mkdir()
    environ = {**os.environ, "DATABASE_PATH": settings.database_path, "LOG_LEVEL": "warning"}
    for workers in ("1", "2"):
        started = subprocess.run([sys.executable, str(HERE / "app.py")], capture_output=True, text=True, timeout=30,
                                 env={**environ, "WORKERS": workers, "PORT": str(free_port())}, cwd=HERE)
        assert started.returncode == 1 and started.stderr.count("\n") == 1, started.stderr
        assert "DATABASE_PATH=" in started.stderr and "rero.db-gen" in started.stderr
        # past the check before the workers (as when the file changes in between): the worker fails, and so
        # does the process
        served = subprocess.run([sys.executable, "-c", "import app, sys; sys.exit(app.serve(app.SETTINGS))"],
                                capture_output=True, text=True, timeout=30, cwd=HERE,
                                env={**environ, "WORKERS": workers, "PORT": str(free_port())})
        assert served.returncode == 3, served.stderr
    assert "rero-slots did not start: worker" in served.stderr


def test_database_files_are_readable_by_the_service_user_only(settings: Settings, tmp_path: Path) -> None:
    with process(settings) as (_, url):
        assert httpx.post(f"{url}/book-slot", json=body(7, date=real_tomorrow())).status_code == 200
        files = sorted(Path(settings.database_path).parent.iterdir())
        assert [path.name for path in files] == ["rero.db", "rero.db-gen", "rero.db-shm", "rero.db-wal"]
        assert {path.name: oct(path.stat().st_mode & 0o777) for path in files} == {
            path.name: "0o600" for path in files}
        assert run_app("backup", str(tmp_path / "backups" / "copy.db"), database=settings.database_path).returncode == 0
        assert oct((tmp_path / "backups" / "copy.db").stat().st_mode & 0o777) == "0o600"
        assert oct((tmp_path / "backups").stat().st_mode & 0o777) == "0o700"  # a folder it makes: the same


def test_backup_copies_a_running_database_and_check_reads_it(settings: Settings, tmp_path: Path) -> None:
    day = real_tomorrow()
    with process(settings) as (_, url):
        for slot in (5, 6):
            response = httpx.post(f"{url}/book-slot", json={"slot_id": slot, "date": day, "username": ALICE,
                                                             "password": PASSWORD})
            assert response.status_code == 200
        copy = tmp_path / "backups" / "rero-copy.db"
        done = run_app("backup", str(copy), database=settings.database_path)  # while the server runs
        assert done.returncode == 0 and "2 booking(s)" in done.stdout
    checked = run_app("check", database=str(copy))
    assert checked.returncode == 0
    assert "integrity ok" in checked.stdout and "schema version 2; 2 booking(s)" in checked.stdout
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        assert conn.execute("SELECT slot_id FROM bookings WHERE date = ? ORDER BY slot_id", (day,)).fetchall() == [
            (5,), (6,)]

    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not a database" * 100)
    assert run_app("check", database=str(broken)).returncode == 1
    assert run_app("check", database=str(tmp_path / "missing.db")).returncode == 1
    assert run_app("restore", database=str(copy)).returncode == 2  # unknown command: the usage, no server


def test_check_and_backup_open_exactly_the_path_given(tmp_path: Path) -> None:
    make_database(tmp_path / "rero", bookings=1)  # what "rero#2.db" would turn into if read as a URI
    corrupt = tmp_path / "rero#2.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    assert run_app("check", database=str(corrupt)).returncode == 1
    assert run_app("backup", str(tmp_path / "copy.db"), database=str(corrupt)).returncode == 1
    assert not (tmp_path / "copy.db").exists()  # no empty copy left behind
    itself = run_app("backup", str(tmp_path / "rero"), database=str(tmp_path / "rero"))
    assert itself.returncode == 1 and "would overwrite the database itself" in itself.stderr
    odd = tmp_path / "club?term=2.db"
    make_database(odd, bookings=2)
    checked = run_app("check", database=str(odd))
    assert checked.returncode == 0 and "2 booking(s)" in checked.stdout
    copied = run_app("backup", str(tmp_path / "copy#1.db"), database=str(odd))
    assert copied.returncode == 0 and "2 booking(s)" in copied.stdout
    assert (tmp_path / "copy#1.db").exists()
