"""Lua scripts: read once from the package, called by EVALSHA, reloaded on NOSCRIPT.

A script file is named ``name-N.lua`` where N is its number of KEYS (the BullMQ convention), so
a wrapper passing the wrong number of keys fails loudly here instead of silently in Redis. A script
that takes a batch is named ``name-N+Mn.lua``: N keys, then M more for each of its n items.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from engine.packaged import packaged

__all__ = ["SCRIPTS", "Code", "Script", "load_scripts"]


class Code(IntEnum):
    """Every result code any script returns (the first element of its reply)."""

    OK = 1
    REPLAYED = 2
    ALREADY_FINAL = 3
    UPDATED = 4
    SALE_NOT_FOUND = -1
    SALE_NOT_STARTED = -2
    SALE_ENDED = -3
    SALE_PAUSED = -4
    INVALID_QUANTITY = -5
    QUANTITY_EXCEEDS_MAXIMUM = -6
    IDEMPOTENCY_KEY_REUSED = -7
    LIMIT_EXCEEDED = -8
    SOLD_OUT = -9
    ORDER_ID_TAKEN = -10
    ORDER_NOT_FOUND = -11
    NOT_DUE = -12
    INVALID_STATE = -13
    PAYMENT_MISMATCH = -14
    RATE_LIMITED = -15
    STALE = 5
    RE_RESERVED = 6
    REFUND_PENDING = 7


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    key_count: int
    source: str
    sha: str
    keys_per_item: int = 0  # a batch script: key_count keys, then this many per item
    min_items: int = 1  # of a batch script

    def check_keys(self, count: int) -> None:
        per = self.keys_per_item
        if per:
            extra = count - self.key_count
            if extra < per * self.min_items or extra % per:
                raise ValueError(
                    f"{self.name} takes {self.key_count} keys + {per} per item, got {count}"
                )
        elif count != self.key_count:
            raise ValueError(f"{self.name} takes {self.key_count} keys, got {count}")

    def evalsha(self, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
        """The EVALSHA command's arguments (after the command name), keys checked."""
        self.check_keys(len(keys))
        return (self.sha, len(keys), *keys, *args)

    async def __call__(self, redis: Redis, keys: list[str], args: list[Any]) -> list[Any]:
        command = self.evalsha(keys, args)
        try:
            reply = await redis.evalsha(*command)
        except NoScriptError:
            # Redis restarted or SCRIPT FLUSH ran: load it again and retry once. EVALSHA that
            # raised NOSCRIPT ran nothing, so the retry cannot apply the change twice.
            await redis.script_load(self.source)
            reply = await redis.evalsha(*command)
        return reply  # type: ignore[no-any-return]


# Batch scripts that may be called with no items. The others take at least one, so a wrapper
# that forgot the items fails here: a reserve of no orders is a mistake, while a snapshot of a
# sale that has no orders yet still reads its counters.
_EMPTY_BATCH_OK = {"snapshot"}

_INCLUDE = re.compile(r"^--!include (\S+)$", re.MULTILINE)
_KEY_COUNT = re.compile(r"^(\d+)(?:\+(\d+)n)?$")


def _load_all() -> dict[str, Script]:
    """Every ``name-N.lua``, with its ``--!include file.lua`` lines replaced by ``includes/``."""
    root = packaged("lua")
    scripts: dict[str, Script] = {}
    for entry in root.iterdir():
        if not entry.name.endswith(".lua"):
            continue
        stem = entry.name.removesuffix(".lua")
        name, _, count = stem.rpartition("-")
        counts = _KEY_COUNT.match(count)
        if counts is None:
            raise ValueError(f"{entry.name}: name it name-N.lua or name-N+Mn.lua")
        source = _INCLUDE.sub(
            lambda m: root.joinpath("includes", m.group(1)).read_text(encoding="utf-8"),
            entry.read_text(encoding="utf-8"),
        )
        sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        scripts[name] = Script(
            name=name,
            key_count=int(counts[1]),
            source=source,
            sha=sha,
            keys_per_item=int(counts[2] or 0),
            min_items=0 if name in _EMPTY_BATCH_OK else 1,
        )
    return scripts


SCRIPTS: dict[str, Script] = _load_all()


async def load_scripts(redis: Redis) -> None:
    """SCRIPT LOAD every script, so the first shopper does not pay for it."""
    for script in SCRIPTS.values():
        await redis.script_load(script.source)
