"""Cell scheduler benchmark: one decision, builds through it, and how builds spread.

1. One placement decision over 10, 100 and 1,000 candidate children, each
   with an announced capacity, through a cell's `CellScheduling.decide` with
   the default filters and weighers, up to the first candidate to try, a
   build of a fresh flavor object each time as `Placer` makes them (µs per
   decision). Baseline in the same run: the random order this scheduler
   replaced (a seeded shuffle of the children's names).
2. `bench-builds` twice in the same run, on the same tree: once through the
   default cell scheduler, once with no filters and no weighers (an even
   random draw, as the random scheduler did); the ratio of builds per
   second.
3. 10,000 simulated builds over three children of capacities 1:2:4: each
   decision comes off the parent's view at once, as it does between
   announcements, and every 100 builds the children announce what they
   really have left. How far each child's share of the builds is from its
   share of the capacity, in percentage points.

Targets: a decision over 1,000 children under 1 ms; builds per second within
10% of the random scheduler's; every share within 5 points. The last line is
JSON.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.builds import build_tree, run_builds
from bench.common import Report, median
from zcells.capacity import Announcement, Capacity, Version
from zcells.cellfilters import BuildSpec, CellCandidate, schedule
from zcells.clock import SYSTEM_CLOCK
from zcells.liveness import Liveness
from zcells.peer import Peer, Role
from zcells.records import Flavor
from zcells.routing import View
from zcells.scheduling import CellScheduling, SchedulerSettings

TINY = Flavor("m1.tiny", 512, 1, 1)
SMALL = Flavor("m1.small", 2048, 20, 1)
SIZES = (10, 100, 1000)
SPREAD_BUILDS = int(os.environ.get("BENCH_SPREAD_BUILDS", "10000"))
SHARES = {"c1": 1, "c2": 2, "c4": 4}


def units(count: int) -> Capacity:
    return Capacity(
        ram_free_mb=512 * count,
        disk_free_gb=20 * count,
        vcpus_free=count,
        ram_units={512: count, 2048: count // 4},
        disk_units={1: 20 * count, 20: count},
        vcpu_units={1: count},
    )


def children(count: int, rng: random.Random) -> list[CellCandidate]:
    return [
        CellCandidate(
            name=f"c{i:04d}",
            path=f"api!c{i:04d}",
            capacity=units(rng.randrange(0, 500)),
            weight_offset=0.0,
        )
        for i in range(count)
    ]


class Cell:
    """What `CellScheduling` reads of its cell: an API cell with `count` live children."""

    def __init__(self, count: int) -> None:
        self.clock = SYSTEM_CLOCK
        self.view = View("api", children=frozenset(f"c{i:04d}" for i in range(count)))
        self.cell_type = "api"
        self.disabled: frozenset[str] = frozenset()
        self.weights: dict[str, tuple[float, float]] = {}
        self.problems: dict[str, str] = {}
        self._alive = {Peer(Role.CHILD, name): Liveness.ALIVE for name in self.view.children}

    def liveness(self) -> dict[Peer, Liveness]:
        return self._alive


def scheduling_of(count: int, rng: random.Random) -> CellScheduling:
    """A cell's scheduling state after each of its `count` children announced."""
    cell = Cell(count)
    scheduling = CellScheduling(cell, SchedulerSettings(), random.Random(3))  # type: ignore[arg-type]
    for child in children(count, rng):
        assert child.capacity is not None
        scheduling.take(child.name, Announcement(Version(1, 1), child.capacity))
    return scheduling


def time_per_call(call: object, repeat: int) -> float:
    """The median over five runs of `repeat` calls, in µs per call."""
    assert callable(call)
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            call()
        runs.append((time.perf_counter() - started) / repeat * 1e6)
    return median(runs)


def decisions(report: Report) -> float:
    rng = random.Random(1)
    worst = 0.0
    for size in SIZES:
        scheduling = scheduling_of(size, rng)
        names = sorted(scheduling.node.view.children)
        repeat = max(20, 20_000 // size)

        def shuffled(names: list[str] = names) -> None:
            order = sorted(names)
            rng.shuffle(order)

        def decided(scheduling: CellScheduling = scheduling) -> None:
            flavor = Flavor(TINY.name, TINY.memory_mb, TINY.disk_gb, TINY.vcpus)
            first = scheduling.decide(BuildSpec(flavor), "api", has_hosts=False).first
            assert first is not None

        baseline = time_per_call(shuffled, repeat)
        us = time_per_call(decided, repeat)
        report.figure(f"random_order_{size}_us", baseline, "µs")
        report.figure(f"decision_{size}_us", us, "µs", baseline)
        worst = us if size == 1000 else worst
    report.check("a decision over 1,000 children < 1 ms", worst < 1000)
    return worst


def spread(report: Report) -> float:
    """The largest gap, in points, between a child's share of builds and of capacity."""
    rng = random.Random(7)
    size = 4 * SPREAD_BUILDS  # room for twice the builds in all: the cells are half full at the end
    total = {name: size * share // 14 for name, share in SHARES.items()}
    left = dict(total)  # what each child really has
    view = {name: units(count) for name, count in left.items()}  # what the parent believes
    taken = dict.fromkeys(SHARES, 0)
    for n in range(SPREAD_BUILDS):
        if n % 100 == 0:
            view = {name: units(count) for name, count in left.items()}  # announcements
        cells = [CellCandidate(name, f"api!{name}", capacity=view[name]) for name in SHARES]
        first = schedule(cells, BuildSpec(TINY), rng).first
        assert first is not None
        taken[first] += 1
        left[first] -= 1
        view[first] = view[first].less(TINY)
    gap = 0.0
    for name, share in SHARES.items():
        got = 100 * taken[name] / SPREAD_BUILDS
        wanted = 100 * share / sum(SHARES.values())
        report.figure(f"share_{name}_pct", got, "%", None)
        gap = max(gap, abs(got - wanted))
    report.figure("largest_share_gap_points", gap, "points")
    report.check("every share within 5 points of its capacity share", gap <= 5)
    return gap


def builds(report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="zcells-bench-") as tmp:
        directory = Path(tmp)
        random_order = run_builds(
            build_tree(directory / "random", scheduler_filters="", scheduler_weighers="")
        )
        weighed = run_builds(build_tree(directory / "weighed"))
    report.figure("random_scheduler_builds_per_s", random_order.builds_per_s, "builds/s")
    report.figure(
        "cell_scheduler_builds_per_s", weighed.builds_per_s, "builds/s", random_order.builds_per_s
    )
    ratio = weighed.builds_per_s / random_order.builds_per_s
    report.check("builds/s within 10% of the random scheduler's", ratio >= 0.9)


def main() -> None:
    report = Report("scheduler")
    print(f"cpus: {os.cpu_count()}, load: {os.getloadavg()[0]:.2f}", flush=True)
    decisions(report)
    spread(report)
    builds(report)
    report.finish()


if __name__ == "__main__":
    main()
