"""The retire job: take sales that are over and have nothing left to do off the live set.

Every other job walks every live sale every tick (``workers.context.each_sale``), so without
this each sale ever held would slow every tick for good. A sale stays live for
``FLASHSALE_RETIRE_AFTER_S`` after its end (Stripe retries a webhook for three days, and the
minutely reconcile compares live sales only); anything that gives a retired sale work again (a
late payment, a refund, a restock) puts it back (``engine.inventory.keep_live``).
"""

from __future__ import annotations

from typing import Any

from engine.sales import retire_sale
from engine.settings import Settings
from workers.context import each_sale, log

__all__ = ["retire_sales"]


async def retire_sales(ctx: dict[str, Any]) -> int:
    """The arq job: retire every live sale that is over and quiet. Returns how many."""
    settings: Settings = ctx["settings"]

    async def one(sale_id: str) -> int:
        if not await retire_sale(ctx["store"], sale_id, settings.retire_after_s):
            return 0
        log.info(
            "sale %s retired: over and nothing left to do", sale_id, extra={"sale_id": sale_id}
        )
        return 1

    return await each_sale(ctx, "retire", one)
