"""Interleaved timing: every case runs once per repeat, in alternating order, in one process.

On a shared machine the speed drifts by tens of percent over a minute; timing A for a minute and then
B for a minute measures the drift. Here repeat r runs A, B, C, ... and repeat r + 1 runs them in
reverse (ABBA), and a ratio is taken per repeat between neighbours in time, then summarised by the
median over repeats (robust to a repeat hit by a burst of load) with the min–max spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds per case and repeat: wall clock, and this process's CPU time (the CPU-side cross-check:
    with one thread it is what the work costs, whatever else the machine runs)."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def ratio(self, num: str, den: str) -> dict[str, dict[str, float | int]]:
        """Per-repeat ratios num / den: {"wall": summary, "cpu": summary}."""
        return {"wall": ratio(self.wall[num], self.wall[den]), "cpu": ratio(self.cpu[num], self.cpu[den])}


def interleaved(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    setup: dict[str, Callable[[], object]] | None = None,
) -> Timings:
    """Time each case once per repeat, in ABBA order.

    `setup[name]`, if given, runs untimed just before each timed call of that case. The caller runs
    any warm-up before; every call of a case here is timed.
    """
    names = list(cases)
    setup = setup or {}
    out = Timings({n: [] for n in names}, {n: [] for n in names})
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            if name in setup:
                setup[name]()
            synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            cases[name]()
            synchronize(device)
            out.wall[name].append(time.perf_counter() - t0)
            out.cpu[name].append(time.process_time() - c0)
    return out


def summarize(values: list[float]) -> dict[str, float | int]:
    """Median, min, max and number of values (the spread is min–max: with 3–9 repeats, quantiles say little)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(num: list[float], den: list[float]) -> dict[str, float | int]:
    """Per-repeat ratios num[r] / den[r], summarised (ours / baseline: 1.02 means 2% slower)."""
    return summarize([a / b for a, b in zip(num, den)])
