"""arq ``WorkerSettings``: run with ``flashsale worker``, which points arq at FLASHSALE_REDIS_URL.

The cron table of the seven jobs, each defined beside the logic it runs:

| job             | module                | runs                          |
| --------------- | --------------------- | ----------------------------- |
| drain_outboxes  | ``workers.outbox``    | every second, at .0 s         |
| expire_holds    | ``workers.holds``     | every second, at .5 s         |
| refunds         | ``workers.payments``  | every second, at .75 s        |
| webhook_retries | ``workers.webhooks``  | every ten seconds             |
| reconcile_sales | ``workers.reconcile`` | every minute, at second 15    |
| deliver_events  | ``workers.deliveries``| every second, at .25 s        |
| retire_sales    | ``workers.retire``    | every minute, at second 45    |

Every cron job is unique per tick (arq's default), so with several worker processes each tick
runs once. The per-second jobs start at different fractions of the second and also run once at
start-up. No job makes PaymentIntents: the shopper's ``POST /v1/orders/{id}/pay`` does, so
payment work grows with the shoppers who pay, not with the holds that exist.
``flashsale worker --jobs`` runs a subset of them. Every job is ``recorded``: logged, its
failures logged as an outage (once at the start, once at the end), its completions
heartbeated for ``flashsale worker --check``.
"""

from __future__ import annotations

from typing import Any

from arq import cron

from workers.context import shutdown, startup
from workers.deliveries import deliver_events, start_dispatcher, stop_dispatcher
from workers.heartbeats import recorded
from workers.holds import expire_holds
from workers.outbox import drain_outboxes
from workers.payments import refunds
from workers.reconcile import reconcile_sales
from workers.retire import retire_sales
from workers.webhooks import webhook_retries

__all__ = ["PERIODS_S", "WorkerSettings"]

# Each job's period, for the heartbeat check and the runner's watchdog.
PERIODS_S: dict[str, float] = {
    "drain_outboxes": 1,
    "expire_holds": 1,
    "refunds": 1,
    "webhook_retries": 10,
    "reconcile_sales": 60,
    "deliver_events": 1,
    "retire_sales": 60,
}


async def on_start(ctx: dict[str, Any]) -> None:
    await startup(ctx)
    # Deliveries to subscribers run in the background of the process (workers.deliveries).
    await start_dispatcher(ctx)


async def on_stop(ctx: dict[str, Any]) -> None:
    await stop_dispatcher(ctx)
    await shutdown(ctx)


class WorkerSettings:
    functions: list[Any] = []
    cron_jobs = [
        cron(recorded(drain_outboxes), second=None, microsecond=0, run_at_startup=True, timeout=30),
        cron(
            recorded(expire_holds),
            second=None,
            microsecond=500_000,
            run_at_startup=True,
            timeout=30,
        ),
        cron(recorded(refunds), second=None, microsecond=750_000, run_at_startup=True, timeout=30),
        cron(recorded(webhook_retries), second={0, 10, 20, 30, 40, 50}, timeout=30),
        cron(recorded(reconcile_sales), second=15, timeout=120),
        cron(recorded(retire_sales), second=45, timeout=30),
        # Returns once it has started the due deliveries: they run in the process's Dispatcher.
        cron(
            recorded(deliver_events),
            second=None,
            microsecond=250_000,
            run_at_startup=True,
            timeout=30,
        ),
    ]
    on_startup = on_start
    on_shutdown = on_stop
    poll_delay = 0.1
    max_jobs = 8
    handle_signals = True
