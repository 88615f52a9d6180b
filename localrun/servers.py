"""Real Redis 7 and PostgreSQL 15 on loopback, in a project folder, for the demo, tests and CI.

``up(dir)`` starts both servers on free ports (reusing ones still running from an earlier ``up``),
waits until they answer and records them in ``dir/services.json``; ``down(dir)`` stops them. Both
are idempotent. ``ensure_installed()`` apt-gets Debian's packages when they are missing, and
``ensure_browser()`` Debian's Chromium, for the dashboard's browser test.

PostgreSQL refuses to run as root, so as root its folder belongs to the ``postgres`` user and its
server tools run through ``runuser``. Debian's own cluster on 5432 is never used.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

APPENDFSYNC_MODES = ("always", "everysec", "no")
DATABASE = "flashsale"
DEFAULT_DIR = Path(".flashsale/local")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# Shared folders whose permissions are not ours to loosen even when root owns them.
_SHARED_DIRS = {Path(p) for p in ("/var/tmp", "/var/lib", "/usr/local", "/usr/lib", "/run/user")}


def _cmd(template: str, **values: object) -> list[str]:
    # Values are quoted before splitting, so paths with spaces stay one argument.
    return shlex.split(template.format(**{k: shlex.quote(str(v)) for k, v in values.items()}))


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    # Captured, so `env` output stays eval-able and failures can quote the tool's own words. A
    # shell's PGHOST, PGSSLMODE, PGDATA... must not steer our tools toward some other server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    # From "/": the postgres user may not be allowed into the caller's working directory.
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@functools.cache
def _pg_bin() -> Path | None:
    """The bin folder of the newest PostgreSQL that has initdb and pg_ctl."""
    found: dict[Path, tuple[int, ...]] = {}
    for ctl in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"):
        found[ctl.parent] = tuple(int(n) for n in re.findall(r"\d+", ctl.parent.parent.name))
    on_path = shutil.which("pg_ctl")
    if on_path and (folder := Path(on_path).resolve().parent) not in found:
        found[folder] = tuple(int(n) for n in re.findall(r"\d+", _run([on_path, "-V"]).stdout)[:2])
    usable = [folder for folder in found if (folder / "initdb").exists()]
    return max(usable, key=found.__getitem__, default=None)


def _missing() -> list[str]:
    missing = [] if shutil.which("redis-server") else ["redis-server"]
    return missing + ([] if _pg_bin() else ["PostgreSQL initdb/pg_ctl"])


def _apt_install(missing: str, packages: list[str]) -> None:
    """apt-get install ``packages``, through sudo unless root; ``missing`` names what is."""
    if os.geteuid() != 0 and not shutil.which("sudo"):
        raise RuntimeError(f"{missing} missing, and no root or sudo to install them")
    # `env` inside sudo because sudo drops the caller's environment; the lock timeout queues us
    # behind an apt that is already running instead of failing; stdout=2 keeps `env` eval-able.
    apt = _cmd("env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600")
    apt = apt if os.geteuid() == 0 else ["sudo", *apt]
    try:
        subprocess.run([*apt, "update"], check=True, stdout=2)
        subprocess.run([*apt, "install", "-y", *packages], check=True, stdout=2)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"apt-get failed ({exc}); install {' and '.join(packages)}") from exc


def ensure_installed() -> None:
    """apt-get install redis-server and postgresql when either is missing."""
    if not _missing():
        return
    _apt_install(", ".join(_missing()), ["redis-server", "postgresql"])
    _pg_bin.cache_clear()
    if missing := _missing():
        raise RuntimeError(f"still missing after apt-get install: {', '.join(missing)}")


# The dashboard's browser test drives Debian's Chromium (playwright's own browser download needs
# the internet); only the test setup asks for it, so the demo and `up` never pull a browser in.
BROWSERS = ("chromium", "chromium-browser")


def browser_path() -> str | None:
    """The system Chromium's executable, if one is installed."""
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def ensure_browser() -> None:
    """apt-get install chromium when no system Chromium is installed."""
    if browser_path():
        return
    _apt_install("chromium", ["chromium"])
    if not browser_path():
        raise RuntimeError("still no chromium after apt-get install chromium")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _alive(pid: int, program: str) -> bool:
    # By name, not kill(pid, 0): after a crash or reboot a stale pid file may name someone else.
    # And not a zombie: a killed daemon lingers as one until (a possibly lax) init reaps it.
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = stat_line.partition("(")[2].rpartition(")")
    return name == program and rest.split()[0] not in ("Z", "X")


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


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

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def recorded_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pidfile.read_text())
        return None  # also while redis has created the file but not yet written it

    def pid(self) -> int | None:
        pid = self.recorded_pid()
        return pid if pid is not None and _alive(pid, "redis-server") else None

    def call(self, *args: str) -> bytes:
        """One command over RESP; returns the start of the raw reply (no client library needed)."""
        request = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(arg.encode()), arg.encode()) for arg in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(request)
            return sock.recv(4096)

    def running(self) -> bool:
        with contextlib.suppress(OSError):
            return self.pid() is not None and self.call("PING").startswith(b"+PONG")
        return False

    def stop(self) -> None:
        if (pid := self.pid()) is not None:
            # NOSAVE skips an RDB dump; Redis still flushes and fsyncs the AOF on the way out, as
            # it does on SIGTERM, the fallback when the port is unknown.
            try:
                self.call("SHUTDOWN", "NOSAVE")
            except OSError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            if not _wait(lambda: not _alive(pid, "redis-server"), 20):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait(lambda: not _alive(pid, "redis-server"), 5)
        self.pidfile.unlink(missing_ok=True)


