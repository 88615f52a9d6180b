"""The deployment's one gateway rate limit: its script's contract, a flood, NOSCRIPT, two
gateways sharing it, and the gateway's own 429 making every caller back off."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from redis.asyncio import Redis

from engine import inventory
from engine.db import connect_redis
from engine.gatewaylimit import GatewayLimiter, RateLimitedGateway
from engine.keys import GATEWAY_RATE, LIVE_SALES, sale_keys
from engine.mockgateway import MockGateway
from engine.payments import GatewayBusy, StripeGateway
from engine.scripts import SCRIPTS, Code
from engine.settings import Settings
from tests.conftest import CountingGateway, SaleFactory
from tests.test_scripts import snapshot
from workers.context import Pass
from workers.heartbeats import HEALTH, WorkerHealth
from workers.payments import GatewayWork, refunds, void_pass


async def test_gateway_rate_contract(redis: Redis):
    """gateway_rate-1: a slot now, the next one an interval later, refused (nothing written)
    past the wait the caller accepts, and taken whatever the wait with -1."""
    rate = SCRIPTS["gateway_rate"]
    interval_us = 100_000  # 10 calls a second
    assert await rate(redis, [GATEWAY_RATE], [interval_us, 1, 1, 0]) == [Code.OK, 0]
    before = await snapshot(redis)
    code, wait_us = await rate(redis, [GATEWAY_RATE], [interval_us, 1, 1, 0])
    assert code == Code.RATE_LIMITED and 90_000 < wait_us <= 100_000
    assert await snapshot(redis) == before
    code, wait_us = await rate(redis, [GATEWAY_RATE], [interval_us, 1, 1, 500_000])
    assert code == Code.OK and 90_000 < wait_us <= 100_000
    # A burst of 3 lets two more start no later than that one; cost 50 is five seconds' worth.
    code, wait_us = await rate(redis, [GATEWAY_RATE], [interval_us, 3, 50, -1])
    assert code == Code.OK and wait_us == 0
    code, wait_us = await rate(redis, [GATEWAY_RATE], [interval_us, 1, 1, 1_000_000])
    assert code == Code.RATE_LIMITED and 5_000_000 < wait_us <= 5_200_000
    ttl_ms = await redis.pttl(GATEWAY_RATE)
    assert 5_000 < ttl_ms <= 6_200  # gone once it lies in the past


async def test_backing_off_together_pushes_the_next_slot_back_once(redis: Redis):
    """Eight callers told "retry after 1 s" at the same moment: nobody calls for about a
    second, not eight."""
    limiter = GatewayLimiter(redis, 10)
    await asyncio.gather(*(limiter.back_off(1.0) for _ in range(8)))
    with pytest.raises(GatewayBusy) as busy:
        await limiter.take(0)
    assert 0.8 < busy.value.retry_after_s <= 1.0
    # A back-off shorter than what is already booked moves nothing.
    await limiter.back_off(0.1)
    with pytest.raises(GatewayBusy) as still:
        await limiter.take(0)
    assert 0.7 < still.value.retry_after_s <= 1.0


async def test_gateway_rate_flood_admits_the_burst_and_what_fits_the_wait(redis: Redis):
    limiter = GatewayLimiter(redis, 100)  # burst 10

    async def one() -> float | None:
        try:
            return await limiter.take(0.5)
        except GatewayBusy:
            return None

    started = time.monotonic()
    waits = await asyncio.gather(*(one() for _ in range(200)))
    # While the flood's calls reach Redis, the clock moves on and frees a slot every 10 ms.
    freed = math.ceil((time.monotonic() - started) / 0.01)
    admitted = sorted(w for w in waits if w is not None)
    # Slots 0-9 at once, then one per 10 ms up to half a second: 60, and those freed meanwhile.
    assert 60 <= len(admitted) <= 60 + freed + 1
    assert 10 <= admitted.count(0.0) <= 10 + freed + 1
    assert 0.45 < admitted[-1] <= 0.5


async def test_gateway_rate_reloads_after_script_flush(redis: Redis):
    limiter = GatewayLimiter(redis, 80)
    await redis.script_flush()
    assert await limiter.take(1.0) == 0.0
    assert await redis.exists(GATEWAY_RATE)


async def test_two_gateways_on_one_redis_share_the_rate(redis: Redis, settings: Settings):
    other = connect_redis(settings)
    try:
        mock = MockGateway(redis)
        intent = await mock.create_intent("s-1.00000000000000aa", "s-1", 100, "usd")
        counted = [CountingGateway(mock), CountingGateway(mock)]
        gateways = [
            RateLimitedGateway(counted[0], GatewayLimiter(redis, 20), max_wait_s=10),
            RateLimitedGateway(counted[1], GatewayLimiter(other, 20), max_wait_s=10),
        ]
        started = time.monotonic()
        await asyncio.gather(*(gateways[i % 2].retrieve_intent(intent.id) for i in range(40)))
        took = time.monotonic() - started
    finally:
        await other.aclose()
    # 40 calls at 20 a second, 2 of them at once at the start: 1.9 s at the least.
    assert 1.8 <= took < 4.0
    at = sorted(counted[0].at + counted[1].at)
    assert len(at) == 40
    busiest = max(sum(1 for t in at if start <= t < start + 1.0) for start in at)
    assert busiest <= 22  # a second's rate plus the burst, in any second


class _TooManyRequests(BaseHTTPRequestHandler):
    """Stripe answering every request with its 429 rate_limit_error."""

    def _answer(self) -> None:
        body = b'{"error": {"type": "rate_limit_error", "message": "Too many requests"}}'
        self.send_response(429)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", "2")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def busy_stripe() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TooManyRequests)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_a_429_from_the_gateway_backs_every_caller_off_and_fails_no_job(
    redis: Redis, redis_sale: SaleFactory, busy_stripe: str, settings: Settings
):
    sale = await redis_sale()
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    await inventory.attach_payment(redis, sale.id, hold.order_id, "pi_1", "s", 1500, "usd")
    await inventory.release(redis, sale.id, hold.order_id, "cancelled")
    stripe_gateway = StripeGateway("sk_test_busy", busy_stripe)
    limiter = GatewayLimiter(redis, 80)
    gateway = RateLimitedGateway(stripe_gateway, limiter, max_wait_s=0.25)
    try:
        with pytest.raises(GatewayBusy) as busy:
            await gateway.cancel_intent("pi_1")
        assert busy.value.retry_after_s == 2.0
        # Its two seconds are taken for everyone: the next call, anywhere, is refused at once.
        with pytest.raises(GatewayBusy) as waiting:
            await limiter.take(1.0)
        assert 1.5 < waiting.value.retry_after_s <= 2.1

        # A job meeting it stops its pass, keeps the order in its index, and does not fail.
        assert await void_pass(GatewayWork(redis, gateway), sale.id) == Pass(0, False)
        await redis.sadd(LIVE_SALES, sale.id)
        health = WorkerHealth()
        ctx = {"store": redis, "gateway": gateway, "settings": settings, HEALTH: health}
        assert await refunds(ctx) == 0
        assert not [name for name, outage in health.jobs.items() if outage.since is not None]
        assert await redis.zrange(sale_keys(sale.id).voids, 0, -1) == [hold.order_id]
    finally:
        await stripe_gateway.aclose()
