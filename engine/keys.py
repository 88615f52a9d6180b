"""Every Redis key the engine uses, and nothing else formats one.

Each key of a sale carries the hash tag ``{fs:SALE}`` so all keys one Lua script touches share a
cluster slot. Ids are validated before they reach here (see ``engine.ids``), so no id can smuggle
a ``}`` or ``:`` into a key.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "GATEWAY_RATE",
    "LIVE_SALES",
    "OUTBOX_GROUP",
    "WORKER_HEARTBEATS",
    "SaleKeys",
    "mock_event_bodies",
    "mock_event_index",
    "mock_idempotency",
    "mock_intent",
    "sale_keys",
]

# Set of sale ids the workers drain and expire. Outside every sale's slot; one script touches
# it, retire_sale, with the sale's own keys: that needs a standalone Redis (in a Cluster it
# would answer CROSSSLOT, and sales would simply never be retired).
LIVE_SALES = "fs:live-sales"
# Hash: worker job name -> unix ms of its last completed run (``flashsale worker --check``).
WORKER_HEARTBEATS = "fs:worker-heartbeats"

# The payment gateway's rate limiter (lua/gateway_rate-1.lua), one for the whole deployment:
# the gateway's limit is per account, not per sale, so it carries no sale's hash tag.
GATEWAY_RATE = "fs:gateway-rate"

# The consumer group that moves outbox entries into the Postgres ledger.
OUTBOX_GROUP = "ledger"


@dataclass(frozen=True, slots=True)
class SaleKeys:
    sale_id: str
    tag: str

    @property
    def sale(self) -> str:
        """Hash: the definition plus live counters ``held`` and ``sold``."""
        return f"{self.tag}:sale"

    @property
    def stock(self) -> str:
        """Integer: units available to reserve now."""
        return f"{self.tag}:stock"

    @property
    def users(self) -> str:
        """Hash: user id -> units in live holds plus paid orders. A shopper who ever held a
        unit stays at 0 after giving it back, so the keys are everyone who ever bought."""
        return f"{self.tag}:users"

    @property
    def holds(self) -> str:
        """Sorted set: live holds without a PaymentIntent, scored by hold expiry (ms since
        epoch). ``attach_payment`` moves a hold to ``intent_holds``: a live hold is in exactly
        one of the two."""
        return f"{self.tag}:holds"

    @property
    def intent_holds(self) -> str:
        """Sorted set: live holds with a PaymentIntent, scored by hold expiry (ms): the holds
        whose expiry needs the gateway (cancel the intent first)."""
        return f"{self.tag}:intent-holds"

    @property
    def outbox(self) -> str:
        """Stream: one entry per order state change (one per batch of new orders from
        ``reserve``), drained into Postgres."""
        return f"{self.tag}:outbox"

    @property
    def refunds(self) -> str:
        """Sorted set: refund_pending order ids, scored by when the refund is due (ms): when it
        became owed, or later when the gateway refused it."""
        return f"{self.tag}:refunds"

    @property
    def voids(self) -> str:
        """Sorted set: cancelled orders whose PaymentIntent still has to be cancelled, scored by
        when the cancel is due (ms)."""
        return f"{self.tag}:voids"

    @property
    def reconciled(self) -> str:
        """String: unix seconds up to which reconcile compared the gateway's events for this
        sale (its cursor; the next sweep reads from a little before it)."""
        return f"{self.tag}:reconciled-until"

    @property
    def reconcile_report(self) -> str:
        """String: the last report of a reconcile run through the admin API, as JSON."""
        return f"{self.tag}:reconcile-report"

    def order(self, order_id: str) -> str:
        """Hash: one order's live state."""
        return f"{self.tag}:order:{order_id}"

    def idempotency(self, user_id: str, key: str) -> str:
        """String: the first answer to (user, Idempotency-Key), kept 24 h."""
        return f"{self.tag}:idem:{user_id}:{key}"


def mock_intent(intent_id: str) -> str:
    """Hash: a payment intent of the offline mock gateway (shared by API and workers)."""
    return f"fs:mock-gateway:pi:{intent_id}"


def mock_event_index() -> str:
    """Sorted set: the mock gateway's event ids by creation time (unix seconds), its answer
    to "events since" (Stripe's event log, for reconcile)."""
    return "fs:mock-gateway:events-by-time"


def mock_event_bodies() -> str:
    """Hash: event id -> the mock gateway's event, as JSON."""
    return "fs:mock-gateway:event-bodies"


def mock_idempotency(key: str) -> str:
    """String: the intent id the mock gateway created for an idempotency key."""
    return f"fs:mock-gateway:idem:{key}"


def sale_keys(sale_id: str) -> SaleKeys:
    return SaleKeys(sale_id=sale_id, tag="{fs:" + sale_id + "}")
