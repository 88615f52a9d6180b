"""Drive HTTP load with Debian's ``wrk`` and its Lua script ``loadtests/wrk_orders.lua``.

wrk is C with one event loop per thread: on a 2-core machine it leaves the server most of the
CPU, where a Python client (locust, aiohttp) saturates before the server does. A phase runs as
back-to-back wrk runs of ``slice_s`` seconds each, so the report can plot throughput and latency
over time; each run reports its latency quantile function, and the phase's percentiles come
from merging those (weighted by requests), accurate to the grid (0.1 percentile near p99).
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = ["Phase", "Slice", "ensure_wrk", "run_phase", "run_slice", "wrk_script"]

_MARK = "WRK_RESULT "


def ensure_wrk() -> str:
    """The path of ``wrk``, apt-getting Debian's package when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise RuntimeError("wrk is missing and there is no root or sudo to apt-get it")
        apt = ["sudo", *apt]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*apt, "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        [*apt, "install", "-y", "-qq", "wrk"], check=True, env=env, stdout=subprocess.DEVNULL
    )
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("apt-get install wrk did not put wrk on PATH")
    return found


def wrk_script() -> Path:
    return Path(__file__).resolve().with_name("wrk_orders.lua")


@dataclass
class Slice:
    """One wrk run: its place in the phase (seconds from the phase's start) and its figures."""

    started_s: float
    requests: int
    duration_s: float
    non2xx: int
    socket_errors: int
    max_us: int
    quantiles_us: list[tuple[float, int]]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, p: float) -> float:
        for point, value in self.quantiles_us:
            if point >= p:
                return value / 1000
        return self.max_us / 1000


@dataclass
class Phase:
    name: str
    url: str
    connections: int
    threads: int
    slices: list[Slice] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds by process, all slices

    def add_cpu(self, spent: dict[str, float]) -> None:
        for name, seconds in spent.items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + seconds

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.slices)

    @property
    def duration_s(self) -> float:
        return sum(s.duration_s for s in self.slices)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, p: float) -> float:
        """Merged across slices: each grid point stands for its share of that slice's requests."""
        samples: list[tuple[int, float]] = []
        for s in self.slices:
            previous = 0.0
            for point, value in s.quantiles_us:
                samples.append((value, (point - previous) / 100 * s.requests))
                previous = point
        if not samples:
            return math.nan
        samples.sort()
        wanted = sum(w for _, w in samples) * p / 100
        seen = 0.0
        for value, weight in samples:
            seen += weight
            if seen >= wanted - 1e-9:
                return value / 1000
        return samples[-1][0] / 1000

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "duration_s": round(self.duration_s, 3),
            "throughput_rps": round(self.rps, 1),
            "latency_ms": {
                "p50": round(self.percentile_ms(50), 3),
                "p95": round(self.percentile_ms(95), 3),
                "p99": round(self.percentile_ms(99), 3),
                "max": round(max((s.max_us for s in self.slices), default=0) / 1000, 3),
            },
            "non_2xx": sum(s.non2xx for s in self.slices),
            "socket_errors": sum(s.socket_errors for s in self.slices),
            "connections": self.connections,
            "wrk_threads": self.threads,
            "cpu": {
                "us_per_request": {
                    name: round(1e6 * seconds / self.requests, 1) if self.requests else None
                    for name, seconds in self.cpu_s.items()
                },
                "cores": {
                    name: round(seconds / self.duration_s, 2) if self.duration_s else None
                    for name, seconds in self.cpu_s.items()
                },
            },
            "slices": [
                {
                    **asdict(s),
                    "quantiles_us": None,
                    "rps": round(s.rps, 1),
                    "p50_ms": s.percentile_ms(50),
                    "p99_ms": s.percentile_ms(99),
                }
                for s in self.slices
            ],
        }


def _run_wrk(
    url: str, path: str, tokens: Path, connections: int, threads: int, seconds: int, timeout_s: int
) -> dict[str, Any]:
    nonce = secrets.token_hex(4)
    cmd = [
        ensure_wrk(),
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--timeout",
        f"{timeout_s}s",
        "-s",
        str(wrk_script()),
        url.rstrip("/") + path,
        "--",
        str(tokens),
        path,
        nonce,
        str(threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            result: dict[str, Any] = orjson.loads(line[len(_MARK) :])
            return result
    raise RuntimeError(f"wrk printed no result (exit {done.returncode}): {done.stderr[-2000:]}")


def run_slice(phase: Phase, path: str, tokens: Path, seconds: int, timeout_s: int = 10) -> Slice:
    """One more wrk run of ``seconds`` for ``phase``; appended to it and returned."""
    raw = _run_wrk(phase.url, path, tokens, phase.connections, phase.threads, seconds, timeout_s)
    slice_ = Slice(
        started_s=round(phase.duration_s, 3),
        requests=raw["requests"],
        duration_s=raw["duration_us"] / 1e6,
        non2xx=raw["non2xx"],
        socket_errors=raw["connect_errors"]
        + raw["read_errors"]
        + raw["write_errors"]
        + raw["timeouts"],
        max_us=raw["max_us"],
        quantiles_us=[(float(p), int(v)) for p, v in raw["quantiles_us"]],
    )
    phase.slices.append(slice_)
    return slice_


def run_phase(
    name: str,
    url: str,
    path: str,
    tokens: Path,
    *,
    connections: int,
    threads: int,
    duration_s: int,
    slice_s: int = 1,
) -> Phase:
    """``duration_s`` of load on POST ``url + path``, as wrk runs of ``slice_s`` seconds."""
    phase = Phase(name=name, url=url, connections=connections, threads=threads)
    for _ in range(max(1, math.ceil(duration_s / slice_s))):
        run_slice(phase, path, tokens, slice_s)
    return phase
