"""Real Redis 7 and PostgreSQL 15 on loopback, in a project folder, for the demo, tests and CI.

``up(dir)`` installs Debian's packages when missing, starts both servers on free ports (reusing
ones still running from an earlier ``up``), waits until they answer, and records them in
``dir/services.json``; ``down(dir)`` stops them. Both are idempotent.

PostgreSQL refuses to run as root, so as root its data directory belongs to the ``postgres`` user
and its commands run through ``runuser``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["down", "ensure_installed", "free_port", "start_postgres", "start_redis", "up"]

APPENDFSYNC_MODES = ("always", "everysec", "no")
DATABASE = "flashsale"


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return versions[-1].parent if versions else None


def ensure_installed() -> None:
    """Install Debian's redis-server and postgresql when either is missing."""
    if shutil.which("redis-server") and _pg_bin():
        return
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*prefix, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [*prefix, "apt-get", "install", "-y", "-qq", "redis-server", "postgresql"],
        check=True,
        env=env,
    )
    if not (shutil.which("redis-server") and _pg_bin()):
        raise RuntimeError("redis-server or PostgreSQL still missing after apt-get install")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class RedisServer:
    port: int
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        pidfile = self.dir / "redis.pid"
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (ValueError, ProcessLookupError):
            pidfile.unlink(missing_ok=True)
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        pidfile.unlink(missing_ok=True)


def start_redis(
    base_dir: Path, port: int | None = None, appendfsync: str = "everysec"
) -> RedisServer:
    if appendfsync not in APPENDFSYNC_MODES:
        raise ValueError(f"appendfsync must be one of {APPENDFSYNC_MODES}, got {appendfsync!r}")
    data = base_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    server = RedisServer(port=port or free_port(), dir=data)
    log = data / "redis.log"
    subprocess.run(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(server.port),
            "--dir",
            str(data),
            "--daemonize",
            "yes",
            "--pidfile",
            str(data / "redis.pid"),
            "--logfile",
            str(log),
            "--appendonly",
            "yes",
            "--appendfsync",
            appendfsync,
            "--save",
            "",
            "--protected-mode",
            "no",
        ],
        check=True,
    )
    deadline = time.monotonic() + 20
    while not server.ping():
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis on port {server.port} did not start:\n{_tail(log)}")
        time.sleep(0.05)
    return server


def _as_postgres(args: list[str]) -> list[str]:
    # Postgres refuses root; as root, run its tools as the postgres user.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@dataclass
