"""What a sale id, order id, user id and idempotency key may look like.

They all end up inside Redis keys and URLs, so each is checked once, at the edge, against a
pattern that cannot contain ``{``, ``}``, whitespace or control characters (the outbox also joins
an order's values with byte 31: lua/includes/emit.lua).
"""

from __future__ import annotations

import re
import secrets

__all__ = [
    "IDEMPOTENCY_KEY_PATTERN",
    "is_idempotency_key",
    "is_sale_id",
    "is_user_id",
    "new_order_id",
    "new_order_ids",
    "sale_of_order",
]

_SALE = re.compile(r"[a-z0-9][a-z0-9-]{0,47}")
_USER = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")
# Public: the OpenAPI document states it, so clients can check a key before sending it.
IDEMPOTENCY_KEY_PATTERN = r"[A-Za-z0-9_.:-]{1,128}"
_IDEMPOTENCY = re.compile(IDEMPOTENCY_KEY_PATTERN)
_ORDER = re.compile(r"([a-z0-9][a-z0-9-]{0,47})\.([0-9a-f]{16})")


def is_sale_id(value: str) -> bool:
    return _SALE.fullmatch(value) is not None


def is_user_id(value: str) -> bool:
    return _USER.fullmatch(value) is not None


def is_idempotency_key(value: str) -> bool:
    return _IDEMPOTENCY.fullmatch(value) is not None


def new_order_id(sale_id: str) -> str:
    """A fresh order id. It carries its sale, so one Redis call finds the order before any
    worker ran, and it is made here rather than in Lua because the script must be handed the
    order's key in KEYS. 64 random bits; ``reserve`` still refuses to overwrite a taken id."""
    return new_order_ids(sale_id, 1)[0]


def new_order_ids(sale_id: str, count: int) -> list[str]:
    """``count`` fresh order ids from one read of the system's randomness (one ``getrandom``
    call per batch instead of one per order)."""
    bits = secrets.token_hex(8 * count)
    return [f"{sale_id}.{bits[i : i + 16]}" for i in range(0, 16 * count, 16)]


def sale_of_order(value: str) -> str | None:
    """The sale an order id belongs to, or None when it is not an order id at all."""
    match = _ORDER.fullmatch(value)
    return match.group(1) if match else None
