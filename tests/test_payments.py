"""Payments against localstripe (the real SDK, a real fake Stripe) and the signed webhook path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import stripe
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from engine import inventory
from engine.checkout import ensure_intent
from engine.http.app import create_app
from engine.http.auth import mint_token
from engine.invariants import audit_sale, wait_for_ledger
from engine.keys import sale_keys
from engine.mockgateway import MockGateway
from engine.payments import Intent, StripeGateway, intent_event, signed_event
from engine.reconcile import reconcile
from engine.settings import Settings
from localrun.demo import start_process, stop_process, wait_ready
from localrun.servers import free_port
from tests.conftest import SECRET, SaleFactory, flashsale
from workers.holds import expire_sale
from workers.outbox import drain_sale
from workers.payments import GatewayWork, all_due, refund_pass, void_pass

VISA = "4242424242424242"
DECLINED = "4000000000000341"  # localstripe declines this one when charging


@pytest.fixture
async def client(
    pay_settings: Settings, redis: Redis, db: asyncpg.Pool
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(pay_settings, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


async def card_pays(sdk: stripe.StripeClient, intent_id: str, number: str = VISA) -> str:
    """Attach a card and confirm, as the shopper's browser would; returns the status."""

    def run() -> str:
        method = sdk.v1.payment_methods.create(
            {
                "type": "card",
                "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
            }
        )
        sdk.v1.payment_intents.update(intent_id, {"payment_method": method.id})
        try:
            return str(sdk.v1.payment_intents.confirm(intent_id).status)
        except stripe.CardError:
            return "declined"

    return await asyncio.to_thread(run)


async def deliver(client: httpx.AsyncClient, event: dict[str, Any], **sign: Any) -> httpx.Response:
    body, header = signed_event(event, sign.pop("secret", SECRET), sign.pop("timestamp", None))
    return await client.post(
        "/v1/webhooks/stripe", content=body, headers={"Stripe-Signature": header}
    )


async def held_order(
    redis: Redis, gateway: StripeGateway, sale_id: str, user: str = "alice", quantity: int = 1
) -> tuple[str, str]:
    hold = await inventory.reserve(redis, sale_id, user, quantity, f"k-{user}")
    intent_id, _ = await ensure_intent(redis, gateway, sale_id, hold.order_id, quantity)
    return hold.order_id, intent_id


async def succeeded(gateway: StripeGateway, intent_id: str, created: int | None = None) -> dict:
    intent = await gateway.retrieve_intent(intent_id)
    return intent_event("payment_intent.succeeded", intent, created)


# --- signatures ------------------------------------------------------------------------------


async def test_webhook_signatures(
    client: httpx.AsyncClient, redis: Redis, ledger_sale: SaleFactory, gateway: StripeGateway
):
    sale = await ledger_sale()
    order_id, intent_id = await held_order(redis, gateway, sale.id)
    event = intent_event("payment_intent.payment_failed", await gateway.retrieve_intent(intent_id))
    body, header = signed_event(event, SECRET)

    cases = {
        "wrong secret": (body, signed_event(event, "whsec_other")[1]),
        "tampered body": (body.replace(b"payment_failed", b"succeeded"), header),
        "stale timestamp": (body, signed_event(event, SECRET, int(time.time()) - 3600)[1]),
    }
    for name, (content, signature) in cases.items():
        response = await client.post(
            "/v1/webhooks/stripe", content=content, headers={"Stripe-Signature": signature}
        )
        assert response.status_code == 400, name
        assert response.json()["code"] == "invalid-signature", name
    missing = await client.post("/v1/webhooks/stripe", content=body)
    assert missing.status_code == 400 and missing.json()["code"] == "invalid-signature"
    assert (await inventory.read_order(redis, sale.id, order_id))["state"] == "reserved"

    good = await client.post(
        "/v1/webhooks/stripe", content=body, headers={"Stripe-Signature": header}
    )
    assert good.status_code == 200 and good.json()["outcome"] == "failed"
    unknown = dict(event, id="evt_unknown", type="customer.created")
    response = await deliver(client, unknown)
    assert response.status_code == 200 and response.json()["outcome"] == "ignored"


# --- races -----------------------------------------------------------------------------------


