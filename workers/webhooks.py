"""The webhook retry job: apply the stored gateway events that could not be applied when they
arrived (their order not yet in Redis, or a refund ahead of its payment).

Verifying, storing and applying an event is ``engine.webhooks``; this job only calls its
``apply_pending``.
"""

from __future__ import annotations

from typing import Any

from engine.webhooks import apply_pending

__all__ = ["webhook_retries"]


async def webhook_retries(ctx: dict[str, Any]) -> int:
    """The arq job: apply stored webhook events that arrived before their order could take them.
    Returns how many it applied."""
    return await apply_pending(ctx["db"], ctx["store"], ctx["gateway"])
