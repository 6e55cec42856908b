"""Benchmark: the app against a bare Starlette ceiling, both under real uvicorn on loopback.

    python bench.py            # about 4 minutes on 2 cores; prints a Markdown table

The ceiling serves the same bytes and broadcasts the same message as the app, with no database and no
auth: whatever the app loses against it is the cost of SQLite, PESU checks and the hub. PESU is a fake
on loopback. Load comes from a separate process with raw keep-alive sockets; listeners are raw sockets
that only read and scan for ``"version":N``, so the server is what is measured.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import os
import re
import select
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple
from zoneinfo import ZoneInfo

import httpx
import orjson

HERE = Path(__file__).resolve().parent
USER = {"username": "PES1UG20CS001", "password": "bench-password"}
VERSION = re.compile(rb'"version":(\d+)')
HTTP_SECONDS = 4
OPS_LATENCY = {100: 200, 1000: 1000}  # one-at-a-time changes on each server, per listener count
LATENCY_CHUNK = 50  # one-at-a-time changes on one server before turning to the other
OPS_BURST = 600  # back-to-back book/cancel messages
BROWSER_LATENCY = {1000: 1000, 5000: 200}  # browser-like listeners: one-at-a-time changes on each server


# -- the servers (each runs in its own process: python bench.py --serve NAME PORT) -----------------------------


def fake_pesu_app():  # noqa: ANN201
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def authenticate(request):  # noqa: ANN001, ANN202
        body = await request.json()
        if body["password"] != USER["password"]:
            return JSONResponse({"status": False}, 401)
        srn = body["username"].upper()
        return JSONResponse({"status": True, "profile": {"name": "Bench", "srn": srn, "prn": srn}})

    return Starlette(routes=[Route("/authenticate", authenticate, methods=["POST"])])


def ceiling_app(slots_body: bytes, update: bytes, my_bookings: bytes, feed: bytes):  # noqa: ANN201
    """The least a server can do for the same traffic: fixed bytes, one set of sockets, sequential sends."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    sockets: set[WebSocket] = set()
    state = {"version": 0}
    template = update.replace(b'"version":0', b'"version":%d')

    async def slots(request: Request) -> Response:
        return Response(slots_body, media_type="application/json")

    async def health(request: Request) -> Response:
        body = {"status": "healthy", "timestamp": datetime.now().isoformat(), "active_connections": len(sockets),
                "total_slots": 12, "booked_slots_count": 0, "available_slots_count": 12,
                "database": {"total_slots": 12, "booked_slots": 0, "available_slots": 12, "database_path": "x"}}
        return Response(orjson.dumps(body), media_type="application/json")

    async def bookings(request: Request) -> Response:
        await request.body()
        return Response(my_bookings, media_type="application/json")

    async def calendar(request: Request) -> Response:
        return Response(feed, media_type="text/calendar", headers={"etag": '"0"'})

    async def socket_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        sockets.add(websocket)
        await websocket.send_text((template % state["version"]).decode())
        try:
            while True:
                message = orjson.loads(await websocket.receive_text())
                if message.get("type") in ("book_slot", "cancel_slot"):
                    await websocket.send_text(orjson.dumps({"type": "booking_response", "success": True,
                                                            "slot_id": message["slot_id"]}).decode())
                    state["version"] += 1
                    text = (template % state["version"]).decode()
                    for peer in list(sockets):
                        with contextlib.suppress(Exception):
                            await peer.send_text(text)
        except WebSocketDisconnect:
            pass
        finally:
            sockets.discard(websocket)

    return Starlette(routes=[
        Route("/slots", slots), Route("/health", health), Route("/my-bookings", bookings, methods=["POST"]),
        Route("/calendar/{secret}.ics", calendar),
        WebSocketRoute("/slot-booking", socket_endpoint),
    ])


