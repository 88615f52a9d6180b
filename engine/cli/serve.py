"""``flashsale serve``, ``worker`` and ``migrate``: the long-running processes and the schema."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from engine.settings import Settings

__all__ = ["SERVE_APPS", "cmd_migrate", "cmd_serve", "cmd_worker"]

# What `serve --app` can run, as import strings that uvicorn resolves in each server process: the
# bench's yardsticks are served by the very same uvicorn set-up, and naming them here loads none
# of loadtests.
SERVE_APPS = {
    "engine": "engine.http.asgi:create",
    "ceiling": "loadtests.benchapps:ceiling",
    "baseline": "loadtests.benchapps:baseline",
}


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings.from_env()
    uvicorn.run(
        SERVE_APPS[args.app],
        factory=True,
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
        workers=args.workers or settings.server_workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=args.log_level,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from arq import run_worker
    from arq.connections import RedisSettings

    from workers.settings import WorkerSettings

    settings = Settings.from_env()
    overrides: dict[str, Any] = {}
    if args.jobs:
        wanted = set(args.jobs.split(","))
        known = {job.name.removeprefix("cron:") for job in WorkerSettings.cron_jobs}
        if wanted - known:
            print(
                f"flashsale: unknown jobs {sorted(wanted - known)}; known: {sorted(known)}",
                file=sys.stderr,
            )
            return 2
        # A dedicated drain worker (the bench runs one) leaves gateway calls to other workers.
        jobs = [job for job in WorkerSettings.cron_jobs if job.name.removeprefix("cron:") in wanted]
        overrides["cron_jobs"] = jobs
    run_worker(
        WorkerSettings,  # type: ignore[arg-type]
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        burst=args.burst,
        **overrides,
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from engine.db import migrate

    applied = asyncio.run(migrate(Settings.from_env().database_url))
    if applied:
        for name in applied:
            print(f"applied {name}")
    else:
        print("nothing to apply: the database is up to date")
    return 0
