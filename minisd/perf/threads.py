"""How many CPU threads a short job should use: the cores that nobody else is using right now.

torch's default (one thread per core) is catastrophic on a busy machine: its ops split work across all
threads and wait at a join, so one core taken by another process stalls every op (2-core VM under load:
20 training steps took 24 s with 1 thread, 562 s with 2). One thread is never catastrophic but leaves an
idle machine's second core unused. `sample.py` takes the middle road: it measures how busy the machine
is while it imports torch and loads the model (a window it spends anyway, about 1.5 s), and uses

    threads = clamp(floor(cores - busy_elsewhere + 1/4), 1, cores)

where `busy_elsewhere` = (CPU seconds the whole machine ran in the window - CPU seconds this process ran)
/ window wall seconds, from the kernel's counters in /proc/stat: a core counts as free when others used
at most a quarter of it. Without /proc/stat (not Linux) the answer is 1. Training keeps a fixed default of 1: it runs for minutes, and the load can change under it.

The thread count can change the last bit of a pixel (a sum split two ways rounds differently), so the
PNG records the count it used (`Threads: N`).
"""
from __future__ import annotations

import math
import os
import time


def cores() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs have spent not idle since boot (/proc/stat `cpu` line), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    try:
        # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
        ticks = [int(v) for v in fields[1:9]]
    except ValueError:
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]                       # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


class LoadWindow:
    """Start a measurement window now; `threads()` ends it and returns the thread count to use."""

    def __init__(self):
        self.machine = _machine_busy_seconds()
        self.own = _own_seconds()
        self.wall = time.monotonic()

    def busy_elsewhere(self) -> float | None:
        """Cores kept busy by other processes during the window, or None if it cannot be told."""
        machine = _machine_busy_seconds()
        wall = time.monotonic() - self.wall
        if machine is None or self.machine is None or wall < 0.2:    # too short: tick granularity 10 ms
            return None
        return max(0.0, (machine - self.machine) - (_own_seconds() - self.own)) / wall

    def threads(self) -> int:
        other = self.busy_elsewhere()
        if other is None:
            return 1
        return max(1, min(cores(), math.floor(cores() - other + 0.25)))


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system
