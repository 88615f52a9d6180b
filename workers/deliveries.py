"""Deliver events to subscribers: at least once, signed, with the Standard Webhooks retries.

``deliver_events`` is the arq job (every second). It produces the live sales' milestone events
(``engine.events.observe_sale``), then claims due deliveries and hands them to the process's
``Dispatcher``, which sends them in the background and records each answer. The job itself
returns at once, so a hanging endpoint never holds an arq slot (the ledger drain's included):
it holds at most ``delivery_per_endpoint`` of the dispatcher's ``delivery_concurrency`` slots,
each for at most ``delivery_timeout_s``.

Claiming moves a delivery's ``next_attempt_at`` past the attempt's longest possible duration (a
lease), so other workers leave it alone; a worker killed mid-attempt leaves the lease to run out
and the next claim sends the same event, with the same ``webhook-id``, again. The claim reads
the due-index per enabled subscription, so it costs the deliveries it takes, not the events
stored.

After a failed attempt the next waits ``delivery_retry_s[attempt]`` (or the endpoint's
``Retry-After``); past the last the delivery fails. ``410 Gone`` disables the subscription at
once; an endpoint whose every attempt failed for ``endpoint_disable_after_s`` is disabled too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
import orjson

from engine.db import connect_postgres
from engine.events import SALE_EVENTS, anyone_wants, event_body, observe_sale
from engine.settings import Settings
from engine.subscriptions import signature_header
from workers.attempts import Outcome, record_outcome
from workers.context import JOB_WINDOW_S, STORE_DEADLINE_S, each_sale

__all__ = [
    "DISPATCHER",
    "Dispatcher",
    "claim_due",
    "deliver_events",
    "dispatch_due",
    "dispatch_for",
]

log = logging.getLogger("flashsale.deliveries")

# The ctx key of the process's Dispatcher (made by start_dispatcher).
DISPATCHER = "deliveries"
# Beyond the request's own timeout, before another worker may send a claimed delivery again:
# time to record the outcome. Should recording outlast it, the delivery is sent twice (at least
# once allows it) and the stale outcome is ignored (record_outcome matches the attempt).
LEASE_MARGIN_S = 5
# How often the job looks for newly due deliveries while none of its deliveries finishes (it
# keeps starting them for the window every job has, ``workers.context.JOB_WINDOW_S``).
IDLE_LOOK_S = 0.2

_CLAIM = """
WITH busy AS (
    SELECT * FROM unnest($2::text[], $3::int[]) AS b (id, in_flight)
),
claimed AS (
    SELECT d.subscription_id, d.event_id, d.next_attempt_at
    FROM webhook_subscriptions s
    CROSS JOIN LATERAL (
        SELECT subscription_id, event_id, next_attempt_at FROM outbound_deliveries d
        WHERE d.subscription_id = s.id AND d.state = 'pending' AND d.next_attempt_at <= now()
        ORDER BY d.next_attempt_at
        LIMIT greatest(0, $4 - coalesce((SELECT in_flight FROM busy WHERE busy.id = s.id), 0))
        FOR UPDATE SKIP LOCKED
    ) d
    WHERE s.enabled
    ORDER BY d.next_attempt_at
    LIMIT $1
)
UPDATE outbound_deliveries d
SET attempts = d.attempts + 1, updated_at = now(),
    next_attempt_at = now() + $5 * interval '1 second'
FROM claimed c, outbound_events e, webhook_subscriptions s
WHERE d.subscription_id = c.subscription_id AND d.event_id = c.event_id
  AND e.id = d.event_id AND s.id = d.subscription_id
RETURNING d.subscription_id, d.event_id, d.attempts, e.type, e.occurred_at, e.data::text,
          s.url, s.secret, s.previous_secret, s.previous_expires_at