async def test_same_event_ten_times_at_once(
    client: httpx.AsyncClient,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
):
    sale = await ledger_sale(stock=5)
    _, intent_id = await held_order(redis, gateway, sale.id, quantity=2)
    assert await card_pays(sdk, intent_id) == "succeeded"
    event = await succeeded(gateway, intent_id)
    responses = await asyncio.gather(*(deliver(client, event) for _ in range(10)))
    outcomes = sorted(r.json()["outcome"] for r in responses)
    assert outcomes == ["duplicate"] * 9 + ["paid"]
    assert await db.fetchval("SELECT count(*) FROM webhook_events") == 1
    keys = sale_keys(sale.id)
    assert await redis.hmget(keys.sale, "sold", "held") == ["2", "0"]
    assert await redis.get(keys.stock) == "3"


async def test_failure_after_success_changes_nothing(
    client: httpx.AsyncClient,
    redis: Redis,
    ledger_sale: SaleFactory,
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
):
    sale = await ledger_sale(stock=5)
    order_id, intent_id = await held_order(redis, gateway, sale.id)
    await card_pays(sdk, intent_id)
    intent = await gateway.retrieve_intent(intent_id)
    now = int(time.time())
    await deliver(client, intent_event("payment_intent.succeeded", intent, now))
    late_failure = intent_event("payment_intent.payment_failed", intent, now - 30)
    assert (await deliver(client, late_failure)).json()["outcome"] == "paid"
    older_success = intent_event("payment_intent.succeeded", intent, now - 60)
    assert (await deliver(client, older_success)).json()["outcome"] == "stale"
    order = await inventory.read_order(redis, sale.id, order_id)
    assert order["state"] == "paid" and order["version"] == "3"  # reserve, attach, paid
    assert await redis.get(sale_keys(sale.id).stock) == "4"


async def test_success_before_the_ledger_has_the_order(
    client: httpx.AsyncClient,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
):
    sale = await ledger_sale()
    order_id, intent_id = await held_order(redis, gateway, sale.id)
    assert await db.fetchval("SELECT count(*) FROM orders") == 0  # no worker ran
    await card_pays(sdk, intent_id)
    assert (await deliver(client, await succeeded(gateway, intent_id))).json()["outcome"] == "paid"
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    row = await db.fetchrow("SELECT state, payment_intent_id FROM orders WHERE id = $1", order_id)
    assert tuple(row.values()) == ("paid", intent_id)
    payment = await db.fetchrow(
        "SELECT order_state, amount FROM payments WHERE intent_id = $1", intent_id
    )
    assert tuple(payment.values()) == ("paid", sale.price)


async def test_event_for_an_unknown_order_is_kept_and_applied_later(
    client: httpx.AsyncClient,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    gateway: StripeGateway,
):
    from engine.webhooks import apply_pending

    sale = await ledger_sale()
    ghost = Intent(
        id="pi_ghost",
        client_secret="",
        status="succeeded",
        amount=100,
        currency="usd",
        order_id=f"{sale.id}.00000000000000ff",
    )
    response = await deliver(client, intent_event("payment_intent.succeeded", ghost))
    assert response.status_code == 200 and response.json()["outcome"] == "pending"
    row = await db.fetchrow("SELECT processed_at FROM webhook_events")
    assert row["processed_at"] is None
    assert await apply_pending(db, redis, gateway, older_than_s=0) == 0  # still unknown: kept
    foreign = intent_event("payment_intent.succeeded", replace(ghost, order_id=""))
    assert (await deliver(client, foreign)).json()["outcome"] == "not-ours"


@pytest.mark.parametrize("stock_left", [True, False])
async def test_late_payment_for_an_expired_hold(
    client: httpx.AsyncClient,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
    stock_left: bool,
):
    sale = await ledger_sale(stock=1, hold_seconds=1)
    order_id, intent_id = await held_order(redis, gateway, sale.id)
    await asyncio.sleep(1.05)
    assert await expire_sale(redis, sale.id) == 1  # no gateway: expired without cancelling
    if not stock_left:
        await inventory.reserve(redis, sale.id, "bob", 1, "k-bob")
    await card_pays(sdk, intent_id)
    outcome = (await deliver(client, await succeeded(gateway, intent_id))).json()["outcome"]
    keys = sale_keys(sale.id)
    if stock_left:
        assert outcome == "paid"
        assert await redis.hmget(keys.sale, "sold", "held") == ["1", "0"]
        assert await redis.get(keys.stock) == "0"
        return
    assert outcome == "refund_pending"
    assert await all_due(refund_pass, GatewayWork(redis, gateway), sale.id) == 1
    order = await inventory.read_order(redis, sale.id, order_id)
    assert order["state"] == "refunded" and order["refund"].startswith("re_")
    assert await redis.hmget(keys.sale, "sold", "held") == ["0", "1"]  # bob's hold
    assert await all_due(refund_pass, GatewayWork(redis, gateway), sale.id) == 0


