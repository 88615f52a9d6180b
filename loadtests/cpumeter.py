"""CPU time of the bench's processes, from ``/proc``: where each phase's time went.

On a 2-core machine every process of the engine (uvicorn, Redis, the drain worker, Postgres)
competes with the others and with the load generator, so a phase's throughput alone does not
say what to make cheaper. Read before and after each wrk slice, these give CPU microseconds
per request in each process, and how many cores the machine had busy (including neighbours
outside the bench, which ``/proc/stat`` counts too).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["MACHINE", "CpuMeter", "children_of", "postmaster_and_backends", "processes_s"]

_TICK = os.sysconf("SC_CLK_TCK")
LOAD_GENERATOR = "wrk"
MACHINE = "machine (all processes)"


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return text.rsplit(")", 1)[1].split()


def _cpu_s(pid: int) -> float:
    fields = _stat(pid)
    # utime and stime, fields 14 and 15 of proc(5), are 11 and 12 after the name.
    return (int(fields[11]) + int(fields[12])) / _TICK if fields else 0.0


def _with_reaped_s(pid: int) -> float:
    """``pid``'s CPU plus that of its children it has waited for (cutime, cstime): a Postgres
    backend that exits mid-phase moves its CPU into its postmaster's, so the sum holds."""
    fields = _stat(pid)
    return sum(int(f) for f in fields[11:15]) / _TICK if fields else 0.0


def children_of(parent: int) -> list[int]:
    """Live processes whose parent is ``parent`` (Postgres's backends of its postmaster)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[1] == str(parent):
            found.append(int(entry.name))
    return found


def _machine_busy_s() -> float:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user, nice, system, irq, softirq: not idle, iowait, or steal (time the hypervisor gave
    # to other guests).
    return (values[0] + values[1] + values[2] + values[5] + values[6]) / _TICK


def processes_s(pids: list[int]) -> float:
    """CPU seconds of these live processes."""
    return sum(_cpu_s(pid) for pid in pids)


def postmaster_and_backends(postmaster: int) -> float:
    """CPU seconds of a Postgres server: its postmaster, live backends and exited ones."""
    return _with_reaped_s(postmaster) + sum(_cpu_s(pid) for pid in children_of(postmaster))


class CpuMeter:
    """CPU seconds used so far by named groups of processes (each group a function that reads
    its own), plus this process's reaped children (the wrk runs) and the whole machine."""

    def __init__(self, groups: dict[str, Callable[[], float]]) -> None:
        self.groups = groups

    def read(self) -> dict[str, float]:
        used = {name: seconds() for name, seconds in self.groups.items()}
        mine = os.times()
        used[LOAD_GENERATOR] = mine.children_user + mine.children_system
        used[MACHINE] = _machine_busy_s()
        return used

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        # A process that exited in between reads as 0 after: never count negative time.
        return {name: max(0.0, after[name] - before.get(name, 0.0)) for name in after}
