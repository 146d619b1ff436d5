"""Ephemeral client secrets (`ek_...`), as OpenAI's `POST /v1/realtime/client_secrets` mints them.

Sans-I/O: the clock is passed in, nothing here does I/O or logs a secret. A secret opens exactly
one session (WebSocket or WebRTC call), then it is gone; it also goes when it expires. They live
in memory only and are bounded in number: minting first drops the expired ones, and when every
slot still holds a live secret the mint is refused (`SecretsFull`, HTTP 429) rather than evicting
a live secret some page is about to use.

Lookup is by the SHA-256 of the value (so a dict probe says nothing useful about the secret) and
the value itself is then compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SECRET_PREFIX = "ek_"
MIN_SECONDS, MAX_SECONDS, DEFAULT_SECONDS = 10, 7200, 600  # OpenAI's documented bounds and default


class SecretsFull(Exception):
    pass


@dataclass(frozen=True)
class ClientSecret:
    value: str
    expires_at: float  # the clock's seconds (unix time in the server)
    session_id: str  # the session it will open: the id its mint answer showed
    session: Any  # the session config applied before session.created (opaque here); None: defaults


def looks_like_secret(token: str) -> bool:
    return token.startswith(SECRET_PREFIX)


class ClientSecrets:
    def __init__(self, max_secrets: int, clock: Callable[[], float]) -> None:
        if max_secrets < 1:
            raise ValueError("max_secrets must be at least 1")
        self.max_secrets = max_secrets
        self.clock = clock
        self._live: OrderedDict[bytes, ClientSecret] = OrderedDict()  # by digest, oldest first

    def __len__(self) -> int:
        return len(self._live)

    def mint(self, seconds: int, session_id: str, session: Any = None) -> ClientSecret:
        if not MIN_SECONDS <= seconds <= MAX_SECONDS:
            raise ValueError(f"expires_after.seconds must be between {MIN_SECONDS} and {MAX_SECONDS}")
        return self._mint(seconds, session_id, session)

    def mint_short(self, seconds: float, session_id: str, session: Any = None) -> ClientSecret:
        """The operator's demo tokens: a lifetime the operator set, not bound by OpenAI's minimum."""
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        return self._mint(seconds, session_id, session)

    def _mint(self, seconds: float, session_id: str, session: Any) -> ClientSecret:
        now = self.clock()
        self.expire(now)
        if len(self._live) >= self.max_secrets:
            raise SecretsFull(f"{self.max_secrets} client secrets are live; try again when some are used or expire")
        value = SECRET_PREFIX + secrets.token_hex(24)
        secret = ClientSecret(value, now + seconds, session_id, session)
        self._live[_digest(value)] = secret
        return secret

    def expire(self, now: float) -> None:
        """Drop the expired secrets (the oldest expire first only when lifetimes are equal: scan all)."""
        for key in [k for k, s in self._live.items() if s.expires_at <= now]:
            del self._live[key]

    def check(self, value: str) -> ClientSecret | None:
        """The live secret with this value, left in place (None: unknown, used or expired)."""
        key = _digest(value)
        secret = self._live.get(key)
        if secret is None or not hmac.compare_digest(secret.value.encode(), value.encode()):
            return None
        if secret.expires_at <= self.clock():
            del self._live[key]
            return None
        return secret

    def redeem(self, value: str) -> ClientSecret | None:
        """Use the secret up: it opens this one session and no other."""
        secret = self.check(value)
        if secret is not None:
            del self._live[_digest(value)]
        return secret


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
