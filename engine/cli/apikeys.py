"""``flashsale apikey create|list|revoke``: operators' API keys for the admin HTTP API."""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import UTC, datetime

import asyncpg
from redis.asyncio import Redis

from engine.cli.stores import run_with_stores

__all__ = ["cmd_apikey_create", "cmd_apikey_list", "cmd_apikey_revoke"]


def _actor() -> str:
    """Who runs the CLI, for the audit: the operating system's user."""
    return f"cli:{getpass.getuser()}"


def cmd_apikey_create(args: argparse.Namespace) -> int:
    from engine import audit
    from engine.apikeys import create_key

    async def run(db: asyncpg.Pool, redis: Redis) -> int:
        key, secret = await create_key(db, args.name, args.scope, args.expires_in)
        detail = {"name": key.name, "scopes": list(key.scopes)}
        await audit.record(db, _actor(), "apikey.create", str(key.id), "ok", detail)
        print(secret)
        print(
            f"key {key.id} ({key.name}): {', '.join(key.scopes)}; shown once, only its hash "
            "is kept",
            file=sys.stderr,
        )
        return 0

    return run_with_stores(run)


def cmd_apikey_list(args: argparse.Namespace) -> int:
    from engine.apikeys import expires_text, list_keys

    async def run(db: asyncpg.Pool, redis: Redis) -> int:
        now = datetime.now(UTC)
        keys = await list_keys(db)
        print(f"{'id':>4}  {'name':<20} {'prefix':<11} {'standing':<24} {'last used':<17} scopes")
        for key in keys:
            used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never"
            print(
                f"{key.id:>4}  {key.name:<20} {key.prefix:<11} {expires_text(key, now):<24} "
                f"{used:<17} {','.join(key.scopes)}"
            )
        return 0

    return run_with_stores(run)


def cmd_apikey_revoke(args: argparse.Namespace) -> int:
    from engine import audit
    from engine.apikeys import CACHE_S, revoke_key

    async def run(db: asyncpg.Pool, redis: Redis) -> int:
        key = await revoke_key(db, args.id)
        await audit.record(db, _actor(), "apikey.revoke", str(key.id), "ok")
        print(f"revoked key {key.id} ({key.name}); servers refuse it within {CACHE_S:g} s")
        return 0

    return run_with_stores(run)
