"""`make soak`: a tree of real cells under faults for a bounded time, then the invariants.

Each cell runs in a network namespace of its own, made here (a veth pair to
the root namespace, which routes between them; addresses 10.77.N.2 are this
run's own test hosts). Clients create, act on and delete servers while a
fault loop, driven by the seed, kills (-9) and restarts, freezes (SIGSTOP)
and partitions (a blackhole root qdisc on both ends of a cell's link) random
cells, the API cell and middle cells included, and a live fuzzer sends
broken frames from registered keys. Then the faults stop, the tree settles,
and the invariants are checked:

* every server a client was told about exists exactly once at the top and in
  exactly one cell, with the same status and version;
* every acknowledged delete is gone everywhere;
* nothing is stuck in BUILD or a task; every ERROR has a fault;
* no cell crashed (exited without being killed by the fault loop);
* RSS growth of each cell stays under a bound.

Where namespaces cannot be made (not root, no `ip`), partitions are made with
SIGSTOP instead, and the run says so. It prints each figure and ends with one
JSON line; it exits 1 when any invariant failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid as uuid_module
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq

from tests.integration import trees
from tests.unit.test_codec_fuzz import broken, samples
from zcells import codec
from zcells.devtree import CellTree
from zcells.errors import WireError

TREE = {"api": {"c1": {"g1": {}, "g2": {}}, "c2": {}, "c3": {}}}
COMPUTE = ("c1", "g1", "g2", "c2", "c3")
SETTLED = {"ACTIVE", "SHUTOFF", "ERROR", "DELETED"}
RSS_GROWTH_LIMIT_MB = 200.0


# -- test hosts in network namespaces ------------------------------------------------------


class Hosts:
    """One network namespace per cell, joined to the root namespace by a veth pair."""

    def __init__(self, names: list[str], tag: str) -> None:
        self.names = names
        self.tag = tag
        self.made: list[str] = []

    def ns(self, name: str) -> str:
        return f"zs{self.tag}-{name}"

    def veth(self, name: str) -> str:
        return f"zv{self.tag}{self.names.index(name)}"

    def address(self, name: str) -> str:
        return f"10.77.{self.names.index(name) + 1}.2"

    @staticmethod
    def available() -> bool:
        return (
            os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
        )

    def up(self) -> None:
        _sh("sysctl", "-qw", "net.ipv4.ip_forward=1", check=False)
        for i, name in enumerate(self.names, start=1):
            ns, veth = self.ns(name), self.veth(name)
            _sh("ip", "netns", "add", ns)
            self.made.append(name)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "addr", "add", f"10.77.{i}.1/24", "dev", veth)
            _sh("ip", "link", "set", veth, "up")
            for cmd in (
                ["ip", "addr", "add", f"10.77.{i}.2/24", "dev", "eth0"],
                ["ip", "link", "set", "eth0", "up"],
                ["ip", "link", "set", "lo", "up"],
                ["ip", "route", "add", "default", "via", f"10.77.{i}.1"],
            ):
                _sh("ip", "netns", "exec", ns, *cmd)

    def cut(self, name: str) -> None:
        """Drop everything on the cell's link, both ends."""
        _sh("tc", "qdisc", "add", "dev", self.veth(name), "root", "blackhole")
        _sh(
            "ip",
            "netns",
            "exec",
            self.ns(name),
            "tc",
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "blackhole",
        )

    def mend(self, name: str) -> None:
        _sh("tc", "qdisc", "del", "dev", self.veth(name), "root", check=False)
        _sh(
            "ip",
            "netns",
            "exec",
            self.ns(name),
            "tc",
            "qdisc",
            "del",
            "dev",
            "eth0",
            "root",
            check=False,
        )

    def down(self) -> None:
        for name in self.made:
            _sh("ip", "link", "del", self.veth(name), check=False)
            _sh("ip", "netns", "del", self.ns(name), check=False)
        self.made.clear()


def _sh(*argv: str, check: bool = True) -> None:
    subprocess.run(argv, check=check, capture_output=True, timeout=30)


# -- the run --------------------------------------------------------------------------------


