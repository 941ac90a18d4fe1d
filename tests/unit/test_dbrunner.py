"""The writer: writes asked for together share one commit, each with its own outcome."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from zcells.db import hosts as hosts_store
from zcells.db import instances as store
from zcells.db import outbox as outbox_store
from zcells.db.engine import Database

from tests.fakes import run
from tests.unit.scripted_node import instance, runner, uuids
from zcells.dbrunner import DbRunner
from zcells.errors import Conflict, DatabaseBusy
from zcells.instances import Instance, placed
from zcells.records import Host

FIRST, SECOND, THIRD = uuids(3)


@pytest.fixture
def db(synced: Database) -> Iterator[DbRunner]:
    runs = runner(synced)
    yield runs
    runs.close()


def place(db: Database, uuid: str) -> Instance | None:
    make = lambda host: placed(instance(uuid), "api!c1", host, 2.0)  # noqa: E731
    return store.place(db, ["h001"], make, f"b-{uuid}")


def test_a_write_that_fails_in_a_group_undoes_only_its_own_work(db: DbRunner) -> None:
    gate = threading.Event()

    def held_open(_: Database) -> None:  # keeps the writer busy while the group queues
        gate.wait(10)

    def fails(database: Database) -> None:
        place(database, SECOND)
        raise Conflict("no")

    async def main() -> None:
        await db.write(hosts_store.sync_hosts, [Host("h001", True, 4096, 100, 8)])
        before = await db.read(outbox_store.last_seq)
        blocker = asyncio.ensure_future(db.write(held_open))
        await asyncio.sleep(0.05)
        writes = [
            asyncio.ensure_future(db.write(place, FIRST)),
            asyncio.ensure_future(db.write(fails)),
            asyncio.ensure_future(db.write(place, THIRD)),
        ]
        await asyncio.sleep(0.05)
        assert not any(write.done() for write in writes)
        gate.set()
        await blocker
        first, failed, third = await asyncio.gather(*writes, return_exceptions=True)
        assert isinstance(first, Instance) and first.uuid == FIRST
        assert isinstance(failed, Conflict)
        assert isinstance(third, Instance) and third.uuid == THIRD
        assert await db.read(store.get, SECOND) is None
        assert await db.read(outbox_store.last_seq) == before + 2
        (host,) = await db.read(hosts_store.list_hosts)
        assert host.memory_mb_used == 2 * first.memory_mb

    run(main())


def test_a_group_that_meets_a_database_error_runs_each_write_alone(db: DbRunner) -> None:
    gate = threading.Event()
    calls: list[str] = []

    def held_open(_: Database) -> None:
        gate.wait(10)

    def busy_once(database: Database) -> None:
        calls.append("busy")
        if len(calls) == 1:
            with database.write():
                raise DatabaseBusy("locked")

    async def main() -> None:
        await db.write(hosts_store.sync_hosts, [Host("h001", True, 4096, 100, 8)])
        blocker = asyncio.ensure_future(db.write(held_open))
        await asyncio.sleep(0.05)
        first = asyncio.ensure_future(db.write(place, FIRST))
        busy = asyncio.ensure_future(db.write(busy_once))
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        taken, _ = await asyncio.gather(first, busy)
        assert taken is not None and taken.uuid == FIRST
        assert calls == ["busy", "busy"]  # the group was undone, then each write ran alone
        assert await db.read(store.get, FIRST) == taken

    run(main())
