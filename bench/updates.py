"""Update benchmark: instance changes streamed up through the real outbox, applied at the top.

zcells: a tree api -> {c1, c2} of `zcells serve` processes. Before the cells
start, each compute cell's database is filled with the records of its
instances, built on a host and stopped since (version 4, SHUTOFF), and
`requeue` puts the current record of each into the outbox: one change per
instance, written by the same functions a running cell uses. The API cell's
index holds each instance as it was before the stop (version 2, ACTIVE), so
every change applied at the top replaces a record. The changes come in the
order the instances were created, as when a burst of builds finishes; the
same number of changes to instances picked at random across a large index
makes SQLite write several times more pages, raw and zcells alike. The tree
is then started and the top's applied sequence of each child is read from
its database every 20 ms; the rate counts from the first applied batch to
the last, so process start-up is not in it. The top's CPU time per change
over that span is printed too.

Ceiling, measured in the same run on a copy of the top's database and the
very batches the cells will send: a raw DEALER sends them pre-packed to a
ROUTER in another process, CURVE on; the ROUTER decodes each batch and
upserts it in one SQLite transaction (WAL and synchronous FULL, as the cells
run it) under the same newer-version condition, and acks it. No validation,
no event loop, no routing: no Python receiver can apply faster on this
machine. The same batches through `apply_updates` in this process, on
another copy and without any messaging, show how much of the gap is the
database apply. Both are the median of three rounds, a third of the rows
each.

Targets: at least 40,000 updates/s applied at the top, and at least half
the ceiling. The last line is JSON.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import multiprocessing
import os
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zcells.db import instances as store
from zcells.db import outbox as outbox_store
from zcells.db.engine import Database

from bench.common import Report, cpu_seconds, median, poll_until
from zcells.devtree import CellTree, free_ports
from zcells.instances import Action, Instance, begin, finish, new_instance, placed
from zcells.upstream import BATCH_BYTES, BATCH_ROWS, within_bytes

CELLS = ("c1", "c2")
PER_CELL = int(os.environ.get("BENCH_UPDATES_PER_CELL", "100000"))
ROUNDS = 3
HOSTS = 50
T0 = 1_764_000_000.0

# The columns of the instances table, in the order the ceiling binds them.
COLUMNS = (
    "uuid",
    "name",
    "project_id",
    "user_id",
    "flavor_name",
    "memory_mb",
    "disk_gb",
    "vcpus",
    "image",
    "vm_state",
    "task_state",
    "power_state",
    "cell_name",
    "host",
    "version",
    "deleted",
    "metadata",
    "created_at",
    "updated_at",
    "deleted_at",
    "fault_code",
    "fault_message",
    "fault_cell",
)
_SET_ONCE = {"uuid", "project_id", "user_id", "created_at"}
UPSERT = (
    f"INSERT INTO instances ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    "ON CONFLICT (uuid) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c not in _SET_ONCE)
    + " WHERE instances.version < excluded.version AND "
    "(instances.cell_name IS NULL OR instances.cell_name = excluded.cell_name)"
)


def instances(count: int, cell: str, seed: int) -> list[tuple[Instance, Instance]]:
    """`count` instances of `cell` as active (version 2) and as stopped since (version 4).

    Their uuids rise with their creation, so the top's index holds them in the
    order `requeue` sends them: the changes come in the order the instances
    were created, as they do when a burst of builds finishes. The same `seed`
    gives the same instances, so processes can fill databases apart.
    """
    rng = random.Random(seed)
    uuids = sorted(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count))
    pairs = []
    for n, instance_uuid in enumerate(uuids):
        created = new_instance(
            uuid=instance_uuid,
            name=f"web-{n:06d}",
            project=f"project-{n % 20:02d}",
            user=f"user-{n % 50:02d}",
            flavor="m1.small",
            memory_mb=2048,
            disk_gb=20,
            vcpus=1,
            image="cirros-0.6.2-x86_64",
            metadata={"role": "frontend", "tier": "1", "owner": "ops"},
            now=T0 + n * 0.001,
        )
        when = T0 + n * 0.001
        active = finish(placed(created, cell, f"h{n % HOSTS + 1:03d}", when + 60), when + 90)
        pairs.append((active, finish(begin(active, Action.STOP, when + 120), when + 150)))
    return pairs


def fill_index(db: Database, records: list[Instance], tag: str) -> None:
    """Write `records` as they are, 1000 to a transaction."""
    for start in range(0, len(records), 1000):
        store.index_create(db, records[start : start + 1000], f"{tag}-{start}")


def fill_top(path: Path, cells: list[tuple[str, int]]) -> None:
    """The top's index: the instances of each (cell, seed) before their change."""
    with Database(f"sqlite:///{path}") as db:
        for cell, seed in cells:
            fill_index(db, [before for before, _ in instances(PER_CELL, cell, seed)], cell)