class Soak:
    def __init__(self, tree: CellTree, hosts: Hosts | None, rng: random.Random, deadline: float):
        self.tree = tree
        self.hosts = hosts
        self.rng = rng
        self.deadline = deadline
        self.created: list[str] = []
        self.deleted: set[str] = set()  # deletes the API cell acknowledged
        self.faults: Counter[str] = Counter()
        self.victims: Counter[str] = Counter()  # faults by cell
        self.killed: set[str] = set()  # cells this run killed (their exit is no crash)
        self.client_errors: Counter[str] = Counter()
        self.fuzzed = 0

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    async def client(self, n: int) -> None:
        rng = random.Random(self.rng.random())
        while self.running():
            try:
                async with self.tree.client("api", timeout_s=5) as api:
                    while self.running():
                        await self._step(api, rng)
            except (WireError, OSError) as exc:
                self.client_errors[type(exc).__name__] += 1
                await asyncio.sleep(0.2)

    async def _step(self, api: Any, rng: random.Random) -> None:
        body = {
            "name": "soak",
            "flavor": "m1.tiny",
            "image": "cirros",
            "count": rng.randint(1, 3),
            "request_id": str(uuid_module.uuid4()),
        }
        result = await api.call("server_create", body)
        if result.ok:
            self.created += result.value["servers"]
        elif result.error is not None:
            self.client_errors[result.error.code] += 1
        if self.created:
            uuid = rng.choice(self.created)
            action = rng.choice(["stop", "start", "reboot", "delete", "stop", "start"])
            result = await api.call("server_action", {"uuid": uuid, "action": action})
            if result.ok and action == "delete":
                self.deleted.add(uuid)
            elif result.error is not None:
                self.client_errors[result.error.code] += 1
        await asyncio.sleep(rng.uniform(0.05, 0.3))

    async def faults_loop(self) -> None:
        names = list(self.tree.cells)
        while self.running():
            await asyncio.sleep(self.rng.uniform(2.0, 6.0))
            if not self.running():
                return
            victim = self.rng.choice(names)
            kind = self.rng.choice(["kill", "freeze", "partition"])
            hold_s = self.rng.uniform(1.0, 6.0)
            self.faults[kind] += 1
            self.victims[victim] += 1
            if kind == "kill":
                self.killed.add(victim)
                await asyncio.to_thread(self.tree.signal, victim, signal.SIGKILL)
                await asyncio.sleep(hold_s)
                await asyncio.to_thread(self.tree.start, victim, 60.0)
            elif kind == "freeze" or self.hosts is None:
                await asyncio.to_thread(self.tree.signal, victim, signal.SIGSTOP)
                await asyncio.sleep(hold_s)
                await asyncio.to_thread(self.tree.signal, victim, signal.SIGCONT)
            else:
                self.hosts.cut(victim)
                try:
                    await asyncio.sleep(hold_s)
                finally:
                    self.hosts.mend(victim)

    async def fuzzer(self) -> None:
        """Broken frames from registered keys, to the API cell's two endpoints."""
        rng = random.Random(self.rng.random())
        api = self.tree.cells["api"]
        kinds = samples()
        targets = [
            (api.api_endpoint, self.tree.clients["ops"]),
            (api.cells_endpoint, self.tree.cells["c2"].keys),
        ]
        ctx: zmq.Context[Any] = zmq.Context()
        socks = []
        try:
            for endpoint, keys in targets:
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.sndhwm = 100
                sock.curve_serverkey = api.keys.public.encode()
                sock.curve_publickey = keys.public.encode()
                sock.curve_secretkey = keys.secret.encode()
                sock.connect(endpoint)
                socks.append(sock)
            while self.running():
                for sock in socks:
                    frames, _ = broken(rng, codec.encode(rng.choice(kinds)))
                    with contextlib.suppress(zmq.Again):
                        sock.send_multipart(frames, flags=zmq.NOBLOCK)
                        self.fuzzed += 1
                    while sock.poll(0):
                        sock.recv_multipart()
                await asyncio.sleep(0.01)
        finally:
            for sock in socks:
                sock.close(0)
            ctx.destroy(0)


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def records(tree: CellTree, name: str) -> dict[str, dict[str, Any]]:
    async with tree.client(name, timeout_s=30) as client:
        return {row["uuid"]: row for row in await trees.every_server(client)}


