"""Prometheus metrics: what the front door, the workers and the gateway count, and ``/metrics``.

With ``FLASHSALE_METRICS_DIR`` set, prometheus-client runs in its multiprocess mode: every
process (each uvicorn worker, each ``flashsale worker``) writes its values to files in that
folder and ``/metrics`` adds them up, so a scrape of any server process sees the whole machine.
The CLI exports the folder as ``PROMETHEUS_MULTIPROC_DIR`` before anything imports
prometheus-client (the library picks its storage at import). Without it, each process counts
for itself (tests, tools).

Requests are counted by ``engine.http.metrics``, the per-sale gauges read at scrape time there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from engine.salestats import SaleStats

__all__ = [
    "CONTENT_TYPE_LATEST",
    "GATEWAY_CALLS",
    "GATEWAY_SECONDS",
    "JOB_LAST_SUCCESS",
    "JOB_RUNS",
    "JOB_SECONDS",
    "LATENCY",
    "LATENCY_BUCKETS",
    "LEDGER_CHANGES",
    "ORDERS",
    "ORDER_ROUTE",
    "RECONCILE_DIFFERENCES",
    "REQUESTS",
    "UNITS",
    "WEBHOOK_EVENTS",
    "multiprocess_dir",
    "render",
    "sale_gauges",
]

# The order route's template: its requests are also counted by outcome.
ORDER_ROUTE = "/v1/sales/{sale_id}/orders"

# Seconds. The order route answers in about a millisecond; a stalled store takes its deadline
# (one second by default); a payment call can take the gateway's ten.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

REQUESTS = Counter(
    "flashsale_http_requests_total",
    "HTTP requests answered, by route template, method, status and problem code ('' if none).",
    ["route", "method", "status", "code"],
)
LATENCY = Histogram(
    "flashsale_http_request_duration_seconds",
    "Time from a request's arrival to its answer, by route template and method.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
ORDERS = Counter(
    "flashsale_orders_total",
    "Order requests by outcome (accepted, replayed, sold_out, limit_exceeded, rejected) and, "
    "for rejected ones, the problem code.",
    ["outcome", "code"],
)
UNITS = Counter(
    "flashsale_units_total",
    "Units recorded in the ledger as reserved, released (cancelled or expired) or sold.",
    ["change"],
)
LEDGER_CHANGES = Counter(
    "flashsale_ledger_changes_total",
    "Order changes written from a sale's outbox to the ledger (its rate is the drain rate).",
    ["sale"],
)
JOB_RUNS = Counter(
    "flashsale_worker_job_runs_total", "Worker job runs by job and outcome.", ["job", "outcome"]
)
JOB_SECONDS = Histogram(
    "flashsale_worker_job_duration_seconds",
    "Worker job run time by job.",
    ["job"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 120.0),
)
JOB_LAST_SUCCESS = Gauge(
    "flashsale_worker_job_last_success_timestamp_seconds",
    "When each worker job last completed (unix seconds).",
    ["job"],
    multiprocess_mode="max",
)
WEBHOOK_EVENTS = Counter(
    "flashsale_webhook_events_total",
    "Payment gateway webhook events received, by event type and outcome.",
    ["type", "outcome"],
)
GATEWAY_CALLS = Counter(
    "flashsale_gateway_calls_total",
    "Payment gateway calls by operation and outcome (ok, busy, unavailable, refused, error; "
    "limited: held back by the deployment's rate, never sent).",
    ["operation", "outcome"],
)
GATEWAY_SECONDS = Histogram(
    "flashsale_gateway_call_duration_seconds",
    "Payment gateway call time by operation (the wait for a rate-limit slot excluded).",
    ["operation"],
    buckets=LATENCY_BUCKETS,
)
RECONCILE_DIFFERENCES = Counter(
    "flashsale_reconcile_differences_total",
    "Differences reconcile found between Redis, the ledger and the gateway, by kind.",
    ["kind"],
)


def multiprocess_dir() -> Path | None:
    """The folder prometheus-client shares between processes, if it runs in that mode."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(folder) if folder else None


def render(extra: Iterable[Collector] = ()) -> bytes:
    """The Prometheus text of every process's metrics (or this process's, without the
    multiprocess folder), plus ``extra`` collectors (per-sale gauges read at scrape time)."""
    registry = CollectorRegistry()
    folder = multiprocess_dir()
    if folder is not None:
        # A temp cleaner may have removed it: a scrape shows what is left rather than failing.
        folder.mkdir(parents=True, exist_ok=True)
        MultiProcessCollector(registry, str(folder))  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY  # this process's own metrics
    combined = CollectorRegistry()
    combined.register(_Fixed(list(registry.collect())))
    for collector in extra:
        combined.register(collector)
    return generate_latest(combined)


def sale_gauges(stats: Iterable[SaleStats]) -> Collector:
    """The live sales' figures as gauges, read from Redis at scrape time (``engine.salestats``:
    a round trip per sale, never a scan). The label ``sale`` is bounded by the live sales."""
    units = GaugeMetricFamily(
        "flashsale_sale_units", "A live sale's units by state.", labels=["sale", "state"]
    )
    families = {
        "holds": GaugeMetricFamily("flashsale_sale_holds", "Live holds.", labels=["sale"]),
        "holds_due": GaugeMetricFamily(
            "flashsale_sale_holds_due",
            "Holds past their expiry that a worker has not released yet.",
            labels=["sale"],
        ),
        "outbox_length": GaugeMetricFamily(
            "flashsale_sale_outbox_entries",
            "Changes in the sale's outbox the ledger has not committed.",
            labels=["sale"],
        ),
        "payments_failed": GaugeMetricFamily(
            "flashsale_sale_payments_failed",
            "Holds ended because the gateway failed their payment.",
            labels=["sale"],
        ),
        "refunds_owed": GaugeMetricFamily(
            "flashsale_sale_refunds_owed", "Refunds still to make at the gateway.", labels=["sale"]
        ),
        "cancels_owed": GaugeMetricFamily(
            "flashsale_sale_intent_cancels_owed",
            "PaymentIntents of cancelled orders still to cancel at the gateway.",
            labels=["sale"],
        ),
    }
    lag = GaugeMetricFamily(
        "flashsale_sale_ledger_lag_seconds",
        "Age of the oldest change the ledger has not committed (0: caught up).",
        labels=["sale"],
    )
    for sale in stats:
        for state in ("available", "held", "sold", "withdrawn"):
            units.add_metric([sale.sale_id, state], getattr(sale, state))
        for name, family in families.items():
            family.add_metric([sale.sale_id], getattr(sale, name))
        lag.add_metric([sale.sale_id], sale.ledger_lag_ms / 1000)
    return _Fixed([units, *families.values(), lag])


class _Fixed(Collector):
    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> Iterable[Any]:
        return self._families
