"""The ``flashsale`` command, run as a real process against real Redis and Postgres."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import jwt
import pytest
from redis.asyncio import Redis

import engine
from engine.cli import build_parser
from engine.db import migrate
from engine.http import asgi
from engine.keys import sale_keys
from engine.settings import Settings
from loadtests import benchapps
from tests.conftest import flashsale


def every_command() -> list[list[str]]:
    parser = build_parser()
    commands: list[list[str]] = [[]]
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():
            commands.append([name])
            for nested in sub._subparsers._group_actions if sub._subparsers else []:
                commands += [[name, inner] for inner in nested.choices]
    return commands


@pytest.mark.parametrize("command", every_command(), ids=" ".join)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, "--help"])
    assert exited.value.code == 0
    assert "usage: flashsale" in capsys.readouterr().out


# Runs `main([*command, "--help"])` for every command in a fresh interpreter, then names the
# lazily imported packages that got loaded on the way.
_HELP_THEN_LIST_LOADED = """
import contextlib, io, json, sys
from engine.cli import main
helps = 0
for command in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*command, "--help"])
    helps += out.getvalue().startswith("usage: flashsale")
lazy = {"loadtests", "localrun", "workers", "matplotlib"}
print(json.dumps([helps, sorted(lazy & {name.partition(".")[0] for name in sys.modules})]))
"""


def test_help_loads_no_tooling_and_no_workers():
    """Tooling and workers are imported by the command that runs them, never by --help."""
    commands = every_command()
    result = subprocess.run(
        [sys.executable, "-c", _HELP_THEN_LIST_LOADED, json.dumps(commands)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [len(commands), []]


def test_version_is_the_package_version():
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout == f"flashsale {engine.__version__}\n"


async def test_migrate_twice_is_a_no_op(settings: Settings):
    assert await migrate(settings.database_url) == []
    result = flashsale(settings, "migrate")
    assert result.returncode == 0 and "up to date" in result.stdout


async def test_sale_lifecycle_through_the_cli(settings: Settings, redis: Redis, db: asyncpg.Pool):
    create = [
        "sale",
        "create",
        "--id",
        "cli-sale",
        "--stock",
        "25",
        "--limit",
        "3",
        "--hold-seconds",
        "90",
        "--duration",
        "600",
    ]
    result = flashsale(settings, *create)
    assert result.returncode == 0, result.stderr
    assert "created sale cli-sale" in result.stdout
    assert await redis.get(sale_keys("cli-sale").stock) == "25"
    row = await db.fetchrow("SELECT stock, per_user_limit, hold_seconds FROM sales")
    assert tuple(row.values()) == (25, 3, 90)

    again = flashsale(settings, *create)
    assert again.returncode == 0 and "already existed" in again.stdout
    other = flashsale(settings, *create[:-4], "--stock", "26")
    assert other.returncode == 1 and "sale-exists" in other.stderr

    show = flashsale(settings, "sale", "show", "cli-sale")
    assert show.returncode == 0 and "live available: 25" in show.stdout

    for action, status in (("pause", "paused"), ("resume", "open"), ("close", "closed")):
        result = flashsale(settings, "sale", action, "cli-sale")
        assert result.returncode == 0, result.stderr
        assert await redis.hget(sale_keys("cli-sale").sale, "status") == status
        assert await db.fetchval("SELECT status FROM sales WHERE id = 'cli-sale'") == status
    reopen = flashsale(settings, "sale", "resume", "cli-sale")
    assert reopen.returncode == 1 and "invalid-status" in reopen.stderr
    missing = flashsale(settings, "sale", "show", "nope")
    assert missing.returncode == 1 and "sale-not-found" in missing.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--id", "Bad Id", "--stock", "5"],
        ["--id", "ok", "--stock", "-1"],
        ["--id", "ok", "--stock", "5", "--currency", "dollars"],
    ],
)
async def test_sale_create_rejects_bad_input(
    settings: Settings, redis: Redis, db: asyncpg.Pool, args: list[str]
):
    result = flashsale(settings, "sale", "create", *args)
    assert result.returncode == 1 and "invalid-sale" in result.stderr
    assert await db.fetchval("SELECT count(*) FROM sales") == 0
    assert await redis.dbsize() == 0


def test_token_mints_many_to_a_file(settings: Settings, tmp_path: Path):
    out = tmp_path / "tokens.tsv"
    result = flashsale(settings, "token", "--count", "500", "--prefix", "load-", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 500
    user, token = lines[-1].split("\t")
    claims = jwt.decode(
        token, settings.jwt_secret, algorithms=["HS256"], audience=settings.jwt_audience
    )
    assert user == "load-500" and claims["sub"] == user


def test_production_without_a_key_exits_2(settings: Settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "migrate"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and "JWT" in result.stderr


@pytest.mark.parametrize(
    "factory",
    [asgi.create, benchapps.ceiling, benchapps.baseline],
    ids=["engine", "ceiling", "baseline"],
)
def test_every_server_factory_freezes_its_start_up_heap(
    factory: Callable[[], object], settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    """Every app `flashsale serve` runs freezes what is alive once it is built."""
    for name, value in settings.as_env().items():
        monkeypatch.setenv(name, value)
    gc.unfreeze()
    try:
        app = factory()
        assert app is not None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
