"""Counting requests for Prometheus, and ``GET /metrics``.

The order route carries the storm, so a request never touches prometheus-client: it only adds
to plain dictionaries of its own process (``RequestMetrics.leave``), and ``flush`` moves the
sums into the shared metrics once a second and before every scrape. A prometheus-client
``inc`` in multiprocess mode writes a memory-mapped file under a lock; three of them per order
(request, latency, outcome) would cost several percent of the order path (``make bench``
reports the engine with this hook beside the engine without it). What one request costs the
hook (242 ns on a 2-core machine)::

    python -m timeit -s 'from engine.http.metrics import RequestMetrics; m = RequestMetrics()' \
        -s 's = {"method": "POST"}' 'm.leave(s, "/v1/sales/{sale_id}/orders", 201, None, 0.003)'
"""

from __future__ import annotations

import asyncio
import contextlib
from bisect import bisect_left
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from engine import metrics
from engine.errors import STORE_UNREACHABLE
from engine.http.context import services
from engine.http.routing import REPLAYED_SCOPE_KEY, RequestHook
from engine.salestats import all_sale_stats

__all__ = ["RequestMetrics", "metrics_route"]
# How often each process moves its counts into the shared metrics (s): a scrape of another
# process sees this one's requests at most this late.
FLUSH_EVERY_S = 1.0


def _order_outcome(status: int, code: str) -> tuple[str, str]:
    if status in (200, 201):
        return "accepted", ""
    if code == "sold-out":
        return "sold_out", ""
    if code == "limit-exceeded":
        return "limit_exceeded", ""
    return "rejected", code or str(status)


class RequestMetrics(RequestHook):
    """Counts every request the front door answers into this process's own sums; ``flush``
    moves them into the shared metrics, every ``FLUSH_EVERY_S`` while the app runs.

    One dictionary entry per (route, method, status, code, replayed) holds the requests' latency
    bucket counts and their sum: a request costs one lookup, a bisect and two additions (the
    module's docstring has the timeit line); request counts and order outcomes are worked out
    at the flush."""

    def __init__(self) -> None:
        # (route, method, status, code, replayed) -> [per bucket..., above every bound, seconds]
        self._sums: dict[tuple[str, str, int, str, bool], list[float]] = {}
        self._width = len(metrics.LATENCY_BUCKETS) + 2

    def leave(
        self, scope: Scope, route: str, status: int, code: str | None, seconds: float
    ) -> None:
        key = (route, scope["method"], status, code or "", REPLAYED_SCOPE_KEY in scope)
        sums = self._sums.get(key)
        if sums is None:
            sums = self._sums[key] = [0.0] * self._width
        # A bucket holds what is at most its bound: bisect_left finds the first bound >= seconds.
        sums[bisect_left(metrics.LATENCY_BUCKETS, seconds)] += 1
        sums[-1] += seconds

    def flush(self) -> None:
        """Add what was counted since the last flush to the shared metrics."""
        all_sums, self._sums = self._sums, {}
        requests: dict[tuple[str, str, str, str], int] = {}
        latency: dict[tuple[str, str], list[float]] = {}
        orders: dict[tuple[str, str], int] = {}
        for (route, method, status, code, replayed), sums in all_sums.items():
            count = int(sum(sums[:-1]))
            labels = (route, method, str(status), code)
            requests[labels] = requests.get(labels, 0) + count
            into = latency.setdefault((route, method), [0.0] * self._width)
            for i, value in enumerate(sums):
                into[i] += value
            if route == metrics.ORDER_ROUTE and method == "POST":
                outcome = _order_outcome(status, code)
                if replayed and outcome[0] == "accepted":
                    outcome = ("replayed", "")
                orders[outcome] = orders.get(outcome, 0) + count
        for labels, count in requests.items():
            metrics.REQUESTS.labels(*labels).inc(count)
        for outcome, count in orders.items():
            metrics.ORDERS.labels(*outcome).inc(count)
        for (route, method), sums in latency.items():
            child = metrics.LATENCY.labels(route, method)
            # prometheus-client observes one value at a time; these are whole buckets, so they
            # go into the child's own per-bucket values and sum (tests/test_metrics.py checks
            # the rendered histogram against the requests sent: a change there fails loudly).
            buckets: list[Any] = child._buckets
            for i, in_bucket in enumerate(sums[:-1]):
                if in_bucket:
                    buckets[i].inc(in_bucket)
            child._sum.inc(sums[-1])

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(FLUSH_EVERY_S)
                self.flush()

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.flush()


async def metrics_route(request: Request) -> Response:
    """Every process's metrics in Prometheus's text format, and the live sales' gauges."""
    request.app.hook.flush()  # this process's own requests, up to this one
    try:
        _, stats = await all_sale_stats(services(request).store)
    except STORE_UNREACHABLE:
        # Redis away: the counters still answer (a scrape must not fail with the store);
        # the sales' gauges are missing until it is back, which alerting sees as absent.
        stats = []
    # Adding up every process's files is Python work that grows with processes and series: in a
    # thread, so the orders in flight on this loop are not held for all of it.
    body = await asyncio.to_thread(metrics.render, [metrics.sale_gauges(stats)])
    return Response(body, media_type=metrics.CONTENT_TYPE_LATEST)
