"""The front door's rules against a scripted node and a real index: delete everywhere,
request ids, isolation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from zcells.db import catalog, registry
from zcells.db import instances as store
from zcells.db.engine import Database

from tests.fakes import run
from tests.unit.scripted_node import (
    ScriptedNode,
    client_call,
    instance,
    ok,
    runner,
    scheduling,
    uuids,
)
from zcells.builds import Placer, TopBuilds
from zcells.codec import packb
from zcells.dbrunner import DbRunner
from zcells.errors import (
    CellUnreachable,
    Conflict,
    Forbidden,
    InternalError,
    InvalidRequest,
    NotFoundRemote,
    QuotaExceeded,
)
from zcells.handlers.servers import ServerHandlers
from zcells.instances import Action, VmState, begin, placed
from zcells.messages import CellResult, Outcome

UUID, OTHER = uuids(2)
NOWHERE = ok("api!c1", {"found": False, "instance": None})
ELSEWHERE = placed(instance(UUID), "api!c1", "h001", 2.0)


@pytest.fixture
def db(synced: Database) -> Iterator[DbRunner]:
    registry.seed_default_flavors(synced)
    catalog.seed_default_images(synced)
    runs = runner(synced)
    yield runs
    runs.close()


def front_door(node: ScriptedNode, db: DbRunner) -> ServerHandlers:
    scheduler = scheduling(node.as_node())
    placer = Placer(node.as_node(), db, scheduler, None, lambda: None)
    builds = TopBuilds(placer, db, retries=0, retry_delay_s=0.0)
    return ServerHandlers(node.as_node(), db, builds, top=True)


def delete(uuid: str = UUID, request_id: str | None = "del-1", **who: Any) -> Any:
    args = {"uuid": uuid, "action": "delete", "request_id": request_id}
    return client_call("server_action", args, **who)


async def unplaced(db: DbRunner, *uuids: str, project: str = "ops") -> None:
    await db.write(store.index_create, [instance(u, project) for u in uuids], "create-" + uuids[0])


# -- delete everywhere ------------------------------------------------------------------------


def test_delete_everywhere_takes_the_record_of_the_cell_that_holds_the_server(
    db: DbRunner,
) -> None:
    held = placed(instance(UUID), "api!c2", "h001", 2.0)
    deleting = begin(held, Action.DELETE, 3.0)
    node = ScriptedNode(children=("c1", "c2"))
    found = ok("api!c2", {"found": True, "instance": deleting.to_wire()})
    node.broadcasts["instance_delete"] = (NOWHERE, found)

    async def main() -> None:
        await unplaced(db, UUID)
        shown = await front_door(node, db).server_action(delete())
        assert shown == deleting.view()
        assert await db.read(store.get, UUID) == deleting
        [sent] = node.sent
        assert sent.body["uuid"] == UUID
        assert sent.timeout_s is not None and sent.timeout_s < 10.0  # the request has 10 s

    run(main())


def test_delete_everywhere_held_by_no_cell_is_recorded_at_the_top_once(db: DbRunner) -> None:
    node = ScriptedNode(children=("c1",))
    node.broadcasts["instance_delete"] = (NOWHERE,)

    async def main() -> None:
        await unplaced(db, UUID)
        door = front_door(node, db)
        once = await door.server_action(delete())
        assert (once["status"], once["cell"], once["version"]) == ("DELETED", None, 2)
        assert await door.server_action(delete()) == once
        assert await door.server_action(delete(request_id="del-2")) == once
        assert (await db.read(store.get, UUID)).view() == once  # type: ignore[union-attr]
        assert len(node.sent) == 1  # only the first asked the cells

    run(main())


@pytest.mark.parametrize(
    "silent",
    [
        CellResult("api!c2", Outcome.TIMED_OUT),
        CellResult("api!c2", Outcome.ERROR, error=InternalError("broken", "api!c2")),
        ok("api!c2", {"found": "maybe"}),
        # Claims a record of a cell outside its own subtree.
        ok(
            "api!c2",
            {"found": True, "instance": placed(instance(UUID), "api!c1", "h1", 2.0).to_wire()},
        ),
    ],
    ids=["timed-out", "error", "malformed", "outside-its-subtree"],
)
def test_delete_everywhere_with_a_cell_not_answering_records_nothing(
    db: DbRunner, silent: CellResult
) -> None:
    node = ScriptedNode(children=("c1", "c2"))
    node.broadcasts["instance_delete"] = (NOWHERE, silent)

    async def main() -> None:
        await unplaced(db, UUID)
        with pytest.raises(CellUnreachable) as info:
            await front_door(node, db).server_action(delete())
        assert "api!c2" in info.value.message and "try again" in info.value.message
        assert await db.read(store.get, UUID) == instance(UUID)

    run(main())


def test_delete_everywhere_passes_on_the_refusal_of_the_cell_holding_the_server(
    db: DbRunner,
) -> None:
    node = ScriptedNode(children=("c1",))
    refused = Conflict(f"instance {UUID} is being deleted already", "api!c1")
    node.broadcasts["instance_delete"] = (CellResult("api!c1", Outcome.ERROR, error=refused),)

    async def main() -> None:
        await unplaced(db, UUID)
        with pytest.raises(Conflict) as info:
            await front_door(node, db).server_action(delete())
        assert info.value.cell == "api!c1"
        assert await db.read(store.get, UUID) == instance(UUID)

    run(main())


def test_only_a_delete_applies_to_a_server_in_no_cell(db: DbRunner) -> None:
    node = ScriptedNode(children=("c1",))

    async def main() -> None:
        await unplaced(db, UUID)
        stop = client_call("server_action", {"uuid": UUID, "action": "stop", "request_id": None})
        with pytest.raises(Conflict) as info:
            await front_door(node, db).server_action(stop)
        assert "still being scheduled" in info.value.message and node.sent == []

    run(main())


# -- request ids --------------------------------------------------------------------------------


def test_request_ids_sent_down_are_the_clients_own(db: DbRunner) -> None:
    node = ScriptedNode(children=("c1",))
    node.broadcasts["instance_delete"] = (CellResult("api!c1", Outcome.TIMED_OUT),)

    async def sent_for(call: Any) -> str:
        with pytest.raises(CellUnreachable):
            await front_door(node, db).server_action(call)
        return str(node.sent[-1].body["request_id"])

    async def main() -> None:
        await unplaced(db, UUID, OTHER)
        first = await sent_for(delete())
        assert await sent_for(delete()) == first
        assert len(first) <= 64 and first.isprintable()
        assert await sent_for(delete(OTHER)) != first
        assert await sent_for(delete(request_id="del-2")) != first
        assert await sent_for(delete(client="ops2")) != first
        without = {await sent_for(delete(request_id=None)) for _ in range(2)}
        assert len(without) == 1  # one message id, one request: the context's id

    run(main())


def test_the_same_create_request_id_from_two_clients_makes_two_servers(db: DbRunner) -> None:
    door = front_door(ScriptedNode(), db)

    async def create(client: str, project: str) -> list[str]:
        args = {
            "name": "web",
            "flavor": "m1.tiny",
            "image": "cirros",
            "count": 2,
            "hints": None,
            "metadata": None,
            "request_id": "create-1",
        }
        call = client_call("server_create", args, client=client, role="member", project=project)
        return list((await door.server_create(call))["servers"])

    async def main() -> None:
        alice = await create("alice", "proj-a")
        assert await create("alice", "proj-a") == alice
        bob = await create("bob", "proj-b")
        assert len(bob) == 2 and set(bob).isdisjoint(alice)
        for uuid in alice:
            assert (await db.read(store.get, uuid)).project == "proj-a"  # type: ignore[union-attr]
        await door.builds.close()

    run(main())


# -- isolation ----------------------------------------------------------------------------------


def test_another_projects_server_answers_as_a_missing_one(db: DbRunner) -> None:
    node = ScriptedNode(children=("c1",))
    missing = "00000000-0000-4000-8000-00000000beef"

    async def refusal(coro: Any) -> NotFoundRemote:
        with pytest.raises(NotFoundRemote) as info:
            await coro
        return info.value

    async def main() -> None:
        await unplaced(db, UUID, project="proj-a")
        door = front_door(node, db)
        bob = {"client": "bob", "role": "member", "project": "proj-b"}
        for make in (
            lambda uuid: door.server_action(delete(uuid, **bob)),
            lambda uuid: door.server_show(client_call("server_show", {"uuid": uuid}, **bob)),
        ):
            hidden = await refusal(make(UUID))
            absent = await refusal(make(missing))
            assert hidden.message.replace(UUID, "X") == absent.message.replace(missing, "X")
            assert "proj-a" not in hidden.message
        assert node.sent == []
        assert (await db.read(store.get, UUID)).vm_state is VmState.BUILDING  # type: ignore[union-attr]

    run(main())


@pytest.mark.parametrize("hints", [{"target_cell": "api!c1"}, {"no_such_hint": 1}])
def test_a_member_may_not_pass_scheduler_hints(db: DbRunner, hints: dict[str, Any]) -> None:
    args = {
        "name": "web",
        "flavor": "m1.tiny",
        "image": "cirros",
        "count": 1,
        "hints": hints,
        "metadata": None,
        "request_id": None,
    }
    call = client_call("server_create", args, client="alice", role="member", project="proj-a")
    with pytest.raises(Forbidden):
        run(front_door(ScriptedNode(), db).server_create(call))
    assert run(db.read(store.list_instances)) == []


# -- host_list ------------------------------------------------------------------------------


def test_host_list_keeps_what_each_cell_said_and_names_the_cells_itself(db: DbRunner) -> None:
    node = ScriptedNode(children=("c1", "c2", "c3", "c4"))
    row = {"name": "h001", "enabled": True, "memory_mb": 1024, "memory_mb_used": 512}
    node.broadcasts["hosts"] = (
        ok("api!c1", {"hosts": [{**row, "cell": "api!c4"}]}),  # a cell speaks for its own only
        ok("api!c2", {"hosts": [{"enabled": True}]}),
        CellResult("api!c3", Outcome.TIMED_OUT),
        ok("api!c4", {"hosts": []}),
    )
    door = front_door(node, db)

    async def main() -> None:
        listed = await door.host_list(client_call("host_list", {"cell": None}))
        assert listed["hosts"] == [{**row, "cell": "api!c1"}]
        assert listed["errors"] == [
            {"cell": "api!c2", "error": "E_SCHEMA"},
            {"cell": "api!c3", "error": "E_TIMEOUT"},
        ]
        assert node.sent[0].timeout_s is not None and node.sent[0].timeout_s < 10.0
        part = await door.host_list(client_call("host_list", {"cell": "api!c3"}))
        assert part == {"hosts": [], "errors": [{"cell": "api!c3", "error": "E_TIMEOUT"}]}
        with pytest.raises(InvalidRequest):
            await door.host_list(client_call("host_list", {"cell": "elsewhere!c1"}))

    run(main())


# -- bounds: pages by bytes, metadata, quotas ---------------------------------------------


def list_args(**changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "status": None,
        "cell": None,
        "name": None,
        "marker": None,
        "limit": 1000,
        "all_projects": True,
    }
    return {**args, **changes}


def test_a_listing_page_ends_early_when_its_bytes_run_out(db: DbRunner) -> None:
    """Row 28: every page fits its byte budget, and the pages together hold every server."""
    heavy = {f"k{i:02}": "v" * 255 for i in range(40)}  # ~10 KB of metadata each

    async def main() -> None:
        made = [instance(u, metadata=heavy) for u in uuids(30)]
        await db.write(store.index_create, made, "heavy")
        door = front_door(ScriptedNode(), db)
        door.page_bytes = 64 * 1024
        seen: list[str] = []
        marker = None
        for _ in range(30):
            page = await door.server_list(client_call("server_list", list_args(marker=marker)))
            size = sum(len(packb(view)) for view in page["servers"])
            assert 0 < len(page["servers"]) < 30 and size <= door.page_bytes
            seen += [view["uuid"] for view in page["servers"]]
            marker = page["next_marker"]
            if marker is None:
                break
        assert sorted(seen) == sorted(i.uuid for i in made)

    run(main())


def create_args(**changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "name": "web",
        "flavor": "m1.tiny",
        "image": "cirros",
        "count": 1,
        "hints": None,
        "metadata": None,
        "request_id": None,
    }
    return {**args, **changes}


def test_metadata_past_the_item_or_byte_limits_is_refused(db: DbRunner) -> None:
    wide = {f"k{i:02}": "\U0001f600" * 255 for i in range(64)}  # ~65 KB in four-byte characters

    async def main() -> None:
        door = front_door(ScriptedNode(), db)
        member = {"role": "member", "client": "mallory", "project": "p-m"}
        with pytest.raises(QuotaExceeded, match="metadata of 65"):
            await door.server_create(client_call("server_create", create_args(metadata=wide)))
        door.quota = replace(door.quota, metadata_items=2)
        many = {"a": "1", "b": "2", "c": "3"}
        with pytest.raises(QuotaExceeded, match="3 metadata items, at most 2"):
            await door.server_create(client_call("server_create", create_args(metadata=many)))
        with pytest.raises(InvalidRequest):
            bad = create_args(metadata={"k": 5})
            await door.server_create(client_call("server_create", bad, **member))
        assert await db.read(store.list_instances, limit=10) == []

    run(main())


def test_a_members_creates_stop_at_the_projects_quota_and_an_admins_do_not(
    db: DbRunner,
) -> None:
    async def main() -> None:
        door = front_door(ScriptedNode(), db)
        member = {"role": "member", "client": "mallory", "project": "p-m"}
        with pytest.raises(QuotaExceeded, match="servers limit 10, in use 0, requested 100"):
            await door.server_create(
                client_call("server_create", create_args(count=100, request_id="q-1"), **member)
            )
        made = await door.server_create(
            client_call("server_create", create_args(count=10, request_id="q-2"), **member)
        )
        assert len(made["servers"]) == 10
        with pytest.raises(QuotaExceeded):
            await door.server_create(
                client_call("server_create", create_args(request_id="q-3"), **member)
            )
        shown = await door.quota_show(client_call("quota_show", {"project": None}, **member))
        assert shown["in_use"] == {"servers": 10, "vcpus": 10, "ram_mb": 5120}
        with pytest.raises(Forbidden):
            await door.quota_show(client_call("quota_show", {"project": "other"}, **member))

        raised = {"project": "p-m", "limits": {"servers": 11}}
        shown = await door.quota_set(client_call("quota_set", raised))
        assert shown["quota"]["servers"] == 11 and shown["own"] == {"servers": 11}
        await door.server_create(
            client_call("server_create", create_args(request_id="q-4"), **member)
        )
        with pytest.raises(InvalidRequest, match="no quota 'cores'"):
            await door.quota_set(
                client_call("quota_set", {"project": "p-m", "limits": {"cores": 1}})
            )
        made = await door.server_create(
            client_call("server_create", create_args(count=50, request_id="q-5"))
        )
        assert len(made["servers"]) == 50  # an admin is not limited

    run(main())
