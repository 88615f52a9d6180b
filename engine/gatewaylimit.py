"""One rate limit for every payment gateway call of the deployment.

Stripe allows 100 operations a second per account in live mode; every server and worker
process shares one GCRA limiter in Redis (``lua/gateway_rate-1.lua``), so together they stay
under ``FLASHSALE_GATEWAY_RATE_PER_S`` (80 by default: headroom for the SDK's own retries on a
network error or a 5xx, and for the rare second request inside one call, which the limiter does
not see). ``make_gateway`` wraps every gateway in ``RateLimitedGateway``, so no call can go
around it.

A caller takes the next free slot and sleeps until it comes, unless that is further away than
it will wait: then ``OverRate`` (a ``GatewayBusy``). The shopper's ``POST /pay`` waits at
most ``PAY_MAX_WAIT_S`` (and answers 503 with Retry-After); background jobs wait at most
``BACKGROUND_MAX_WAIT_S``, so when shoppers keep the limiter busy the jobs get fewer slots,
never the shoppers. When the
gateway itself answers "too many requests", its retry-after's worth of slots is taken for
everyone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis

from engine.keys import GATEWAY_RATE
from engine.metrics import GATEWAY_CALLS, GATEWAY_SECONDS
from engine.payments import (
    EventPage,
    GatewayBusy,
    GatewayRefused,
    GatewayUnavailable,
    Intent,
    OverRate,
    PaymentGateway,
)
from engine.scripts import SCRIPTS, Code

__all__ = [
    "BACKGROUND_MAX_WAIT_S",
    "PAY_MAX_WAIT_S",
    "GatewayLimiter",
    "RateLimitedGateway",
]

T = TypeVar("T")

_gateway_rate = SCRIPTS["gateway_rate"]

# A shopper waits this long for a slot at most; past it, 503 payment-unavailable at once.
PAY_MAX_WAIT_S = 1.0
# Background jobs take a slot only this close: the slots further ahead are the shoppers'.
BACKGROUND_MAX_WAIT_S = 0.25
# Calls that may start together after a quiet spell, as a share of a second's calls: at the
# default 80/s, 8 at once, and never more than 88 in any second.
BURST_S = 0.1


class GatewayLimiter:
    """The typed wrapper of ``gateway_rate-1.lua``: ``rate_per_s`` calls a second, shared by
    every client of the same Redis."""

    def __init__(self, redis: Redis, rate_per_s: int) -> None:
        if rate_per_s < 1:
            raise ValueError(f"a gateway rate is at least 1 call a second, not {rate_per_s}")
        self._redis = redis
        self.rate_per_s = rate_per_s
        self._interval_us = 1_000_000 / rate_per_s
        self._burst = max(1, int(rate_per_s * BURST_S))

    async def take(self, max_wait_s: float | None, cost: int = 1, not_before_s: float = 0) -> float:
        """Take ``cost`` slots; returns the seconds to wait before calling. ``OverRate``
        (nothing taken) when that is longer than ``max_wait_s``; None takes them anyway.
        ``not_before_s``: no call may start sooner than this from now."""
        max_wait_us = -1 if max_wait_s is None else int(max_wait_s * 1_000_000)
        reply = await _gateway_rate(
            self._redis,
            [GATEWAY_RATE],
            [
                f"{self._interval_us:.3f}",
                self._burst,
                cost,
                max_wait_us,
                int(not_before_s * 1_000_000),
            ],
        )
        wait_s = int(reply[1]) / 1_000_000
        if Code(reply[0]) is Code.RATE_LIMITED:
            raise OverRate(
                f"over the gateway rate of {self.rate_per_s}/s: next slot in {wait_s:.2f} s",
                retry_after_s=wait_s,
            )
        return wait_s

    async def back_off(self, seconds: float) -> None:
        """The gateway said "too many requests": nobody calls it for ``seconds`` from now.
        Callers told so at the same moment push the next slot back once between them."""
        await self.take(None, cost=0, not_before_s=seconds)


class RateLimitedGateway:
    """A ``PaymentGateway`` whose every call first takes a slot of the shared limiter."""

    def __init__(self, inner: PaymentGateway, limiter: GatewayLimiter, max_wait_s: float) -> None:
        self.inner = inner
        self._limiter = limiter
        self._max_wait_s = max_wait_s

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            wait_s = await self._limiter.take(self._max_wait_s)
        except OverRate:
            GATEWAY_CALLS.labels(operation, "limited").inc()  # refused here, never sent
            raise
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await call()
        except GatewayBusy as exc:
            outcome = "busy"
            await self._limiter.back_off(exc.retry_after_s)
            raise
        except GatewayUnavailable:
            outcome = "unavailable"
            raise
        except GatewayRefused:
            outcome = "refused"
            raise
        except BaseException:  # a fault of ours, or the caller gave up (cancelled)
            outcome = "error"
            raise
        finally:
            GATEWAY_CALLS.labels(operation, outcome).inc()
            GATEWAY_SECONDS.labels(operation).observe(time.perf_counter() - started)

    async def create_intent(
        self, order_id: str, sale_id: str, amount: int, currency: str
    ) -> Intent:
        return await self._call(
            "create_intent", lambda: self.inner.create_intent(order_id, sale_id, amount, currency)
        )

    async def retrieve_intent(self, intent_id: str) -> Intent:
        return await self._call("retrieve_intent", lambda: self.inner.retrieve_intent(intent_id))

    async def cancel_intent(self, intent_id: str) -> Intent:
        return await self._call("cancel_intent", lambda: self.inner.cancel_intent(intent_id))

    async def refund(self, intent_id: str, order_id: str) -> str:
        return await self._call("refund", lambda: self.inner.refund(intent_id, order_id))

    async def event_page(self, since: int, starting_after: str | None) -> EventPage:
        return await self._call("event_page", lambda: self.inner.event_page(since, starting_after))

    async def aclose(self) -> None:
        await self.inner.aclose()
