"""Move outbox stream entries into the Postgres ledger, exactly once in effect.

Each sale's outbox is read through the consumer group ``ledger``. An entry is acknowledged (and
deleted, so the stream does not grow without bound) only after the batch it came in has been
committed. A worker that dies between reading and acknowledging leaves its entries pending; the
next drain by any worker claims entries pending longer than ``claim_idle_ms`` and writes them
again, which the ledger's version check makes harmless.

``drain_outboxes`` is the arq job: every second it drains every live sale's outbox for most of
that second, so the ledger trails Redis by a batch, not by a tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine.events import write_with_events
from engine.keys import OUTBOX_GROUP, sale_keys
from engine.ledger import entry_changes, units_moved
from engine.metrics import LEDGER_CHANGES, UNITS
from engine.restock import restock_entries, write_restocks
from engine.sales import live_sale_ids
from engine.scripts import SCRIPTS
from engine.settings import Settings

__all__ = ["drain_outboxes", "drain_sale"]

log = logging.getLogger("flashsale.outbox")

Entry = tuple[str, dict[str, str]]

_ack = SCRIPTS["ack"]

# How long one drain job keeps polling before the next tick's job takes over; under 1 s so two
# ticks' jobs rarely overlap. After each pass the job waits FLASHSALE_DRAIN_POLL_MS, so under a
# storm entries gather into batches instead of the loop spinning on a few at a time: Postgres
# and the worker pay a fixed cost per pass whatever its size (`python -m loadtests.costs`, entries
# of 20 orders, 1,000 against 200 orders per pass: worker 3.6 against 11.6 µs, Postgres 13.5
# against 17.5 µs per order).
DRAIN_WINDOW_S = 0.9
# Each pass that finds every outbox empty doubles the wait, up to this: every pass reads every
# live sale's outbox, so a quiet worker backs off instead of spending CPU on empty reads, and
# the first orders after a quiet spell still reach the ledger within this long.
IDLE_PAUSE_MAX_S = 0.16


async def _write_and_ack(
    redis: Redis, db: asyncpg.Pool, sale_id: str, entries: list[Entry], batch: int
) -> int:
    if not entries:
        return 0
    # Claimed entries may have been trimmed already (XAUTOCLAIM reports those as empty).
    changes = [change for _, fields in entries if fields for change in entry_changes(fields)]
    # A reserve entry carries a whole batch of orders, so ``batch`` entries can hold far more
    # changes: at most ``batch`` per statement. A crash between statements leaves every entry
    # pending, and the ledger absorbs the part written twice. Each statement's events for
    # subscribers are produced in its transaction (engine.events), once however often replayed.
    for start in range(0, len(changes), batch):
        await write_with_events(db, sale_id, changes[start : start + batch])
    await write_restocks(db, sale_id, restock_entries(entries))
    # Only now, after the commit: if we die before this line, the entries stay pending and are
    # written again by whoever claims them.
    outbox = sale_keys(sale_id).outbox
    await _ack(redis, [outbox], [OUTBOX_GROUP, ",".join(entry_id for entry_id, _ in entries)])
    # Counted after the commit: a change written twice (claimed after a crash) counts twice.
    LEDGER_CHANGES.labels(sale_id).inc(len(changes))
    for change, units in units_moved(changes).items():
        if units:
            UNITS.labels(change).inc(units)
    return len(changes)


async def _read(redis: Redis, outbox: str, consumer: str, start: str, count: int) -> list[Entry]:
    try:
        reply: Any = await redis.xreadgroup(OUTBOX_GROUP, consumer, {outbox: start}, count=count)
    except ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        # The stream or group vanished (a Redis restored without them): recreate from the
        # beginning so nothing still in the stream is skipped.
        await redis.xgroup_create(outbox, OUTBOX_GROUP, id="0", mkstream=True)
        return []
    if not reply:
        return []
    return [(entry_id, fields) for entry_id, fields in reply[0][1]]


async def drain_sale(
    redis: Redis,
    db: asyncpg.Pool,
    sale_id: str,
    consumer: str,
    batch: int,
    claim_idle_ms: int,
    recover: bool = True,
) -> int:
    """One pass over a sale's outbox: with ``recover``, my own pending entries and then those a
    dead worker left pending; then new ones. Returns the number of changes written."""
    outbox = sale_keys(sale_id).outbox
    written = 0
    if recover:
        written += await _recover(redis, db, sale_id, outbox, consumer, batch, claim_idle_ms)
    # New entries, batch by batch until the stream is empty.
    while True:
        entries = await _read(redis, outbox, consumer, ">", batch)
        written += await _write_and_ack(redis, db, sale_id, entries, batch)
        if len(entries) < batch:
            return written


async def _recover(
    redis: Redis,
    db: asyncpg.Pool,
    sale_id: str,
    outbox: str,
    consumer: str,
    batch: int,
    claim_idle_ms: int,
) -> int:
    """Entries read but never acknowledged: mine (my last write failed), then a dead worker's."""
    written = 0
    # Entries this consumer read before but did not acknowledge (the last write failed).
    written += await _write_and_ack(
        redis, db, sale_id, await _read(redis, outbox, consumer, "0", batch), batch
    )
    # Entries another consumer has held longer than any healthy batch takes: it died.
    cursor = "0-0"
    while True:
        try:
            cursor, claimed, _ = await redis.xautoclaim(
                outbox,
                OUTBOX_GROUP,
                consumer,
                min_idle_time=claim_idle_ms,
                start_id=cursor,
                count=batch,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return written
        if claimed:
            log.info("claimed %d outbox entries of %s from a dead worker", len(claimed), sale_id)
            claimed_entries = [(i, f) for i, f in claimed]
            written += await _write_and_ack(redis, db, sale_id, claimed_entries, batch)
        if cursor == "0-0":
            return written


async def drain_outboxes(ctx: dict[str, Any]) -> int:
    """The arq job: drain every live sale's outbox into Postgres for about a second."""
    settings: Settings = ctx["settings"]
    deadline = time.monotonic() + DRAIN_WINDOW_S
    written = 0
    first = True
    empty_passes = 0
    while True:
        this_pass = 0
        for sale_id in await live_sale_ids(ctx["drain_store"]):
            this_pass += await drain_sale(
                ctx["drain_store"],
                ctx["drain_db"],
                sale_id,
                ctx["consumer"],
                settings.drain_batch,
                settings.claim_idle_ms,
                # Pending and dead workers' entries once a job (a second), not every pass: a
                # failed write ends the job, so the next one picks its entries up.
                recover=first,
            )
        first = False
        written += this_pass
        if time.monotonic() >= deadline:
            return written
        empty_passes = 0 if this_pass else empty_passes + 1
        # drain_sale has read each outbox until a read came back short of a batch, so every
        # pass ends caught up: wait for the next orders to gather. Never past the window: the
        # next tick's job (same consumer) would otherwise start while this one still runs and
        # re-write its in-flight entries in its recovery pass.
        poll_s = settings.drain_poll_ms / 1000
        pause = max(poll_s, min(poll_s * 2**empty_passes, IDLE_PAUSE_MAX_S))
        await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