"""


@dataclass(frozen=True, slots=True)
class Claimed:
    subscription_id: str
    event_id: str
    attempt: int
    url: str
    keys: tuple[str, ...]
    body: bytes


async def claim_due(
    db: asyncpg.Pool, limit: int, in_flight: dict[str, int], per_endpoint: int, lease_s: int
) -> list[Claimed]:
    """At most ``limit`` due deliveries, at most ``per_endpoint`` minus what is already in flight
    per subscription, each leased for ``lease_s``."""
    if limit <= 0:
        return []
    rows = await db.fetch(
        _CLAIM, limit, list(in_flight), list(in_flight.values()), per_endpoint, lease_s
    )
    now = datetime.now().astimezone()
    found = []
    for row in rows:
        keys = [row["secret"]]
        expires = row["previous_expires_at"]
        if row["previous_secret"] and expires is not None and expires > now:
            keys.append(row["previous_secret"])
        found.append(
            Claimed(
                row["subscription_id"],
                row["event_id"],
                row["attempts"],
                row["url"],
                tuple(keys),
                _body(row["type"], row["occurred_at"], row["data"]),
            )
        )
    return found


def _body(kind: str, occurred_at: datetime, data: str) -> bytes:
    parsed: dict[str, Any] = orjson.loads(data)
    return event_body(kind, occurred_at, parsed)


class Dispatcher:
    """The process's deliveries in flight: bounded in all, and per subscription."""

    def __init__(self, settings: Settings, db: asyncpg.Pool) -> None:
        self.settings = settings
        self.db = db
        self.in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        # Set whenever a delivery finishes: its slot can take the next due one at once.
        self.slot_freed = asyncio.Event()

    @property
    def free(self) -> int:
        return self.settings.delivery_concurrency - len(self._tasks)

    def start(self, claimed: Claimed) -> None:
        self.in_flight[claimed.subscription_id] = self.in_flight.get(claimed.subscription_id, 0) + 1
        task = asyncio.create_task(self._deliver(claimed))
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._finished(done, claimed.subscription_id))

    def _finished(self, task: asyncio.Task[None], subscription_id: str) -> None:
        self._tasks.discard(task)
        self.slot_freed.set()
        left = self.in_flight.get(subscription_id, 1) - 1
        if left:
            self.in_flight[subscription_id] = left
        else:
            self.in_flight.pop(subscription_id, None)
        if not task.cancelled() and task.exception() is not None:
            # The answer was not recorded (Postgres away): the lease runs out and the delivery
            # is sent again, with the same id.
            log.warning("a delivery's outcome was not recorded", exc_info=task.exception())

    async def wait(self) -> None:
        """Until every delivery in flight has finished (tests, and a graceful stop)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.delivery_timeout_s)
            )
        return self._session

    async def _deliver(self, claimed: Claimed) -> None:
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": claimed.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(
                claimed.keys, claimed.event_id, timestamp, claimed.body
            ),
        }
        started = time.monotonic()
        status: int | None = None
        retry_after: str | None = None
        error: str | None = None
        try:
            async with self._client().post(
                claimed.url, data=claimed.body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500] if str(exc) else type(exc).__name__
        outcome = Outcome(
            claimed.subscription_id,
            claimed.event_id,
            claimed.attempt,
            status,
            error,
            int((time.monotonic() - started) * 1000),
            retry_after,
        )
        await record_outcome(self.db, self.settings, outcome)


async def deliver_events(ctx: dict[str, Any]) -> int:
    """The arq job: produce the live sales' milestones, then keep the dispatcher's slots busy
    with due deliveries for about a second."""
    settings: Settings = ctx["settings"]
    dispatcher: Dispatcher = ctx[DISPATCHER]
    # Each live sale is read every tick only while someone subscribes to sale events; one sale
    # that fails is that sale's outage (each_sale), the deliveries go on.
    if await anyone_wants(ctx["db"], SALE_EVENTS):

        async def observe(sale_id: str) -> int:
            await observe_sale(ctx["db"], ctx["store"], sale_id, settings.stock_low_units)
            return 0

        await each_sale(ctx, "observe", observe)
    return await dispatch_for(dispatcher, JOB_WINDOW_S)


async def start_dispatcher(ctx: dict[str, Any]) -> None:
    """Part of the worker's start-up: the process's Dispatcher, on a pool of its own, so
    deliveries recording their outcomes never take the connections the other jobs need."""
    settings: Settings = ctx["settings"]
    ctx["delivery_db"] = await connect_postgres(settings, 0, 4, deadline_s=STORE_DEADLINE_S)
    ctx[DISPATCHER] = Dispatcher(settings, ctx["delivery_db"])


async def stop_dispatcher(ctx: dict[str, Any]) -> None:
    """Part of the worker's shutdown (as far as start-up got)."""
    if DISPATCHER in ctx:
        # Deliveries cut short are sent again when their lease runs out, with the same id.
        await ctx[DISPATCHER].aclose()
    if "delivery_db" in ctx:
        await ctx["delivery_db"].close()


async def dispatch_for(dispatcher: Dispatcher, window_s: float) -> int:
    """Start due deliveries as slots free up, for ``window_s``; returns how many were started.
    Deliveries still in flight at the end go on in the background."""
    deadline = time.monotonic() + window_s
    started = 0
    while True:
        dispatcher.slot_freed.clear()
        now = await dispatch_due(dispatcher)
        started += now
        left = deadline - time.monotonic()
        if left <= 0:
            return started
        # A finished delivery frees a slot (and may make its endpoint's next one due); with
        # nothing finishing, look again for newly due ones within IDLE_LOOK_S.
        try:
            await asyncio.wait_for(dispatcher.slot_freed.wait(), min(left, IDLE_LOOK_S))
        except TimeoutError:
            pass


async def dispatch_due(dispatcher: Dispatcher) -> int:
    """Claim as many due deliveries as the dispatcher has room for, and start them."""
    settings = dispatcher.settings
    claimed = await claim_due(
        dispatcher.db,
        dispatcher.free,
        dict(dispatcher.in_flight),
        settings.delivery_per_endpoint,
        settings.delivery_timeout_s + LEASE_MARGIN_S,
    )
    for delivery in claimed:
        dispatcher.start(delivery)
    return len(claimed)