async def test_expiry_racing_a_payment_has_one_outcome(
    client: httpx.AsyncClient,
    redis: Redis,
    ledger_sale: SaleFactory,
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
):
    sale = await ledger_sale(stock=40, per_user_limit=1, per_order_max=1, hold_seconds=1)
    orders = [await held_order(redis, gateway, sale.id, f"u{i}") for i in range(20)]
    paid = orders[::2]
    for _, intent_id in paid:
        await card_pays(sdk, intent_id)
    await asyncio.sleep(1.05)
    events = [await succeeded(gateway, intent_id) for _, intent_id in paid]
    # The expiry worker (which cancels at Stripe first) and the webhooks race.
    results = await asyncio.gather(
        expire_sale(redis, sale.id, gateway=gateway),
        *(deliver(client, event) for event in events),
    )
    assert all(r.status_code == 200 for r in results[1:])
    states = [(await inventory.read_order(redis, sale.id, oid))["state"] for oid, _ in orders]
    assert states == ["paid", "expired"] * 10
    keys = sale_keys(sale.id)
    assert await redis.hmget(keys.sale, "sold", "held") == ["10", "0"]
    assert await redis.get(keys.stock) == "30"
    for _, intent_id in orders[1::2]:
        assert (await gateway.retrieve_intent(intent_id)).status == "canceled"


async def test_worker_killed_between_the_gateway_and_redis(
    redis: Redis, ledger_sale: SaleFactory, gateway: StripeGateway
):
    sale = await ledger_sale()
    mock = MockGateway(redis)
    hold = await inventory.reserve(redis, sale.id, "alice", 1, "k1")
    # A pay call asked the gateway, got its answer, and died before attaching it.
    first = await mock.create_intent(hold.order_id, sale.id, sale.price, sale.currency)
    again = await ensure_intent(redis, mock, sale.id, hold.order_id, 1)
    assert again[0] == first.id  # same idempotency key, same intent: nothing made twice
    order = await inventory.read_order(redis, sale.id, hold.order_id)
    assert order["pi"] == first.id

    # Refund: gateway refunded, worker died before marking it; the retry refunds nothing new.
    await mock.settle(first.id, succeeded=True)
    await inventory.confirm(redis, sale.id, hold.order_id, first.id)
    await inventory.refund(redis, sale.id, hold.order_id, "request", restock=True)
    refund_id = await mock.refund(first.id, hold.order_id)
    assert await all_due(refund_pass, GatewayWork(redis, mock), sale.id) == 1
    order = await inventory.read_order(redis, sale.id, hold.order_id)
    assert (order["state"], order["refund"]) == ("refunded", refund_id)
    assert await redis.get(sale_keys(sale.id).stock) == str(sale.stock)


async def test_mock_gateway_cut_off_between_its_writes_still_makes_the_intent(
    redis: Redis, redis_sale: SaleFactory, monkeypatch: pytest.MonkeyPatch
):
    """Redis lost right after the first of create_intent's two writes (killed, or the
    connection dropped): the next try for the order still gets an intent, and racing tries get
    one and the same, with no other left behind."""
    sale = await redis_sale()
    mock = MockGateway(redis)
    order_id = f"{sale.id}.00000000000000aa"
    writes: list[str] = []
    for name in ("set", "hset"):
        write = getattr(redis, name)

        async def cut_off(*args: Any, _write: Any = write, _name: str = name, **kw: Any) -> Any:
            writes.append(_name)
            if len(writes) == 2:
                raise RedisConnectionError("Connection reset by peer")
            return await _write(*args, **kw)

        monkeypatch.setattr(redis, name, cut_off)
    with pytest.raises(RedisConnectionError):
        await mock.create_intent(order_id, sale.id, 1500, "usd")
    monkeypatch.undo()

    intent = await mock.create_intent(order_id, sale.id, 1500, "usd")
    assert (intent.order_id, intent.amount) == (order_id, 1500)
    other = f"{sale.id}.00000000000000bb"
    racing = await asyncio.gather(
        *(mock.create_intent(other, sale.id, 3000, "usd") for _ in range(20))
    )
    assert len({i.id for i in racing}) == 1
    intents = [key async for key in redis.scan_iter(match="fs:mock-gateway:pi:*")]
    # The two handed out, and at most the one whose key the cut-off kept from being written.
    assert {f"fs:mock-gateway:pi:{i}" for i in (intent.id, racing[0].id)} <= set(intents)
    assert len(intents) <= 3


