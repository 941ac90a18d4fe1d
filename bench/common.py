"""What every benchmark shares: medians, percentiles, polling, figures with baselines, JSON."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def poll_until(
    done: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02
) -> float:
    """Call `done` every `interval_s` until it is true; when that was (perf_counter).

    Raises `SystemExit` naming `what` after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)
    return time.perf_counter()


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process has used so far; Linux only."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_us(samples_s: list[float]) -> dict[str, float]:
    us = [s * 1e6 for s in samples_s]
    return {
        "p50_us": round(percentile(us, 50), 1),
        "p99_us": round(percentile(us, 99), 1),
        "mean_us": round(statistics.fmean(us), 1),
    }


class Report:
    """Collects figures, prints each as it comes, and ends with one JSON line."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.figures: dict[str, Any] = {}

    def figure(
        self,
        key: str,
        value: float,
        unit: str,
        baseline: float | None = None,
        higher_is_better: bool = False,
    ) -> None:
        self.figures[key] = value
        line = f"{key:<40} {value:>12,.{1 if abs(value) >= 10 else 3}f} {unit}"
        if baseline:
            ratio = value / baseline
            self.figures[f"{key}_ratio"] = round(ratio, 3)
            line += f"   ({ratio:.2f}x baseline)"
        print(line, flush=True)

    def check(self, label: str, ok: bool) -> None:
        self.figures.setdefault("targets", {})[label] = ok
        print(f"target {label}: {'met' if ok else 'NOT met'}", flush=True)

    def finish(self) -> None:
        print(json.dumps({"benchmark": self.name, **self.figures}, sort_keys=True), flush=True)