def start_redis(
    base_dir: Path, port: int | None = None, appendfsync: str = "everysec"
) -> RedisServer:
    if appendfsync not in APPENDFSYNC_MODES:
        raise ValueError(f"appendfsync must be one of {APPENDFSYNC_MODES}, not {appendfsync!r}")
    server = RedisServer(port or free_port(), base_dir.resolve() / "redis")
    server.dir.mkdir(parents=True, exist_ok=True)
    # Two servers appending to one AOF would corrupt it.
    if (pid := server.pid()) is not None:
        raise RuntimeError(f"redis-server pid {pid} already uses {server.dir}; stop it first")
    server.pidfile.unlink(missing_ok=True)
    started = _run(
        _cmd(
            "redis-server --bind 127.0.0.1 --port {port} --protected-mode no --dir {dir} "
            "--appendonly yes --appendfsync {fsync} --save '' --daemonize yes "
            "--pidfile {pidfile} --logfile {log}",
            port=server.port,
            dir=server.dir,
            fsync=appendfsync,
            pidfile=server.pidfile,
            log=server.log,
        )
    )

    def died() -> bool:  # daemonized, so a bad start shows only as a pid file without a process
        pid = server.recorded_pid()
        return pid is not None and not _alive(pid, "redis-server")

    if started.returncode != 0 or not _wait(lambda: server.running() or died(), 20) or died():
        raise RuntimeError(
            f"redis-server did not answer on 127.0.0.1:{server.port} within 20 s. "
            f"{started.stderr.strip()}\n{server.log}:\n{_tail(server.log)}"
        )
    return server


@dataclass
class PostgresServer:
    port: int
    dir: Path

    @property
    def dsn(self) -> str:
        return self.dsn_for(DATABASE)

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def log(self) -> Path:
        return self.dir / "postgres.log"

    def postmaster(self) -> tuple[int, int] | None:
        """(pid, port) of a live postmaster on this data directory, from its postmaster.pid."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            lines = (self.data / "postmaster.pid").read_text().splitlines()
            if _alive(int(lines[0]), "postgres"):
                return int(lines[0]), int(lines[3])
        return None

    def running(self) -> bool:
        return self.postmaster() is not None and _connectable(self.port)

    def psql(self, sql: str, database: str = "postgres") -> str:
        # Debian's /usr/bin/psql wrapper guesses a cluster; the versioned binary just connects.
        folder = _pg_bin()
        psql = folder / "psql" if folder and (folder / "psql").exists() else "psql"
        args = "-X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p {port} -U postgres -d {db} -tAc"
        result = _run([*_cmd("{psql} " + args, psql=psql, port=self.port, db=database), sql])
        if result.returncode != 0:
            raise RuntimeError(f"psql on port {self.port} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def create_database(self, name: str) -> str:
        """Create database name unless it exists; returns its DSN."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a plain database name: {name!r}")
        exists = f"SELECT 1 FROM pg_database WHERE datname = '{name}'"
        if self.psql(exists) != "1":
            try:
                self.psql(f'CREATE DATABASE "{name}"')
            except RuntimeError:
                if self.psql(exists) != "1":  # else a concurrent caller created it first
                    raise
        return self.dsn_for(name)

    def stop(self) -> None:
        if self.postmaster() is None:
            return  # a stale postmaster.pid is left for start_postgres to discard
        stop = _cmd("{ctl} -D {data} stop -m fast -w -t 60", ctl=_bin("pg_ctl"), data=self.data)
        result = _run(_as_postgres(stop))
        if result.returncode != 0 and self.postmaster() is not None:
            raise RuntimeError(f"pg_ctl stop failed: {result.stderr.strip()}")


