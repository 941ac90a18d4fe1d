"""Build benchmark: servers created at the API cell until each shows ACTIVE there, end to end.

zcells: a tree api -> {c1, c2} of `zcells serve` processes, each compute
cell with 50 fake hosts far larger than the load (capacity never refuses a
build) and builds that take no time. `WORKERS` clients on one link each
create `PER_CREATE` servers with one `server_create` and wait until all of
them are ACTIVE at the top before creating more, so about WORKERS x
PER_CREATE builds are under way at any time. After a warm-up, `SERVERS`
servers are timed:

* builds per second: the servers of the timed part over the time from its
  first create to its last server seen ACTIVE;
* create-to-ACTIVE latency of each server, p50 and p99: from the answer to
  its `server_create` to the first time the top's index shows it ACTIVE;
* the CPU time the three cell processes spent per build, which says how
  many builds a second the machine's cores could carry at best.

The top's index is read straight from its SQLite database (WAL lets a reader
run beside the cell's writer) every 5 ms, by uuid, for the servers still
awaited. A `server_list` poll would make the top render every server each
time and slow what it measures.
At the end `server_list` must agree: every server ACTIVE.

Baselines, measured in the same run: how many durable single-row
transactions SQLite commits per second on this disk (one instance-shaped
row each, WAL, synchronous FULL, as the cells run it; a build takes several
transactions, in two cells), and the raw pyzmq round trip with CURVE on
(a build takes at least two, client to top and top to cell).

Targets: at least 1,000 builds/s and p99 under 200 ms. The last line is JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Report, cpu_seconds, percentile
from zcells.client import CellClient
from zcells.devtree import CellTree, free_ports

WORKERS = int(os.environ.get("BENCH_BUILD_WORKERS", "10"))
PER_CREATE = int(os.environ.get("BENCH_BUILD_PER_CREATE", "10"))
SERVERS = int(os.environ.get("BENCH_BUILDS", "3000"))
WARM_UP = WORKERS * PER_CREATE * 2
POLL_S = 0.005
ACTIVE_WITHIN_S = 60
FLAVOR = "m1.tiny"
BIG = 1 << 30  # every resource of a fake host: no build is ever refused for room


# -- baselines ----------------------------------------------------------------------------


def durable_commits(report: Report, directory: Path) -> float:
    """Single-row transactions per second: one instance-shaped row each, WAL, synchronous FULL."""
    conn = sqlite3.connect(directory / "commits.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE instances (uuid TEXT PRIMARY KEY, name TEXT, project_id TEXT, "
        "vm_state TEXT, task_state TEXT, cell_name TEXT, host TEXT, version INTEGER, "
        "metadata TEXT, created_at TEXT, updated_at TEXT)"
    )
    conn.execute("CREATE INDEX ix_updated_at ON instances (updated_at)")
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < 2.0:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                str(uuid.uuid4()),
                f"web-{count}",
                "ops",
                "building",
                "spawning",
                "api!c1",
                "h001",
                1,
                '{"role": "frontend"}',
                "2026-11-25 12:00:00.000000",
                "2026-11-25 12:00:00.000000",
            ),
        )
        conn.execute("COMMIT")
        count += 1
    rate = count / (time.perf_counter() - started)
    conn.close()
    report.figure("raw_sqlite_commits_per_s", rate, "txn/s")
    return rate


def _echo(endpoint: str, secret: bytes, ready: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_secretkey = secret
    sock.bind(endpoint)
    ready.set()
    while True:
        rid, body = sock.recv_multipart()
        message = msgpack.unpackb(body)
        if message.get("stop"):
            break
        sock.send_multipart([rid, msgpack.packb(message)])
    sock.close(0)
    ctx.term()


def raw_round_trip(report: Report) -> float:
    """The p50 of a raw DEALER/ROUTER round trip with CURVE on, in ms."""
    public, secret = zmq.curve_keypair()
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_echo, args=(endpoint, secret, ready))
    server.start()
    ctx = zmq.Context()
    try:
        if not ready.wait(10):
            raise SystemExit("the echo server did not start")
        sock = ctx.socket(zmq.DEALER)
        sock.curve_serverkey = public
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.connect(endpoint)
        body = {"name": "web-1", "flavor": FLAVOR, "image": "cirros", "count": PER_CREATE}
        samples = []
        for i in range(2200):
            started = time.perf_counter()
            sock.send(msgpack.packb(body))
            msgpack.unpackb(sock.recv())
            if i >= 200:  # the first ones warm up the handshake and caches
                samples.append(time.perf_counter() - started)
        sock.send(msgpack.packb({"stop": True}))
        sock.close(linger=1000)
    finally:
        ctx.term()
        server.join(10)
        if server.is_alive():
            server.kill()
    rtt_ms = percentile(samples, 50) * 1000
    report.figure("raw_rtt_p50_ms", rtt_ms, "ms")
    return rtt_ms


# -- zcells -------------------------------------------------------------------------------


class ActiveWatch:
    """When each awaited server was first seen ACTIVE at the top, read from its database."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        self.waiting: dict[str, asyncio.Future[float]] = {}

    def look(self) -> None:
        if not self.waiting:
            return
        uuids = list(self.waiting)
        rows = self.conn.execute(
            f"SELECT uuid FROM instances WHERE uuid IN ({', '.join('?' * len(uuids))}) "
            "AND vm_state = 'active' AND task_state IS NULL",
            uuids,
        ).fetchall()
        now = time.perf_counter()
        for (active,) in rows:
            self.waiting.pop(active).set_result(now)

    def active(self, uuid_: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[uuid_] = future
        return future

    async def run(self) -> None:
        while True:
            self.look()
            await asyncio.sleep(POLL_S)


def tree_cpu_seconds(tree: CellTree) -> float:
    return sum(cpu_seconds(cell.proc.pid) for cell in tree.cells.values() if cell.proc)


async def create_until(
    client: CellClient, watch: ActiveWatch, servers: int, latencies: list[float]
) -> tuple[float, float]:
    """`servers` builds by `WORKERS` clients; (time of the first create, of the last ACTIVE)."""
    left = servers
    last_active = 0.0
    first_create = time.perf_counter()

    async def worker(w: int) -> None:
        nonlocal left, last_active
        n = 0
        while left > 0:
            count = min(PER_CREATE, left)
            left -= count
            n += 1
            answer = await client.request(
                "server_create",
                {"name": f"w{w}-{n}", "flavor": FLAVOR, "image": "cirros", "count": count},
            )
            answered = time.perf_counter()
            try:
                async with asyncio.timeout(ACTIVE_WITHIN_S):
                    seen = await asyncio.gather(*(watch.active(u) for u in answer["servers"]))
            except TimeoutError:
                raise SystemExit(f"servers not ACTIVE within {ACTIVE_WITHIN_S}s") from None
            latencies.extend(at - answered for at in seen)
            last_active = max(last_active, *seen)

    await asyncio.gather(*(worker(w) for w in range(WORKERS)))
    return first_create, last_active


@dataclass(frozen=True)
class Measured:
    builds_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_build: float


async def measure(tree: CellTree) -> Measured:
    """Warm up, then time `SERVERS` builds on a running tree; every one must end ACTIVE."""
    cell = tree.cells["api"]
    watch = ActiveWatch(cell.directory / "state" / f"{cell.name}.db")
    async with tree.client(timeout_s=60) as client:
        looking = asyncio.create_task(watch.run())
        try:
            await create_until(client, watch, WARM_UP, [])
            latencies: list[float] = []
            cpu_before = tree_cpu_seconds(tree)
            started, ended = await create_until(client, watch, SERVERS, latencies)
            cpu = tree_cpu_seconds(tree) - cpu_before
        finally:
            looking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await looking
        active, marker = 0, None
        while True:  # the API agrees: every server is ACTIVE
            body: dict[str, Any] = {"status": "ACTIVE", "limit": 1000, "all_projects": True}
            if marker is not None:
                body["marker"] = marker
            page = await client.request("server_list", body)
            active += len(page["servers"])
            marker = page["next_marker"]
            if marker is None:
                break
    if active != WARM_UP + SERVERS:
        raise SystemExit(f"server_list shows {active} ACTIVE servers, not {WARM_UP + SERVERS}")
    p50, p99 = (percentile(latencies, q) * 1000 for q in (50, 99))
    return Measured(SERVERS / (ended - started), p50, p99, cpu / SERVERS * 1000)


def build_tree(directory: Path, **cells_options: Any) -> CellTree:
    """api -> {c1, c2}, 50 fake hosts each, far larger than the load; builds take no time."""
    return CellTree(
        {"api": {"c1": {}, "c2": {}}},
        directory,
        log_level="warning",
        compute={
            "fake_hosts": 50,
            "fake_build_seconds": 0,
            "fake_host_ram_mb": BIG,
            "fake_host_disk_gb": BIG,
            "fake_host_vcpus": BIG,
        },
        mute_child_interval=60,
        heartbeat_interval=5,
        call_timeout=30,
        **cells_options,
    )


def run_builds(tree: CellTree) -> Measured:
    """Start `tree`, measure its builds, stop it; its logs on stderr if anything failed."""
    try:
        tree.start()
        return asyncio.run(measure(tree))
    except BaseException:
        print(tree.logs(), file=sys.stderr)
        raise
    finally:
        tree.stop()


def main() -> None:
    report = Report("builds")
    print(
        f"servers: {SERVERS:,} timed after {WARM_UP:,}, {WORKERS} clients x {PER_CREATE} "
        f"a create, cpus: {os.cpu_count()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="zcells-bench-") as tmp:
        directory = Path(tmp)
        commit_rate = durable_commits(report, directory)
        rtt_ms = raw_round_trip(report)
        measured = run_builds(build_tree(directory / "tree"))
    report.figure("zcells_builds_per_s", measured.builds_per_s, "builds/s", commit_rate)
    report.figure("tree_cpu_ms_per_build", measured.cpu_ms_per_build, "ms")
    report.figure("create_to_active_p50_ms", measured.p50_ms, "ms", rtt_ms)
    report.figure("create_to_active_p99_ms", measured.p99_ms, "ms", rtt_ms)
    report.check("builds >= 1,000/s", measured.builds_per_s >= 1000)
    report.check("create-to-ACTIVE p99 < 200 ms", measured.p99_ms < 200)
    report.finish()


if __name__ == "__main__":
    main()
