"""The audit trail: one row per admin action, who did what to which target, and how it ended.

Written by the admin routes (``engine.http.adminauth.admin_action``) after the action, whatever
its outcome, including a refusal for want of a scope. A request that proves no identity at all
(401) is not written: anyone could fill the table with those.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

__all__ = ["AuditRow", "recent", "record"]


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any] | None


async def record(
    db: asyncpg.Pool,
    actor: str,
    action: str,
    target: str | None,
    outcome: str,
    detail: dict[str, Any] | None = None,
) -> None:
    await db.execute(
        "INSERT INTO audit (actor, action, target, outcome, detail) VALUES ($1, $2, $3, $4, $5)",
        actor,
        action,
        target,
        outcome,
        None if detail is None else orjson.dumps(detail).decode(),
    )


async def recent(db: asyncpg.Pool, limit: int = 50, target: str | None = None) -> list[AuditRow]:
    """The newest rows first; only those about ``target`` when it is given."""
    rows = await db.fetch(
        "SELECT id, at, actor, action, target, outcome, detail::text AS detail FROM audit"
        " WHERE $1::text IS NULL OR target = $1 ORDER BY id DESC LIMIT $2",
        target,
        limit,
    )
    return [
        AuditRow(
            id=row["id"],
            at=row["at"],
            actor=row["actor"],
            action=row["action"],
            target=row["target"],
            outcome=row["outcome"],
            detail=orjson.loads(row["detail"]) if row["detail"] is not None else None,
        )
        for row in rows
    ]