def _bin(tool: str) -> Path:
    folder = _pg_bin()
    if folder is None:
        raise RuntimeError("PostgreSQL is not installed; call ensure_installed() first")
    return folder / tool


def create_database(dsn: str, name: str) -> str:
    """Create database name on the server of dsn (as up() returns it); returns the new DSN."""
    port = urlsplit(dsn).port
    if port is None:
        raise ValueError(f"no port in {dsn!r}")
    return PostgresServer(port, Path()).create_database(name)


def _give_to_postgres(folder: Path) -> None:
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("as root, PostgreSQL needs the postgres user") from None
    for root, dirs, files in os.walk(folder):
        for name in [".", *dirs, *files]:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid, follow_symlinks=False)
    # postgres must traverse every parent. Only folders root owns below the top level (a project
    # checkout) are opened, for traversal only; /, /tmp, /root and shared folders keep their modes.
    for parent in folder.parents:
        info = parent.stat()
        ours = info.st_uid == os.geteuid() and len(parent.parts) > 2 and parent not in _SHARED_DIRS
        if ours and not info.st_mode & stat.S_IXOTH:
            parent.chmod(info.st_mode | stat.S_IXOTH)
    if _run(_as_postgres(["test", "-x", str(folder)])).returncode != 0:
        raise RuntimeError(f"user postgres cannot reach {folder}; use a --dir it can traverse")


def start_postgres(base_dir: Path, port: int | None = None) -> PostgresServer:
    server = PostgresServer(port or free_port(), base_dir.resolve() / "pg")
    if (live := server.postmaster()) is not None:
        raise RuntimeError(f"postgres pid {live[0]} already uses {server.data}; stop it first")
    server.dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        _give_to_postgres(server.dir)
    if not (server.data / "PG_VERSION").exists():
        initdb = _cmd(
            "{initdb} -D {data} -U postgres --auth=trust -E UTF8 --locale=C.UTF-8",
            initdb=_bin("initdb"),
            data=server.data,
        )
        if (result := _run(_as_postgres(initdb))).returncode != 0:
            raise RuntimeError(f"initdb {server.data} failed:\n{result.stderr.strip()}")
    # pg_ctl discards the postmaster.pid of a killed run itself, unless its pid is still a zombie
    # (an init that reaps lazily); postmaster() above has ruled out a live server, so drop it.
    (server.data / "postmaster.pid").unlink(missing_ok=True)
    # The dead postmaster's orphaned children may hold its shared memory a moment longer, and a free
    # port may be taken before the server binds it: retry while the log says "in use".
    deadline = time.monotonic() + 30
    while True:
        options = "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' "
        options += "-c fsync=on -c max_connections=200"
        start = _cmd(
            "{ctl} -D {data} -l {log} -w -t 60 -o {options} start",
            ctl=_bin("pg_ctl"),
            data=server.data,
            log=server.log,
            options=options.format(port=server.port),
        )
        if (result := _run(_as_postgres(start))).returncode == 0:
            break
        log = _tail(server.log)
        if "in use" not in log or time.monotonic() > deadline:
            raise RuntimeError(f"postgres failed on port {server.port}: {result.stderr}\n{log}")
        if port is None and "Address already in use" in log:
            server.port = free_port()
        time.sleep(0.5)
    if not _wait(lambda: _connectable(server.port), 30):
        raise RuntimeError(f"postgres started but 127.0.0.1:{server.port} refuses connections")
    server.psql("SELECT 1")
    server.create_database(DATABASE)
    return server