async def test_admin_refund_route_and_cli(
    client: httpx.AsyncClient,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
    pay_settings: Settings,
):
    sale = await ledger_sale(stock=3)
    order_id, intent_id = await held_order(redis, gateway, sale.id)
    await card_pays(sdk, intent_id)
    await deliver(client, await succeeded(gateway, intent_id))
    url = f"/v1/admin/orders/{order_id}/refund?restock=true"
    assert (await client.post(url)).status_code == 401
    admin = {"Authorization": f"Bearer {pay_settings.admin_token}"}
    for _ in range(2):
        response = await client.post(url, headers=admin)
        assert response.status_code == 202 and response.json()["state"] == "refund_pending"
    assert await redis.get(sale_keys(sale.id).stock) == "3"
    for _ in range(2):
        result = await asyncio.to_thread(flashsale, pay_settings, "order", "refund", order_id)
        assert result.returncode == 0, result.stderr
        assert "refunded" in result.stdout
    assert (await inventory.read_order(redis, sale.id, order_id))["state"] == "refunded"


async def test_pay_route_creates_one_intent(
    client: httpx.AsyncClient, redis: Redis, ledger_sale: SaleFactory, pay_settings: Settings
):
    sale = await ledger_sale(price=2500)
    headers = {"Authorization": f"Bearer {mint_token(pay_settings, 'alice')}"}
    placed = await client.post(
        f"/v1/sales/{sale.id}/orders",
        json={"quantity": 2},
        headers={**headers, "Idempotency-Key": "k"},
    )
    order_id = placed.json()["id"]
    first = (await client.post(f"/v1/orders/{order_id}/pay", headers=headers)).json()
    again = (await client.post(f"/v1/orders/{order_id}/pay", headers=headers)).json()
    assert first == again
    assert first["amount"] == 5000 and first["payment_intent_id"].startswith("pi_")
    assert first["client_secret"].startswith(first["payment_intent_id"])
    other = {"Authorization": f"Bearer {mint_token(pay_settings, 'mallory')}"}
    assert (await client.post(f"/v1/orders/{order_id}/pay", headers=other)).status_code == 404


# --- the whole flow, with localstripe delivering webhooks to a real server ------------------


