"""Runs arq's worker so that it never dies silently and never sits alive and idle.

arq's main loop ends on the first error from Redis (a restart, a lost connection: ``run_cron``
→ ``enqueue_job`` → ``WATCH`` raises), and its shutdown then waits, without a deadline, for
every job still running. A worker whose Redis restarted therefore either exited 1, or hung in
that wait with its loop gone. Here:

- a lost Redis or Postgres (``STORES_LOST``) ends only the current arq worker: its
  jobs are cancelled, its clients closed (every step with a deadline), the outage is logged
  once, and after a backoff (0.5 s doubling to 10 s; back to 0.5 s after a healthy minute) a
  fresh arq worker starts in the same process, re-running ``startup``;
- any other error ends the process with status 1 within seconds, for a supervisor to restart;
- a watchdog ends the process with status 1 when no job has run at all (well or not: a job
  that fails because Postgres is away still shows a live loop) for ``stall_s`` while the arq
  worker is up: a wedged loop is reported rather than left looking alive;
- SIGTERM or SIGINT stops it cleanly with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, create_worker

from workers.heartbeats import HEALTH, STORES_LOST, WorkerHealth

__all__ = ["STALL_S", "run"]

log = logging.getLogger("flashsale.worker")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
HEALTHY_S = 60.0
# No job ran for this long while the worker is up: its loop is wedged. The jobs' own timeout
# is 30 s, so a per-second job that is merely slow still finishes within it.
STALL_S = 45.0
CLOSE_DEADLINE_S = 10.0


class Stalled(Exception):
    """No job of the arq worker ran for the stall time: its loop is wedged."""


async def _bounded(step: Awaitable[Any], what: str) -> None:
    try:
        async with asyncio.timeout(CLOSE_DEADLINE_S):
            await step
    except Exception as exc:  # closing a client of a dead service can fail in many ways
        log.warning("while stopping the worker, %s: %r", what, exc)


async def _stop(worker: Worker, pool: ArqRedis) -> None:
    """Stop ``worker`` without waiting on anything for longer than the close deadline (arq's
    own ``close`` waits for every job without one). ``shutdown`` closes only what ``startup``
    got to open; the arq pool is ours, so we close it."""
    for task in worker.tasks.values():
        task.cancel()
    await _bounded(asyncio.gather(*worker.tasks.values(), return_exceptions=True), "jobs")
    if worker.on_shutdown is not None:
        await _bounded(worker.on_shutdown(worker.ctx), "closing the clients")
    # aclose: close() is deprecated since redis 5.0.1 and warns on every restart.
    await _bounded(pool.aclose(close_connection_pool=True), "closing arq's pool")


async def _watch(health: WorkerHealth, started: float, stall_s: float) -> None:
    """Return when no job has finished, well or not, for ``stall_s`` since ``started``."""
    while True:
        await asyncio.sleep(min(stall_s / 6, 5.0))
        # Runs before this arq worker started say nothing about its loop.
        last = max([started, *health.ran.values()])
        if time.monotonic() - last > stall_s:
            return


async def _one_worker(
    settings_cls: type,
    redis_settings: RedisSettings,
    health: WorkerHealth,
    stopping: asyncio.Event,
    stall_s: float,
    overrides: dict[str, Any],
) -> BaseException | None:
    """Run one arq worker until it ends. Returns the error it ended with (``Stalled`` when
    the watchdog ended it), None when a burst ran out of work or a signal stopped it."""
    pool = await create_pool(redis_settings)
    worker = create_worker(
        settings_cls,
        redis_pool=pool,
        handle_signals=False,
        ctx={HEALTH: health},
        **overrides,
    )
    main = asyncio.ensure_future(worker.main())
    stop = asyncio.ensure_future(stopping.wait())
    watchdog = asyncio.ensure_future(_watch(health, time.monotonic(), stall_s))
    try:
        await asyncio.wait({main, stop, watchdog}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stop, watchdog):
            task.cancel()
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await main
        await _stop(worker, pool)
    if main.cancelled():
        return None if stopping.is_set() else Stalled()
    return main.exception()


async def run(
    settings_cls: type, redis_settings: RedisSettings, stall_s: float = STALL_S, **overrides: Any
) -> int:
    """Run the worker until a signal stops it (0), a burst ends (0), or it cannot go on (1).
    ``stall_s``: how long the worker may run no job at all before it counts as wedged."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # One for the process: the jobs of every arq worker it starts record into it.
    health = WorkerHealth()
    outage = health.stores
    backoff = BACKOFF_MIN_S
    try:
        while not stopping.is_set():
            started = time.monotonic()
            try:
                ended = await _one_worker(
                    settings_cls, redis_settings, health, stopping, stall_s, overrides
                )
            except STORES_LOST as error:  # arq's pool could not be made
                ended = error
            if isinstance(ended, Stalled):
                log.error(
                    "no worker job ran for %.0f s: exiting for a restart",
                    stall_s,
                    extra={"event": "worker.stalled"},
                )
                return 1
            if ended is None:
                outage.recovered()
                return 0  # a signal, or a burst that ran out of work
            if not isinstance(ended, STORES_LOST):
                log.error(
                    "worker failed: %r", ended, exc_info=ended, extra={"event": "worker.failed"}
                )
                return 1
            if time.monotonic() - started > HEALTHY_S:
                backoff = BACKOFF_MIN_S
            outage.failed(ended)
            log.info("restarting the worker in %.1f s", backoff, extra={"event": "worker.backoff"})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await stopping.wait()
            backoff = min(backoff * 2, BACKOFF_MAX_S)
        return 0
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
