"""arq ``WorkerSettings``: run with ``flashsale worker``, which points arq at FLASHSALE_REDIS_URL.

The cron table of the five jobs, each defined beside the logic it runs:

| job             | module                | runs                          |
| --------------- | --------------------- | ----------------------------- |
| drain_outboxes  | ``workers.outbox``    | every second, at .0 s         |
| expire_holds    | ``workers.holds``     | every second, at .5 s         |
| refunds         | ``workers.payments``  | every second, at .75 s        |
| webhook_retries | ``workers.webhooks``  | every ten seconds             |
| reconcile_sales | ``workers.reconcile`` | every minute, at second 15    |

Every cron job is unique per tick (arq's default), so with several worker processes each tick
runs once. The per-second jobs start at different fractions of the second and also run once at
start-up. No job makes PaymentIntents: the shopper's ``POST /v1/orders/{id}/pay`` does, so
payment work grows with the shoppers who pay, not with the holds that exist.
``flashsale worker --jobs`` runs a subset of them.
"""

from __future__ import annotations

from typing import Any

from arq import cron

from workers.context import shutdown, startup
from workers.holds import expire_holds
from workers.outbox import drain_outboxes
from workers.payments import refunds
from workers.reconcile import reconcile_sales
from workers.webhooks import webhook_retries

__all__ = ["WorkerSettings"]


class WorkerSettings:
    functions: list[Any] = []
    cron_jobs = [
        cron(drain_outboxes, second=None, microsecond=0, run_at_startup=True, timeout=30),
        cron(expire_holds, second=None, microsecond=500_000, run_at_startup=True, timeout=30),
        cron(refunds, second=None, microsecond=750_000, run_at_startup=True, timeout=30),
        cron(webhook_retries, second={0, 10, 20, 30, 40, 50}, timeout=30),
        cron(reconcile_sales, second=15, timeout=120),
    ]
    on_startup = startup
    on_shutdown = shutdown
    poll_delay = 0.1
    max_jobs = 8
    handle_signals = True