async def test_flood_of_mixed_outcomes_reconciles_clean(
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    pay_settings: Settings,
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
    tmp_path: Path,
):
    settings = replace(pay_settings, port=free_port())
    server = start_process(["serve"], settings, tmp_path / "server.log")
    worker = start_process(["worker"], settings, tmp_path / "worker.log")
    base = f"http://127.0.0.1:{settings.port}"
    try:
        await wait_ready(base)
        async with httpx.AsyncClient() as config:
            hook = {"url": base + "/v1/webhooks/stripe", "secret": SECRET}
            await config.post(f"{settings.stripe_api_base}/_config/webhooks/flashsale", data=hook)
        # Holds long enough that every shopper who pays does so before expiry, even on a
        # loaded machine; the abandoned ones expire a few seconds later.
        sale = await ledger_sale(stock=60, per_user_limit=2, per_order_max=2, hold_seconds=8)
        shoppers = [f"s{i}" for i in range(80)]
        tokens = {u: mint_token(settings, u) for u in shoppers}
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            placed = await asyncio.gather(
                *(
                    http.post(
                        f"/v1/sales/{sale.id}/orders",
                        json={"quantity": 1 + i % 2},
                        headers={
                            "Authorization": f"Bearer {tokens[u]}",
                            "Idempotency-Key": f"k{i}",
                        },
                    )
                    for i, u in enumerate(shoppers)
                )
            )
            orders = [
                (u, r.json()["id"])
                for u, r in zip(shoppers, placed, strict=True)
                if r.status_code == 201
            ]
            assert len(orders) >= 30

            async def shop(i: int, user: str, order_id: str) -> str:
                auth = {"Authorization": f"Bearer {tokens[user]}"}
                fate = ("pay", "pay", "fail", "abandon", "cancel")[i % 5]
                if fate == "cancel":
                    await http.post(f"/v1/orders/{order_id}/cancel", headers=auth)
                    return fate
                pay = (await http.post(f"/v1/orders/{order_id}/pay", headers=auth)).json()
                if fate != "abandon":
                    number = VISA if fate == "pay" else DECLINED
                    await card_pays(sdk, pay["payment_intent_id"], number)
                return fate

            fates = await asyncio.gather(*(shop(i, u, o) for i, (u, o) in enumerate(orders)))
            await asyncio.sleep(1.0)  # localstripe's webhooks
            # Stripe delivers at least once: send every stored event again, re-signed.
            for row in await db.fetch("SELECT payload FROM webhook_events"):
                body = row["payload"].encode()
                for _ in range(2):
                    header = stripe.WebhookSignature.generate_signature_header(
                        body.decode(), SECRET
                    )
                    again = await http.post(
                        "/v1/webhooks/stripe", content=body, headers={"Stripe-Signature": header}
                    )
                    assert again.json()["outcome"] == "duplicate"
        # Abandoned holds expire after 8 s; the worker cancels their intents first.
        deadline = time.monotonic() + 60
        keys = sale_keys(sale.id)
        while await redis.zcard(keys.holds) + await redis.zcard(keys.intent_holds):
            assert time.monotonic() < deadline, "holds never expired"
            await asyncio.sleep(0.2)
        await wait_for_ledger(redis, sale.id)
    finally:
        stop_process(server)
        stop_process(worker)

    states = {oid: (await inventory.read_order(redis, sale.id, oid))["state"] for _, oid in orders}
    expected = {"pay": "paid", "fail": "failed", "abandon": "expired", "cancel": "cancelled"}
    assert [states[oid] for _, oid in orders] == [expected[f] for f in fates]
    audit = await audit_sale(redis, db, sale.id, {oid for _, oid in orders})
    assert audit.ok, audit.violations
    assert audit.available + audit.held + audit.sold == sale.stock
    report = await reconcile(redis, db, gateway, sale.id)
    assert report.differences == []
    # Nobody charged without an order: every succeeded intent belongs to a paid order.
    for oid, state in states.items():
        order = await inventory.read_order(redis, sale.id, oid)
        if order.get("pi"):
            status = (await gateway.retrieve_intent(order["pi"])).status
            assert (status == "succeeded") == (state == "paid"), (oid, state, status)


async def test_charge_refunded_and_intent_canceled_events(
    client: httpx.AsyncClient,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
):
    sale = await ledger_sale(stock=4)
    paid_id, paid_intent = await held_order(redis, gateway, sale.id, "alice")
    await card_pays(sdk, paid_intent)
    await deliver(client, await succeeded(gateway, paid_intent))
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    # Refunded from Stripe's dashboard: the charge event names the intent, not the order, so
    # the receiver finds the order through the ledger's payments table.
    refunded = {
        "id": "evt_refund_1",
        "object": "event",
        "type": "charge.refunded",
        "created": int(time.time()),
        "data": {
            "object": {
                "id": "ch_1",
                "object": "charge",
                "payment_intent": paid_intent,
                "amount_refunded": sale.price,
                "metadata": {},
            }
        },
    }
    assert (await deliver(client, refunded)).json()["outcome"] == "refunded"
    assert (await inventory.read_order(redis, sale.id, paid_id))["state"] == "refunded"
    assert await redis.hmget(sale_keys(sale.id).sale, "sold", "withdrawn") == ["0", "1"]

    _, held_intent = await held_order(redis, gateway, sale.id, "bob")
    await gateway.cancel_intent(held_intent)
    canceled = intent_event("payment_intent.canceled", await gateway.retrieve_intent(held_intent))
    assert (await deliver(client, canceled)).json()["outcome"] == "failed"
    assert await redis.get(sale_keys(sale.id).stock) == "3"  # bob's unit is back


