"""What one delivery attempt's answer means: delivered, retried later, failed, or the endpoint
disabled; written to the delivery, its attempt log and its subscription in one transaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import asyncpg

from engine.settings import Settings

__all__ = ["Outcome", "next_wait_s", "record_outcome"]

log = logging.getLogger("flashsale.deliveries")

# The longest an endpoint's Retry-After may put an attempt off: the standard schedule's longest
# wait, so no answer parks a delivery for longer than the schedule would.
RETRY_AFTER_MAX_S = 36_000


@dataclass(frozen=True, slots=True)
class Outcome:
    subscription_id: str
    event_id: str
    attempt: int  # 1 for the first
    status: int | None  # None: no HTTP answer (refused, timed out)
    error: str | None
    duration_ms: int
    retry_after: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def _retry_after_s(value: str | None) -> int | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date (RFC 9110 10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0, int((when - datetime.now(UTC)).total_seconds()))


def next_wait_s(schedule: tuple[int, ...], attempt: int, retry_after: str | None) -> int | None:
    """Seconds before the next attempt after ``attempt`` failed, or None: no attempts are left.
    The endpoint's Retry-After replaces the scheduled wait, up to RETRY_AFTER_MAX_S."""
    if attempt >= len(schedule):
        return None
    asked = _retry_after_s(retry_after)
    if asked is not None:
        return min(asked, RETRY_AFTER_MAX_S)
    return schedule[attempt]


_ATTEMPT = """
INSERT INTO outbound_attempts (subscription_id, event_id, attempt, status, error, duration_ms)
VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING
"""
# Only a delivery still held by this attempt is moved: one whose lease ran out and was claimed
# again belongs to the newer attempt.
_DELIVERY = """
UPDATE outbound_deliveries SET state = $4, last_status = $5, last_error = $6,
    next_attempt_at = now() + coalesce($7, 0) * interval '1 second', updated_at = now()
WHERE subscription_id = $1 AND event_id = $2 AND attempts = $3 AND state = 'pending'
"""
_FAILING = """
UPDATE webhook_subscriptions SET failing_since = coalesce(failing_since, now())
WHERE id = $1 RETURNING failing_since <= now() - $2 * interval '1 second' AS too_long
"""
_DISABLE = """
WITH off AS (
    UPDATE webhook_subscriptions SET enabled = false, disabled_reason = $2, updated_at = now()
    WHERE id = $1 AND enabled
)
UPDATE outbound_deliveries SET state = 'failed', last_error = $2, updated_at = now()
WHERE subscription_id = $1 AND state = 'pending'
"""


async def record_outcome(db: asyncpg.Pool, settings: Settings, outcome: Outcome) -> None:
    wait_s = (
        None
        if outcome.delivered
        else next_wait_s(settings.delivery_retry_s, outcome.attempt, outcome.retry_after)
    )
    if outcome.delivered:
        state = "delivered"
    else:
        state = "failed" if wait_s is None else "pending"
    disable: str | None = None
    async with db.acquire() as conn, conn.transaction():
        sub, event = outcome.subscription_id, outcome.event_id
        await conn.execute(
            _ATTEMPT,
            sub,
            event,
            outcome.attempt,
            outcome.status,
            outcome.error,
            outcome.duration_ms,
        )
        await conn.execute(
            _DELIVERY, sub, event, outcome.attempt, state, outcome.status, outcome.error, wait_s
        )
        if outcome.delivered:
            await conn.execute(
                "UPDATE webhook_subscriptions SET failing_since = NULL"
                " WHERE id = $1 AND failing_since IS NOT NULL",
                sub,
            )
        elif outcome.status == 410:
            disable = "the endpoint answered 410 Gone"
        else:
            too_long = await conn.fetchval(_FAILING, sub, settings.endpoint_disable_after_s)
            if too_long:
                days = settings.endpoint_disable_after_s / 86400
                disable = f"every attempt failed for {days:g} days"
        if disable is not None:
            await conn.execute(_DISABLE, sub, disable)
    if disable is not None:
        log.warning(
            "webhook subscription %s disabled: %s",
            outcome.subscription_id,
            disable,
            extra={"subscription_id": outcome.subscription_id},
        )
