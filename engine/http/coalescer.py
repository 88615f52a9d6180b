"""Orders coalesced: every order a server process places in one event-loop turn, per sale, goes
to Redis as ONE ``reserve`` script call.

A storm brings many orders for one sale at once. Alone, each order's script reads the sale, the
clock, the stock and the shopper's count, and writes the stock, the count, the held counter, the
hold index and an outbox entry: 12 ``redis.call``s. Together, the orders of one turn share those
reads and writes (10 calls per batch, then 2 per order: the order hash and the idempotency
record; the batch's new orders travel in ONE outbox entry, so the drain also reads,
acknowledges and deletes once per batch), and Redis parses one command instead of one per
order. Measured: ``python -m loadtests.costs`` (``INFO commandstats``, 20,000 orders), calls of 1,
20 and 64 orders, 69, 27 and 23 µs of Redis CPU per order; ``make bench``, Redis CPU per order
in the engine phase 51 -> 34 µs, drain worker 8 -> 5 µs. Each order is still decided exactly
as if it ran alone, in arrival order, and still costs the shopper one Redis round trip.

The batch is packed just before the pipelined connection's write of this turn
(``PipelinedRedis.before_write``), and its reply is handed out in the connection's
``data_received`` (``PipelinedRedis.send``): no task or future of its own stands between the
shoppers' requests and Redis, so coalescing adds no event-loop turn to an order's answer and no
task per batch. (``make bench`` could not tell it from a version with a task per batch: 0.680
against 0.675 of the ceiling, one run each.)

Rare cases take the awaitable path (``inventory.reserve_many``): no live connection yet (it
connects), NOSCRIPT (it loads the script), an order id already taken (it draws again). An
order whose batch fails (the connection is lost, Redis refuses) gets that failure, as it would
have alone; the shopper retries with the same Idempotency-Key, which is safe whether or not the
script ran.

Back-pressure: at most ``max_in_flight`` orders of the process wait for Redis at once. Past
that a new order is refused at once with 503 ``server-busy`` and ``Retry-After`` instead of
joining a queue that a slow Redis would turn into timeouts for everyone behind it.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from redis.exceptions import NoScriptError

from engine.errors import Unavailable
from engine.http.pipeline import PipelinedRedis
from engine.inventory import MAX_BATCH, Hold, Order, reserve_call, reserve_many, reserve_outcome
from engine.scripts import SCRIPTS
from engine.settings import Settings

__all__ = ["Reservations"]


_SCRIPT = SCRIPTS["reserve"]

_Waiting = tuple[Order, asyncio.Future[Hold]]


def _settle(future: asyncio.Future[Hold], outcome: Hold | BaseException) -> None:
    if future.done():  # its request was cancelled; the order stands, as it would alone
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _fail(batch: list[_Waiting], error: BaseException) -> None:
    """Every order of the batch gets ``error``, as each would have alone."""
    for _, future in batch:
        _settle(future, error)


class Reservations:
    """Places orders on ``store``, coalescing those issued in the same event-loop turn."""

    def __init__(
        self, store: PipelinedRedis, max_in_flight: int = Settings.max_orders_in_flight
    ) -> None:
        self._store = store
        self._waiting: dict[str, list[_Waiting]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._max_in_flight = max_in_flight
        # Orders handed to reserve() and not yet settled. Counted down once per batch at each
        # place a batch ends (answered, failed, retried on the awaitable path).
        self.in_flight = 0

    def reserve(
        self, sale_id: str, user_id: str, quantity: int, idempotency_key: str
    ) -> asyncio.Future[Hold]:
        """What ``inventory.reserve`` answers, once the turn's batch has run."""
        if self.in_flight >= self._max_in_flight:
            raise Unavailable(
                "server-busy",
                "too many orders are waiting for the inventory store; retry shortly with the "
                "same Idempotency-Key",
            )
        self.in_flight += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Hold] = loop.create_future()
        if not self._waiting and not self._store.before_write(self._send):
            loop.call_soon(self._send_awaiting)
        self._waiting.setdefault(sale_id, []).append(((user_id, quantity, idempotency_key), future))
        return future

    def _batches(self) -> list[tuple[str, list[_Waiting]]]:
        waiting, self._waiting = self._waiting, {}
        return [
            (sale_id, orders[start : start + MAX_BATCH])
            for sale_id, orders in waiting.items()
            for start in range(0, len(orders), MAX_BATCH)
        ]

    def _send(self) -> None:
        for sale_id, batch in self._batches():
            try:
                command = _SCRIPT.evalsha(*reserve_call(sale_id, [order for order, _ in batch]))
            except Exception as exc:  # nothing was sent: the batch's shoppers hear why
                _fail(batch, exc)
                self.in_flight -= len(batch)
                continue
            self._store.send(("EVALSHA", *command), partial(self._answer, sale_id, batch))

    def _answer(self, sale_id: str, batch: list[_Waiting], reply: Any) -> None:
        # Runs inside the connection's data_received: whatever goes wrong here must reach the
        # batch's shoppers, not the protocol (which would drop the connection and leave them
        # waiting for good).
        try:
            retry = self._hand_out(sale_id, batch, reply)
        except Exception as exc:
            _fail(batch, exc)
            retry = []
        self.in_flight -= len(batch) - len(retry)
        if retry:
            self._await(sale_id, retry)

    def _hand_out(self, sale_id: str, batch: list[_Waiting], reply: Any) -> list[_Waiting]:
        """Settle the batch's orders from ``reply``; returns those to retry on the awaitable
        path."""
        if isinstance(reply, NoScriptError):
            # EVALSHA that raised NOSCRIPT ran nothing: the awaitable path loads the script.
            return batch
        if isinstance(reply, BaseException):
            _fail(batch, reply)
            return []
        retry = []
        for waiting, one in zip(batch, reply, strict=True):
            outcome = reserve_outcome(one, sale_id)
            if outcome is None:
                retry.append(waiting)
            else:
                _settle(waiting[1], outcome)
        return retry

    def _send_awaiting(self) -> None:
        for sale_id, batch in self._batches():
            self._await(sale_id, batch)

    def _await(self, sale_id: str, batch: list[_Waiting]) -> None:
        task = asyncio.ensure_future(self._place(sale_id, batch))
        # The loop keeps only weak references to tasks: hold them until they finish.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _place(self, sale_id: str, batch: list[_Waiting]) -> None:
        try:
            outcomes = await reserve_many(self._store, sale_id, [order for order, _ in batch])
        except Exception as exc:
            _fail(batch, exc)
            return
        finally:
            self.in_flight -= len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            _settle(future, outcome)

    async def aclose(self) -> None:
        """Wait for the batches on the awaitable path."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
