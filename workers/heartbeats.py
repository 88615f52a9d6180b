"""Each job's last completed run: recorded in Redis after every run, read by
``flashsale worker --check`` (a probe for a supervisor) and by the runner's own watchdog.

A job is overdue when its last completion is older than ``overdue_after_s`` of its period: a
few missed ticks are normal (a slow pass, a restart, a Redis blip), a minute of silence from a
per-second job is not.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
from arq.typing import WorkerCoroutine
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.keys import WORKER_HEARTBEATS
from engine.logs import Outage
from engine.metrics import JOB_LAST_SUCCESS, JOB_RUNS, JOB_SECONDS

__all__ = [
    "HEALTH",
    "STORES_LOST",
    "JobReport",
    "WorkerHealth",
    "read_heartbeats",
    "recorded",
]

log = logging.getLogger("flashsale.worker")

Job = Callable[[dict[str, Any]], Awaitable[int]]

# The ctx key of the WorkerHealth every job records into.
HEALTH = "health"
# Redis is away (refused, reset, still loading its AOF, silent): not a fault of the job.
REDIS_LOST = (RedisConnectionError, RedisTimeoutError)
# Redis or Postgres is away: not a fault of the sale a job was working on.
STORES_LOST = (*REDIS_LOST, OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)


@dataclass
class WorkerHealth:
    """What the jobs record and the runner reads, kept for the life of the process.

    It must be in the arq worker's ctx before any job runs (the runner passes it in,
    ``workers.context.startup`` adds one otherwise): arq runs each job with a shallow copy of
    that ctx, so a key a job adds itself is gone when the job ends, while an object already
    there is shared. The runner keeps the same one across its restarts of arq, so an outage
    that began under one arq worker ends under the next.
    """

    # Redis or Postgres away for the whole worker: arq's loop died of it, or a job lost Redis.
    stores: Outage = field(default_factory=lambda: Outage("worker's stores", log))
    jobs: dict[str, Outage] = field(default_factory=dict)  # a job failing on its own
    # The payment gateway down or busy, whichever job meets it (workers.payments.GatewayWork).
    gateway: Outage = field(default_factory=lambda: Outage("payment gateway", log))
    ran: dict[str, float] = field(default_factory=dict)  # job -> monotonic end of its last run

    def job(self, name: str) -> Outage:
        if name not in self.jobs:
            self.jobs[name] = Outage(f"job {name}", log)
        return self.jobs[name]

    def failed(self, name: str, error: BaseException, **fields: str) -> None:
        """``name`` (a job, or a job's work for one sale) failed: logged with its traceback
        when it starts failing, then only counted until it works again."""
        outage = self.job(name)
        if outage.since is None:
            log.error("%s failed", outage.what, exc_info=error, extra={"job": name, **fields})
        outage.failed(error)


def overdue_after_s(period_s: float) -> float:
    """How long a job of this period may go without completing before it counts as overdue:
    five periods, and never less than its 30 s timeout plus a tick."""
    return max(5 * period_s, 31.0)


def recorded(job: Job) -> WorkerCoroutine:
    """``job``, logged and heartbeated.

    A run that did something is logged at info, every run at debug. A failing job is an outage
    of that job: logged once with its traceback when it starts failing and once when it works
    again, not every tick (a lost Postgres fails the drain every second), and the failure is
    not re-raised, so arq does not log the same traceback again. A job that lost Redis is part
    of the outage of the worker's stores instead, which the runner reports too when arq's own
    loop dies of the same loss: one outage, not one per job plus the runner's. Every finished
    run, failed or not, is noted in ``WorkerHealth.ran`` (the runner's watchdog reads it: a
    loop that runs jobs is alive); a successful one also in ``WORKER_HEARTBEATS`` (``flashsale
    worker --check``).
    """
    name = job.__name__

    @functools.wraps(job)
    async def run(ctx: dict[Any, Any], *args: Any, **kwargs: Any) -> int:
        health: WorkerHealth = ctx[HEALTH]
        outage = health.job(name)
        started = time.monotonic()
        try:
            done = await job(ctx)
        except REDIS_LOST as exc:
            health.stores.failed(exc)
            JOB_RUNS.labels(name, "failed").inc()
            return 0
        except Exception as exc:
            health.failed(name, exc)
            JOB_RUNS.labels(name, "failed").inc()
            return 0
        finally:
            health.ran[name] = time.monotonic()
            JOB_SECONDS.labels(name).observe(health.ran[name] - started)
        JOB_RUNS.labels(name, "ok").inc()
        JOB_LAST_SUCCESS.labels(name).set(time.time())
        outage.recovered()
        # Every job reads the live sales from Redis, after a startup that reached Postgres: one
        # that completed means the worker is back, and the outage ends now, not at the next
        # look of the watchdog.
        health.stores.recovered()
        seconds = round(time.monotonic() - started, 3)
        level = logging.INFO if done else logging.DEBUG
        fields = {"job": name, "done": done, "seconds": seconds}
        log.log(level, "job %s did %d", name, done, extra=fields)
        store: Redis = ctx["store"]
        try:
            await store.hset(WORKER_HEARTBEATS, name, int(time.time() * 1000))
        except RedisError as exc:  # the run itself succeeded; the next one records again
            log.warning("job %s: heartbeat not recorded: %r", name, exc, extra={"job": name})
        return done

    return cast(WorkerCoroutine, run)


@dataclass(frozen=True)
class JobReport:
    job: str
    age_s: float | None  # since its last completion; None: never completed
    allowed_s: float

    @property
    def overdue(self) -> bool:
        return self.age_s is None or self.age_s > self.allowed_s


async def read_heartbeats(redis: Redis, periods_s: dict[str, float]) -> list[JobReport]:
    """How long ago each job of ``periods_s`` last completed, against what it is allowed."""
    raw: list[str | None] = await redis.hmget(WORKER_HEARTBEATS, list(periods_s))
    now_ms = time.time() * 1000
    return [
        JobReport(job, None if ms is None else (now_ms - int(ms)) / 1000, overdue_after_s(period))
        for (job, period), ms in zip(periods_s.items(), raw, strict=True)
    ]
