"""The worker's runner and its jobs' records: a healthy worker is never taken for a wedged one,
a wedged one is, and an outage is logged once when it starts and once when it ends, across the
copies of ctx arq hands each job."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import pytest
from arq import cron
from arq.connections import RedisSettings
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from engine.keys import WORKER_HEARTBEATS
from engine.settings import Settings
from workers import runner
from workers.heartbeats import HEALTH, WorkerHealth, recorded


def _events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.event, r.dependency)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", "").startswith("outage.")
    ]


async def test_an_outage_is_logged_once_across_runs_with_copied_ctx(
    redis: Redis, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, "flashsale.worker")
    failures: list[Exception] = [
        RedisConnectionError("refused"),
        RedisConnectionError("refused"),
        RuntimeError("the gateway said no"),
        RuntimeError("the gateway said no"),
    ]

    async def tick(ctx: dict[str, Any]) -> int:
        if failures:
            raise failures.pop(0)
        return 1

    job = recorded(tick)
    worker_ctx: dict[str, Any] = {HEALTH: WorkerHealth(), "store": redis}
    # arq runs every job with a shallow copy of the worker's ctx.
    outcomes = [await job({**worker_ctx, "job_id": str(i)}) for i in range(6)]
    assert outcomes == [0, 0, 0, 0, 1, 1]
    assert _events(caplog) == [
        ("outage.start", "worker's stores"),
        ("outage.start", "job tick"),
        # The first run that completed: it reached Redis, and the job works again.
        ("outage.end", "job tick"),
        ("outage.end", "worker's stores"),
    ]
    # A lost Redis is not the job's fault: one traceback, for the job's own failure.
    assert [r.message for r in caplog.records if r.exc_info] == ["job tick failed"]
    assert "tick" in worker_ctx[HEALTH].ran
    assert await redis.hget(WORKER_HEARTBEATS, "tick") is not None


def _settings_class(redis_url: str, job: Any) -> type:
    async def startup(ctx: dict[str, Any]) -> None:
        ctx["store"] = Redis.from_url(redis_url, decode_responses=True)

    async def shutdown(ctx: dict[str, Any]) -> None:
        await ctx["store"].aclose()

    class Every:
        functions: list[Any] = []
        cron_jobs = [cron(recorded(job), second=None, run_at_startup=True, timeout=60)]
        on_startup = startup
        on_shutdown = shutdown
        poll_delay = 0.1

    return Every


async def _run_for(settings_cls: type, settings: Settings, seconds: float) -> int | None:
    """The runner's exit status if it ended within ``seconds``; else None, after stopping it
    as a supervisor would (SIGTERM, handled by the runner's loop)."""
    run = asyncio.ensure_future(
        runner.run(settings_cls, RedisSettings.from_dsn(settings.redis_url), stall_s=2.0)
    )
    done, _ = await asyncio.wait({run}, timeout=seconds)
    if done:
        return run.result()
    os.kill(os.getpid(), signal.SIGTERM)  # the runner's handler is installed while it runs
    assert await asyncio.wait_for(run, 15) == 0
    return None


@pytest.mark.slow
async def test_a_worker_whose_jobs_run_is_never_taken_for_a_wedged_one(
    redis: Redis, settings: Settings
):
    async def tick(ctx: dict[str, Any]) -> int:
        return 1

    # Three times the stall limit: jobs run every second all along.
    assert await _run_for(_settings_class(settings.redis_url, tick), settings, 6.0) is None


@pytest.mark.slow
async def test_a_worker_whose_loop_is_wedged_exits_for_a_restart(redis: Redis, settings: Settings):
    async def stuck(ctx: dict[str, Any]) -> int:
        await asyncio.sleep(60)
        return 0

    assert await _run_for(_settings_class(settings.redis_url, stuck), settings, 10.0) == 1
