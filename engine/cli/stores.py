"""Redis and Postgres, opened for the length of one command."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from engine.settings import Settings

if TYPE_CHECKING:
    import asyncpg
    from redis.asyncio import Redis

__all__ = ["run_with_stores"]

T = TypeVar("T")


def run_with_stores(fn: Callable[[asyncpg.Pool, Redis], Awaitable[T]]) -> T:
    """Run ``fn(db, redis)`` on a new event loop, with the scripts loaded, and close both after."""
    return asyncio.run(_with_stores(fn))


async def _with_stores(fn: Callable[[asyncpg.Pool, Redis], Awaitable[T]]) -> T:
    # Imported here so that `--help` and the commands that need no store stay quick to start.
    from engine.db import connect_postgres, connect_redis
    from engine.scripts import load_scripts

    settings = Settings.from_env()
    # One command's worth of calls: a few connections are plenty.
    redis = connect_redis(settings, pool_size=4)
    db = await connect_postgres(settings, min_size=1, max_size=2)
    try:
        await load_scripts(redis)
        return await fn(db, redis)
    finally:
        await redis.aclose()
        await db.close()