async def violations(tree: CellTree, soak: Soak) -> list[str]:
    """Every invariant that does not hold now."""
    found: list[str] = []
    top = await records(tree, "api")
    missing = set(soak.created) - top.keys()
    if missing:
        found.append(
            f"lost: {len(missing)} servers a client was told about, e.g. {sorted(missing)[:3]}"
        )
    stuck = [u for u, r in top.items() if r["status"] not in SETTLED or r["task_state"]]
    if stuck:
        found.append(f"stuck: {len(stuck)} not settled at the top, e.g. {stuck[:3]}")
    faultless = [u for u, r in top.items() if r["status"] == "ERROR" and not r.get("fault")]
    if faultless:
        found.append(f"ERROR without a fault: {faultless[:3]}")
    alive: dict[str, list[str]] = {}
    held: dict[str, dict[str, Any]] = {}
    for name in COMPUTE:
        for uuid, row in (await records(tree, name)).items():
            if row["status"] != "DELETED":
                alive.setdefault(uuid, []).append(row["cell"])
            if top.get(uuid, {}).get("cell") == row["cell"]:
                held[uuid] = row
    twice = {u: c for u, c in alive.items() if len(c) > 1}
    if twice:
        found.append(f"duplicated: {len(twice)} alive in two cells, e.g. {list(twice.items())[:2]}")
    for uuid, row in top.items():
        if row["cell"] is None:
            continue
        own = held.get(uuid)
        if own is None:
            found.append(f"stale: {uuid} indexed under {row['cell']}, which does not hold it")
            continue
        keys = ("status", "version", "task_state", "host")
        if any(own[k] != row[k] for k in keys):
            found.append(
                f"stale: {uuid} top {[row[k] for k in keys]} cell {[own[k] for k in keys]}"
            )
    for uuid in soak.deleted:
        if top.get(uuid, {}).get("status") != "DELETED" or uuid in alive:
            found.append(f"undeleted: {uuid} was acknowledged deleted")
    return found


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    names = list(_walk(TREE))
    hosts = (
        Hosts(names, tag=str(os.getpid() % 1000))
        if (Hosts.available() and not args.no_netns)
        else None
    )
    root = Path(tempfile.mkdtemp(prefix="zcells-soak-"))
    figures: dict[str, Any] = {"seed": args.seed, "minutes": args.minutes, "cells": len(names)}
    figures["partitions_by"] = "netns blackhole qdisc" if hosts else "SIGSTOP (no namespaces here)"
    print(
        f"soak: seed {args.seed}, {args.minutes} min, {len(names)} cells, "
        f"partitions by {figures['partitions_by']}"
    )
    try:
        if hosts is not None:
            hosts.up()
        tree = CellTree(
            TREE,
            root,
            log_level="info",
            compute={"fake_hosts": 4, "fake_build_seconds": 0.2},
            scheduler_retry_delay=0.5,
            call_timeout=5,
            hosts={n: hosts.address(n) for n in names} if hosts else None,
            launcher=(lambda n: ["ip", "netns", "exec", hosts.ns(n)]) if hosts else None,
        )
        tree.start(timeout_s=120)
        try:
            rss_start = {n: rss_mb(c.proc.pid) for n, c in tree.cells.items() if c.proc}
            soak = Soak(tree, hosts, rng, time.monotonic() + args.minutes * 60)
            await asyncio.gather(
                *(soak.client(i) for i in range(args.clients)), soak.faults_loop(), soak.fuzzer()
            )
            crashed = [
                n
                for n, c in tree.cells.items()
                if c.proc and c.proc.poll() is not None and n not in soak.killed
            ]
            for name, cell in tree.cells.items():  # every cell back, whatever the last fault left
                if cell.proc is None or cell.proc.poll() is not None:
                    await asyncio.to_thread(tree.start, name, 60.0)
            last: list[str] = []

            async def settled() -> bool:
                last[:] = await violations(tree, soak)
                return not last

            settle_started = time.monotonic()
            with contextlib.suppress(AssertionError):
                await trees.until(settled, args.settle_s, "the tree to settle")
            rss_end = {n: rss_mb(c.proc.pid) for n, c in tree.cells.items() if c.proc}
            growth = {n: round(rss_end[n] - rss_start.get(n, rss_end[n]), 1) for n in rss_end}
            found = list(last)
            if crashed:
                found.append(f"crashed: {crashed}")
            big = {n: g for n, g in growth.items() if g > RSS_GROWTH_LIMIT_MB}
            if big:
                found.append(f"RSS grew past {RSS_GROWTH_LIMIT_MB} MB: {big}")
            figures.update(
                servers=len(set(soak.created)),
                deletes_acknowledged=len(soak.deleted),
                faults=dict(soak.faults),
                faults_by_cell=dict(soak.victims),
                fuzzed_frames=soak.fuzzed,
                client_errors=dict(soak.client_errors),
                settle_s=round(time.monotonic() - settle_started, 1),
                rss_growth_mb=growth,
                crashed=crashed,
                violations=len(found),
            )
            for line in found:
                print(f"VIOLATION {line}")
        finally:
            tree.stop()
    finally:
        if hosts is not None:
            hosts.down()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"soak: logs kept in {root}")
    return figures


def _walk(tree: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, below in tree.items():
        out.append(name)
        out += _walk(below)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "10"))
    )
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED") or time.time()))
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=240.0)
    parser.add_argument("--no-netns", action="store_true", help="partition with SIGSTOP instead")
    parser.add_argument("--keep", action="store_true", help="keep the cells' logs")
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    for key, value in figures.items():
        print(f"{key}: {value}")
    print(json.dumps(figures, sort_keys=True))
    if figures.get("violations"):
        print(f"replay: python soak/run.py --minutes {args.minutes} --seed {args.seed}")
    return 1 if figures.get("violations", 1) else 0


if __name__ == "__main__":
    sys.exit(main())
