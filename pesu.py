"""Who a member is: the PESU credential checker, session tokens, and the throttle on guessing.

The PESU credential checker: one shared HTTP client, a TTL cache of successes, one call per credential.

pesu-auth answers a refusal either as 200 with ``"status": false`` (older versions) or as 401 (newer);
both are ``InvalidCredentials``. Anything else (timeout, refused connection, 5xx, a body we cannot read)
means PESU is down for us, and is ``AuthUnavailable``: a member must never be told their password is
wrong because a server on the internet is asleep.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from cachetools import TTLCache

DEFAULT_URL = "https://pesu-auth.onrender.com/authenticate"
TIMEOUT_SECONDS = 10.0
PROFILE_FIELDS = ("name", "srn", "prn", "program", "branch", "campus")


class InvalidCredentials(Exception):
    """PESU says the username or password is wrong."""


class AuthUnavailable(Exception):
    """PESU could not be asked, or gave an answer we cannot trust."""


class PesuChecker:
    """Checks PESU credentials, remembering successes for ``ttl_seconds``.

    The cache key is an HMAC of username and password under a secret made fresh for each process,
    so nothing in memory could be reversed or compared against a leaked hash elsewhere.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str = DEFAULT_URL,
        ttl_seconds: float = 30 * 60,
        maxsize: int = 10_000,
        timer: Callable[[], float] | None = None,
        deadline: float = 1.5 * TIMEOUT_SECONDS,
    ) -> None:
        self.client = client
        self.url = url
        # The client's timeouts bound each read and write; this bounds the whole call, so a server that
        # trickles bytes cannot hold a member's request for long.
        self.deadline = deadline
        self.cache: TTLCache[bytes, dict[str, Any]] = (
            TTLCache(maxsize, ttl_seconds, timer=timer) if timer else TTLCache(maxsize, ttl_seconds)
        )
        self._secret = os.urandom(32)
        self._inflight: dict[bytes, asyncio.Task[dict[str, Any]]] = {}
        self.upstream_calls = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.on_upstream: Callable[[float], None] = lambda seconds: None  # each PESU call's duration

    def _key(self, username: str, password: str) -> bytes:
        message = username.encode() + b"\x00" + password.encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    async def check(self, username: str, password: str) -> dict[str, Any]:
        """The member's profile (always with "srn") if PESU accepts these credentials."""
        key = self._key(username, password)
        profile = self.cache.get(key)
        if profile is not None:
            self.cache_hits += 1
            return profile
        self.cache_misses += 1
        task = self._inflight.get(key)
        if task is None:
            # Concurrent checks of the same credentials share this one upstream call.
            task = asyncio.create_task(self._ask(username, password))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # shield: one caller going away must not cancel the call the others are waiting on.
        profile = await asyncio.shield(task)
        self.cache[key] = profile
        return profile

    async def _ask(self, username: str, password: str) -> dict[str, Any]:
        self.upstream_calls += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.deadline):
                response = await self.client.post(
                    self.url, json={"username": username, "password": password, "profile": True}
                )
        except (httpx.HTTPError, asyncio.TimeoutError) as exc:
            raise AuthUnavailable(type(exc).__name__) from None
        finally:
            self.on_upstream(time.perf_counter() - started)
        if response.status_code == 401:
            raise InvalidCredentials
        if response.status_code != 200:
            raise AuthUnavailable(f"HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise AuthUnavailable("unreadable body") from None
        if not isinstance(body, dict) or not isinstance(body.get("status"), bool):
            raise AuthUnavailable("unexpected body")
        if body["status"] is False:
            raise InvalidCredentials
        raw = body.get("profile")
        if not isinstance(raw, dict):
            raise AuthUnavailable("no profile")
        profile = {field: raw.get(field) for field in PROFILE_FIELDS}
        srn = raw.get("srn") or raw.get("prn") or username
        profile["srn"] = str(srn).strip().upper()
        return profile


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

    def _sign(self, claims: str) -> str:
        return _b64(hmac.new(self.secret, claims.encode(), hashlib.sha256).digest())

    def issue(self, srn: str) -> tuple[str, int]:
        """A new token for srn, and its lifetime in seconds."""
        expires = int(self.clock() + self.lifetime)
        claims = _b64(orjson.dumps({"srn": srn, "exp": expires, "jti": secrets.token_hex(8)}))
        return f"{claims}.{self._sign(claims)}", int(self.lifetime)

    def claims(self, token: Any) -> dict[str, Any]:
        """The token's claims if it is genuine, unexpired and not revoked; InvalidToken otherwise."""
        if not isinstance(token, str) or token.count(".") != 1 or len(token) > 512:
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

    def srn_of(self, token: Any) -> str:
        return self.claims(token)["srn"]

    def revoke(self, jti: str, expires: float) -> None:
        now = self.clock()
        for old in [old for old, until in self.revoked.items() if until <= now]:
            del self.revoked[old]
        if expires > now:
            self.revoked[jti] = expires


class Throttle:
    """Failed attempts per key (a username, an address) within a sliding window; ``limit`` 0 = off."""

    def __init__(self, limit: int, window_seconds: float, clock: Callable[[], float], maxsize: int = 100_000) -> None:
        self.limit = limit
        self.window = window_seconds
        self.clock = clock
        # A key's failures are dropped a window after its latest one; the size bound keeps a flood of
        # made-up usernames from growing memory without end.
        self.failures: TTLCache[str, list[float]] = TTLCache(maxsize, window_seconds, timer=clock)

    def _recent(self, key: str, now: float) -> list[float]:
        """key's failures still inside the window."""
        return [at for at in self.failures.get(key, ()) if at > now - self.window]

    def retry_after(self, key: str) -> int:
        """Seconds until key may try again; 0 if it may now."""
        if not self.limit:
            return 0
        now = self.clock()
        recent = self._recent(key, now)
        if len(recent) < self.limit:
            return 0
        return max(1, math.ceil(recent[-self.limit] + self.window - now))

    def fail(self, key: str) -> None:
        if self.limit:
            now = self.clock()
            self.failures[key] = self._recent(key, now)[-self.limit:] + [now]

    def clear(self, key: str) -> None:
        self.failures.pop(key, None)
