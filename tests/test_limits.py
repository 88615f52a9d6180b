"""The protocol's limits, against a real ``flashsale serve`` on a real socket: heads that are too
big or too many are refused before the app runs, and clients too slow to send a request are cut
off, each answered with problem+json."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from engine.errors import PROBLEM_TYPES
from engine.http.auth import mint_token
from engine.inventory import SaleDefinition
from engine.keys import sale_keys
from engine.settings import Settings
from localrun import servers as localservices
from localrun.demo import start_process, stop_process, wait_ready
from tests.conftest import SaleFactory
from tests.test_scripts import snapshot

pytestmark = pytest.mark.slow

TIMEOUT_S = 1
# The deadline is looked at twice a second for this timeout; the rest is a busy machine's slack.
CUT_OFF_BY_S = TIMEOUT_S + 0.5 + 1.5


@pytest.fixture(scope="module")
def served(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One server for the module: each test uses its own sale and connections."""
    served = replace(settings, port=localservices.free_port(), request_read_timeout_s=TIMEOUT_S)
    log = tmp_path_factory.mktemp("limits") / "server.log"
    proc = start_process(["serve"], served, log)
    try:
        asyncio.run(wait_ready(f"http://{served.host}:{served.port}"))
        yield served
    finally:
        stop_process(proc)
        print(log.read_text()[-3000:])