class BareFrames(asyncio.Protocol):
    """The wire's ceiling: a WebSocket server in plain asyncio that, on each book or cancel, builds one
    frame (the app's own slots_update, with the new version) and writes it to every transport, deflated
    once for those that agreed to compression (without context takeover, as the app agrees to it). No
    ASGI, no state machine, no database: what this machine and Python can do at most."""

    clients: set[BareFrames] = set()
    version = 0
    update = b""  # the slots_update with "version":0, set at start-up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer, self.open, self.deflate = b"", False, False

    def connection_lost(self, exc: Exception | None) -> None:
        BareFrames.clients.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.open:
            if b"\r\n\r\n" not in self.buffer:
                return
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            if head.startswith(b"GET /health"):
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                self.transport.close()
                return
            key = re.search(rb"(?i)sec-websocket-key: *([^\r]+)", head).group(1)  # type: ignore[union-attr]
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            self.deflate = b"permessage-deflate" in head.lower()
            extension = (b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; "
                         b"client_no_context_takeover; server_max_window_bits=12; client_max_window_bits=12\r\n"
                         if self.deflate else b"")
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 b"Sec-WebSocket-Accept: " + accept + b"\r\n" + extension + b"\r\n")
            self.open = True
            BareFrames.clients.add(self)
            self.transport.write(self.frames(self.state())[self.deflate])
        while len(self.buffer) >= 6:  # client frames: masked, short
            first, size = self.buffer[0], self.buffer[1] & 0x7F
            start = 2 + {126: 2, 127: 8}.get(size, 0)
            if size >= 126:
                size = int.from_bytes(self.buffer[2:start], "big")
            if len(self.buffer) < start + 4 + size:
                return
            mask, payload = self.buffer[start:start + 4], self.buffer[start + 4:start + 4 + size]
            self.buffer = self.buffer[start + 4 + size:]
            text = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if first & 0x0F == 0x9:  # a ping: its pong
                self.transport.write(self.frame(text, 0x8A))
            elif b"book_slot" in text or b"cancel_slot" in text:
                BareFrames.version += 1
                self.transport.write(self.frame(b'{"type":"booking_response","success":true}'))
                frames = self.frames(self.state())
                for client in list(BareFrames.clients):
                    client.transport.write(frames[client.deflate])

    @staticmethod
    def state() -> bytes:
        return BareFrames.update.replace(b'"version":0', b'"version":%d' % BareFrames.version, 1)

    @staticmethod
    def frame(payload: bytes, first: int = 0x81) -> bytes:
        size = len(payload)
        head = bytes([first, size]) if size < 126 else (bytes([first, 126]) + size.to_bytes(2, "big") if size < 65536
                                                       else bytes([first, 127]) + size.to_bytes(8, "big"))
        return head + payload

    @classmethod
    def frames(cls, payload: bytes) -> tuple[bytes, bytes]:
        encoder = zlib.compressobj(wbits=-12, memLevel=5)
        deflated = encoder.compress(payload) + encoder.flush(zlib.Z_SYNC_FLUSH)
        return cls.frame(payload), cls.frame(deflated[:-4], 0xC1)


