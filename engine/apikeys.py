"""Operators' API keys: random, shown once, stored hashed, scoped, expiring, revocable.

A key is ``fsk_`` and 32 random bytes (urlsafe base64). Only its SHA-256 is stored. A slow
password hash (bcrypt, argon2) exists to make guessing a human's low-entropy password costly;
a key carries 256 random bits, so no guess at all is feasible and a fast hash loses nothing,
while an admin request whose key is not cached does not pay milliseconds of hashing. Lookups
go by the hash (a unique index), so no comparison of secrets leaks timing.

``KeyCache`` keeps what a lookup found for ``CACHE_S`` per process: a burst of admin requests
costs Postgres one lookup, and a revoke or an expiry takes effect within that long. Last use is
written at most once per ``LAST_USE_EVERY_S`` per key and process, never per request.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from engine.errors import NotFound, Unprocessable

__all__ = [
    "CACHE_S",
    "KEY_PREFIX",
    "LAST_USE_EVERY_S",
    "SCOPES",
    "ApiKey",
    "KeyCache",
    "create_key",
    "expires_text",
    "hash_key",
    "list_keys",
    "revoke_key",
]

KEY_PREFIX = "fsk_"
# Every scope a key may hold; an admin JWT holds them all.
SCOPES = (
    "sales:read",
    "sales:write",
    "orders:read",
    "orders:write",
    "refunds:write",
    "reconcile:run",
    "webhooks:read",
    "webhooks:write",
)
# How long a process trusts a lookup: the longest a revoked key still works.
CACHE_S = 5.0
LAST_USE_EVERY_S = 60.0
# Past this many cached keys the cache starts over: a flood of made-up keys cannot grow it.
_CACHE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def actor(self) -> str:
        return f"key:{self.id}"

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ApiKey:
        return cls(
            id=row["id"],
            name=row["name"],
            prefix=row["prefix"],
            scopes=tuple(row["scopes"]),
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
            last_used_at=row["last_used_at"],
        )


_COLUMNS = "id, name, prefix, scopes, created_at, expires_at, revoked_at, last_used_at"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def create_key(
    db: asyncpg.Pool, name: str, scopes: list[str], expires_in_days: int | None = None
) -> tuple[ApiKey, str]:
    """A new key and its secret, the only time the secret is seen."""
    unknown = sorted(set(scopes) - set(SCOPES))
    problems = [f"unknown scope {s!r}" for s in unknown]
    if not scopes:
        problems.append("give at least one scope")
    if not name.strip():
        problems.append("give the key a name")
    if expires_in_days is not None and expires_in_days < 1:
        problems.append("expiry must be at least one day away")
    if problems:
        raise Unprocessable("invalid-api-key", "; ".join(problems), errors=problems)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = await db.fetchrow(
        f"""
        INSERT INTO api_keys (name, prefix, hash, scopes, expires_at)
        VALUES ($1, $2, $3, $4, now() + make_interval(days => $5))
        RETURNING {_COLUMNS}
        """,
        name.strip(),
        secret[: len(KEY_PREFIX) + 6],
        hash_key(secret),
        sorted(set(scopes), key=SCOPES.index),
        expires_in_days,
    )
    assert row is not None
    return ApiKey.from_row(row), secret


async def list_keys(db: asyncpg.Pool) -> list[ApiKey]:
    rows = await db.fetch(f"SELECT {_COLUMNS} FROM api_keys ORDER BY id")
    return [ApiKey.from_row(row) for row in rows]


async def revoke_key(db: asyncpg.Pool, key_id: int) -> ApiKey:
    """Revoke a key (again: it stays revoked as of the first time)."""
    row = await db.fetchrow(
        f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1"
        f" RETURNING {_COLUMNS}",
        key_id,
    )
    if row is None:
        raise NotFound("api-key-not-found", f"there is no API key {key_id}")
    return ApiKey.from_row(row)


class KeyCache:
    """One process's recent key lookups, and when it last recorded each key's use."""

    def __init__(self) -> None:
        self._found: dict[bytes, tuple[ApiKey | None, float]] = {}
        self._recorded: dict[int, float] = {}

    async def lookup(self, db: asyncpg.Pool, secret: str) -> ApiKey | None:
        """The key with this secret (usable or not), or None when there is none."""
        digest = hash_key(secret)
        now = time.monotonic()
        cached = self._found.get(digest)
        if cached is not None and now - cached[1] < CACHE_S:
            key = cached[0]
        else:
            row = await db.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE hash = $1", digest)
            key = ApiKey.from_row(row) if row is not None else None
            if len(self._found) >= _CACHE_LIMIT:
                self._found.clear()
            self._found[digest] = (key, now)
        if key is not None and now - self._recorded.get(key.id, -LAST_USE_EVERY_S) >= (
            LAST_USE_EVERY_S
        ):
            self._recorded[key.id] = now
            await db.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", key.id)
        return key


def expires_text(key: ApiKey, now: datetime) -> str:
    """How ``flashsale apikey list`` shows a key's standing."""
    if key.revoked_at is not None:
        return f"revoked {key.revoked_at:%Y-%m-%d %H:%M}"
    if key.expires_at is None:
        return "never expires"
    if key.expires_at <= now:
        return f"expired {key.expires_at:%Y-%m-%d %H:%M}"
    return f"expires in {(key.expires_at - now) // timedelta(days=1)} d"
