"""The reconcile job: compare what changed at the payment gateway since each live sale's cursor
with Redis and Postgres.

The comparison itself is ``engine.reconcile``, which ``flashsale reconcile`` runs too; this job
only logs the differences it finds, and a person decides on ``flashsale reconcile --repair``.
The whole sweep (every order, every intent) is for audits: ``flashsale reconcile --full``.
"""

from __future__ import annotations

from typing import Any

from engine.reconcile import reconcile
from workers.context import each_sale

__all__ = ["reconcile_sales"]


async def reconcile_sales(ctx: dict[str, Any]) -> int:
    """The arq job: compare what changed at the gateway since each sale's cursor with Redis and
    Postgres; log every difference (repairs are manual). Returns how many it found."""

    async def one(sale_id: str) -> int:
        report = await reconcile(ctx["store"], ctx["db"], ctx["gateway"], sale_id, full=False)
        return len(report.differences)

    return await each_sale(ctx, "reconcile", one)