def fill_cell(path: Path, cell: str, seed: int) -> int:
    """A compute cell's records, each queued once for the parents; the last outbox seq."""
    with Database(f"sqlite:///{path}") as db:
        fill_index(db, [after for _, after in instances(PER_CELL, cell, seed)], "fill")
        outbox_store.requeue(db, None)
        return outbox_store.last_seq(db)


# -- the ceiling: raw pyzmq, msgpack and SQLite ------------------------------------------


def _stamp(seconds: float | None) -> str | None:
    """A time as SQLAlchemy stores it in SQLite."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


_NO_FAULT = {"code": None, "message": None, "cell": None}


def _columns(record: dict[str, Any]) -> tuple[Any, ...]:
    fault = record["fault"] or _NO_FAULT
    return (
        record["uuid"],
        record["name"],
        record["project"],
        record["user"],
        record["flavor"],
        record["memory_mb"],
        record["disk_gb"],
        record["vcpus"],
        record["image"],
        record["vm_state"],
        record["task_state"],
        record["power_state"],
        record["cell"],
        record["host"],
        record["version"],
        record["vm_state"] == "deleted",
        json.dumps(record["metadata"]),
        _stamp(record["created_at"]),
        _stamp(record["updated_at"]),
        _stamp(record["deleted_at"]),
        fault["code"],
        fault["message"],
        fault["cell"],
    )


def _ceiling_sink(endpoint: str, secret: bytes, path: str, ready: Any, batches: int) -> None:
    """Decode each batch and upsert it in one transaction; ack it with its last seq."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_secretkey = secret
    sock.rcvhwm = sock.sndhwm = 0
    sock.bind(endpoint)
    ready.set()
    for _ in range(batches):
        rid, body = sock.recv_multipart()
        rows = msgpack.unpackb(body)
        params = [_columns(msgpack.unpackb(payload)) for _, _, payload in rows]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(UPSERT, params)
        conn.execute("COMMIT")
        sock.send_multipart([rid, msgpack.packb(rows[-1][0])])
    sock.close(0)
    ctx.term()
    conn.close()


Batch = tuple[str, list[tuple[int, str, bytes]]]  # a child's name and rows of its outbox


