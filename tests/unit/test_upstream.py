"""The upward stream against a scripted parent and a real database.

The parent here is a few lines of state: the sequence it has applied and the
rows it took. The stream must hand it every row once, in order, in bounded
batches, and repair the cases where the two sides disagree about the past.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from zcells.db import instances as store
from zcells.db import outbox as outbox_store
from zcells.db.engine import Database

from tests.fakes import run
from tests.unit.scripted_node import ScriptedNode, instance, ok, runner, uuids
from zcells.clock import SYSTEM_CLOCK
from zcells.dbrunner import DbRunner
from zcells.errors import CallTimeout
from zcells.instances import Instance, placed
from zcells.upstream import Upstream, within_bytes


def decoded(payload: bytes) -> Instance:
    return Instance.from_wire(msgpack.unpackb(payload, raw=False))


@dataclass
class Parent:
    """What a parent keeps of one child: its applied sequence and the rows it took."""

    applied: int = 0
    took: list[int] = field(default_factory=list)
    uuids: list[str] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    first_takes: int | None = None  # rows of the first batch it applies (None: all)

    def progress(self, body: dict[str, Any]) -> Any:
        return ok("api", {"applied": self.applied})

    def updates(self, body: dict[str, Any]) -> Any:
        seqs = [row[0] for row in body["rows"]]
        self.batches.append(len(seqs))
        fresh = [row for row in body["rows"] if row[0] > self.applied]
        if self.first_takes is not None and len(self.batches) == 1:
            fresh = fresh[: self.first_takes]
        self.took += [row[0] for row in fresh]
        self.uuids += [decoded(row[2]).uuid for row in fresh]
        self.applied = max([self.applied, *self.took])
        return ok("api", {"applied": self.applied})


@pytest.fixture
def db(synced: Database) -> Iterator[DbRunner]:
    db_runner = runner(synced)
    yield db_runner
    db_runner.close()


def stream(
    db: DbRunner, parent: Parent, resyncs: list[int] | None = None, **options: Any
) -> Upstream:
    # The real clock: the stream's database reads run on threads, in real time.
    node = ScriptedNode(here="api!c1", parents={"api": "api"}, clock=SYSTEM_CLOCK)
    node.calls[("progress", "api")] = parent.progress
    node.calls[("updates", "api")] = parent.updates

    async def resync_children() -> None:
        if resyncs is not None:
            resyncs.append(1)

    return Upstream(
        node.as_node(),
        db,
        resync_children=resync_children,
        idle_s=0.01,
        retry_s=0.01,
        **options,
    )


def own(db: Database, count: int) -> list[Instance]:
    """`count` instances this cell holds, each with one outbox row."""
    made = []
    for uuid in uuids(count):
        record = placed(instance(uuid), "api!c1", "h1", 2.0)
        assert store.index_put(db, record)
        made.append(record)
    assert outbox_store.requeue(db, None) == count
    return made


async def until_taken(
    up: Upstream, parent: Parent, seq: int, trimmed: Database | None = None
) -> None:
    """Run the stream until the parent applied `seq` and, given `trimmed`, its outbox is empty."""

    def done() -> bool:
        if parent.applied < seq or up.acked.get("api", 0) < seq:
            return False
        return trimmed is None or outbox_store.read_outbox(trimmed, 0, 1) == []

    task = asyncio.create_task(up.run())
    try:
        async with asyncio.timeout(10):
            while not done():
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_every_row_goes_up_once_in_order_and_is_trimmed(db: DbRunner) -> None:
    own(db.db, 25)
    parent = Parent()
    up = stream(db, parent, batch_rows=10)
    run(until_taken(up, parent, 25, trimmed=db.db))  # the only parent applied them all
    assert parent.took == list(range(1, 26))
    assert parent.batches == [10, 10, 5]


def test_a_parent_that_applies_part_of_a_batch_gets_the_rest_next(db: DbRunner) -> None:
    """Rows read while a batch was in flight go next only if the whole batch was applied."""
    own(db.db, 25)
    parent = Parent(first_takes=3)
    up = stream(db, parent, batch_rows=10)
    run(until_taken(up, parent, 25, trimmed=db.db))
    assert parent.took == list(range(1, 26))
    assert parent.batches == [10, 10, 10, 2]


def test_a_batch_is_cut_to_fit_its_bytes() -> None:
    rows = [(n, "instance", b"x" * 400) for n in range(1, 6)]
    assert within_bytes(rows, 1000) == rows[:2]
    assert within_bytes(rows, 10) == rows[:1]  # one row always goes, however large
    assert within_bytes(rows, 10_000) == rows


def test_the_stream_resumes_after_what_the_parent_applied(db: DbRunner) -> None:
    own(db.db, 6)
    parent = Parent(applied=4)
    up = stream(db, parent)
    run(until_taken(up, parent, 6))
    assert parent.took == [5, 6]


def test_rows_trimmed_before_the_parent_took_them_requeue_the_subtree(db: DbRunner) -> None:
    made = own(db.db, 5)
    outbox_store.trim_outbox(db.db, 3)  # another parent took 1-3; this one took nothing
    parent = Parent()
    resyncs: list[int] = []
    up = stream(db, parent, resyncs=resyncs)
    run(until_taken(up, parent, 10))
    assert resyncs == [1]
    assert parent.took == [4, 5, 6, 7, 8, 9, 10]  # 4-5 as kept, then every instance again
    assert parent.uuids[2:] == [r.uuid for r in made]


def test_a_parent_ahead_of_this_database_gets_everything_under_new_numbers(
    db: DbRunner,
) -> None:
    made = own(db.db, 3)  # rows 1-3
    parent = Parent(applied=50)  # it applied rows of a newer past this database forgot
    resyncs: list[int] = []
    up = stream(db, parent, resyncs=resyncs)
    run(until_taken(up, parent, 53, trimmed=db.db))  # all trimmed once taken
    assert parent.took == [51, 52, 53]
    assert resyncs == [1]
    assert outbox_store.last_seq(db.db) == 53
    assert parent.uuids == [r.uuid for r in made]  # every instance went up again


def test_a_failed_call_asks_for_progress_again(db: DbRunner) -> None:
    made = own(db.db, 4)
    parent = Parent()
    failures = [1]

    def flaky(body: dict[str, Any]) -> Any:
        if failures:
            failures.pop()
            parent.applied = 2  # it applied, then the answer was lost
            raise CallTimeout("no answer")
        return parent.updates(body)

    up = stream(db, parent)
    node = up.node
    node.calls[("updates", "api")] = flaky  # type: ignore[attr-defined]
    run(until_taken(up, parent, 4))
    assert parent.took == [3, 4]  # 1-2 were applied by the lost call, never twice
    assert parent.uuids == [r.uuid for r in made[2:]]


def test_a_parent_that_reports_a_gap_gets_every_instance_again(db: DbRunner) -> None:
    """Its database went back in time while the stream ran: the rows it lacks were trimmed."""
    made = own(db.db, 3)
    parent = Parent()
    resyncs: list[int] = []
    up = stream(db, parent, resyncs=resyncs)
    reported = parent.updates

    def restored(body: dict[str, Any]) -> Any:
        answer = reported(body)
        if body["rows"][0][0] == 4:
            answer.value["gap"] = True
        return answer

    up.node.calls[("updates", "api")] = restored  # type: ignore[attr-defined]

    async def scenario() -> None:
        task = asyncio.create_task(up.run())
        try:
            async with asyncio.timeout(10):
                while up.acked.get("api", 0) < 3 or outbox_store.read_outbox(db.db, 0, 1):
                    await asyncio.sleep(0.01)
                assert resyncs == []
                parent.applied = 1  # restored: it forgets rows 2-3, trimmed here already
                assert outbox_store.requeue(db.db, None) == 3  # rows 4-6: the parent finds its gap
                up.wake()
                while parent.applied < 9:  # then every instance again as 7-9
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(scenario())
    assert resyncs == [1]
    assert parent.took == list(range(1, 10))
    assert sorted(parent.uuids[6:]) == sorted(r.uuid for r in made)
