"""Webhook subscriptions: who receives events, with which secret, and how each is signed.

Signatures follow Standard Webhooks: ``webhook-signature`` is ``v1,<base64 HMAC-SHA256>`` of
``{id}.{timestamp}.{body}``, keyed with the base64-decoded part of the secret after ``whsec_``.
While a rotated-out secret is in its grace period both secrets sign, space-separated, so a
receiver still holding the old one keeps verifying.

The engine signs with ``hmac`` rather than the ``standardwebhooks`` package: the scheme is a few
lines, the package signs with one secret per object (a rotation wants two signatures in one
header), and it would be a runtime dependency for that. The suite verifies every delivery with
the package.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from engine.errors import NotFound, Unprocessable
from engine.events import EVENT_TYPES

__all__ = [
    "SECRET_PREFIX",
    "create_subscription",
    "delete_subscription",
    "get_subscription",
    "list_deliveries",
    "list_subscriptions",
    "new_secret",
    "rotate_secret",
    "signature_header",
    "update_subscription",
]

SECRET_PREFIX = "whsec_"
# 32 bytes: the size of the HMAC-SHA256 key block's digest; Standard Webhooks asks 24 to 64.
_SECRET_BYTES = 32
_ID = re.compile(r"sub_[0-9a-f]{24}")
_MAX_URL = 2048
DELIVERY_STATES = ("pending", "delivered", "failed")

# What the admin API shows of a subscription; the secret only at creation and rotation.
_COLUMNS = (
    "id, url, event_types, description, enabled, disabled_reason, failing_since, "
    "previous_expires_at, created_at, updated_at"
)


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode()


def _sign(secret: str, to_sign: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    return "v1," + base64.b64encode(hmac.new(key, to_sign, hashlib.sha256).digest()).decode()


def signature_header(keys: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per secret in ``keys``."""
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(_sign(secret, to_sign) for secret in keys)


def _internal(host: str) -> bool:
    """Whether ``host`` names this machine or a private network by itself (an address literal,
    or localhost). A name that resolves there is not caught: put the workers behind an egress
    proxy for that."""
    host = host.rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            # The forms the resolver also reads as an IPv4 address: 2130706433, 127.1, 0x7f.1
            address = ipaddress.ip_address(socket.inet_ntoa(socket.inet_aton(host)))
        except OSError:
            return False
    return not address.is_global


def _url(value: Any, internal_ok: bool) -> str:
    if not isinstance(value, str) or len(value) > _MAX_URL:
        raise Unprocessable("invalid-subscription", f"url must be a string of at most {_MAX_URL}")
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        host = None
    if host is None or parts.scheme not in ("http", "https"):
        raise Unprocessable("invalid-subscription", "url must be an http or https URL")
    if not internal_ok and _internal(host):
        # The workers would POST into the deployment's own network for whoever holds a key.
        raise Unprocessable(
            "invalid-subscription", "url must not point at this machine or a private network"
        )
    return value


