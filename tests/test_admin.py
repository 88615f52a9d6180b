"""The admin API's credentials, audit trail and restock, against the real Redis and Postgres.

Every route's refusals (no credential, a customer's token, a key without the scope) are driven
by tests/test_openapi.py; here: each way in on a route that reads and one that writes, keys
revoked and expired, the audit row of each, the CLI, and a restock under a flood of orders.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import replace
from importlib import metadata

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from engine import apikeys, inventory
from engine.audit import recent
from engine.errors import ProblemError
from engine.http.app import create_app
from engine.http.auth import mint_token
from engine.invariants import audit_sale
from engine.keys import sale_keys
from engine.restock import restocked_units
from engine.settings import Settings
from tests.conftest import SaleFactory, flashsale
from workers.outbox import drain_sale


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def key(db: asyncpg.Pool, *scopes: str) -> dict[str, str]:
    return bearer((await apikeys.create_key(db, "test-" + secrets.token_hex(3), list(scopes)))[1])


async def test_each_way_in_and_each_refusal_leaves_its_audit_row(
    client: httpx.AsyncClient,
    settings: Settings,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
):
    sale = await ledger_sale(stock=10)
    show, pause = f"/v1/admin/sales/{sale.id}", f"/v1/admin/sales/{sale.id}/pause"
    admin_jwt = bearer(mint_token(settings, "root", roles=["admin"]))
    customer = bearer(mint_token(settings, "alice", roles=["customer"]))
    no_roles = bearer(mint_token(settings, "bob"))
    reader = await key(db, "sales:read")
    writer = await key(db, "sales:write")

    assert (await client.get(show, headers=admin_jwt)).status_code == 200
    assert (await client.get(show, headers=reader)).status_code == 200
    refused = await client.post(pause, headers=reader)
    assert refused.status_code == 403 and refused.json()["code"] == "insufficient-scope"
    for token in (customer, no_roles):
        answer = await client.get(show, headers=token)
        assert answer.status_code == 403 and answer.json()["code"] == "admin-role-required"
    assert (await client.get(show)).status_code == 401
    assert (await client.get(show, headers=bearer("fsk_" + "x" * 43))).status_code == 401
    assert (await client.post(pause, headers=writer)).status_code == 200
    assert (await inventory.read_sale(redis, sale.id) or {})["status"] == "paused"

    rows = [(r.actor, r.action, r.target, r.outcome) for r in await recent(db, target=sale.id)]
    key_ids = {k.id for k in await apikeys.list_keys(db)}
    reader_id, writer_id = sorted(key_ids)[-2:]
    # Newest first; the 401s proved no identity and left none.
    assert rows == [
        (f"key:{writer_id}", "sale.pause", sale.id, "ok"),
        ("user:bob", "sale.show", sale.id, "admin-role-required"),
        ("user:alice", "sale.show", sale.id, "admin-role-required"),
        (f"key:{reader_id}", "sale.pause", sale.id, "insufficient-scope"),
        (f"key:{reader_id}", "sale.show", sale.id, "ok"),
        ("user:root", "sale.show", sale.id, "ok"),
    ]


async def test_revoked_and_expired_keys_are_refused(
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(apikeys, "CACHE_S", 0.2)
    sale = await ledger_sale()
    show = f"/v1/admin/sales/{sale.id}"
    made, secret = await apikeys.create_key(db, "soon-revoked", ["sales:read"], 30)
    assert (await client.get(show, headers=bearer(secret))).status_code == 200
    await apikeys.revoke_key(db, made.id)
    await asyncio.sleep(0.25)  # past the process's cache of the lookup
    answer = await client.get(show, headers=bearer(secret))
    assert answer.status_code == 401 and answer.json()["code"] == "invalid-token"
    # A revoked key's use is named in the audit (an unknown one, anybody's, is not).
    refused = await db.fetchrow("SELECT * FROM audit ORDER BY id DESC LIMIT 1")
    assert (refused["actor"], refused["outcome"]) == (made.actor, "invalid-token")

    expiring, secret = await apikeys.create_key(db, "expiring", ["sales:read"], 1)
    await db.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1", expiring.id
    )
    assert (await client.get(show, headers=bearer(secret))).status_code == 401
    used = {k.id: k.last_used_at for k in await apikeys.list_keys(db)}
    assert used[made.id] is not None
    with pytest.raises(ProblemError) as refused:
        await apikeys.create_key(db, "bad", ["sales:delete"])
    assert refused.value.code == "invalid-api-key"


async def test_apikey_cli_prints_the_key_once_lists_and_revokes(
    client: httpx.AsyncClient, settings: Settings, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    sale = await ledger_sale()
    made = await asyncio.to_thread(
        flashsale,
        settings,
        "apikey",
        "create",
        "--name",
        "ops",
        "--scope",
        "sales:read",
        "--scope",
        "orders:read",
        "--expires-in",
        "7",
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("fsk_") and len(secret) > 40
    stored = await db.fetchval(
        "SELECT count(*) FROM api_keys WHERE hash = $1", apikeys.hash_key(secret)
    )
    assert stored == 1
    assert secret not in str(await db.fetch("SELECT * FROM api_keys"))
    assert (
        await client.get(f"/v1/admin/sales/{sale.id}", headers=bearer(secret))
    ).status_code == 200
    listed = await asyncio.to_thread(flashsale, settings, "apikey", "list")
    assert "ops" in listed.stdout and "sales:read,orders:read" in listed.stdout
    key_id = max(k.id for k in await apikeys.list_keys(db))
    revoked = await asyncio.to_thread(flashsale, settings, "apikey", "revoke", str(key_id))
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert (await db.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", key_id)) is not None
    cli_rows = await db.fetch(
        "SELECT action, target FROM audit WHERE actor LIKE 'cli:%' AND target = $1 ORDER BY id",
        str(key_id),
    )
    assert [tuple(r) for r in cli_rows] == [
        ("apikey.create", str(key_id)),
        ("apikey.revoke", str(key_id)),
    ]
    missing = await asyncio.to_thread(flashsale, settings, "apikey", "revoke", "999999")
    assert missing.returncode == 1 and "api-key-not-found" in missing.stderr
    version = await asyncio.to_thread(flashsale, settings, "--version")
    assert version.stdout.strip() == f"flashsale {metadata.version('flashsale')}"


async def test_restock_under_an_order_flood_never_oversells_and_reaches_the_ledger(
    client: httpx.AsyncClient, redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    """32 streams of new shoppers (half the client pool: the restocks need a connection) keep
    ordering one unit each of 50 while three restocks of 10
    land mid-flood, and for a moment after the last."""
    sale = await ledger_sale(stock=50, per_user_limit=1, per_order_max=1)
    writer = await key(db, "sales:write")
    url = f"/v1/admin/sales/{sale.id}/restock"
    done = asyncio.Event()
    sold: list[str] = []
    refused = 0

    async def stream(n: int) -> None:
        nonlocal refused
        attempt = 0
        while not done.is_set():
            attempt += 1
            user = f"u{n}x{attempt}"
            try:
                hold = await inventory.reserve(redis, sale.id, user, 1, "k")
            except ProblemError as exc:
                assert exc.code == "sold-out"
                refused += 1
                continue
            sold.append(hold.order_id)

    async def restocks() -> list[httpx.Response]:
        answers = []
        for _ in range(3):
            await asyncio.sleep(0.05)
            answers.append(await client.post(url, json={"units": 10}, headers=writer))
        await asyncio.sleep(0.1)
        done.set()
        return answers

    *_, answers = await asyncio.gather(*(stream(n) for n in range(32)), restocks())
    assert [a.status_code for a in answers] == [200, 200, 200]
    # Demand beyond supply throughout: every unit, restocked ones included, went, and not one
    # more; the shoppers were refused in between.
    assert len(sold) == len(set(sold)) == 80 and refused > 0
    assert int(await redis.hget(sale_keys(sale.id).sale, "restocked")) == 30

    await drain_sale(redis, db, sale.id, "test", 1000, 500)
    audit = await audit_sale(redis, db, sale.id)
    assert audit.violations == [] and audit.initial == 80 and audit.available == 0
    assert await restocked_units(db, sale.id) == 30
    assert await db.fetchval("SELECT count(*) FROM orders WHERE sale_id = $1", sale.id) == 80
    # Drained again (a replay): the ledger does not count a restock twice.
    await drain_sale(redis, db, sale.id, "test", 1000, 500)
    assert await restocked_units(db, sale.id) == 30
    report = (
        await client.get(f"/v1/admin/sales/{sale.id}", headers=await key(db, "sales:read"))
    ).json()
    assert report["ledger_restocked"] == 30 and report["live"]["initial_stock"] == 80
    rows = [r for r in await recent(db, target=sale.id) if r.action == "sale.restock"]
    assert [(r.outcome, r.detail) for r in rows] == [("ok", {"units": 10})] * 3


async def test_a_restock_is_seen_at_once_by_the_sold_out_memory(
    settings: Settings, redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    """With the memory reading its view only once a minute, orders after a restock still get
    the new units: the process that restocked lets go of its sold-out view at once."""
    sale = await ledger_sale(stock=1, per_user_limit=1, per_order_max=1)
    app = create_app(replace(settings, sold_out_refresh_ms=60_000), redis)
    writer = await key(db, "sales:write")

    async def order(c: httpx.AsyncClient, user: str) -> int:
        token = mint_token(settings, user)
        headers = {**bearer(token), "Idempotency-Key": "k-" + user}
        response = await c.post(
            f"/v1/sales/{sale.id}/orders", json={"quantity": 1}, headers=headers
        )
        return response.status_code

    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert await order(c, "first") == 201
            assert await order(c, "second") == 409  # sold out: the memory starts watching
            deadline = time.monotonic() + 5
            while not app.state.order_route.sold_out.answers(sale.id, "third", 1):
                assert time.monotonic() < deadline, "the memory never took the sale"
                await asyncio.sleep(0.01)
            restock = await c.post(
                f"/v1/admin/sales/{sale.id}/restock", json={"units": 2}, headers=writer
            )
            assert restock.status_code == 200 and restock.json()["available"] == 2
            assert await order(c, "third") == 201
            assert await order(c, "fourth") == 201
            assert await order(c, "fifth") == 409


async def test_order_search_filters_and_pages(
    client: httpx.AsyncClient, redis: Redis, db: asyncpg.Pool, ledger_sale: SaleFactory
):
    one, two = await ledger_sale(stock=20), await ledger_sale(stock=20)
    placed: dict[tuple[str, str], str] = {}
    for sale in (one, two):
        for user in ("ann", "bob"):
            for k in range(2):
                hold = await inventory.reserve(redis, sale.id, user, 1, f"k{k}")
                placed[(sale.id, f"{user}{k}")] = hold.order_id
    cancelled = placed[(one.id, "bob1")]
    await inventory.release(redis, one.id, cancelled, "cancelled")
    for sale in (one, two):
        await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    reader = await key(db, "orders:read")

    async def search(query: str) -> list[str]:
        ids: list[str] = []
        cursor = ""
        while True:  # two a page, so the cursor is followed too
            page = await client.get(
                f"/v1/admin/orders?{query}&limit=2&cursor={cursor}", headers=reader
            )
            assert page.status_code == 200, page.text
            ids += [order["id"] for order in page.json()["orders"]]
            if page.json()["next_cursor"] is None:
                return ids
            cursor = page.json()["next_cursor"]

    in_one = sorted(v for (s, _), v in placed.items() if s == one.id)
    assert await search(f"sale_id={one.id}") == in_one
    anns = sorted(v for (_, who), v in placed.items() if who.startswith("ann"))
    assert await search("user_id=ann") == anns
    assert await search(f"sale_id={one.id}&state=cancelled") == [cancelled]
    assert await search("user_id=bob&state=cancelled") == [cancelled]