def split_rounds(batches: list[Batch]) -> list[list[Batch]]:
    size = -(-len(batches) // ROUNDS)
    return [batches[i : i + size] for i in range(0, len(batches), size)]


def rows_in(batches: list[Batch]) -> int:
    return sum(len(rows) for _, rows in batches)


def ceiling(report: Report, path: Path, batches: list[Batch]) -> float:
    """Updates/s of the raw receiver: the median of `ROUNDS` rounds, a third of the rows each."""
    rounds = [
        [msgpack.packb([list(row) for row in rows]) for _, rows in part]
        for part in split_rounds(batches)
    ]
    public, secret = zmq.curve_keypair()
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    ready = multiprocessing.Event()
    sink = multiprocessing.Process(
        target=_ceiling_sink, args=(endpoint, secret, str(path), ready, len(batches))
    )
    sink.start()
    ctx = zmq.Context()
    rates = []
    try:
        if not ready.wait(10):
            raise SystemExit("the ceiling's receiver did not start")
        sock = ctx.socket(zmq.DEALER)
        sock.curve_serverkey = public
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.sndhwm = sock.rcvhwm = 0
        sock.connect(endpoint)
        for frames, part in zip(rounds, split_rounds(batches), strict=True):
            started = time.perf_counter()
            for frame in frames:
                sock.send(frame)
            for _ in frames:
                if not sock.poll(60_000):
                    raise SystemExit("the ceiling's receiver stopped acking")
                sock.recv()
            rates.append(rows_in(part) / (time.perf_counter() - started))
        sock.close(0)
    finally:
        ctx.term()
        sink.join(10)
        if sink.is_alive():
            sink.kill()
    _, rows = batches[-1]
    last = Instance.from_wire(msgpack.unpackb(rows[-1][2]))
    with Database(f"sqlite:///{path}") as db:  # what the raw receiver wrote, read by zcells
        if store.get(db, last.uuid) != last:
            raise SystemExit("the ceiling stored a row that zcells reads differently")
    rate = median(rates)
    report.figure("ceiling_updates_per_s", rate, "updates/s")
    return rate


def in_process(tree: CellTree, path: Path, batches: list[Batch]) -> float:
    """The same batches through `apply_updates` in this process: the database apply alone."""
    rates = []
    with Database(f"sqlite:///{path}") as db:
        for part in split_rounds(batches):
            started = time.perf_counter()
            for name, rows in part:
                store.apply_updates(db, name, tree.cells[name].path, rows, store_forward=False)
            rates.append(rows_in(part) / (time.perf_counter() - started))
    return median(rates)


# -- zcells --------------------------------------------------------------------------------


def db_path(tree: CellTree, name: str) -> Path:
    cell = tree.cells[name]
    return cell.directory / "state" / f"{cell.name}.db"


def fill(tree: CellTree) -> dict[str, int]:
    """Fill the top's index and each cell's records and outbox; each cell's last seq."""
    started = time.perf_counter()
    seeds = {name: 100 + i for i, name in enumerate(CELLS)}
    with concurrent.futures.ProcessPoolExecutor(len(CELLS) + 1) as pool:
        index = pool.submit(
            fill_top, db_path(tree, "api"), [(tree.cells[n].path, seeds[n]) for n in CELLS]
        )
        queued = {
            name: pool.submit(fill_cell, db_path(tree, name), tree.cells[name].path, seeds[name])
            for name in CELLS
        }
        index.result()
        last = {name: future.result() for name, future in queued.items()}
    print(
        f"filled {len(CELLS)} cells with {sum(last.values()):,} queued changes "
        f"in {time.perf_counter() - started:.1f}s",
        flush=True,
    )
    return last


def outbox_batches(tree: CellTree, last: dict[str, int]) -> list[Batch]:
    """The batches the cells will send, cut as their upstream cuts them, the cells alternating."""
    per_cell = []
    for name in CELLS:
        with Database(f"sqlite:///{db_path(tree, name)}") as db:
            rows = outbox_store.read_outbox(db, 0, last[name])
        batches: list[Batch] = []
        while rows:
            batch = within_bytes(rows[:BATCH_ROWS], BATCH_BYTES)
            batches.append((name, batch))
            rows = rows[len(batch) :]
        per_cell.append(batches)
    return [batch for turn in itertools.zip_longest(*per_cell) for batch in turn if batch]


def copy_db(source: Path, target: Path) -> None:
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


def zcells_rate(report: Report, tree: CellTree, last: dict[str, int], ceiling_rate: float) -> None:
    """Start the tree and time the top applying every queued change."""
    total = sum(last.values())
    top = Database(f"sqlite:///{db_path(tree, 'api')}")

    def applied() -> int:
        return sum(min(store.applied_seq(top, name), last[name]) for name in CELLS)

    try:
        started = time.perf_counter()
        tree.start()
        proc = tree.cells["api"].proc
        assert proc is not None
        top_pid = proc.pid
        first_at = poll_until(lambda: applied() > 0, 60, "the first batch at the top", 0.005)
        first = applied()
        cpu_before = cpu_seconds(top_pid)
        done_at = poll_until(lambda: applied() >= total, 300, "every change at the top")
        top_cpu = cpu_seconds(top_pid) - cpu_before
        stopped = store.counts(top)["SHUTOFF"]
    except SystemExit:
        print(tree.logs(), file=sys.stderr)
        raise
    finally:
        tree.stop()
        top.close()
    if stopped != total:
        raise SystemExit(f"the top shows {stopped} stopped instances, not {total}")
    print(
        f"first batch applied {first_at - started:.2f}s after start; "
        f"{total - first:,} changes in {done_at - first_at:.2f}s after it",
        flush=True,
    )
    rate = (total - first) / (done_at - first_at)
    report.figure("zcells_updates_per_s", rate, "updates/s", ceiling_rate)
    report.figure("top_cpu_us_per_update", top_cpu / (total - first) * 1e6, "us")
    report.check("updates >= 40,000/s at the top", rate >= 40_000)
    report.check("updates >= 0.5x ceiling", rate >= 0.5 * ceiling_rate)


def main() -> None:
    report = Report("updates")
    print(
        f"cells: {len(CELLS)} x {PER_CELL:,} changes, batches: {BATCH_ROWS} rows "
        f"or {BATCH_BYTES // 1024} KiB, cpus: {os.cpu_count()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="zcells-bench-") as tmp:
        directory = Path(tmp)
        tree = CellTree(
            {"api": {name: {} for name in CELLS}},
            directory / "tree",
            log_level="warning",
            compute={"fake_hosts": 0},  # nothing to build or resume: the outbox is all the load
            mute_child_interval=60,
            heartbeat_interval=5,
            call_timeout=30,
        )
        last = fill(tree)
        batches = outbox_batches(tree, last)
        for copy in ("ceiling.db", "in-process.db"):
            copy_db(db_path(tree, "api"), directory / copy)
        ceiling_rate = ceiling(report, directory / "ceiling.db", batches)
        rate = in_process(tree, directory / "in-process.db", batches)
        report.figure("zcells_apply_in_process_per_s", rate, "updates/s", ceiling_rate)
        zcells_rate(report, tree, last, ceiling_rate)
    report.finish()


if __name__ == "__main__":
    main()