@contextlib.contextmanager
def _locked(base_dir: Path) -> Iterator[None]:
    # Two `up`s on one folder at once (parallel test runs) would start two servers on one AOF.
    with open(base_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _state(base_dir: Path) -> tuple[int, int]:
    """Recorded (redis port, postgres port); 0 when unknown."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
        state: dict[str, Any] = json.loads((base_dir / "services.json").read_text())
        # Also reads the flat {"redis_port": ...} shape, which older checkouts may have left.
        names = ("redis", "postgres")
        ports = [state[n]["port"] if n in state else state[f"{n}_port"] for n in names]
        return int(ports[0]), int(ports[1])
    return 0, 0


def _reusable(port: int) -> int | None:
    """port if it is free: restarting on it keeps URLs that shells already exported valid."""
    with socket.socket() as sock:
        # As the servers do, so a port left in TIME_WAIT by our last run still counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port or None
    return None


def up(base_dir: Path, appendfsync: str = "everysec") -> dict[str, str]:
    """Start both servers, or reuse the ones still running; returns redis_url and postgres_dsn."""
    if appendfsync not in APPENDFSYNC_MODES:
        raise ValueError(f"appendfsync must be one of {APPENDFSYNC_MODES}, not {appendfsync!r}")
    base_dir = base_dir.resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    with _locked(base_dir):
        redis_port, pg_port = _state(base_dir)
        redis = RedisServer(redis_port, base_dir / "redis")
        if redis.running():
            redis.call("CONFIG", "SET", "appendfsync", appendfsync)
        else:
            redis.stop()  # one alive on a port we no longer know, or just a stale pid file
            redis = start_redis(base_dir, _reusable(redis_port), appendfsync)
        postgres = PostgresServer(pg_port, base_dir / "pg")
        if (live := postgres.postmaster()) and _connectable(live[1]):
            postgres.port = live[1]  # postmaster.pid knows the port even if services.json is lost
            postgres.create_database(DATABASE)
        else:
            postgres.stop()
            postgres = start_postgres(base_dir, _reusable(pg_port))
        urls = {"redis_url": redis.url, "postgres_dsn": postgres.dsn}
        live = postgres.postmaster()
        record = {
            "redis": {"port": redis.port, "pid": redis.pid(), "appendfsync": appendfsync},
            "postgres": {"port": postgres.port, "pid": live[0] if live else None},
            **urls,
        }
        # Write-then-rename, so a reader never sees half a file.
        partial = base_dir / "services.json.tmp"
        partial.write_text(json.dumps(record, indent=2) + "\n")
        partial.replace(base_dir / "services.json")
        return urls


def down(base_dir: Path) -> None:
    """Stop both servers; a no-op when nothing runs."""
    base_dir = base_dir.resolve()
    if not base_dir.is_dir():
        return
    with _locked(base_dir):
        redis_port, pg_port = _state(base_dir)
        RedisServer(redis_port, base_dir / "redis").stop()
        PostgresServer(pg_port, base_dir / "pg").stop()
        (base_dir / "services.json").unlink(missing_ok=True)


def status(base_dir: Path) -> dict[str, str | None]:
    """redis_url and postgres_dsn of the servers running for base_dir; None for a stopped one."""
    base_dir = base_dir.resolve()
    redis_port, pg_port = _state(base_dir)
    redis = RedisServer(redis_port, base_dir / "redis")
    postgres = PostgresServer(pg_port, base_dir / "pg")
    if live := postgres.postmaster():
        postgres.port = live[1]
    return {
        "redis_url": redis.url if redis.running() else None,
        "postgres_dsn": postgres.dsn if postgres.running() else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localrun.servers",
        description="Run flashsale's own Redis and PostgreSQL on 127.0.0.1 (free ports), with "
        "their data, logs and services.json in --dir.",
        epilog='typical: python -m localrun.servers up; eval "$(python -m '
        'localrun.servers env)"; ...; python -m localrun.servers down',
    )
    parser.add_argument(
        "action",
        choices=["install", "up", "down", "status", "env"],
        help="install: apt-get redis-server/postgresql/chromium if missing; up: start (or reuse) "
        "both and "
        "print their URLs; down: stop both; status: show them, exit 1 unless both run; "
        "env: like up, but print FLASHSALE_REDIS_URL/FLASHSALE_DATABASE_URL export lines",
    )
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="default: %(default)s")
    parser.add_argument(
        "--appendfsync",
        default="everysec",
        choices=APPENDFSYNC_MODES,
        help="Redis AOF fsync policy, also applied to an already running server (default: "
        "%(default)s)",
    )
    args = parser.parse_args(argv)
    if args.action == "down":
        down(args.dir)
        print("stopped")
        return 0
    if args.action == "status":
        current = status(args.dir)
        print(f"redis     {current['redis_url'] or 'stopped'}")
        print(f"postgres  {current['postgres_dsn'] or 'stopped'}")
        return 0 if all(current.values()) else 1
    ensure_installed()
    if args.action == "install":
        # `install` is the test setup's step (make test, .ci/run): the tests need a browser too.
        ensure_browser()
        print("redis-server, PostgreSQL and Chromium are installed")
        return 0
    urls = up(args.dir, args.appendfsync)
    if args.action == "env":
        print(f"export FLASHSALE_REDIS_URL={shlex.quote(urls['redis_url'])}")
        print(f"export FLASHSALE_DATABASE_URL={shlex.quote(urls['postgres_dsn'])}")
    else:
        print(f"redis     {urls['redis_url']}\npostgres  {urls['postgres_dsn']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
