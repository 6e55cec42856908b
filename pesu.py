"""Who a member is: the PESU credential checker, session tokens, and the throttle on guessing.

The PESU credential checker: shared HTTP clients, a TTL cache of successes, one call per credential.

pesu-auth answers a refusal either as 200 with ``"status": false`` (older versions) or as 401 (newer);
both are ``InvalidCredentials``. Anything else (timeout, refused connection, 5xx, a body we cannot read)
means PESU is down for us, and is ``AuthUnavailable``: a member must never be told their password is
wrong because a server on the internet is asleep.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import heapq
import hmac
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx
import orjson
from cachetools import TTLCache

DEFAULT_URL = "https://pesu-auth.onrender.com/authenticate"
TIMEOUT_SECONDS = 10.0
MAX_ANSWER_BYTES = 1024 * 1024  # a real answer is under 1 KiB; anything past this is not read
PROFILE_FIELDS = ("name", "srn", "prn", "program", "branch", "campus")
POOL_SIZE = 20  # connections per HTTP client: httpcore looks at every connection of a pool for each request
T = TypeVar("T")


class InvalidCredentials(Exception):
    """PESU says the username or password is wrong."""


class AuthUnavailable(Exception):
    """PESU could not be asked, or gave an answer we cannot trust; ``retry_after`` is a hint in seconds."""

    retry_after = 30


class AuthBusy(AuthUnavailable):
    """Too many checks are already waiting for PESU: refused at once rather than queued without end."""

    retry_after = 5


class Throttled(Exception):
    """Too many failed guesses lately for this username (from this address) or from this address.

    ``key`` names the guard entry whose delay refused it, when waiting ``retry_after`` is sure to be enough."""

    def __init__(self, retry_after: int, key: str = "") -> None:
        super().__init__(retry_after)
        self.retry_after = max(1, retry_after)
        self.key = key


class PesuChecker:
    """Checks PESU credentials, remembering successes for ``ttl_seconds``.

    The cache key is an HMAC of username and password under a secret made fresh for each process,
    so nothing in memory could be reversed or compared against a leaked hash elsewhere.

    Every check that has to go upstream passes the ``guard`` first (guessing is slowed there), then waits
    for one of ``max_concurrency`` places, in a queue of at most ``max_queue``: beyond it, ``AuthBusy`` at
    once. One client address may hold at most half of places and queue together, so a flood of guesses
    sent at one instant, before the guard has seen any of them fail, leaves the other half to everyone
    else. The time limit starts once a place is had, so a slow PESU is never "unavailable" because of time
    spent queueing here.
    """

    def __init__(
        self,
        client: httpx.AsyncClient | Sequence[httpx.AsyncClient],
        url: str = DEFAULT_URL,
        ttl_seconds: float = 30 * 60,
        maxsize: int = 10_000,
        timer: Callable[[], float] | None = None,
        deadline: float = 1.5 * TIMEOUT_SECONDS,
        guard: Guard | None = None,
        max_concurrency: int = 200,
        max_queue: int = 200,
        on_upstream: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        # Checks in flight by client: each goes to the least busy (see clients()), so no pool is asked
        # for more connections than it has.
        self.clients = dict.fromkeys([client] if isinstance(client, httpx.AsyncClient) else client, 0)
        self.url = url
        # The client's timeouts bound each read and write; this bounds the whole call, so a server that
        # trickles bytes cannot hold a member's request for long.
        self.deadline = deadline
        timer = timer or time.monotonic  # TTLCache's own default
        self.cache: TTLCache[bytes, dict[str, Any]] = TTLCache(maxsize, ttl_seconds, timer=timer)
        # srn -> (tag of the password PESU last accepted, the cache keys it was accepted under), so that a
        # new password accepted by PESU retires the old one here at once.
        self._passwords: TTLCache[str, tuple[bytes, set[bytes]]] = TTLCache(maxsize, ttl_seconds, timer=timer)
        self._secret = os.urandom(32)
        self._inflight: dict[bytes, asyncio.Task[dict[str, Any]]] = {}
        self.guard = guard
        self._places = asyncio.Semaphore(max_concurrency)
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_per_address = max(1, (max_concurrency + max_queue) // 2)
        self.pending = 0  # checks asking PESU or waiting for a place to ...
        self.pending_from: collections.Counter[str] = collections.Counter()  # ... by client address
        self.upstream_calls = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.on_upstream = on_upstream  # told each PESU call's duration (the app's metrics)

    def _key(self, username: str, password: str) -> bytes:
        message = username.encode() + b"\x00" + password.encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    async def check(self, username: str, password: str, address: str = "") -> dict[str, Any]:
        """The member's profile (always with "srn") if PESU accepts these credentials.

        Credentials PESU accepted lately are answered from memory and never throttled. Otherwise
        ``Throttled`` or ``AuthBusy`` may come before PESU is asked.
        """
        key = self._key(username, password)
        profile = self.cache.get(key)
        if profile is not None:
            self.cache_hits += 1
            return profile
        self.cache_misses += 1
        task = self._inflight.get(key)
        if task is None:
            # Concurrent checks of the same credentials share this one task: one admission by the guard, one
            # upstream call (registered before anything is awaited, so none can slip in beside it).
            self._refuse_if_busy(address)  # at once, before the guard's database is asked
            task = asyncio.create_task(self._ask(username, password, key, address))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # shield: one caller going away must not cancel the call the others are waiting on.
        return await asyncio.shield(task)

    def _refuse_if_busy(self, address: str) -> None:
        if self.pending >= self.max_concurrency + self.max_queue:
            raise AuthBusy("too many checks waiting for PESU")
        if self.pending_from[address] >= self.max_per_address:
            raise AuthBusy("too many checks from one address waiting for PESU")

    async def _settle(self, attempt: Attempt | None, outcome: str, srn: str = "") -> None:
        if self.guard is not None and attempt is not None:
            await self.guard.settle(attempt, outcome, srn)

    async def _ask(self, username: str, password: str, key: bytes, address: str) -> dict[str, Any]:
        attempt = await self.guard.admit(username, address) if self.guard else None  # or Throttled
        try:
            self._refuse_if_busy(address)
            self.pending += 1  # in flight, or waiting for a place
            self.pending_from[address] += 1
            try:
                async with self._places:
                    profile = await self._call(username, password)
            finally:
                self.pending -= 1
                self.pending_from[address] -= 1
                if not self.pending_from[address]:
                    del self.pending_from[address]
        except InvalidCredentials:
            await self._settle(attempt, "invalid")
            raise
        except Exception:
            await self._settle(attempt, "unavailable")
            raise
        self._remember(key, password, profile)
        await self._settle(attempt, "ok", profile["srn"])
        return profile

    def _remember(self, key: bytes, password: str, profile: dict[str, Any]) -> None:
        """Cache a success; a password for this member other than the one remembered retires that one."""
        srn = profile["srn"]
        tag = hmac.new(self._secret, b"password\x00" + password.encode(), hashlib.sha256).digest()
        known = self._passwords.get(srn)
        if known is not None and known[0] != tag:
            for old in known[1]:
                self.cache.pop(old, None)
            known = None
        keys = known[1] if known is not None else set()
        keys.add(key)
        self._passwords[srn] = (tag, keys)
        self.cache[key] = profile

    async def _call(self, username: str, password: str) -> dict[str, Any]:
        self.upstream_calls += 1
        client = min(self.clients, key=self.clients.__getitem__)
        self.clients[client] += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.deadline):
                request = client.build_request(
                    "POST", self.url, json={"username": username, "password": password, "profile": True},
                    headers={"accept-encoding": "identity"},  # raw bytes are what the size cap counts
                )
                response = await client.send(request, stream=True)
                try:
                    status = response.status_code
                    body = await read_capped(response, MAX_ANSWER_BYTES) if status == 200 else b""
                finally:
                    await response.aclose()
        except (httpx.HTTPError, asyncio.TimeoutError) as exc:
            raise AuthUnavailable(describe(exc, self.deadline, client.timeout)) from None
        finally:
            self.clients[client] -= 1
            self.on_upstream(time.perf_counter() - started)
        if status == 401:
            raise InvalidCredentials
        if status != 200:
            raise AuthUnavailable(f"HTTP {status}")
        if body is None:
            raise AuthUnavailable(f"answer over {MAX_ANSWER_BYTES} bytes")
        try:
            data = orjson.loads(body)  # orjson refuses nesting past 1024 levels with a JSONDecodeError
        except orjson.JSONDecodeError:
            raise AuthUnavailable("unreadable body") from None
        if not isinstance(data, dict) or not isinstance(data.get("status"), bool):
            raise AuthUnavailable("unexpected body")
        if data["status"] is False:
            raise InvalidCredentials
        raw = data.get("profile")
        if not isinstance(raw, dict):
            raise AuthUnavailable("no profile")
        profile = {field: raw.get(field) for field in PROFILE_FIELDS}
        srn = raw.get("srn") or raw.get("prn") or username
        profile["srn"] = str(srn).strip().upper()[:64]
        return profile


def client_timeout(seconds: float) -> httpx.Timeout:
    """The HTTP client's limits for PESU_TIMEOUT_SECONDS: each read and write (a connect, at most 5 s)."""
    return httpx.Timeout(seconds, connect=min(5.0, seconds))


