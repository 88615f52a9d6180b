"""The offline gateway: PaymentIntents kept in Redis, ids ``mock_…``, for demos and tests.

Its state lives in Redis so the API and the workers see the same intents; ``settle`` plays the
shopper's card and returns the event Stripe would send.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import WatchError

from engine.keys import mock_event_bodies, mock_event_index, mock_idempotency, mock_intent
from engine.payments import (
    EVENT_PAGE,
    INTENT_KEY,
    REFUND_KEY,
    EventPage,
    GatewayRefused,
    Intent,
    intent_event,
)

__all__ = ["MockGateway"]

# Events the mock keeps, newest first (a demo's worth): the oldest go as new ones come.
KEPT_EVENTS = 10_000


class MockGateway:
    """The ``PaymentGateway`` of a deployment without a Stripe key."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def aclose(self) -> None:
        """Nothing to close: the Redis client belongs to the caller."""

    async def event_page(self, since: int, starting_after: str | None) -> EventPage:
        index = mock_event_index()
        start = 0
        if starting_after is not None:
            rank = await self._redis.zrevrank(index, starting_after)
            if rank is None:
                return EventPage([], False)  # trimmed away meanwhile
            # The range below starts at the newest event, so its offsets are ranks too.
            start = rank + 1
        ids: list[str] = await self._redis.zrevrangebyscore(
            index, "+inf", since, start=start, num=EVENT_PAGE + 1
        )
        page = ids[:EVENT_PAGE]
        bodies = await self._redis.hmget(mock_event_bodies(), page) if page else []
        events = [orjson.loads(body) for body in bodies if body is not None]
        return EventPage(events, len(ids) > EVENT_PAGE)

    async def _read(self, intent_id: str) -> Intent:
        fields = await self._redis.hgetall(mock_intent(intent_id))
        if not fields:
            raise GatewayRefused(f"no such payment intent: {intent_id}")
        return Intent(
            id=intent_id,
            client_secret=fields["client_secret"],
            status=fields["status"],
            amount=int(fields["amount"]),
            currency=fields["currency"],
            order_id=fields["order_id"],
        )

    async def create_intent(
        self, order_id: str, sale_id: str, amount: int, currency: str
    ) -> Intent:
        intent_id = "mock_pi_" + secrets.token_hex(8)
        # The intent is written before the idempotency key that names it: a caller cancelled
        # between the two leaves an intent nobody names (harmless), never a key naming nothing.
        await self._redis.hset(
            mock_intent(intent_id),
            mapping={
                "client_secret": f"{intent_id}_secret_{secrets.token_hex(8)}",
                "status": "requires_payment_method",
                "amount": amount,
                "currency": currency,
                "order_id": order_id,
                "sale_id": sale_id,
            },
        )
        key = mock_idempotency(INTENT_KEY.format(order_id=order_id))
        while True:
            # SET NX is the idempotency key: whoever comes second gets the first one's intent.
            if await self._redis.set(key, intent_id, nx=True, ex=86_400):
                return await self._read(intent_id)
            first = await self._redis.get(key)
            if first and await self._redis.exists(mock_intent(first)):
                await self._redis.delete(mock_intent(intent_id))
                return await self._read(first)
            # The key names no intent (a writer that wrote the key first, or a store that lost
            # the intent): ours replaces it, unless another caller replaced it meanwhile.
            if await self._replace(key, first, intent_id):
                return await self._read(intent_id)

    async def _replace(self, key: str, stale: str | None, intent_id: str) -> bool:
        """Point ``key`` at ``intent_id`` if it still names ``stale``: a compare-and-set."""
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            if await pipe.get(key) != stale:
                return False
            pipe.multi()
            pipe.set(key, intent_id, ex=86_400)
            try:
                await pipe.execute()
            except WatchError:
                return False
        return True

    async def retrieve_intent(self, intent_id: str) -> Intent:
        return await self._read(intent_id)

    async def cancel_intent(self, intent_id: str) -> Intent:
        intent = await self._read(intent_id)
        if intent.status not in ("succeeded", "canceled"):
            await self._redis.hset(mock_intent(intent_id), "status", "canceled")
        return await self._read(intent_id)

    async def refund(self, intent_id: str, order_id: str) -> str:
        key = mock_idempotency(REFUND_KEY.format(order_id=order_id))
        refund_id = "mock_re_" + secrets.token_hex(8)
        await self._redis.set(key, refund_id, nx=True, ex=86_400)
        return str(await self._redis.get(key))

    async def settle(self, intent_id: str, succeeded: bool) -> dict[str, Any]:
        """The shopper's card answered: update the intent and return the event Stripe would
        send (``payment_intent.succeeded`` or ``payment_intent.payment_failed``)."""
        status = "succeeded" if succeeded else "requires_payment_method"
        await self._redis.hset(mock_intent(intent_id), "status", status)
        intent = await self._read(intent_id)
        kind = "payment_intent.succeeded" if succeeded else "payment_intent.payment_failed"
        event = intent_event(kind, intent)
        # Kept like Stripe keeps its events, so reconciliation can find a lost webhook.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(mock_event_bodies(), event["id"], orjson.dumps(event))
            pipe.zadd(mock_event_index(), {event["id"]: event["created"]})
            pipe.zcard(mock_event_index())
            *_, kept = await pipe.execute()
        if kept > KEPT_EVENTS:
            oldest = await self._redis.zrange(mock_event_index(), 0, kept - KEPT_EVENTS - 1)
            await self._redis.zrem(mock_event_index(), *oldest)
            await self._redis.hdel(mock_event_bodies(), *oldest)
        return event
