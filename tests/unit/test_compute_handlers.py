"""A compute cell's part in actions from its parent: repeats by request id, delete everywhere."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from zcells.db import hosts as hosts_store
from zcells.db import instances as store
from zcells.db import outbox as outbox_store
from zcells.db.engine import Database

from tests.fakes import run
from tests.unit.scripted_node import ScriptedNode, instance, parent_call, runner, scheduling, uuids
from zcells.builds import Placer
from zcells.clock import FakeClock
from zcells.dbrunner import DbRunner
from zcells.errors import Conflict
from zcells.handlers.compute import ComputeHandlers
from zcells.instances import Instance, finish, placed
from zcells.records import Host

UUID, OTHER = uuids(2)
CELL = "api!c1"


@pytest.fixture
def db(synced: Database) -> Iterator[DbRunner]:
    runs = runner(synced)
    yield runs
    runs.close()


def handlers(db: DbRunner) -> ComputeHandlers:
    node = ScriptedNode(here=CELL, clock=FakeClock(start=0.0, wall_at_zero=10.0)).as_node()
    placer = Placer(node, db, scheduling(node), None, lambda: None)
    return ComputeHandlers(db, placer, None, lambda: None)


async def held_here(db: DbRunner, uuid: str) -> Instance:
    await db.write(hosts_store.sync_hosts, [Host("h001", True, 4096, 100, 8)])
    taken = await db.write(
        store.place, ["h001"], lambda host: placed(instance(uuid), CELL, host, 2.0), f"b-{uuid}"
    )
    assert taken is not None
    return await db.write(store.change, uuid, lambda i: finish(i, 3.0), request_id=None, method="f")


def action(uuid: str, name: str, request_id: str) -> dict[str, str]:
    return {"uuid": uuid, "action": name, "request_id": request_id}


def test_an_action_sent_twice_is_done_once(db: DbRunner) -> None:
    async def main() -> None:
        active = await held_here(db, UUID)
        cell = handlers(db)
        before = await db.read(outbox_store.last_seq)
        once = await cell.instance_action(
            parent_call("instance_action", action(UUID, "stop", "r1"))
        )
        twice = await cell.instance_action(
            parent_call("instance_action", action(UUID, "stop", "r1"))
        )
        assert once == twice
        assert once["instance"]["version"] == active.version + 1
        assert await db.read(outbox_store.last_seq) == before + 1  # one change, one outbox row
        # The first result, whatever the second asked for under the same id.
        start = await cell.instance_action(
            parent_call("instance_action", action(UUID, "start", "r1"))
        )
        assert start == once
        with pytest.raises(Conflict):  # a new id is new work: it runs already
            await cell.instance_action(parent_call("instance_action", action(UUID, "stop", "r2")))
        assert await db.read(outbox_store.last_seq) == before + 1

    run(main())


def test_delete_everywhere_finds_only_what_this_cell_holds(db: DbRunner) -> None:
    async def main() -> None:
        active = await held_here(db, UUID)
        cell = handlers(db)
        body = {"uuid": OTHER, "request_id": "d1"}
        assert await cell.instance_delete(parent_call("instance_delete", body)) == {
            "found": False,
            "instance": None,
        }
        body = {"uuid": UUID, "request_id": "d1"}
        once = await cell.instance_delete(parent_call("instance_delete", body))
        assert once["found"] and once["instance"]["task_state"] == "deleting"
        assert once["instance"]["version"] == active.version + 1
        assert await cell.instance_delete(parent_call("instance_delete", body)) == once
        # The targeted repeat of the same request answers the same.
        repeat = await cell.instance_action(
            parent_call("instance_action", action(UUID, "delete", "d1"))
        )
        assert repeat == {"instance": once["instance"]}

    run(main())


def test_delete_everywhere_of_an_instance_deleted_here_already_answers_its_record(
    db: DbRunner,
) -> None:
    async def main() -> None:
        await held_here(db, UUID)
        cell = handlers(db)
        await cell.instance_action(parent_call("instance_action", action(UUID, "delete", "d1")))
        gone = await db.write(
            store.change, UUID, lambda i: finish(i, 4.0), request_id=None, method="f"
        )
        assert gone.deleted
        body = {"uuid": UUID, "request_id": "d2"}
        found = await cell.instance_delete(parent_call("instance_delete", body))
        assert found == {"found": True, "instance": gone.to_wire()}
        stop = action(UUID, "stop", "s1")
        with pytest.raises(Conflict):  # only the broadcast is lenient: it asks where it is
            await cell.instance_action(parent_call("instance_action", stop))

    run(main())