def check_deadline(seconds: float) -> float:
    """A whole check's limit for PESU_TIMEOUT_SECONDS: the timeout bounds each read, this the call, so a
    server that trickles bytes cannot hold a member's request for long."""
    return 1.5 * seconds


def stale_after(seconds: float) -> float:
    """How long a check may be in flight before the Guard takes its worker for dead: past any deadline."""
    return 3 * seconds + 5


@contextlib.asynccontextmanager
async def clients(places: int, **options: Any) -> AsyncIterator[list[httpx.AsyncClient]]:
    """HTTP clients for ``places`` checks at once, POOL_SIZE connections each, so nobody waits inside a
    pool and no request makes httpcore look through hundreds of connections (with one pool of 200, the
    process spent 11 ms a check on that alone, 2.2 s for 200 members signing in at once)."""
    per = min(places, POOL_SIZE)
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(httpx.AsyncClient(limits=limits, **options))
               for _ in range(math.ceil(places / per))]


async def read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The response body, or None as soon as it passes ``limit`` bytes (the rest is never read)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    if response.is_stream_consumed:  # read already (an answer built in memory, as a test transport gives)
        return response.content if len(response.content) <= limit else None
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def describe(exc: BaseException, deadline: float, timeout: httpx.Timeout) -> str:
    """Why PESU could not be asked, for the log: the error and its root cause, never the request."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {deadline:g} s"
    if isinstance(exc, httpx.TimeoutException):
        phase = {httpx.ConnectTimeout: timeout.connect, httpx.ReadTimeout: timeout.read,
                 httpx.WriteTimeout: timeout.write, httpx.PoolTimeout: timeout.pool}.get(type(exc))
        return f"{type(exc).__name__} after {phase:g} s" if phase else type(exc).__name__
    cause = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    return f"{type(exc).__name__}: {str(cause) or type(cause).__name__}"


# -- sessions and throttling: what a member holds after signing in, and how guessing is slowed -------------


class InvalidToken(Exception):
    """A session token that is malformed, tampered with, expired or revoked."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Signed, expiring session tokens: ``base64url(claims).base64url(HMAC-SHA256(secret, claims))``.

    The claims are the SRN, the expiry and a random id (``jti``) that logout can revoke; nothing in a
    token is secret, and nothing about sessions is stored except the ids of revoked tokens.
    """

    def __init__(self, secret: bytes, lifetime_seconds: float, clock: Callable[[], float]) -> None:
        self.secret = secret
        self.lifetime = lifetime_seconds
        self.clock = clock
        self.revoked: dict[str, float] = {}  # jti -> expiry, forgotten once the token would have expired
        self._expiries: list[tuple[float, str]] = []  # a heap of (expiry, jti): what to forget next

    def _sign(self, claims: str) -> str:
        return _b64(hmac.new(self.secret, claims.encode(), hashlib.sha256).digest())

    def issue(self, srn: str) -> tuple[str, int]:
        """A new token for srn, and its lifetime in seconds."""
        expires = int(self.clock() + self.lifetime)
        claims = _b64(orjson.dumps({"srn": srn, "exp": expires, "jti": secrets.token_hex(8)}))
        return f"{claims}.{self._sign(claims)}", int(self.lifetime)

    def claims(self, token: Any) -> dict[str, Any]:
        """The token's claims if it is genuine, unexpired and not revoked; InvalidToken otherwise."""
        # A real token is ASCII; anything else is refused here (compare_digest would raise on it).
        if not isinstance(token, str) or not token.isascii() or token.count(".") != 1 or len(token) > 512:
            raise InvalidToken
        claims, signature = token.split(".")
        if not hmac.compare_digest(signature, self._sign(claims)):
            raise InvalidToken
        try:
            data = orjson.loads(_unb64(claims))
        except (ValueError, orjson.JSONDecodeError):
            raise InvalidToken from None
        if data["exp"] <= self.clock() or data["jti"] in self.revoked:
            raise InvalidToken
        return data

    def live(self, jti: str, expires: float) -> bool:
        """Whether the token with this id and expiry is still good: unexpired and not signed out."""
        return expires > self.clock() and jti not in self.revoked

    def revoke(self, jti: str, expires: float) -> None:
        """Refuse this token from now on; the ids of tokens that have expired since are forgotten, oldest
        first, so each call does work in proportion to what it forgets, not to all it remembers."""
        now = self.clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, old = heapq.heappop(self._expiries)
            self.revoked.pop(old, None)
        if expires > now and jti not in self.revoked:
            self.revoked[jti] = expires
            heapq.heappush(self._expiries, (expires, jti))