class PostgresServer:
    port: int
    dir: Path

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        pg_bin = _pg_bin()
        assert pg_bin is not None
        return subprocess.run(
            _as_postgres([str(pg_bin / "pg_ctl"), "-D", str(self.data), *args]),
            check=check,
            capture_output=True,
        )

    def running(self) -> bool:
        return self._ctl("status", check=False).returncode == 0 and _answers(self.port)

    def psql(self, sql: str, database: str = "postgres") -> str:
        pg_bin = _pg_bin()
        assert pg_bin is not None
        result = subprocess.run(
            [
                str(pg_bin / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-tAc",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout.strip()

    def create_database(self, name: str) -> None:
        if self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != "1":
            self.psql(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._ctl("stop", "-m", "fast", "-w", "-t", "60", check=False)


def _give_to_postgres(path: Path) -> None:
    if os.geteuid() != 0:
        return
    shutil.chown(path, "postgres", "postgres")
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            shutil.chown(os.path.join(root, name), "postgres", "postgres")
    # The postgres user must be able to reach the folder: open the parents we made ourselves
    # (never system folders) for traversal only.
    for parent in path.parents:
        if parent == Path(parent.anchor) or str(parent) in ("/tmp", "/root", "/home", "/work"):
            break
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def start_postgres(base_dir: Path, port: int | None = None) -> PostgresServer:
    pg_bin = _pg_bin()
    if pg_bin is None:
        raise RuntimeError("PostgreSQL is not installed (run ensure_installed first)")
    server = PostgresServer(port=port or free_port(), dir=(base_dir / "pg").resolve())
    server.dir.mkdir(parents=True, exist_ok=True)
    _give_to_postgres(server.dir)
    if not (server.data / "PG_VERSION").exists():
        subprocess.run(
            _as_postgres(
                [
                    str(pg_bin / "initdb"),
                    "-D",
                    str(server.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ]
            ),
            check=True,
            capture_output=True,
        )
    log = server.dir / "postgres.log"
    options = (
        f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories='' "
        "-c max_connections=200"
    )
    # A postmaster killed with -9 leaves postmaster.pid behind; pg_ctl start sees its process is
    # gone and starts anyway, so a crashed earlier run needs no clean-up here.
    result = server._ctl("start", "-w", "-t", "60", "-l", str(log), "-o", options, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"postgres did not start on port {server.port}:\n{result.stderr.decode()}\n{_tail(log)}"
        )
    server.create_database(DATABASE)
    return server


def _state_file(base_dir: Path) -> Path:
    return base_dir / "services.json"


def _read_state(base_dir: Path) -> dict[str, int]:
    try:
        state: dict[str, int] = json.loads(_state_file(base_dir).read_text())
        return state
    except (OSError, ValueError):
        return {}


def up(base_dir: Path, appendfsync: str = "everysec") -> dict[str, str]:
    """Start (or reuse) both servers; returns their URLs."""
    base_dir = base_dir.resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(base_dir)
    redis = RedisServer(port=state.get("redis_port", 0), dir=base_dir / "redis")
    if not (redis.port and redis.ping()):
        redis.stop()
        redis = start_redis(base_dir, appendfsync=appendfsync)
    postgres = PostgresServer(port=state.get("postgres_port", 0), dir=base_dir / "pg")
    if not (postgres.port and postgres.running()):
        if (postgres.data / "postmaster.pid").exists():
            postgres.stop()
        postgres = start_postgres(base_dir)
    _state_file(base_dir).write_text(
        json.dumps({"redis_port": redis.port, "postgres_port": postgres.port})
    )
    return {"redis_url": redis.url, "postgres_dsn": postgres.dsn}


def down(base_dir: Path) -> None:
    """Stop both servers; a no-op when nothing runs."""
    base_dir = base_dir.resolve()
    state = _read_state(base_dir)
    RedisServer(port=state.get("redis_port", 0), dir=base_dir / "redis").stop()
    PostgresServer(port=state.get("postgres_port", 0), dir=base_dir / "pg").stop()
    _state_file(base_dir).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.localservices",
        description="Start or stop a local Redis and PostgreSQL for flashsale, on loopback, "
        "with their data in --dir.",
    )
    parser.add_argument(
        "action",
        choices=["install", "up", "down", "status", "env"],
        help="install: apt-get what is missing; up: start (idempotent); down: stop; "
        "status: show; "
        "env: print shell exports for FLASHSALE_REDIS_URL/DATABASE_URL",
    )
    parser.add_argument("--dir", default=".flashsale/local", type=Path)
    parser.add_argument(
        "--appendfsync",
        default="everysec",
        choices=APPENDFSYNC_MODES,
        help="Redis AOF fsync policy (default everysec)",
    )
    args = parser.parse_args(argv)
    if args.action == "down":
        down(args.dir)
        print("stopped")
        return 0
    if args.action == "status":
        state = _read_state(args.dir.resolve())
        print(json.dumps(state) if state else "not running")
        return 0
    ensure_installed()
    if args.action == "install":
        print("redis-server and PostgreSQL are installed")
        return 0
    urls = up(args.dir, args.appendfsync)
    if args.action == "env":
        print(f"export FLASHSALE_REDIS_URL={urls['redis_url']}")
        print(f"export FLASHSALE_DATABASE_URL={urls['postgres_dsn']}")
    else:
        print(f"redis    {urls['redis_url']}\npostgres {urls['postgres_dsn']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