async def test_refund_before_payment_waits_partial_refund_keeps_the_order(
    client: httpx.AsyncClient,
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
):
    from engine.webhooks import apply_pending

    sale = await ledger_sale(stock=4)
    order_id, intent_id = await held_order(redis, gateway, sale.id)
    await card_pays(sdk, intent_id)

    def charge_event(event_id: str, refunded: bool) -> dict[str, Any]:
        return {
            "id": event_id,
            "object": "event",
            "type": "charge.refunded",
            "created": int(time.time()),
            "data": {
                "object": {
                    "id": "ch_1",
                    "object": "charge",
                    "payment_intent": intent_id,
                    "refunded": refunded,
                    "metadata": {"order_id": order_id},
                }
            },
        }

    partial = await deliver(client, charge_event("evt_partial", refunded=False))
    assert partial.json()["outcome"] == "partial-refund"
    # The refund overtook the payment's webhook: it must wait, not be dropped.
    early = await deliver(client, charge_event("evt_full", refunded=True))
    assert early.json()["outcome"] == "pending"
    await deliver(client, await succeeded(gateway, intent_id))
    assert (await inventory.read_order(redis, sale.id, order_id))["state"] == "paid"
    assert await apply_pending(db, redis, gateway, older_than_s=0) == 1
    assert (await inventory.read_order(redis, sale.id, order_id))["state"] == "refunded"


async def test_a_stale_failure_does_not_end_a_hold_whose_payment_went_through(
    client: httpx.AsyncClient,
    redis: Redis,
    ledger_sale: SaleFactory,
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
):
    sale = await ledger_sale(stock=4)
    _, intent_id = await held_order(redis, gateway, sale.id)
    intent = await gateway.retrieve_intent(intent_id)
    old_failure = intent_event("payment_intent.payment_failed", intent, int(time.time()) - 600)
    await card_pays(sdk, intent_id)  # the retry succeeded; its webhook has not arrived
    outcome = (await deliver(client, old_failure)).json()["outcome"]
    assert outcome == "paid"  # Stripe refused to cancel a succeeded intent: it is paid
    assert await redis.hget(sale_keys(sale.id).sale, "sold") == "1"


async def test_non_ascii_signature_is_a_400(client: httpx.AsyncClient):
    response = await client.post(
        "/v1/webhooks/stripe",
        content=b"{}",
        headers={"Stripe-Signature": "t=1,v1=\xe9".encode("latin-1")},
    )
    assert response.status_code == 400 and response.json()["code"] == "invalid-signature"


async def test_cancelled_orders_intents_are_cancelled_at_stripe(
    redis: Redis, ledger_sale: SaleFactory, gateway: StripeGateway
):
    sale = await ledger_sale(stock=4)
    order_id, intent_id = await held_order(redis, gateway, sale.id)
    await inventory.release(redis, sale.id, order_id, "cancelled", "alice")
    assert await redis.zrange(sale_keys(sale.id).voids, 0, -1) == [order_id]
    assert await all_due(void_pass, GatewayWork(redis, gateway), sale.id) == 1
    assert (await gateway.retrieve_intent(intent_id)).status == "canceled"
    assert await all_due(void_pass, GatewayWork(redis, gateway), sale.id) == 0


@pytest.mark.parametrize("full", [True, False], ids=["full", "since-cursor"])
async def test_reconcile_finds_and_repairs_a_missed_webhook(
    redis: Redis,
    db: asyncpg.Pool,
    ledger_sale: SaleFactory,
    gateway: StripeGateway,
    sdk: stripe.StripeClient,
    full: bool,
):
    sale = await ledger_sale(stock=3)
    order_id, intent_id = await held_order(redis, gateway, sale.id)
    await card_pays(sdk, intent_id)  # Stripe has the event; it never reached us
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    report = await reconcile(redis, db, gateway, sale.id, full=full)
    kinds = sorted(d.kind for d in report.differences)
    assert kinds == ["missed-webhook", "paid-at-gateway-not-here"]
    repaired = await reconcile(redis, db, gateway, sale.id, repair=True, full=full)
    assert any("received" in line for line in repaired.repaired)
    assert (await inventory.read_order(redis, sale.id, order_id))["state"] == "paid"
    await drain_sale(redis, db, sale.id, "c", batch=100, claim_idle_ms=60_000)
    assert (await reconcile(redis, db, gateway, sale.id, full=full)).differences == []