@dataclass(frozen=True)
class Attempt:
    """A check let through to PESU, to be settled with its outcome."""

    pair: str  # the key of its (username, address)
    address: str


class Entries(Protocol):
    """Where the guard keeps its state: small JSON-able values under string keys, each for ``ttl`` seconds.

    db.GuardStore gives one inside a write transaction, so every worker on the file sees one state."""

    def get(self, key: str) -> Any: ...

    def put(self, key: str, value: Any, ttl: float) -> None: ...

    def delete(self, key: str) -> None: ...


class GuardStorage(Protocol):
    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...


class Guard:
    """How guessing through us is slowed, without letting anyone lock a member out.

    - Per (username, address): ``free_fails`` failed checks in a window go at once; after that, one check
      at a time, each after a delay that doubles with every further failure (1 s, 2 s, 4 s ... up to
      ``max_delay``). A success forgets the pair. Other addresses are not affected at all. Checks count
      from the moment they are let through, so guesses sent at the same instant cannot all slip past.
    - Per address: a budget of ``address_fails`` failed checks, refilled at that many per window, so one
      address cannot spray a password over many usernames. Only failures spend it (members behind one
      address signing in at the same moment are never refused for each other's checks in flight); checks
      already in flight when it runs out may overdraw it, and the overdraft is repaid before the address may
      check again. Each member who signs in successfully from the address (once per window) earns it two.
    - A check PESU could not answer is given back; one whose worker died is given back after ``stale``.

    ``0`` turns either limit off. The state lives in the database (``store``), read and changed in one
    transaction per step, so the limits hold across worker processes; each entry is forgotten a window
    after its last change. A refusal is remembered in memory until it ends, so a flood of refused attempts
    costs no database work.
    """

    def __init__(
        self,
        store: GuardStorage,
        free_fails: int,
        window: float,
        address_fails: int,
        clock: Callable[[], float],
        max_delay: float = 30.0,
        stale: float = 60.0,
    ) -> None:
        self.store = store
        self.free_fails = free_fails
        self.window = window
        self.address_fails = address_fails
        self.clock = clock
        self.max_delay = max_delay
        self.stale = stale
        # pair or address key -> when its refusal ends, as the database last said
        self.refused: TTLCache[str, float] = TTLCache(100_000, max(window, max_delay), timer=clock)

    async def admit(self, username: str, address: str) -> Attempt:
        """Let one check through to PESU, or raise Throttled with the seconds to wait."""
        now = self.clock()
        pair = orjson.dumps(["pair", username.upper(), address]).decode()
        bucket = "bucket " + address
        until = max(self.refused.get(pair, 0.0), self.refused.get(bucket, 0.0))
        if until > now:
            raise Throttled(max(1, math.ceil(until - now)))
        try:
            return await self.store.run(self._admit, pair, address, now)
        except Throttled as exc:
            if exc.key:
                self.refused[exc.key] = now + exc.retry_after
            raise

    async def settle(self, attempt: Attempt, outcome: str, srn: str = "") -> None:
        """Record how a check let through went: "ok", "invalid" or "unavailable"."""
        await self.store.run(self._settle, attempt, outcome, srn, self.clock())

    def _tokens(self, entries: Entries, address: str, now: float) -> float:
        tokens, at = entries.get("bucket " + address) or (float(self.address_fails), now)
        return min(float(self.address_fails), tokens + (now - at) * self.address_fails / self.window)

    def _admit(self, entries: Entries, key: str, address: str, now: float) -> Attempt:
        fails, next_at, inflight, since = entries.get(key) or (0, 0.0, 0, now)
        if inflight and now - since > self.stale:
            inflight = 0
        if self.free_fails and fails + inflight >= self.free_fails:
            if now < next_at:
                raise Throttled(math.ceil(next_at - now), key)
            if inflight:
                raise Throttled(1)  # one at a time now: the check in flight decides the next delay
        if self.address_fails:
            tokens = self._tokens(entries, address, now)
            if tokens < 1:
                raise Throttled(math.ceil((1 - tokens) * self.window / self.address_fails), "bucket " + address)
        entries.put(key, (fails, next_at, inflight + 1, now), self.window)
        return Attempt(key, address)

    def _settle(self, entries: Entries, attempt: Attempt, outcome: str, srn: str, now: float) -> None:
        pair = entries.get(attempt.pair)
        if pair is not None:
            fails, next_at, inflight, since = pair
            inflight = max(0, inflight - 1)
            if outcome == "ok":
                entries.delete(attempt.pair)
            else:
                if outcome == "invalid":
                    fails += 1
                    if fails >= self.free_fails:
                        next_at = now + min(2.0 ** (fails - self.free_fails), self.max_delay)
                entries.put(attempt.pair, (fails, next_at, inflight, since), self.window)
        if self.address_fails and outcome != "unavailable":
            change = -1.0
            if outcome == "ok":
                credit = orjson.dumps(["credit", attempt.address, srn]).decode()
                if entries.get(credit) is not None:
                    return
                entries.put(credit, 1, self.window)
                change = 2.0
            tokens = min(float(self.address_fails), self._tokens(entries, attempt.address, now) + change)
            entries.put("bucket " + attempt.address, (tokens, now), self.window)
