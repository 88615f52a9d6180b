"""``GET /metrics``: what a flood's client counted, per outcome, is what the metrics say, in one
process and added up across two server processes and a worker (prometheus-client's
multiprocess mode)."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from engine.db import connect_postgres
from engine.http.app import create_app
from engine.http.auth import mint_tokens
from engine.http.metrics import RequestMetrics
from engine.inventory import SaleDefinition
from engine.metrics import ORDER_ROUTE
from engine.sales import create_sale
from engine.settings import Settings
from localrun.demo import start_process, stop_process, wait_ready
from localrun.servers import free_port
from tests.conftest import SaleFactory, sale_definition

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# The outcomes a flood's client tells apart, as (status, problem code) -> the metric's labels.
OUTCOMES = {
    (201, "", False): ("accepted", ""),
    (201, "", True): ("replayed", ""),
    (409, "sold-out", False): ("sold_out", ""),
    (409, "limit-exceeded", False): ("limit_exceeded", ""),
    (400, "missing-idempotency-key", False): ("rejected", "missing-idempotency-key"),
    (422, "invalid-quantity", False): ("rejected", "invalid-quantity"),
}


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def flood(
    post: Callable[[dict[str, str], object], Awaitable[tuple[int, dict[str, object], bool]]],
    sale_id: str,
    tokens: list[str],
) -> Counter[tuple[int, str, bool]]:
    """Orders of every kind at once: new ones until the stock runs out, replays of the same
    keys, shoppers over their limit, and bad requests. Returns what the client saw."""
    seen: Counter[tuple[int, str, bool]] = Counter()

    async def one(i: int) -> None:
        token = tokens[i % len(tokens)]
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": f"k-{i}"}
        body: object = {"quantity": 1}
        if i % 17 == 0:
            del headers["Idempotency-Key"]
        elif i % 19 == 0:
            body = {"quantity": 0}
        status, answer, replayed = await post(headers, body)
        seen[(status, str(answer.get("code", "")), replayed)] += 1
        if status == 201 and i % 3 == 0:  # the same request again: a replay
            status, answer, replayed = await post(headers, body)
            seen[(status, str(answer.get("code", "")), replayed)] += 1

    await asyncio.gather(*(one(i) for i in range(400)))
    return seen


def check_orders(before: Samples, after: Samples, seen: Counter[tuple[int, str, bool]]) -> None:
    assert set(seen) <= set(OUTCOMES), seen
    # Every kind happened, so every label below is really compared.
    assert len(seen) == len(OUTCOMES), seen
    for outcome, count in seen.items():
        label, code = OUTCOMES[outcome]
        name = "flashsale_orders_total"
        counted = value(after, name, outcome=label, code=code) - value(
            before, name, outcome=label, code=code
        )
        assert counted == count, (outcome, counted, count)
    requests = sum(seen.values())
    histogram = "flashsale_http_request_duration_seconds_count"
    labels = {"route": ORDER_ROUTE, "method": "POST"}
    assert value(after, histogram, **labels) - value(before, histogram, **labels) == requests
    by_status: Counter[str] = Counter()
    for (status, _, _), count in seen.items():
        by_status[str(status)] += count
    for status, count in by_status.items():
        total = sum(
            v - before.get(k, 0.0)
            for k, v in after.items()
            if k[0] == "flashsale_http_requests_total"
            and ("route", ORDER_ROUTE) in k[1]
            and ("status", status) in k[1]
        )
        assert total == count, (status, total, count)


@pytest.fixture
async def metered(settings: Settings, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    """The app with the metrics hook, on the test Redis, through its lifespan."""
    app = create_app(settings, redis, hook=RequestMetrics())
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


async def test_metrics_count_what_a_flood_saw(
    metered: httpx.AsyncClient, ledger_sale: SaleFactory, settings: Settings
) -> None:
    sale = await ledger_sale(stock=150, per_user_limit=2, per_order_max=2)
    tokens = mint_tokens(settings, [f"shopper-{i}" for i in range(90)])
    before = samples((await metered.get("/metrics")).text)

    async def post(headers: dict[str, str], body: object) -> tuple[int, dict[str, object], bool]:
        answer = await metered.post(f"/v1/sales/{sale.id}/orders", json=body, headers=headers)
        replayed = answer.headers.get("idempotent-replayed") == "true"
        return answer.status_code, answer.json(), replayed

    seen = await flood(post, sale.id, tokens)
    response = await metered.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)
    check_orders(before, after, seen)
    # The sale's gauges, read from Redis at the scrape: every unit accepted is held.
    accepted = seen[(201, "", False)]
    units = "flashsale_sale_units"
    assert value(after, units, sale=sale.id, state="held") == accepted
    assert value(after, units, sale=sale.id, state="available") == 150 - accepted
    assert value(after, "flashsale_sale_holds", sale=sale.id) == accepted
    assert value(after, "flashsale_sale_outbox_entries", sale=sale.id) > 0  # no worker here
    assert value(after, "flashsale_sale_ledger_lag_seconds", sale=sale.id) > 0


async def _sale_in_ledger(settings: Settings, redis: Redis, sale: SaleDefinition) -> None:
    db = await connect_postgres(settings, max_size=2)
    try:
        await create_sale(db, redis, sale)
    finally:
        await db.close()


@pytest.mark.slow
async def test_two_server_processes_and_a_worker_add_up(
    settings: Settings, redis: Redis, db: object, tmp_path: Path
) -> None:
    """``flashsale serve --workers 2`` and a ``flashsale worker`` on one metrics folder: a
    scrape of either server process reports the flood of both, and the worker's jobs and the
    units the ledger recorded."""
    own = replace(
        settings,
        port=free_port(),
        server_workers=2,
        metrics_dir=str(tmp_path / "metrics"),
        log_format="json",
    )
    sale = sale_definition(id="s-" + secrets.token_hex(4), stock=150)
    await _sale_in_ledger(own, redis, sale)
    server = start_process(["serve"], own, tmp_path / "server.log")
    worker = start_process(["worker"], own, tmp_path / "worker.log")
    base = f"http://{own.host}:{own.port}"
    try:
        await wait_ready(base)
        tokens = mint_tokens(own, [f"shopper-{i}" for i in range(90)])
        # Many connections, so both server processes take requests.
        connector = aiohttp.TCPConnector(limit=64, force_close=True)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as http:

            async def post(
                headers: dict[str, str], body: object
            ) -> tuple[int, dict[str, object], bool]:
                async with http.post(
                    f"/v1/sales/{sale.id}/orders", json=body, headers=headers
                ) as answer:
                    replayed = answer.headers.get("idempotent-replayed") == "true"
                    return answer.status, await answer.json(content_type=None), replayed

            seen = await flood(post, sale.id, tokens)
            accepted_units = seen[(201, "", False)]
            scrapes: list[Samples] = []
            deadline = asyncio.get_running_loop().time() + 20
            while True:
                # Each process moves its counts into the shared files once a second; the
                # worker writes its own as its jobs run.
                await asyncio.sleep(1.2)
                async with http.get("/metrics") as response:
                    assert response.status == 200
                    found = samples(await response.text())
                reserved = value(found, "flashsale_units_total", change="reserved")
                if reserved == accepted_units:
                    scrapes.append(found)
                if len(scrapes) >= 4:
                    break
                assert asyncio.get_running_loop().time() < deadline, (reserved, accepted_units)
        pids = {path.stem.rsplit("_", 1)[-1] for path in (tmp_path / "metrics").glob("*.db")}
        assert len(pids) >= 3, pids  # two server processes and the worker wrote
        for found in scrapes:  # whichever process answered, the same totals
            check_orders({}, found, seen)
            runs = value(
                found, "flashsale_worker_job_runs_total", job="drain_outboxes", outcome="ok"
            )
            assert runs >= 1
            assert value(found, "flashsale_ledger_changes_total", sale=sale.id) >= accepted_units
    finally:
        stop_process(worker)
        stop_process(server)
