"""One whole simulation: build the tree, run it under faults and clients, settle, check.

The phases, all in virtual time:

1. Every cell starts; the run waits until each knows its place in the tree.
2. For `duration_s`, clients work and the faults chosen from the seed strike.
3. The faults stop: links are restored, cells thawed, clocks set right and
   crashed cells started again. Clients finish what was left unanswered.
4. The tree settles: within `settle_s`, every outbox must drain, every link
   come back, the index agree on every server.
5. The invariants (`zcells.sim.invariants`) are checked.

Every source of randomness is a `random.Random` derived from the seed (ids
through `zcells.entropy`), and string hashing must be fixed
(``PYTHONHASHSEED``): then the same seed gives the same `trace_hash`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zcells import entropy
from zcells.clock import LoopClock
from zcells.node import Node
from zcells.sim import invariants
from zcells.sim.faults import Fault, parse_faults, plan
from zcells.sim.loop import VirtualTimeLoop
from zcells.sim.network import EdgeFaults, SimNetwork, edge
from zcells.sim.tree import TOP, Settings, Shape, SimTree
from zcells.sim.workload import SimClient, Told, run_clients

WALL_AT_ZERO = 1_800_000_000.0  # the virtual epoch: 2027-01-15
PLACED_WITHIN_S = 300.0
POLL_S = 5.0


@dataclass(frozen=True)
class SimOptions:
    cells: int = 1000
    fanout: int = 10
    hosts: int = 2
    seed: int = 1
    duration_s: float = 600.0
    clients: int = 4
    faults: str = "all"
    settle_s: float = 900.0
    db_dir: Path | None = None

    def replay_command(self) -> str:
        return (
            f"zcells sim --cells {self.cells} --fanout {self.fanout} --hosts {self.hosts} "
            f"--seed {self.seed} --duration {self.duration_s:g} --clients {self.clients} "
            f"--faults {self.faults}"
        )


@dataclass
class Report:
    options: SimOptions
    trace_hash: str = ""
    faults: Counter[str] = field(default_factory=Counter)
    checks: dict[str, list[str]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    virtual_s: float = 0.0
    wall_s: float = 0.0
    messages: int = 0
    peak_rss_mb: float = 0.0

    @property
    def violations(self) -> int:
        return sum(len(found) for found in self.checks.values())

    def summary(self) -> dict[str, Any]:
        """The run's JSON line."""
        return {
            "seed": self.options.seed,
            "cells": self.options.cells,
            "fanout": self.options.fanout,
            "duration_s": self.options.duration_s,
            "trace_hash": self.trace_hash,
            "violations": self.violations,
            "faults": dict(sorted(self.faults.items())),
            "servers_created": self.counts["servers_told"],
            "messages": self.messages,
            "virtual_s": round(self.virtual_s, 3),
            "wall_s": round(self.wall_s, 3),
            "virtual_per_wall": round(self.virtual_s / self.wall_s, 2) if self.wall_s else None,
            "messages_per_wall_s": round(self.messages / self.wall_s) if self.wall_s else None,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


class Injector:
    """Carries out the planned faults at their times, and undoes every one on `heal()`."""

    def __init__(self, tree: SimTree, faults: list[Fault], report: Report) -> None:
        self.tree = tree
        self.network = tree.network
        self.loop = tree.network.loop
        self.faults = faults
        self.report = report
        self._undo: dict[int, tuple[asyncio.TimerHandle | None, Callable[[], None]]] = {}
        self._ids = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.down: set[str] = set()

    async def run(self, start: float) -> None:
        for fault in self.faults:
            delay = start + fault.at - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._apply(fault)

    def _later(self, after_s: float, undo: Callable[[], None]) -> None:
        self._ids += 1
        key = self._ids

        def fire() -> None:
            self._undo.pop(key, None)
            undo()

        self._undo[key] = (self.loop.call_later(after_s, fire), undo)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _apply(self, fault: Fault) -> None:
        kind = fault.kind
        self.report.faults[kind] += 1
        if kind in ("delay", "loss", "duplicate", "reorder"):
            (child, parent) = fault.links[0]
            key = edge(child, parent)
            faults = EdgeFaults(
                delay_s=fault.amount if kind == "delay" else 0.0,
                jitter_s=fault.amount if kind == "reorder" else 0.0,
                loss=fault.amount if kind == "loss" else 0.0,
                duplicate=fault.amount if kind == "duplicate" else 0.0,
            )
            self.network.faults[key] = faults

            def clear(key: tuple[str, str] = key, faults: EdgeFaults = faults) -> None:
                if self.network.faults.get(key) is faults:
                    del self.network.faults[key]

            self._later(fault.duration_s, clear)
        elif kind == "partition":
            (child, parent) = fault.links[0]
            self.network.cut(child, parent)
            self._later(fault.duration_s, lambda: self.network.restore(child, parent))
        elif kind == "clog":
            self._spawn(self._clog(fault))
        elif kind == "crash":
            self._spawn(self._crash(fault))
        elif kind == "freeze":
            neighbours = self.tree.shape.neighbours(fault.cell)
            self.network.freeze(fault.cell, neighbours)
            self._later(fault.duration_s, lambda: self.network.thaw(fault.cell, neighbours))
        elif kind == "skew":
            clock = self.tree.cells[fault.cell].clock
            clock.skew_s += fault.amount

            def unskew(clock: LoopClock = clock, amount: float = fault.amount) -> None:
                clock.skew_s -= amount

            self._later(fault.duration_s, unskew)

    async def _clog(self, fault: Fault) -> None:
        cut: list[tuple[str, str]] = []

        def restore_rest() -> None:
            while cut:
                self.network.restore(*cut.pop())

        self._ids += 1
        key = self._ids
        self._undo[key] = (None, restore_rest)
        steps = iter(fault.steps)
        for link in fault.links:
            self.network.cut(*link)
            cut.append(link)
            await asyncio.sleep(next(steps))
        await asyncio.sleep(fault.duration_s)
        order = list(fault.links)
        random.Random(int(fault.at * 1000)).shuffle(order)
        for link in order:
            if link in cut:
                cut.remove(link)
                self.network.restore(*link)
            await asyncio.sleep(next(steps))
        self._undo.pop(key, None)

    async def _crash(self, fault: Fault) -> None:
        if fault.cell in self.down or not await self.tree.crash(fault.cell):
            self.report.faults["crash_skipped"] += 1
            return
        self.down.add(fault.cell)
        await asyncio.sleep(fault.duration_s)
        if fault.cell in self.down:
            self.down.discard(fault.cell)
            self.tree.start(fault.cell)

    async def heal(self) -> None:
        """Undo every fault still in force and start every crashed cell again."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle, undo in list(self._undo.values()):
            if handle is not None:
                handle.cancel()
            undo()
        self._undo.clear()
        for name in sorted(self.down):
            self.tree.start(name)
        self.down.clear()
        for name in self.tree.shape.names:  # crashed by a fault whose task was cancelled
            if not self.tree.cells[name].up:
                self.tree.start(name)


def run(options: SimOptions, log: Callable[[str], None] = lambda _line: None) -> Report:
    """Run one simulation to the end and report it."""
    if options.cells < 1 or options.fanout < 1:
        raise ValueError("a tree needs at least one cell and a fanout of at least one")
    report = Report(options)
    started = time.monotonic()
    logging.getLogger("zcells").setLevel(logging.ERROR)  # thousands of cells: faults are expected
    with contextlib.ExitStack() as stack:
        directory = options.db_dir
        if directory is None:
            base = "/dev/shm" if Path("/dev/shm").is_dir() else None  # noqa: S108 (private temp dir)
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=base)))
        loop = VirtualTimeLoop()
        stack.callback(loop.close)
        stack.enter_context(entropy.seeded(random.Random(f"{options.seed}:ids")))
        asyncio.set_event_loop(loop)
        stack.callback(asyncio.set_event_loop, None)
        loop.run_until_complete(_main(options, loop, directory, report, log))
        report.virtual_s = loop.time()
    report.wall_s = time.monotonic() - started
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return report


async def _main(
    options: SimOptions,
    loop: asyncio.AbstractEventLoop,
    directory: Path,
    report: Report,
    log: Callable[[str], None],
) -> None:
    seed = options.seed
    shape = Shape.make(options.cells, options.fanout)
    network = SimNetwork(loop, random.Random(f"{seed}:network"))
    watch = invariants.SequenceWatch()
    network.observers.append(watch.observe)
    settings = Settings(hosts=options.hosts, clients=options.clients)
    tree = SimTree(shape, settings, network, random.Random(f"{seed}:keys"), directory, WALL_AT_ZERO)
    log(f"building {options.cells} cells in {directory}")
    tree.build()
    nodes: dict[str, Node] = {}
    tree.on_node = nodes.__setitem__
    try:
        for name in shape.names:
            tree.start(name)
        placed = await _until(loop, lambda: _placed(tree, nodes), PLACED_WITHIN_S)
        unplaced = [] if placed else [f"not every cell was placed within {PLACED_WITHIN_S:g}s"]
        log(f"placed at t={loop.time():.1f}s; running {options.duration_s:g}s with faults")
        spec = parse_faults(options.faults, options.cells)
        faults = plan(
            spec,
            random.Random(f"{seed}:faults"),
            options.duration_s,
            shape.names,
            shape.links(),
        )
        injector = Injector(tree, faults, report)
        told = Told()
        top_clock = tree.cells[TOP].clock
        clients = [
            SimClient(tree, name, random.Random(f"{seed}:{name}"), told, top_clock)
            for name in sorted(tree.client_keys)
        ]
        start = loop.time()
        until = start + options.duration_s
        faulting = loop.create_task(injector.run(start))
        await run_clients(clients, until)
        faulting.cancel()
        await asyncio.gather(faulting, return_exceptions=True)
        await injector.heal()
        log(f"faults stopped at t={loop.time():.1f}s; settling")
        unanswered = [c.name for c in clients if not await c.finish()]
        settled_by = loop.time() + options.settle_s
        why = await _settle(loop, tree, nodes, settled_by)
        report.counts.update(told.counts)
        report.counts["servers_told"] = len(told.created)
        report.counts["servers_deleted"] = len(told.deleted)
        report.checks = {
            "servers": invariants.servers(tree, told),
            "deletes": invariants.deletes(tree, told),
            "claims": invariants.claims(tree),
            "outbox": list(watch.violations),
            "settled": unplaced + why + [f"{c}: a create was never answered" for c in unanswered],
        }
        report.messages = network.counters["delivered"]
        report.counts.update({f"network_{k}": v for k, v in network.counters.items()})
        report.counts["crashes"] = tree.crashes
        report.trace_hash = network.trace_hash
    finally:
        await tree.stop_all()
        tree.close()


def _placed(tree: SimTree, nodes: dict[str, Node]) -> bool:
    return all(
        name in nodes and nodes[name].neighbours.known_path == tree.shape.path[name]
        for name in tree.shape.names
    )


async def _until(
    loop: asyncio.AbstractEventLoop, done: Callable[[], bool], within_s: float
) -> bool:
    deadline = loop.time() + within_s
    while not done():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(1.0)
    return True


async def _settle(
    loop: asyncio.AbstractEventLoop, tree: SimTree, nodes: dict[str, Node], by: float
) -> list[str]:
    """Wait until the tree has settled; what still is not, if it did not by `by`."""
    why: list[str] = []
    while loop.time() < by:
        why = invariants.unsettled(tree)
        if not why:
            liveness = {name: node.liveness() for name, node in nodes.items()}
            why = invariants.children_seen(tree, liveness) + _index_unsettled(tree)
            if not why:
                why = invariants.announced(tree)
            if not why:
                return []
        await asyncio.sleep(POLL_S)
    return [f"not settled at t={loop.time():.0f}s: {w}" for w in why[:5]]


def _index_unsettled(tree: SimTree) -> list[str]:
    found = []
    for uuid, instance in invariants.every_instance(tree, TOP).items():
        if instance.task_state is not None or instance.status == "BUILD":
            found.append(f"{uuid}: {instance.status} ({instance.task_state}) in the index")
    return found[:5]


def hash_seed_fixed() -> bool:
    """Whether string hashing is fixed, as a replayable run needs."""
    return os.environ.get("PYTHONHASHSEED", "random") not in ("", "random")