@pytest.fixture
def served_by_two(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """Two server processes, which uvicorn spawns: the protocol is handed to them by reference."""
    served = replace(settings, port=localservices.free_port(), server_workers=2)
    proc = start_process(["serve"], served, tmp_path / "server.log")
    try:
        asyncio.run(wait_ready(f"http://{served.host}:{served.port}"))
        yield served
    finally:
        stop_process(proc)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float  # from connecting to the server closing the connection

    def problem(self, status: int, code: str) -> None:
        assert self.status == status, (self.status, self.body[:300])
        assert self.headers["content-type"] == "application/problem+json"
        assert self.headers["connection"] == "close"
        body = orjson.loads(self.body)
        assert body["status"] == status and body["code"] == code and PROBLEM_TYPES[code] == status
        assert body["type"] == "https://flashsale.dev/problems/" + code
        assert body["title"] and body["detail"]


async def exchange(served: Settings, *parts: bytes) -> Answer:
    """Send ``parts`` on a fresh connection, then nothing more, and read until the server closes.
    A server that refuses early may reset the connection under a large send; what it answered
    first is still read."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
    except ConnectionError:
        pass
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), CUT_OFF_BY_S + 5):
            received += chunk
    except ConnectionError:
        pass
    seconds = time.monotonic() - started
    writer.close()
    if not received:
        return Answer(0, {}, b"", seconds)
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Answer(int(status_line.split()[1]), headers, body, seconds)


# The headers of every order request below but the keep-alive one's.
USUAL_HEADERS = 6


def order_request(
    served: Settings,
    sale: SaleDefinition,
    key: str,
    extra: Sequence[tuple[str, str]] = (),
    keep_alive: bool = False,
) -> tuple[bytes, bytes]:
    """An order request's head and body, with ``extra`` headers after the usual ones."""
    body = b'{"quantity": 1}'
    headers = [
        ("Host", f"{served.host}:{served.port}"),
        ("Authorization", f"Bearer {mint_token(served, 'alice')}"),
        ("Idempotency-Key", key),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        *([] if keep_alive else [("Connection", "close")]),
        *extra,
    ]
    lines = [f"POST /v1/sales/{sale.id}/orders HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), body


async def assert_orders_still_placed(served: Settings, sale: SaleDefinition, key: str) -> None:
    head, body = order_request(served, sale, key)
    answer = await exchange(served, head + body)
    assert answer.status == 201, answer.body


async def stock_and_orders(redis: Redis, sale: SaleDefinition) -> tuple[str | None, int]:
    keys = sale_keys(sale.id)
    return await redis.get(keys.stock), await redis.zcard(keys.holds)


HEADERS_OVER = {
    "one 1 MiB header": [("X-Junk", "j" * 2**20)],
    "one 16 MiB header": [("X-Junk", "j" * 2**24)],
    "17 headers of 1 KiB": [(f"X-Junk-{i}", "j" * 1024) for i in range(17)],
    "101 headers": [(f"X-H{i}", "1") for i in range(101 - USUAL_HEADERS)],
}


@pytest.mark.parametrize("extra", HEADERS_OVER.values(), ids=HEADERS_OVER.keys())
async def test_a_head_over_the_limits_is_431_and_places_no_order(
    served: Settings, redis: Redis, redis_sale: SaleFactory, extra: list[tuple[str, str]]
):
    sale = await redis_sale(stock=5)
    before = await snapshot(redis)
    head, body = order_request(served, sale, "k-big", extra)
    answer = await exchange(served, head + body)
    answer.problem(431, "headers-too-large")
    assert await snapshot(redis) == before
    assert await stock_and_orders(redis, sale) == ("5", 0)
    await assert_orders_still_placed(served, sale, "k-after")
    assert await stock_and_orders(redis, sale) == ("4", 1)


HEADERS_UNDER = {
    "one 15 KiB header": [("X-Big", "b" * 15 * 1024)],
    "100 headers": [(f"X-H{i}", "1") for i in range(100 - USUAL_HEADERS)],
}


@pytest.mark.parametrize("extra", HEADERS_UNDER.values(), ids=HEADERS_UNDER.keys())
async def test_a_head_within_the_limits_places_its_order(
    served: Settings, redis: Redis, redis_sale: SaleFactory, extra: list[tuple[str, str]]
):
    sale = await redis_sale(stock=5)
    head, body = order_request(served, sale, "k-ok", extra)
    answer = await exchange(served, head + body)
    assert answer.status == 201, answer.body
    assert await stock_and_orders(redis, sale) == ("4", 1)


async def test_a_client_stalling_in_its_headers_gets_408(
    served: Settings, redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale(stock=5)
    head, _ = order_request(served, sale, "k-slow")
    answer = await exchange(served, head[: len(head) // 2])
    answer.problem(408, "request-timeout")
    assert TIMEOUT_S - 0.1 <= answer.seconds < CUT_OFF_BY_S
    assert await stock_and_orders(redis, sale) == ("5", 0)
    await assert_orders_still_placed(served, sale, "k-after")


async def test_a_client_stalling_in_its_body_gets_408(
    served: Settings, redis: Redis, redis_sale: SaleFactory
):
    sale = await redis_sale(stock=5)
    head, body = order_request(served, sale, "k-slow")
    answer = await exchange(served, head, body[: len(body) // 2])
    answer.problem(408, "request-timeout")
    assert TIMEOUT_S - 0.1 <= answer.seconds < CUT_OFF_BY_S
    assert await stock_and_orders(redis, sale) == ("5", 0)
    await assert_orders_still_placed(served, sale, "k-after")


async def test_a_connection_that_sends_nothing_is_closed(served: Settings):
    answer = await exchange(served)
    assert answer.status == 0  # closed without an answer: there was no request to answer
    assert TIMEOUT_S - 0.1 <= answer.seconds < CUT_OFF_BY_S


async def test_an_idle_keep_alive_connection_is_not_timed_out(
    served: Settings, redis: Redis, redis_sale: SaleFactory
):
    """The deadline covers receiving a request, not the wait between two of them (uvicorn's
    keep-alive timeout, 5 s, governs that)."""
    sale = await redis_sale(stock=5)
    reader, writer = await asyncio.open_connection(served.host, served.port)
    for key in ("k1", "k2"):
        head, body = order_request(served, sale, key, keep_alive=True)
        writer.write(head + body)
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode().lower()
        assert head.startswith("http/1.1 201 ")
        length = int(head.split("content-length:")[1].split()[0])
        await reader.readexactly(length)
        await asyncio.sleep(TIMEOUT_S + 1)
    writer.close()
    assert await stock_and_orders(redis, sale) == ("3", 2)


async def test_spawned_server_processes_enforce_the_limits(served_by_two: Settings):
    # Each connection is accepted by whichever process is free: several, to reach both.
    head = "GET /health HTTP/1.1\r\nHost: x\r\n" + "X-H: 1\r\n" * 100 + "\r\n"
    for _ in range(6):
        answer = await exchange(served_by_two, head.encode())
        answer.problem(431, "headers-too-large")
