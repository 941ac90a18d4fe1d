"""Simulation benchmark: the default 1,000-cell tree for 10 virtual minutes under faults.

Each run is `zcells sim` in a process of its own (so its peak RSS is its
own), with every fault kind at its default rate and four clients. Printed
for a 100-cell tree first, for comparison, then for the 1,000-cell one:

* wall time, and virtual seconds simulated per wall second;
* messages delivered between cells per wall second;
* peak RSS.

Baseline, measured in the same run: how many timer callbacks a second the
bare virtual-time loop runs, each scheduling the next (no cell code): the
most events a second any simulation on this loop could reach. Each run's
messages per wall second are printed as a ratio to it.

Target: the 1,000-cell, 10-virtual-minute run with faults finishes within
10 minutes of wall time (on 2 cores; the simulation uses one). The last
line is JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Report
from zcells.sim.loop import VirtualTimeLoop

SEED = int(os.environ.get("SIM_SEED", "1"))
DURATION_S = 600.0
TARGET_WALL_S = 600.0


def bare_loop_events_per_s(events: int = 200_000) -> float:
    """Timer callbacks a second on the virtual loop alone, each setting the next."""
    loop = VirtualTimeLoop()
    done = loop.create_future()
    left = [events]

    def tick() -> None:
        left[0] -= 1
        if left[0] == 0:
            done.set_result(None)
        else:
            loop.call_later(0.001, tick)

    try:
        started = time.perf_counter()
        loop.call_later(0.001, tick)
        loop.run_until_complete(done)
        return events / (time.perf_counter() - started)
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def simulate(cells: int) -> dict[str, Any]:
    args = ["--cells", str(cells), "--fanout", "10", "--seed", str(SEED)]
    args += ["--duration", f"{DURATION_S:g}", "--faults", "all"]
    done = subprocess.run(
        [sys.executable, "-m", "zcells.cli.app", "sim", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode not in (0, 1):
        raise SystemExit(f"zcells sim failed:\n{done.stderr}")
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def main() -> None:
    report = Report("sim")
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    bare = bare_loop_events_per_s()
    report.figure("bare virtual loop", bare, "events/s")
    for cells in (100, 1000):
        summary = simulate(cells)
        key = f"{cells} cells"
        report.figure(f"{key}: wall time", summary["wall_s"], "s")
        report.figure(f"{key}: virtual per wall", summary["virtual_per_wall"], "x")
        report.figure(
            f"{key}: messages per wall second", summary["messages_per_wall_s"], "msg/s", bare
        )
        report.figure(f"{key}: peak RSS", summary["peak_rss_mb"], "MB")
        report.figure(f"{key}: violations", summary["violations"], "")
        print(f"{key}: faults {summary['faults']}, trace {summary['trace_hash']}", flush=True)
        if cells == 1000:
            report.check(
                "1,000 cells x 10 virtual minutes within 10 wall minutes",
                summary["wall_s"] <= TARGET_WALL_S,
            )
    report.finish()


if __name__ == "__main__":
    main()
