"""The order path never hangs: every Redis wait has a deadline, and the orders waiting for Redis
are capped. A stalled Redis (SIGSTOP: it accepts connections and answers nothing) makes each
order answer 503 with Retry-After within about the deadline; when Redis answers again, the
next orders succeed without a restart, and a replay of a stalled order is exact."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError

from engine.db import connect_redis
from engine.http.app import create_app
from engine.http.pipeline import PipelinedRedis, RedisStalled
from engine.inventory import load_sale
from engine.keys import sale_keys
from engine.scripts import load_scripts
from engine.settings import Settings
from localrun import servers
from tests.conftest import sale_definition
from tests.test_app import place

DEADLINE_MS = 400


async def test_a_connection_that_answers_nothing_fails_every_call_within_the_deadline() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing: a stalled server

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = PipelinedRedis(f"redis://127.0.0.1:{port}/0", DEADLINE_MS / 1000)
    try:
        started = time.monotonic()
        calls = [store.execute_command("PING") for _ in range(50)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        waited = time.monotonic() - started
        assert all(isinstance(outcome, RedisStalled) for outcome in outcomes), outcomes
        assert DEADLINE_MS / 1000 <= waited < DEADLINE_MS / 1000 * 2
        # The stalled connection was given up: the next call opens another one.
        with pytest.raises(RedisStalled):
            await store.execute_command("PING")
        assert len(accepted) == 2
    finally:
        await store.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_callers_queued_behind_a_hanging_connect_fail_within_one_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connect that never completes (packets dropped): every caller waiting for it, the ones
    queued behind the first included, fails within one deadline, not one deadline each."""
    loop = asyncio.get_running_loop()

    async def never(*args: object, **kwargs: object) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(loop, "create_connection", never)
    store = PipelinedRedis("redis://127.0.0.1:6379/0", DEADLINE_MS / 1000)
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(store.execute_command("PING") for _ in range(6)), return_exceptions=True
    )
    waited = time.monotonic() - started
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes), outcomes
    assert waited < DEADLINE_MS / 1000 * 2, waited


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[servers.RedisServer]:
    """A Redis of this test's own, to stop and resume without touching the suite's."""
    server = servers.start_redis(tmp_path)
    yield server
    pid = server.pid()
    if pid is not None:
        os.kill(pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
async def stalled_app(
    settings: Settings, own_redis: servers.RedisServer
) -> AsyncIterator[tuple[Settings, httpx.AsyncClient, Redis]]:
    own = replace(
        settings, redis_url=own_redis.url, redis_deadline_ms=DEADLINE_MS, max_orders_in_flight=8
    )
    redis = connect_redis(own)
    await load_scripts(redis)
    app = create_app(own, redis)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield own, client, redis
    await redis.aclose()


async def test_a_stopped_redis_gets_503_within_the_deadline_and_orders_resume_after(
    stalled_app: tuple[Settings, httpx.AsyncClient, Redis],
    own_redis: servers.RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    own, client, redis = stalled_app
    sale = sale_definition(stock=50, per_user_limit=5, per_order_max=1)
    await load_sale(redis, sale)
    assert (await place(client, own, sale, key="before", user="u0")).status_code == 201

    pid = own_redis.pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        # 20 orders at once against a cap of 8 waiting for Redis.
        stalled = await asyncio.gather(
            *(place(client, own, sale, key=f"k{i}", user=f"u{i}") for i in range(20))
        )
        waited = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert waited < DEADLINE_MS / 1000 * 2 + 0.5, waited
    codes = sorted(response.json()["code"] for response in stalled)
    assert all(response.status_code == 503 for response in stalled)
    assert all(response.headers["retry-after"] == "1" for response in stalled)
    assert codes == ["not-ready"] * 8 + ["server-busy"] * 12

    # Redis answers again: the same server takes orders. An order refused as overloaded never
    # left the server; one that timed out was written to the socket, and a resumed Redis may
    # still run it: its retry with the same Idempotency-Key is then a replay of that order.
    after = [await place(client, own, sale, key=f"k{i}", user=f"u{i}") for i in range(20)]
    assert [response.status_code for response in after] == [201] * 20
    for before, retry in zip(stalled, after, strict=True):
        if before.json()["code"] == "server-busy":
            assert retry.headers.get("idempotent-replayed") is None
    keys = sale_keys(sale.id)
    assert int(await redis.get(keys.stock) or 0) == 50 - 21
    # The outage was logged once when it began and once when it ended, no traceback per order.
    events = [getattr(r, "event", None) for r in caplog.records if r.name == "flashsale.redis"]
    assert events == ["outage.start", "outage.end"]
    assert not any(r.exc_info for r in caplog.records)
