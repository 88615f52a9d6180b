"""``flashsale serve``, ``worker`` and ``migrate``: the long-running processes and the schema."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from engine.settings import ConfigError, Settings

__all__ = ["SERVE_APPS", "cmd_migrate", "cmd_serve", "cmd_worker"]

# What `serve --app` can run, as import strings that uvicorn resolves in each server process: the
# bench's yardsticks are served by the very same uvicorn set-up, and naming them here loads none
# of loadtests.
SERVE_APPS = {
    "engine": "engine.http.asgi:create",
    "ceiling": "loadtests.benchapps:ceiling",
    "baseline": "loadtests.benchapps:baseline",
}


def _share_metrics(settings: Settings) -> None:
    """Make this process, and the server processes it starts, write their metrics to the
    machine's one folder that ``/metrics`` adds up. prometheus-client picks where it keeps
    values when it is first imported, from this variable: it is set before anything imports
    it, and uvicorn's server processes inherit it."""
    # The files of processes that ended stay: their counts are part of the machine's totals
    # (removing them would make every counter drop, which Prometheus reads as a reset).
    folder = Path(settings.metrics_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".writable-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"FLASHSALE_METRICS_DIR {folder} cannot be written: {exc}") from None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.log_format:
        # Read by every server process's app factory (engine.http.asgi), uvicorn's workers too.
        os.environ["FLASHSALE_LOG_FORMAT"] = args.log_format
    settings = Settings.from_env()
    _share_metrics(settings)
    # Outside production a missing JWT key or webhook secret is made up by each process: the
    # server processes of this one serve must all use this process's, or each would refuse
    # the others' tokens.
    for name, value in (
        ("FLASHSALE_JWT_SECRET", settings.jwt_secret),
        ("FLASHSALE_WEBHOOK_SECRET", settings.webhook_secret),
    ):
        if value is not None and not os.environ.get(name):
            os.environ[name] = value

    import uvicorn

    from engine.http.protocol import LimitedHttpToolsProtocol
    from engine.logs import configure

    configure(settings.log_format, args.log_level)
    uvicorn.run(
        SERVE_APPS[args.app],
        factory=True,
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
        workers=args.workers or settings.server_workers,
        loop="uvloop",
        # httptools with header limits and a read deadline for slow clients.
        http=LimitedHttpToolsProtocol,
        access_log=False,
        log_level=args.log_level,
        log_config=None,  # the records go through engine.logs' handler, not uvicorn's own
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    _share_metrics(settings)  # before the jobs' modules import prometheus-client

    from arq.connections import RedisSettings

    from engine.logs import configure
    from workers import runner
    from workers.settings import PERIODS_S, WorkerSettings

    known = {job.name.removeprefix("cron:") for job in WorkerSettings.cron_jobs}
    wanted = set(args.jobs.split(",")) if args.jobs else known
    if wanted - known:
        print(
            f"flashsale: unknown jobs {sorted(wanted - known)}; known: {sorted(known)}",
            file=sys.stderr,
        )
        return 2
    periods = {job: period for job, period in PERIODS_S.items() if job in wanted}
    if args.check:
        return asyncio.run(_check(settings, periods))
    configure(args.log_format or settings.log_format, args.log_level)
    overrides: dict[str, Any] = {}
    if args.jobs:
        # A dedicated drain worker (the bench runs one) leaves gateway calls to other workers.
        jobs = [job for job in WorkerSettings.cron_jobs if job.name.removeprefix("cron:") in wanted]
        overrides["cron_jobs"] = jobs
    # Wedged: not even the most frequent of its jobs has run for a few of its periods.
    stall_s = max(runner.STALL_S, 3 * min(periods.values()))
    return asyncio.run(
        runner.run(
            WorkerSettings,
            RedisSettings.from_dsn(settings.redis_url),
            stall_s=stall_s,
            burst=args.burst,
            **overrides,
        )
    )


async def _check(settings: Settings, periods: dict[str, float]) -> int:
    """Exit status for a probe: 0 every job completed recently, 1 one is overdue, 2 Redis did
    not answer."""
    from redis.exceptions import RedisError

    from engine.db import connect_redis
    from workers.heartbeats import read_heartbeats

    redis = connect_redis(settings, pool_size=1, deadline_s=2)
    try:
        reports = await read_heartbeats(redis, periods)
    except RedisError as exc:
        print(f"flashsale: cannot read the heartbeats: {exc}", file=sys.stderr)
        return 2
    finally:
        await redis.aclose()
    for report in reports:
        age = "never" if report.age_s is None else f"{report.age_s:.1f} s ago"
        verdict = "OVERDUE" if report.overdue else "ok"
        allowed = f"(allowed {report.allowed_s:.0f} s)"
        print(f"{report.job:<16} last completed {age:<14} {allowed} {verdict}")
    return 1 if any(report.overdue for report in reports) else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from engine.db import migrate

    applied = asyncio.run(migrate(Settings.from_env().database_url))
    if applied:
        for name in applied:
            print(f"applied {name}")
    else:
        print("nothing to apply: the database is up to date")
    return 0
