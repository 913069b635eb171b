"""How much CPU the host took from this machine while a benchmark ran.

On a shared virtual machine the hypervisor can hand this guest's cores to other guests ("steal",
the eighth field of /proc/stat's cpu line). A throughput figure measured while the host stole 30%
of the CPU says little about the code, so the benchmarks record the steal of every timed window next
to its result. Linux only; elsewhere the share is NaN.
"""
from __future__ import annotations

import math


def cpu_ticks() -> tuple[int, ...] | None:
    """The aggregate cpu line of /proc/stat: user, nice, system, idle, iowait, irq, softirq, steal."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    return tuple(int(v) for v in fields[1:9])


def steal_percent(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> float:
    """Percentage of all CPU time between two ``cpu_ticks()`` readings that the host stole."""
    if before is None or after is None:
        return math.nan
    total = sum(after) - sum(before)
    return 100.0 * (after[7] - before[7]) / total if total > 0 else math.nan


def format_steal(value: float | None) -> str:
    """A steal share for a report: one decimal, or n/a (no /proc/stat, or results from before it)."""
    return "n/a" if value is None or value != value else f"{value:.1f}"
