"""Answering "sold out" without a Redis round trip, once a sale has no stock left.

The crowd does not stop at the sell-out: most of a flash sale's requests come after it, and
each would cost a ``reserve`` call that only says no. After ``reserve`` answers SOLD_OUT with
no stock at all, this process reads the sale's ``sold_out_view`` (one read-only script) and
re-reads it every ``refresh_s``. While that view is fresh, an order is answered here, with the
very answer ``reserve`` would give (409 ``sold-out``, ``available: 0``), when:

- the shopper never held a unit of the sale. Idempotency records are written only with a
  hold, and the view lists every shopper who ever held one (``users`` keeps them at 0; the
  view refuses a sale without the ``buyers_kept`` mark that promises so), plus those this
  process gave a hold to since the watch began (a view read already on its way when their
  reserve ran after it cannot list them). So this request cannot be a replay owed its first
  answer;
- the quantity is within the sale's per-order maximum and per-user limit, so ``reserve``
  would pass those checks (a newcomer holds nothing) and stop at the stock;
- the view said open and inside the window, and the sale's end has not come.

Everyone else (a past buyer, who may be replaying; a bigger quantity) goes to Redis as before.

What it costs: stock that comes back (a cancel, an expired hold) is seen at the next read, so
for up to ``refresh_s`` newcomers hear "sold out" as if someone had been faster; a pause or a
close is seen as late. With one server process in front of a sale that is all. With several
there is one more corner, and it breaks the contract that a replay returns the first answer: a
newcomer who takes a returned unit through another process and replays through this one
inside that same window hears "sold out" instead of the replay. So it is off unless
``FLASHSALE_SOLD_OUT_REFRESH_MS`` is set (``flashsale bench`` sets 50).

A view older than three refreshes (a stalled loop, an unreachable Redis) is not used, a sale
nobody asked about for ``IDLE_S`` is forgotten, and after a watch ends the sale rests
``REST_S`` before the next (so a sale with too many buyers to list, or one whose stock keeps
coming back, costs one view read per rest, not one per sold-out answer).

Measured (``flashsale bench``, one uvicorn process, 64 connections): sold-out answers went
from 0.81 to 1.24-1.41 of the ceiling's throughput.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from engine.inventory import SoldOutView, sold_out_view

__all__ = ["SoldOutMemory"]

log = logging.getLogger("flashsale.soldout")

# A sale that nobody asked this process about for this long is forgotten (its reads stop).
IDLE_S = 10.0
# Above this many past buyers the view is not kept: listing them (HKEYS) would hold Redis
# for longer than the round trips it saves are worth.
MAX_SHOPPERS = 100_000
# After a watch ends (stock back, sale paused, too many buyers), this long before another:
# otherwise every sold-out answer from Redis would start one and cost a second script call.
REST_S = 1.0


@dataclass(slots=True)
class _Memory:
    view: SoldOutView
    buyers: frozenset[str]
    closes_at: float  # time.monotonic() at which the sale ends
    fresh_until: float  # time.monotonic() after which the view is not trusted
    used_at: float  # when it last answered an order


class SoldOutMemory:
    """One server process's memory of its sold-out sales (see the module's docstring)."""

    def __init__(self, store: Redis, refresh_s: float) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._sales: dict[str, _Memory] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._resting: dict[str, float] = {}  # sale -> when it may be watched again
        # Shoppers this process placed an order for while it watched the sale: a view read that
        # was on its way to Redis as their reserve ran after it may not list them.
        self._bought_here: dict[str, set[str]] = {}
        self._closed = False

    def answers(self, sale_id: str, user: str, quantity: int) -> bool:
        """True when the order can be told "sold out" without asking Redis."""
        memory = self._sales.get(sale_id)
        if memory is None:
            return False
        now = time.monotonic()
        view = memory.view
        if (
            now >= memory.fresh_until
            or now >= memory.closes_at
            or quantity > view.per_order_max
            or quantity > view.per_user_limit
            or user in memory.buyers
            or user in self._bought_here.get(sale_id, ())
        ):
            return False
        memory.used_at = now
        return True

    def bought(self, sale_id: str, user: str) -> None:
        """``reserve`` just gave ``user`` a hold in the sale."""
        if sale_id in self._watchers:
            self._bought_here.setdefault(sale_id, set()).add(user)

    def sold_out(self, sale_id: str) -> None:
        """``reserve`` just found no stock at all in the sale: start watching it."""
        if self._closed or self._refresh_s <= 0 or sale_id in self._watchers:
            return
        if time.monotonic() >= self._resting.get(sale_id, 0.0):
            task = asyncio.get_running_loop().create_task(self._watch(sale_id))
            self._watchers[sale_id] = task

    def stock_back(self, sale_id: str) -> None:
        """Units were just added to the sale (a restock): stop answering it here at once, so
        orders reach ``reserve`` now rather than after the next view read."""
        self._sales.pop(sale_id, None)
        watcher = self._watchers.get(sale_id)
        if watcher is not None:
            watcher.cancel()

    async def _watch(self, sale_id: str) -> None:
        memory: _Memory | None = None
        try:
            while True:
                asked = time.monotonic()
                if memory is not None and asked - memory.used_at > IDLE_S:
                    return
                known = memory.view.fingerprint if memory is not None else ""
                # A read that hangs must not pin the sale: past the view's freshness it is no
                # use anyway.
                view = await asyncio.wait_for(
                    sold_out_view(self._store, sale_id, known, MAX_SHOPPERS),
                    timeout=3 * self._refresh_s,
                )
                if view is None:
                    return  # stock is back, or the sale is not open: reserve decides again
                if view.names is not None:
                    buyers = frozenset(view.names)
                elif memory is not None:
                    buyers = memory.buyers
                else:  # cannot happen: a first read (no fingerprint) always lists them
                    return
                memory = _Memory(
                    view=view,
                    buyers=buyers,
                    # Both clocks count from the moment of asking, so the local clock's offset
                    # from Redis's does not matter.
                    closes_at=asked + (view.end_ms - view.now_ms) / 1000,
                    fresh_until=asked + 3 * self._refresh_s,
                    used_at=memory.used_at if memory is not None else asked,
                )
                self._sales[sale_id] = memory
                await asyncio.sleep(self._refresh_s)
        except Exception as exc:
            # Orders go to Redis again, where the same trouble is reported to the shopper.
            log.warning("stopped answering sold-out for %s locally: %s", sale_id, exc)
        finally:
            self._sales.pop(sale_id, None)
            self._watchers.pop(sale_id, None)
            self._bought_here.pop(sale_id, None)
            self._resting[sale_id] = time.monotonic() + REST_S

    async def aclose(self) -> None:
        self._closed = True
        watchers = list(self._watchers.values())
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
