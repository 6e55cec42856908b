"""The PESU credential checker: one shared HTTP client, a TTL cache of successes, one call per credential.

pesu-auth answers a refusal either as 200 with ``"status": false`` (older versions) or as 401 (newer);
both are ``InvalidCredentials``. Anything else (timeout, refused connection, 5xx, a body we cannot read)
means PESU is down for us, and is ``AuthUnavailable``: a member must never be told their password is
wrong because a server on the internet is asleep.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any

import httpx
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

    def _key(self, username: str, password: str) -> bytes:
        message = username.encode() + b"\x00" + password.encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    async def check(self, username: str, password: str) -> dict[str, Any]:
        """The member's profile (always with "srn") if PESU accepts these credentials."""
        key = self._key(username, password)
        profile = self.cache.get(key)
        if profile is not None:
            return profile
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
        try:
            async with asyncio.timeout(self.deadline):
                response = await self.client.post(
                    self.url, json={"username": username, "password": password, "profile": True}
                )
        except (httpx.HTTPError, asyncio.TimeoutError) as exc:
            raise AuthUnavailable(type(exc).__name__) from None
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
