"""Restocking a running sale: more units in Redis at once, and in the ledger through the outbox.

``restock`` is one call of ``lua/restock-3.lua``: the units become available to ``reserve`` and
the outbox gets a ``restock`` entry in the same atomic step, so no order can take a restocked
unit the ledger will not hear of. The drain (``workers/outbox.py``) writes those entries into
``sale_restocks`` with ``write_restocks``; the outbox entry's id is the row's key, so a drain
that runs twice writes once.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from engine.errors import Conflict, NotFound, Unprocessable
from engine.inventory import keep_live
from engine.keys import sale_keys
from engine.scripts import SCRIPTS, Code

__all__ = [
    "RESTOCK_FIELD",
    "Restocked",
    "restock",
    "restock_entries",
    "restocked_units",
    "write_restocks",
]

# The one field of a restock outbox entry (order changes use 'change' or 'changes').
RESTOCK_FIELD = "restock"
_SEP = "\x1f"
# A restock bigger than this is a typo: no drop sells a million units more at once.
MAX_UNITS = 1_000_000

_restock = SCRIPTS["restock"]


@dataclass(frozen=True, slots=True)
class Restocked:
    available: int  # units available right after the restock
    initial_stock: int  # every unit ever put on sale, the restock included


async def restock(redis: Redis, sale_id: str, units: int, actor: str) -> Restocked:
    """Add ``units`` to the sale's stock (open or paused, not closed)."""
    if not 1 <= units <= MAX_UNITS:
        raise Unprocessable("invalid-body", f"units must be an integer from 1 to {MAX_UNITS}")
    keys = sale_keys(sale_id)
    reply = await _restock(redis, [keys.sale, keys.stock, keys.outbox], [units, actor])
    code = Code(reply[0])
    if code is Code.SALE_NOT_FOUND:
        raise NotFound("sale-not-found", f"there is no sale {sale_id!r} in Redis")
    if code is Code.INVALID_STATE:
        raise Conflict("invalid-status", f"a {reply[1]} sale cannot be restocked")
    if code is Code.INVALID_QUANTITY:
        raise Unprocessable("invalid-body", "units must be a positive integer")
    await keep_live(redis, sale_id)
    return Restocked(available=int(reply[1]), initial_stock=int(reply[2]))


Entry = tuple[str, dict[str, str]]


def restock_entries(entries: list[Entry]) -> list[tuple[str, str]]:
    """(entry id, packed restock) of the restock entries among an outbox's ``entries``."""
    return [(i, fields[RESTOCK_FIELD]) for i, fields in entries if RESTOCK_FIELD in fields]


async def write_restocks(db: asyncpg.Pool, sale_id: str, restocks: list[tuple[str, str]]) -> None:
    """Record restock entries in the ledger; one already recorded is left as it is."""
    if not restocks:
        return
    rows = []
    for entry_id, packed in restocks:
        # The actor is free text (a JWT's subject): it may hold the separator itself, so it
        # is whatever lies between the time and the last value.
        units, at_ms, rest = packed.split(_SEP, 2)
        actor = rest.rpartition(_SEP)[0]
        rows.append((sale_id, entry_id, int(units), actor, int(at_ms)))
    await db.executemany(
        """
        INSERT INTO sale_restocks (sale_id, entry_id, units, actor, at)
        VALUES ($1, $2, $3, $4, to_timestamp($5::bigint / 1000.0))
        ON CONFLICT DO NOTHING
        """,
        rows,
    )


async def restocked_units(db: asyncpg.Pool | asyncpg.Connection, sale_id: str) -> int:
    """Units the ledger has recorded as restocked into the sale."""
    total = await db.fetchval(
        "SELECT coalesce(sum(units), 0) FROM sale_restocks WHERE sale_id = $1", sale_id
    )
    return int(total)
