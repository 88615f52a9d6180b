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

from engine.keys import mock_events, mock_idempotency, mock_intent
from engine.payments import INTENT_KEY, REFUND_KEY, GatewayRefused, Intent, intent_event

__all__ = ["MockGateway"]


class MockGateway:
    """The ``PaymentGateway`` of a deployment without a Stripe key."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def aclose(self) -> None:
        """Nothing to close: the Redis client belongs to the caller."""

    async def recent_events(self, since: int) -> list[dict[str, Any]]:
        raw = await self._redis.lrange(mock_events(), 0, -1)
        events = [orjson.loads(item) for item in raw]
        return [event for event in events if event["created"] >= since]

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
        await self._redis.lpush(mock_events(), orjson.dumps(event))
        await self._redis.ltrim(mock_events(), 0, 9_999)
        return event
