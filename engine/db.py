"""Connections to Redis and Postgres, and the migration runner.

Migrations are the numbered ``NNNN_name.sql`` files of ``migrations/``; each runs once, in its own
transaction, recorded in ``schema_migrations``. An advisory lock makes concurrent ``migrate``
runs (two deploys at once) wait for each other instead of racing.
"""

from __future__ import annotations

import re

import asyncpg
from redis.asyncio import BlockingConnectionPool, Redis

from engine.packaged import packaged
from engine.settings import Settings

__all__ = ["connect_postgres", "connect_redis", "empty_tables", "migrate", "redis_ms"]

_MIGRATION = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
# Any constant will do; it only has to be the same in every process that migrates.
_MIGRATION_LOCK = 0x_F1A5_5A1E


def connect_redis(
    settings: Settings, pool_size: int | None = None, deadline_s: float | None = None
) -> Redis:
    """A client on a pool of ``pool_size`` connections. ``deadline_s``: the longest any call
    waits (for a free connection, to connect, for a reply); None waits as long as it takes."""
    # A blocking pool: under a storm, requests queue for a connection instead of opening
    # thousands of sockets (and per-request connection set-up stays off the order path).
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=pool_size or settings.redis_pool_size,
        timeout=5 if deadline_s is None else deadline_s,
        socket_timeout=deadline_s,
        socket_connect_timeout=deadline_s,
        decode_responses=True,
        health_check_interval=0,
    )
    # from_pool: the client owns the pool, so aclose() closes its connections too.
    return Redis.from_pool(pool)


async def redis_ms(redis: Redis) -> int:
    """Redis's clock in ms: the scripts score the work indexes by it (TIME), so callers that
    compare against those scores must read the same clock."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def connect_postgres(
    settings: Settings, min_size: int = 1, max_size: int = 10, deadline_s: float | None = None
) -> asyncpg.Pool:
    """A pool of ``min_size`` to ``max_size`` connections. ``deadline_s``: the longest a
    connection attempt or a statement may take; None leaves asyncpg's defaults (60 s to
    connect, statements unbounded)."""
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=min_size,
        max_size=max_size,
        timeout=60 if deadline_s is None else deadline_s,
        command_timeout=deadline_s,
    )
    assert pool is not None
    return pool


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in packaged("migrations").iterdir():
        match = _MIGRATION.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found)


async def _applied(conn: asyncpg.Connection) -> set[int]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    return {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}


async def migrate(database_url: str) -> list[str]:
    """Apply every migration not yet applied; returns the names applied (empty: a no-op)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            applied = await _applied(conn)
            done = []
            for number, name, sql in _migrations():
                if number in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        number,
                        name,
                    )
                done.append(f"{number:04d}_{name}")
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    finally:
        await conn.close()


async def empty_tables(db: asyncpg.Pool) -> None:
    """Empty every table the migrations made, for tests and benchmarks that own their database.
    Read from the catalog, so a table a new migration adds is never left out."""
    tables = await db.fetch(
        "SELECT quote_ident(tablename) AS name FROM pg_tables"
        " WHERE schemaname = current_schema() AND tablename <> 'schema_migrations'"
    )
    if tables:
        await db.execute(f"TRUNCATE {', '.join(t['name'] for t in tables)} CASCADE")