def serve_bare(port: int, extra: str) -> None:
    BareFrames.update = orjson.loads(Path(extra).read_bytes())["update"].encode()

    async def run() -> None:
        server = await asyncio.get_running_loop().create_server(BareFrames, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    asyncio.run(run())


def serve(name: str, port: int, extra: str) -> None:
    import uvicorn

    if name == "bare":
        return serve_bare(port, extra)
    if name == "pesu":
        app = fake_pesu_app()
    else:
        data = orjson.loads(Path(extra).read_bytes())
        app = ceiling_app(data["slots"].encode(), data["update"].encode(), data["my_bookings"].encode(),
                          data["feed"].encode())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", ws_max_size=16384, ws_ping_interval=0)


@contextlib.contextmanager
def process(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, float]]:
    """Start a server; yields it and the seconds it took to answer its first /health (or any request)."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            assert proc.poll() is None, f"{args} exited"
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            time.sleep(0.002)
        yield proc, time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(10)


class Server(NamedTuple):
    port: int
    proc: subprocess.Popen
    startup: float  # seconds to the first answer
    day: str | None  # the day its listeners watch (None: today)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# -- load: requests per second, from a separate process (python bench.py --load PORT METHOD PATH BODY) --------


async def load(port: int, method: str, path: str, body: bytes, seconds: float, connections: int = 32) -> float:
    request = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    done = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head[:40]
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            done += 1
        writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return done / seconds


def requests_per_second(port: int, method: str, path: str, body: bytes = b"") -> float:
    out = subprocess.run([sys.executable, __file__, "--load", str(port), method, path, body.decode()],
                         capture_output=True, text=True, check=True)
    return float(out.stdout)


# -- listeners: raw WebSockets that only read, in their own process -------------------------------------------


def client_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    head = bytes([0x81, 0x80 | len(payload)]) if len(payload) < 126 else (
        bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big"))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


BROWSER_OFFER = "permessage-deflate; client_max_window_bits"  # what Chrome sends in every handshake


class Frames:
    """A browser-like listener's reading side: whole frames out of the byte stream, inflated when the
    server agreed to permessage-deflate (RSV1 set), as a browser does. Server frames are never masked."""

    def __init__(self) -> None:
        self.buffer = b""
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)

    def messages(self, chunk: bytes) -> list[bytes]:
        self.buffer += chunk
        out = []
        while len(self.buffer) >= 2:
            first, length = self.buffer[0], self.buffer[1] & 0x7F
            start = 2
            if length == 126:
                if len(self.buffer) < 4:
                    break
                length, start = int.from_bytes(self.buffer[2:4], "big"), 4
            elif length == 127:
                if len(self.buffer) < 10:
                    break
                length, start = int.from_bytes(self.buffer[2:10], "big"), 10
            if len(self.buffer) < start + length:
                break
            payload, self.buffer = self.buffer[start:start + length], self.buffer[start + length:]
            if first & 0x40:  # RSV1: a compressed message
                payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
            out.append(payload)
        return out


def listen(port: int, count: int, hello: bytes, browser: bool = False) -> None:
    """python bench.py --listen PORT COUNT HELLO [browser]: open COUNT sockets that only read, and print
    "VERSION TIME" each time the lowest version held by all of them rises (TIME from perf_counter,
    which is CLOCK_MONOTONIC: comparable with the parent's). Browser-like sockets offer permessage-deflate
    in the handshake and inflate what comes back; plain ones scan the raw bytes."""
    selector = selectors.DefaultSelector()
    versions: dict[socket.socket, int] = {}
    tails: dict[socket.socket, bytes] = {}
    frames: dict[socket.socket, Frames] = {}
    held: collections.Counter[int] = collections.Counter({-1: count})
    lowest = -1
    offer = f"Sec-WebSocket-Extensions: {BROWSER_OFFER}\r\n" if browser else ""

    def take(sock: socket.socket, chunk: bytes) -> None:
        nonlocal lowest
        if browser:
            found = [v for message in frames[sock].messages(chunk) for v in VERSION.findall(message)]
        else:
            found = VERSION.findall(tails[sock] + chunk)
            tails[sock] = chunk[-24:]
        if not found or int(found[-1]) <= versions[sock]:
            return
        old, versions[sock] = versions[sock], int(found[-1])
        held[old] -= 1
        held[versions[sock]] += 1
        if held[old] == 0:
            del held[old]
            if old == lowest:
                lowest = min(held)
                print(lowest, time.perf_counter(), flush=True)

    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET /slot-booking HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n".encode())
        response = b""
        while b"\r\n\r\n" not in response:  # the upgrade first: bytes sent along with it are lost
            response += sock.recv(4096)
        if hello:
            sock.sendall(client_frame(hello))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        versions[sock], tails[sock], frames[sock] = -1, b"", Frames()
        take(sock, response.split(b"\r\n\r\n", 1)[1])  # the first state may have come with the upgrade
    while True:
        for key, _ in selector.select():
            sock = key.fileobj  # type: ignore[assignment]
            try:
                chunk = sock.recv(262144)
            except BlockingIOError:
                continue
            if not chunk:
                print(f"listener: a socket was closed by the server at version {versions[sock]}", file=sys.stderr)
                return
            take(sock, chunk)


class Listeners:
    """COUNT raw listening sockets in a child process; ``all_hold(v)`` is when the last of them held v."""

    def __init__(self, port: int, count: int, hello: bytes | None, browser: bool = False) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--listen", str(port), str(count),
                                      (hello or b"").decode(), "browser" if browser else "plain"],
                                     stdout=subprocess.PIPE)
        self.lowest, self.at = -1, 0.0
        self.unread = b""

    def _take_reports(self, wait: float) -> bool:
        """Read what the child has reported within ``wait`` seconds; False if it reported nothing.

        Reads the pipe's file descriptor itself: a buffered reader could hold reports that select()
        then never sees.
        """
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        if not select.select([fd], [], [], max(0.0, wait))[0]:
            return False
        chunk = os.read(fd, 65536)
        assert chunk, "listener process ended"
        *lines, self.unread = (self.unread + chunk).split(b"\n")
        for line in lines:
            lowest, at = line.split()
            self.lowest, self.at = int(lowest), float(at)
        return True

    def all_hold(self, version: int, timeout: float = 30) -> float:
        deadline = time.perf_counter() + timeout
        while self.lowest < version:
            reported = self._take_reports(deadline - time.perf_counter())
            assert reported, f"listeners never all held version {version} (lowest {self.lowest})"
        return self.at

    def settle(self, quiet: float = 0.3) -> None:
        """Take reports until none has come for ``quiet`` seconds."""
        while self._take_reports(quiet):
            pass

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Booker:
    """A real client: one socket that books and cancels, reading its replies."""

    def __init__(self, port: int, day: str | None) -> None:
        self.port, self.day = port, day

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(f"ws://127.0.0.1:{self.port}/slot-booking", max_size=2**20, compression=None)
        await self.ws.recv()

    async def change(self, kind: str, slot: int) -> None:
        message = {"type": kind, "slot_id": slot, **USER}
        if self.day:
            message["date"] = self.day
        await self.ws.send(orjson.dumps(message).decode())
        while True:
            reply = orjson.loads(await self.ws.recv())
            if reply["type"] != "slots_update":
                assert reply["success"], reply
                return


class Rig:
    """COUNT listeners and one booker on one server, and the version every listener holds."""

    def __init__(self, listeners: Listeners, booker: Booker, version: int) -> None:
        self.listeners, self.booker, self.version = listeners, booker, version

    @classmethod
    async def open(cls, server: Server, count: int, browser: bool = False) -> Rig:
        hello = orjson.dumps({"type": "get_slots", "date": server.day}) if server.day else None
        listeners = Listeners(server.port, count, hello, browser)
        try:
            version = await asyncio.to_thread(initial_version, listeners)
            booker = Booker(server.port, server.day)
            await booker.open()
        except BaseException:
            listeners.close()
            raise
        return cls(listeners, booker, version)

    async def one_at_a_time(self, changes: int) -> list[float]:
        """Book or cancel slot 9 (an even number of changes leaves it free), waiting each time until every
        listener holds the new state; the seconds each took."""
        delays = []
        self.replies = []
        for i in range(changes):
            started = time.perf_counter()
            await self.booker.change("book_slot" if i % 2 == 0 else "cancel_slot", 9)
            self.replies.append(time.perf_counter() - started)
            self.version += 1
            delays.append(await asyncio.to_thread(self.listeners.all_hold, self.version) - started)
        return delays

    async def back_to_back(self, changes: int) -> dict[str, float]:
        """Book and cancel slot 10 as fast as the replies come, then wait until every listener holds the
        final state."""
        replies = []
        started = time.perf_counter()
        for i in range(changes):
            sent = time.perf_counter()
            await self.booker.change("book_slot" if i % 2 == 0 else "cancel_slot", 10)
            replies.append(time.perf_counter() - sent)
        last_reply = time.perf_counter()
        self.version += changes
        final = await asyncio.to_thread(self.listeners.all_hold, self.version)
        return {"ops": changes / (final - started), "tail": (final - last_reply) * 1000,
                "reply_p99": percentile(replies, 0.99) * 1000}

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.booker.ws.close()
        self.listeners.close()


def percentile(values: list[float], fraction: float) -> float:
    return sorted(values)[int(len(values) * fraction) - 1]


async def realtime(servers: dict[str, Server], count: int, browser: bool = False,
                   changes: int | None = None, burst: bool = True) -> dict[str, dict[str, float]]:
    """COUNT listeners on every server at once; one change at a time, LATENCY_CHUNK changes on each server
    in turn, so that a slow spell of the VM falls on both; then back-to-back changes on each."""
    rigs: dict[str, Rig] = {}
    try:
        for name, server in servers.items():
            rigs[name] = await Rig.open(server, count, browser)
        delays: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range((changes or OPS_LATENCY[count]) // LATENCY_CHUNK):
            for name, rig in rigs.items():
                delays[name] += await rig.one_at_a_time(LATENCY_CHUNK)
        results = {}
        for name, rig in rigs.items():
            results[name] = {"p50": statistics.median(delays[name]) * 1000,
                             "p99": percentile(delays[name], 0.99) * 1000,
                             **(await rig.back_to_back(OPS_BURST) if burst else {})}
            assert rig.listeners.proc.poll() is None, f"{name}: a listener was closed by the server"
    finally:
        for rig in rigs.values():
            await rig.close()
    return results


def initial_version(listeners: Listeners) -> int:
    """The version every listener holds once all are connected and have their first state."""
    listeners.all_hold(0)
    listeners.settle()  # every get_slots (the day switch) answered before the first change
    return listeners.lowest


def idle_memory(pid: int, port: int, count: int = 1000) -> tuple[float, float]:
    """KiB of server memory per idle socket: plain ones, then browser-like ones opened while the plain ones
    are still open (memory freed by sockets that closed would be reused, and hide what new ones cost)."""
    results = []
    opened: list[Listeners] = []
    try:
        for browser in (False, True):
            before = rss_kib(pid)
            opened.append(Listeners(port, count, None, browser))
            opened[-1].all_hold(0)
            time.sleep(0.5)
            results.append((rss_kib(pid) - before) / count)
    finally:
        for listeners in opened:
            listeners.close()
    return results[0], results[1]


# -- the run ------------------------------------------------------------------------------------------------


HTTP = [("slots", "GET", "/slots", b""), ("health", "GET", "/health", b""),
        ("my_bookings", "POST", "/my-bookings", orjson.dumps(USER))]
HTTP_ROUNDS = 2  # each request rate is taken this many times, app and ceiling in turn; the best counts


def measure(servers: dict[str, Server], feed: str) -> dict[str, dict[str, float]]:
    """Every measure, on each server in turn before the next measure: a VM that slows down for a while
    (a shared 2-core one does) then weighs on both sides of a ratio alike, not on one."""
    results: dict[str, dict[str, float]] = {name: {"startup": server.startup * 1000} for name, server in servers.items()}

    def step(name: str, what: str) -> None:
        print(f"  {name}: {what}", file=sys.stderr, flush=True)

    for key, method, path, body in [*HTTP, ("feed", "GET", feed, b"")]:
        for _ in range(HTTP_ROUNDS):
            for name, server in servers.items():
                step(name, f"{method} {path}")
                rate = requests_per_second(server.port, method, path, body)
                results[name][key] = max(results[name].get(key, 0.0), rate)
    for name, server in servers.items():
        step(name, "memory")
        results[name]["memory"], results[name]["browser_memory"] = idle_memory(server.proc.pid, server.port)
    for count in (100, 1000):
        step("both", f"{count} listeners")
        for name, measured in asyncio.run(realtime(servers, count)).items():
            for key, value in measured.items():
                results[name][f"{key}_{count}"] = value
    for count, changes in BROWSER_LATENCY.items():
        step("both", f"{count} browser-like listeners")
        for name, measured in asyncio.run(realtime(servers, count, browser=True, changes=changes,
                                                   burst=False)).items():
            for key, value in measured.items():
                results[name][f"browser_{key}_{count}"] = value
    return results


# -- the wire: server CPU per broadcast against the bare-frame ceiling (python bench.py wire [RUNS]) ----------


WIRE_LISTENERS = (1000, 5000)
WIRE_CHANGES = (24, 120)  # CPU per broadcast: the difference between the two runs, per change


def cpu_seconds(pid: int) -> float:
    """The process's own CPU time (user + system), from /proc: the listeners share the cores, so wall time
    would count their work too."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wire_round(server: Server, count: int, browser: bool) -> dict[str, float]:
    """COUNT listeners on one server: CPU per broadcast (ms), one change's lag until every listener holds it
    (p50, p99, ms), and the booker's reply (p99, ms)."""
    rig = await Rig.open(server, count, browser)
    try:
        spent = []
        delays: list[float] = []
        replies: list[float] = []
        for changes in WIRE_CHANGES:
            before = cpu_seconds(server.proc.pid)
            delays = await rig.one_at_a_time(changes)
            replies = rig.replies
            spent.append(cpu_seconds(server.proc.pid) - before)
        assert rig.listeners.proc.poll() is None, "a listener was closed by the server"
    finally:
        await rig.close()
    return {"cpu": (spent[1] - spent[0]) / (WIRE_CHANGES[1] - WIRE_CHANGES[0]) * 1000,
            "p50": statistics.median(delays) * 1000, "p99": percentile(delays, 0.99) * 1000,
            "reply_p99": percentile(replies, 0.99) * 1000}


def wire(runs: int) -> None:
    """The app (python app.py, WS_COMPRESSION=1 for the browser-like listeners, 0 for the plain) against
    the bare-frame ceiling, RUNS times; prints the first run's table and the ratios' spread over all."""
    tomorrow = (datetime.now(ZoneInfo("Asia/Kolkata")) + timedelta(days=1)).date().isoformat()
    table: list[dict[str, float]] = []
    for run in range(runs):
        row: dict[str, float] = {}
        for compression in ("0", "1"):
            with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
                pesu_port, app_port, bare_port = free_port(), free_port(), free_port()
                running.enter_context(process([sys.executable, __file__, "--serve", "pesu", str(pesu_port), ""],
                                              pesu_port))
                env = {"HOST": "127.0.0.1", "PORT": str(app_port), "DATABASE_PATH": f"{tmp}/rero.db",
                       "LOG_LEVEL": "warning", "PESU_AUTH_URL": f"http://127.0.0.1:{pesu_port}/authenticate",
                       "WS_RATE_PER_SECOND": "0", "WS_PING_SECONDS": "0", "MAX_CONNECTIONS": "20000",
                       "WS_COMPRESSION": compression}
                app = Server(app_port, *running.enter_context(process([sys.executable, "app.py"], app_port, env)),
                             tomorrow)
                slots = httpx.get(f"http://127.0.0.1:{app_port}/slots", params={"date": tomorrow}).text
                update = orjson.dumps({"type": "slots_update", "data": {**orjson.loads(slots), "version": 0},
                                       "timestamp": datetime.now().isoformat()})
                Path(f"{tmp}/bytes.json").write_bytes(orjson.dumps({"update": update.decode()}))
                args = [sys.executable, __file__, "--serve", "bare", str(bare_port), f"{tmp}/bytes.json"]
                bare = Server(bare_port, *running.enter_context(process(args, bare_port)), None)
                browser = compression == "1"
                kind = "browser" if browser else "plain"
                for name, server in (("bare", bare), ("app", app)):  # on a fresh server: nothing freed to reuse
                    plain_kib, browser_kib = idle_memory(server.proc.pid, server.port)
                    row[f"{name}_{kind}_memory"] = browser_kib if browser else plain_kib
                for count in WIRE_LISTENERS:
                    for name, server in (("bare", bare), ("app", app)):
                        print(f"  run {run + 1}: {name}, {count} {kind} listeners", file=sys.stderr, flush=True)
                        for key, value in asyncio.run(wire_round(server, count, browser)).items():
                            row[f"{name}_{kind}_{key}_{count}"] = value
        table.append(row)
    wire_report(table)


def wire_report(table: list[dict[str, float]]) -> None:
    first = table[0]
    print("| measure | app | bare frames | app / bare | spread of the ratio over the runs |")
    print("|---|---:|---:|---:|---:|")
    for kind in ("plain", "browser"):
        for count in WIRE_LISTENERS:
            for key, label, fmt in (("cpu", "server CPU per broadcast (ms)", "{:.2f}"),
                                    ("p50", "change until all hold it, p50 (ms)", "{:.1f}"),
                                    ("p99", "change until all hold it, p99 (ms)", "{:.1f}"),
                                    ("reply_p99", "booker's reply p99 (ms)", "{:.2f}")):
                app, bare = first[f"app_{kind}_{key}_{count}"], first[f"bare_{kind}_{key}_{count}"]
                ratios = [row[f"app_{kind}_{key}_{count}"] / row[f"bare_{kind}_{key}_{count}"] for row in table]
                print(f"| {count} {kind} listeners: {label} | {fmt.format(app)} | {fmt.format(bare)} | "
                      f"{app / bare:.2f} | {min(ratios):.2f}-{max(ratios):.2f} |")
        app, bare = first[f"app_{kind}_memory"], first[f"bare_{kind}_memory"]
        print(f"| {kind} listeners: memory per idle socket (KiB) | {app:.1f} | {bare:.1f} | {app / bare:.2f} | "
              f"{min(r[f'app_{kind}_memory'] for r in table):.1f}-{max(r[f'app_{kind}_memory'] for r in table):.1f}"
              " KiB |")
    compressing = [row["app_browser_cpu_5000"] / row["app_plain_cpu_5000"] for row in table]
    print(f"\ncompressing / plain, the app's CPU per broadcast at 5000: {compressing[0]:.2f} "
          f"(over the runs {min(compressing):.2f}-{max(compressing):.2f}); {len(table)} run(s), "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {os.uname().machine}")


def main() -> None:
    tomorrow = (datetime.now(ZoneInfo("Asia/Kolkata")) + timedelta(days=1)).date().isoformat()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        pesu_port, app_port, ceiling_port = free_port(), free_port(), free_port()
        running.enter_context(process([sys.executable, __file__, "--serve", "pesu", str(pesu_port), ""], pesu_port))
        # The app as deployed (python app.py), but with keep-alive pings off for both servers: the listeners
        # only read, so they would never answer one; and room for 5000 listeners and the booker.
        env = {"HOST": "127.0.0.1", "PORT": str(app_port), "DATABASE_PATH": f"{tmp}/rero.db",
               "LOG_LEVEL": "warning", "PESU_AUTH_URL": f"http://127.0.0.1:{pesu_port}/authenticate",
               "WS_RATE_PER_SECOND": "0", "WS_PING_SECONDS": "0", "MAX_CONNECTIONS": "20000",
               "ADMIN_SRNS": USER["username"]}
        args = [sys.executable, "app.py"]
        app = Server(app_port, *running.enter_context(process(args, app_port, env)), tomorrow)
        base = f"http://127.0.0.1:{app_port}"
        httpx.post(f"{base}/auth/login", json=USER).raise_for_status()
        later = (datetime.fromisoformat(tomorrow) + timedelta(days=1)).date().isoformat()  # not the day measured
        for slot_id in (5, 9, 13):  # a member's calendar feed with a few bookings in it
            httpx.post(f"{base}/book-slot", json={**USER, "slot_id": slot_id, "date": later}).raise_for_status()
        feed = httpx.post(f"{base}/calendar/link", json=USER).json()["path"]
        same = {
            "slots": httpx.get(f"{base}/slots").text,
            "my_bookings": httpx.post(f"{base}/my-bookings", json=USER).text,
            "feed": httpx.get(f"{base}{feed}").text,
        }
        # the ceiling sends the app's own slots_update, with version 0 to count up from
        update = orjson.dumps({"type": "slots_update", "data": {**orjson.loads(same["slots"]), "version": 0},
                               "timestamp": datetime.now().isoformat()})
        Path(f"{tmp}/bytes.json").write_bytes(orjson.dumps({**same, "update": update.decode()}))
        args = [sys.executable, __file__, "--serve", "ceiling", str(ceiling_port), f"{tmp}/bytes.json"]
        ceiling = Server(ceiling_port, *running.enter_context(process(args, ceiling_port)), None)
        results = measure({"app": app, "ceiling": ceiling}, feed)
        series = largest_series(base)
    report(results["app"], results["ceiling"])
    print("\nThe largest series (12 slots, every day, 366 days), on the app alone: "
          + "; ".join(f"{label} {value:.0f} ms" for label, value in series.items()))


def largest_series(base: str) -> dict[str, float]:
    """How long the largest series an admin may ask for takes (dry run, then for real), what GET /slots
    waits meanwhile (p99), and how long the lab's feed then takes to build and to answer from memory."""
    today = datetime.now(ZoneInfo("Asia/Kolkata")).date()
    spec = {**USER, "action": "close", "slots": list(range(3, 15)), "weekdays": ["mon", "tue", "wed", "thu", "fri",
            "sat", "sun"], "from": (today + timedelta(days=1)).isoformat(),
            "until": (today + timedelta(days=366)).isoformat()}
    lab = httpx.post(f"{base}/calendar/link", json={**USER, "feed": "lab"}).json()["path"]
    timings: dict[str, float] = {}

    async def slots_meanwhile(call: str, body: dict[str, object]) -> None:
        waits: list[float] = []
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            task = asyncio.ensure_future(client.post("/admin/series", json=body))
            started = time.perf_counter()
            while not task.done():
                before = time.perf_counter()
                await client.get("/slots")
                waits.append(time.perf_counter() - before)
            (await task).raise_for_status()
            timings[call] = (time.perf_counter() - started) * 1000
            timings[f"GET /slots p99 during the {call}"] = percentile(waits, 0.99) * 1000

    asyncio.run(slots_meanwhile("dry run", {**spec, "dry_run": True}))
    asyncio.run(slots_meanwhile("series", spec))
    for label in ("lab feed, built", "lab feed, from memory"):
        started = time.perf_counter()
        size = len(httpx.get(f"{base}{lab}", timeout=60).content)
        timings[f"{label} ({size // 1024} KiB)"] = (time.perf_counter() - started) * 1000
    return timings


def report(app: dict[str, float], ceiling: dict[str, float]) -> None:
    rows = [
        ("GET /slots (req/s)", "slots", "{:,.0f}"),
        ("GET /health (req/s)", "health", "{:,.0f}"),
        ("POST /my-bookings, cached login (req/s)", "my_bookings", "{:,.0f}"),
        ("GET /calendar/<secret>.ics, 3 bookings (req/s)", "feed", "{:,.0f}"),
        ("100 listeners: change until all hold it, p50 (ms)", "p50_100", "{:.2f}"),
        ("100 listeners: change until all hold it, p99 (ms)", "p99_100", "{:.2f}"),
        ("1000 listeners: change until all hold it, p50 (ms)", "p50_1000", "{:.2f}"),
        ("1000 listeners: change until all hold it, p99 (ms)", "p99_1000", "{:.2f}"),
        ("100 listeners: back-to-back book/cancel (ops/s)", "ops_100", "{:,.0f}"),
        ("1000 listeners: back-to-back book/cancel (ops/s)", "ops_1000", "{:,.0f}"),
        ("1000 listeners: last reply until all hold final state (ms)", "tail_1000", "{:.1f}"),
        ("1000 listeners: booker's reply p99 (ms)", "reply_p99_1000", "{:.2f}"),
        ("memory per idle socket (KiB)", "memory", "{:.1f}"),
        ("browser-like: memory per idle socket (KiB)", "browser_memory", "{:.1f}"),
        ("browser-like, 1000 listeners: change until all hold it, p50 (ms)", "browser_p50_1000", "{:.2f}"),
        ("browser-like, 1000 listeners: change until all hold it, p99 (ms)", "browser_p99_1000", "{:.2f}"),
        ("browser-like, 5000 listeners: change until all hold it, p50 (ms)", "browser_p50_5000", "{:.2f}"),
        ("browser-like, 5000 listeners: change until all hold it, p99 (ms)", "browser_p99_5000", "{:.2f}"),
        ("start-up to first /health (ms)", "startup", "{:.0f}"),
    ]
    print("| measure | app | ceiling | app / ceiling |\n|---|---:|---:|---:|")
    for label, key, fmt in rows:
        ratio = app[key] / ceiling[key] if ceiling[key] else float("nan")
        print(f"| {label} | {fmt.format(app[key])} | {fmt.format(ceiling[key])} | {ratio:.2f} |")
    print(f"\n{os.cpu_count()} cores, Python {sys.version.split()[0]}, {os.uname().machine}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "--listen":
        listen(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode(), sys.argv[5] == "browser")
    elif len(sys.argv) > 1 and sys.argv[1] == "--load":
        port, method, path, body = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5].encode()
        print(asyncio.run(load(port, method, path, body, HTTP_SECONDS)))
    elif len(sys.argv) > 1 and sys.argv[1] == "wire":
        wire(int(sys.argv[2]) if len(sys.argv) > 2 else 3)
    else:
        main()