def _event_types(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise Unprocessable("invalid-subscription", "event_types must be a non-empty list")
    unknown = sorted(set(value) - set(EVENT_TYPES))
    if unknown:
        raise Unprocessable(
            "invalid-subscription",
            f"unknown event types: {', '.join(unknown)}",
            known=list(EVENT_TYPES),
        )
    return sorted(set(value))


def _description(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 500:
        raise Unprocessable("invalid-subscription", "description must be at most 500 characters")
    return value


def _known_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise Unprocessable("invalid-subscription", f"unknown fields: {', '.join(sorted(unknown))}")


def _id(subscription_id: str) -> str:
    if _ID.fullmatch(subscription_id) is None:
        raise NotFound("subscription-not-found", f"there is no subscription {subscription_id!r}")
    return subscription_id


async def create_subscription(
    db: asyncpg.Pool, body: dict[str, Any], internal_ok: bool = False
) -> dict[str, Any]:
    """A new subscription, with its secret: the only answer that shows it. ``internal_ok``:
    allow URLs on this machine or a private network (outside production)."""
    _known_fields(body, {"url", "event_types", "description"})
    if "url" not in body or "event_types" not in body:
        raise Unprocessable("invalid-subscription", "url and event_types are required")
    row = await db.fetchrow(
        f"INSERT INTO webhook_subscriptions (id, url, event_types, description, secret)"
        f" VALUES ($1, $2, $3, $4, $5) RETURNING {_COLUMNS}, secret",
        "sub_" + secrets.token_hex(12),
        _url(body["url"], internal_ok),
        _event_types(body["event_types"]),
        _description(body.get("description", "")),
        new_secret(),
    )
    assert row is not None
    return dict(row)


async def list_subscriptions(db: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await db.fetch(f"SELECT {_COLUMNS} FROM webhook_subscriptions ORDER BY created_at, id")
    return [dict(row) for row in rows]


async def get_subscription(db: asyncpg.Pool, subscription_id: str) -> dict[str, Any]:
    row = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM webhook_subscriptions WHERE id = $1", _id(subscription_id)
    )
    if row is None:
        raise NotFound("subscription-not-found", f"there is no subscription {subscription_id!r}")
    return dict(row)


async def update_subscription(
    db: asyncpg.Pool, subscription_id: str, body: dict[str, Any], internal_ok: bool = False
) -> dict[str, Any]:
    """Change url, event_types, description or enabled; enabling again forgets past failures."""
    _known_fields(body, {"url", "event_types", "description", "enabled"})
    enabled = body.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise Unprocessable("invalid-subscription", "enabled must be true or false")
    row = await db.fetchrow(
        f"""
        UPDATE webhook_subscriptions SET
            url = coalesce($2, url), event_types = coalesce($3, event_types),
            description = coalesce($4, description), enabled = coalesce($5, enabled),
            disabled_reason = CASE WHEN $5 THEN NULL ELSE disabled_reason END,
            failing_since = CASE WHEN $5 THEN NULL ELSE failing_since END,
            updated_at = now()
        WHERE id = $1 RETURNING {_COLUMNS}
        """,
        _id(subscription_id),
        _url(body["url"], internal_ok) if "url" in body else None,
        _event_types(body["event_types"]) if "event_types" in body else None,
        _description(body["description"]) if "description" in body else None,
        enabled,
    )
    if row is None:
        raise NotFound("subscription-not-found", f"there is no subscription {subscription_id!r}")
    return dict(row)


async def rotate_secret(db: asyncpg.Pool, subscription_id: str, grace_s: int) -> dict[str, Any]:
    """A new secret; the current one keeps signing beside it for ``grace_s`` seconds."""
    row = await db.fetchrow(
        """
        UPDATE webhook_subscriptions SET previous_secret = secret, secret = $2,
            previous_expires_at = now() + $3 * interval '1 second', updated_at = now()
        WHERE id = $1 RETURNING id, secret, previous_expires_at
        """,
        _id(subscription_id),
        new_secret(),
        grace_s,
    )
    if row is None:
        raise NotFound("subscription-not-found", f"there is no subscription {subscription_id!r}")
    return dict(row)


async def delete_subscription(db: asyncpg.Pool, subscription_id: str) -> None:
    """Gone, with its deliveries (their events stay for other subscriptions)."""
    status = await db.execute(
        "DELETE FROM webhook_subscriptions WHERE id = $1", _id(subscription_id)
    )
    if status == "DELETE 0":
        raise NotFound("subscription-not-found", f"there is no subscription {subscription_id!r}")


async def list_deliveries(
    db: asyncpg.Pool, subscription_id: str, state: str | None, limit: int
) -> list[dict[str, Any]]:
    """The subscription's newest deliveries (of ``state``, if given), each with its attempts."""
    await get_subscription(db, subscription_id)
    rows = await db.fetch(
        """
        SELECT d.event_id, e.type, d.state, d.attempts, d.next_attempt_at, d.last_status,
               d.last_error, d.created_at, d.updated_at,
               coalesce((SELECT jsonb_agg(jsonb_build_object(
                             'attempt', a.attempt, 'at', a.at, 'status', a.status,
                             'error', a.error, 'duration_ms', a.duration_ms) ORDER BY a.attempt)
                         FROM outbound_attempts a
                         WHERE a.subscription_id = d.subscription_id
                           AND a.event_id = d.event_id), '[]'::jsonb)::text AS attempt_log
        FROM outbound_deliveries d JOIN outbound_events e ON e.id = d.event_id
        WHERE d.subscription_id = $1 AND ($2::text IS NULL OR d.state = $2)
        ORDER BY d.created_at DESC, d.event_id LIMIT $3
        """,
        subscription_id,
        state,
        limit,
    )
    found = []
    for row in rows:
        shown = dict(row)
        shown["attempt_log"] = orjson.loads(shown["attempt_log"])
        found.append(shown)
    return found
