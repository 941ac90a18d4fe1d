"""The server rules across a tree of real `zcells serve` processes (DESIGN.md §4, §5, §7, §8).

api ── c1 ── g1        c1 and g1 have two fake hosts each;
 └──── c2              c2 has none, so every build must land under c1.

One tree serves the whole module: each test uses servers of its own names
and leaves the tree as it found it (the test that stops c1 waits for it to
be back). Clients: "ops" (admin), "alice" and "bob" (members of proj-a and
proj-b), "rita" (reader of proj-a).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes import run
from tests.integration.trees import (
    answer,
    every_server,
    held_by_cells,
    index_agrees_with_cells,
    refused,
    servers,
    summary,
)
from tests.polling import until
from zcells.client import CellClient
from zcells.devtree import CellTree, running_tree
from zcells.errors import (
    CellUnreachable,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFoundRemote,
    NoValidHost,
)

TREE = {"api": {"c1": {"g1": {}}, "c2": {}}}
COMPUTE = {"c1": "api!c1", "g1": "api!c1!g1", "c2": "api!c2"}
WITH_HOSTS = ("api!c1", "api!c1!g1")
HOST_RAM_MB, HOST_DISK_GB, HOST_VCPUS = 16384, 200, 16
CLIENTS = {
    "alice": ("member", "proj-a"),
    "bob": ("member", "proj-b"),
    "rita": ("reader", "proj-a"),
}
TINY = {"flavor": "m1.tiny", "image": "cirros"}
MISSING = "00000000-0000-4000-8000-000000000000"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellTree]:
    with running_tree(
        TREE,
        tmp_path_factory.mktemp("server-rules"),
        log_level="info",
        clients=CLIENTS,
        compute={
            "fake_hosts": 2,
            "fake_host_ram_mb": HOST_RAM_MB,
            "fake_host_disk_gb": HOST_DISK_GB,
            "fake_host_vcpus": HOST_VCPUS,
            "fake_build_seconds": 0.05,
        },
        cell_compute={"c2": {"fake_hosts": 0}},
        scheduler_retries=3,
        scheduler_retry_delay=0.2,
        call_timeout=4,
    ) as cells:
        yield cells
        for cell in cells.cells.values():
            assert "Traceback" not in cell.log_text(), cell.log_text()[-6000:]


async def show(client: CellClient, uuid: str) -> dict[str, Any]:
    return await answer(client, "server_show", {"uuid": uuid})  # type: ignore[no-any-return]


async def status_is(client: CellClient, uuids: list[str], status: str) -> list[dict[str, Any]]:
    """The servers once each shows `status` with no task running, else an empty list."""
    rows = [await show(client, uuid) for uuid in uuids]
    done = all(r["status"] == status and r["task_state"] is None for r in rows)
    return rows if done else []


async def tree_is_whole(client: CellClient) -> bool:
    """Every cell answers, and each sees every neighbour of it alive."""
    pings = await client.ping_all(timeout_s=2)
    if len(pings) != len(COMPUTE) + 1 or not all(p.ok for p in pings):
        return False
    for cell in ("api", *COMPUTE.values()):
        stats = (await client.call("stats", {}, target=cell)).unwrap()
        if any(state != "alive" for state in stats["neighbours"].values()):
            return False
    return True


# -- 1. idempotency -----------------------------------------------------------------------


def test_a_request_id_sent_twice_does_the_work_once(tree: CellTree) -> None:
    async def main() -> None:
        async with tree.client(timeout_s=30) as ops:
            create = {"name": "idem", **TINY, "count": 3, "request_id": "idem-create"}
            first = (await answer(ops, "server_create", create))["servers"]
            again = (await answer(ops, "server_create", create))["servers"]
            assert again == first and len(set(first)) == 3
            rows = await until(lambda: status_is(ops, first, "ACTIVE"), 30, "idem ACTIVE")
            assert {r["uuid"] for r in await servers(ops, name="idem")} == set(first)
            active = {r["uuid"]: r["version"] for r in rows}

            # A delete sent twice: one answer, one delete, the version moves once.
            victim = first[0]
            delete = {"uuid": victim, "action": "delete", "request_id": "idem-delete"}
            once = await answer(ops, "server_action", delete)
            twice = await answer(ops, "server_action", delete)
            assert once == twice
            assert once["task_state"] == "deleting" and once["version"] == active[victim] + 1
            # Another request id is another request: the delete runs already.
            other = await refused(ops, "server_action", {**delete, "request_id": "idem-delete-2"})
            assert isinstance(other, Conflict)
            gone = await until(lambda: status_is(ops, [victim], "DELETED"), 30, "the delete")
            assert gone[0]["version"] == active[victim] + 2
            # Still the first answer, once the delete has finished.
            assert await answer(ops, "server_action", delete) == once

            # The same for a stop: the cell answers its first result again.
            stopped = first[1]
            stop = {"uuid": stopped, "action": "stop", "request_id": "idem-stop"}
            once = await answer(ops, "server_action", stop)
            assert await answer(ops, "server_action", stop) == once
            assert once["version"] == active[stopped] + 1
            rows = await until(lambda: status_is(ops, [stopped], "SHUTOFF"), 30, "the stop")
            assert rows[0]["version"] == active[stopped] + 2
            assert await answer(ops, "server_action", stop) == once

            # The cells hold exactly what the index holds, versions included.
            held = await until(
                lambda: index_agrees_with_cells(ops, tree, COMPUTE), 30, "index == cells"
            )
            index, _ = held
            assert index[victim][0] == "DELETED" and index[victim][3] == active[victim] + 2
            assert index[stopped][0] == "SHUTOFF" and index[stopped][3] == active[stopped] + 2
            assert index[first[2]][0] == "ACTIVE" and index[first[2]][3] == active[first[2]]

    run(main(), timeout_s=90)


# -- 2. no valid host anywhere, and delete everywhere of a server in no cell ---------------


def test_a_flavor_no_host_fits_ends_in_error_naming_why_and_where(tree: CellTree) -> None:
    async def main() -> None:
        async with tree.client(timeout_s=30) as ops:
            huge = {"name": "huge", "ram": HOST_RAM_MB * 4, "disk": 10, "vcpus": 1}
            made = await answer(ops, "flavor_create", huge)
            assert (made["name"], made["memory_mb"]) == ("huge", HOST_RAM_MB * 4)
            assert isinstance(await refused(ops, "flavor_create", huge), Conflict)

            create = {"name": "huge", "flavor": "huge", "image": "cirros", "request_id": "huge-1"}
            [uuid] = (await answer(ops, "server_create", create))["servers"]
            [row] = await until(lambda: status_is(ops, [uuid], "ERROR"), 30, "huge in ERROR")
            assert row["cell"] is None and row["host"] is None
            fault = row["fault"]
            assert fault["code"] == NoValidHost.code and fault["cell"] == "api"
            message = fault["message"]
            # Each cell below says why it could not: tried, with its hosts short of RAM, or
            # known to have no room by the cell above it, whose filter removed it then. Which
            # depends on how far the new flavor and the announcements had come.
            why = {
                "g1": ("api!c1!g1", "g1: capacity (no room for huge", "c1: capacity (no room"),
                "c2": ("api!c2", "c2: capacity (no room for huge"),
            }
            for cell, reasons in why.items():
                assert any(reason in message for reason in reasons), (cell, message)

            # The same request again answers the same server and builds nothing again:
            # once a later build of the same flavor has failed, the first is unchanged.
            again = (await answer(ops, "server_create", create))["servers"]
            assert again == [uuid]
            later = {**create, "name": "huge-later", "request_id": "huge-2"}
            [sentinel] = (await answer(ops, "server_create", later))["servers"]
            await until(lambda: status_is(ops, [sentinel], "ERROR"), 30, "huge-later in ERROR")
            assert await show(ops, uuid) == row

            # Only a delete applies to a server in no cell ...
            stop = await refused(ops, "server_action", {"uuid": uuid, "action": "stop"})
            assert isinstance(stop, Conflict) and "in no cell" in stop.message
            # ... and no cell holds it, so the top records the delete itself, once.
            delete = {"uuid": uuid, "action": "delete", "request_id": "huge-delete"}
            once = await answer(ops, "server_action", delete)
            assert once["status"] == "DELETED" and once["cell"] is None
            assert once["version"] == row["version"] + 2
            assert await answer(ops, "server_action", delete) == once
            assert await show(ops, uuid) == once
            assert uuid not in await held_by_cells(tree, COMPUTE)
            await answer(ops, "server_action", {"uuid": sentinel, "action": "delete"})

    run(main(), timeout_s=90)


# -- 3. a cell with no hosts ----------------------------------------------------------------


def test_every_build_lands_in_a_cell_with_hosts(tree: CellTree) -> None:
    async def main() -> None:
        async with tree.client(timeout_s=30) as ops:
            create = {"name": "spread", **TINY, "count": 12}
            created = (await answer(ops, "server_create", create))["servers"]

            async def settled() -> list[dict[str, Any]]:
                rows = await servers(ops, name="spread")
                return rows if all(r["status"] != "BUILD" for r in rows) else []

            rows = await until(settled, 30, "the spread builds to settle")
            assert {r["uuid"] for r in rows} == set(created)
            assert [r for r in rows if r["status"] != "ACTIVE"] == []
            assert {r["cell"] for r in rows} <= set(WITH_HOSTS)
            async with tree.client("c2") as c2:
                assert await every_server(c2) == []

    run(main(), timeout_s=60)


# -- 4. isolation ---------------------------------------------------------------------------


def test_projects_are_isolated_and_roles_hold(tree: CellTree) -> None:
    async def main() -> None:
        async with (
            tree.client(timeout_s=30) as ops,
            tree.client(timeout_s=30, as_client="alice") as alice,
            tree.client(timeout_s=30, as_client="bob") as bob,
            tree.client(timeout_s=30, as_client="rita") as rita,
        ):
            create = {"name": "iso", **TINY, "count": 2, "request_id": "iso-create"}
            mine = (await answer(alice, "server_create", create))["servers"]
            # Bob's request id is his own, even when Alice used it too.
            theirs = (await answer(bob, "server_create", {**create, "count": 1}))["servers"]
            assert set(theirs).isdisjoint(mine) and len(theirs) == 1
            await until(lambda: status_is(ops, mine + theirs, "ACTIVE"), 30, "iso ACTIVE")
            shown = await show(alice, mine[0])
            assert (shown["project"], shown["user"]) == ("proj-a", "alice")

            listed = {r["uuid"] for r in await servers(bob, all_projects=False)}
            assert listed == set(theirs)
            assert {r["uuid"] for r in await servers(alice, all_projects=False)} == set(mine)
            assert {r["uuid"] for r in await servers(rita, all_projects=False)} == set(mine)
            assert set(mine + theirs) <= {r["uuid"] for r in await servers(ops)}
            for member in (alice, bob, rita):
                every = await refused(member, "server_list", {"all_projects": True})
                assert isinstance(every, Forbidden)
            for path in WITH_HOSTS:  # a compute cell keeps projects apart too
                async with tree.client(path.rsplit("!", 1)[-1], as_client="bob") as there:
                    rows = await servers(there, all_projects=False)
                    assert set(mine).isdisjoint(r["uuid"] for r in rows)

            # Another project's server answers exactly as a missing one.
            for method, body in (
                ("server_show", {}),
                ("server_action", {"action": "stop"}),
                ("server_action", {"action": "delete"}),
            ):
                hidden = await refused(bob, method, {**body, "uuid": mine[0]})
                absent = await refused(bob, method, {**body, "uuid": MISSING})
                assert isinstance(hidden, NotFoundRemote)
                assert (hidden.code, hidden.cell) == (absent.code, absent.cell)
                assert hidden.message.replace(mine[0], "X") == absent.message.replace(MISSING, "X")
                for secret in ("proj-a", "alice", "c1", "g1"):
                    assert secret not in hidden.message.replace(mine[0], "")
            hidden = await refused(bob, "server_list", {"marker": mine[0]})
            absent = await refused(bob, "server_list", {"marker": MISSING})
            assert isinstance(hidden, InvalidRequest)
            assert hidden.message.replace(mine[0], "X") == absent.message.replace(MISSING, "X")
            assert (await show(alice, mine[0]))["task_state"] is None  # Bob's delete did nothing

            # A reader reads its project and changes nothing.
            assert (await show(rita, mine[0]))["uuid"] == mine[0]
            assert isinstance(
                await refused(rita, "server_show", {"uuid": theirs[0]}), NotFoundRemote
            )
            stop = {"uuid": mine[0], "action": "stop"}
            assert isinstance(await refused(rita, "server_action", stop), Forbidden)
            assert isinstance(await refused(rita, "server_create", create), Forbidden)

            # Scheduler hints are for admins, whatever they say.
            for hints in ({"target_cell": "api!c1"}, {"no_such_hint": "x"}):
                hinted = {"name": "hinted", **TINY, "hints": hints}
                assert isinstance(await refused(alice, "server_create", hinted), Forbidden)
            # And admin-only methods are refused to members and readers.
            for member in (alice, rita):
                for method, body in (
                    ("host_list", {}),
                    ("cell_sync", {"cell": "api!c1"}),
                    ("flavor_create", {"name": "mine", "ram": 1, "disk": 1, "vcpus": 1}),
                ):
                    assert isinstance(await refused(member, method, body), Forbidden), method
            flavors = (await answer(alice, "flavor_list"))["flavors"]
            assert "mine" not in {f["name"] for f in flavors}

            for uuid in mine:
                await answer(alice, "server_action", {"uuid": uuid, "action": "delete"})
            await answer(bob, "server_action", {"uuid": theirs[0], "action": "delete"})
            await until(lambda: status_is(ops, mine + theirs, "DELETED"), 30, "iso deleted")

    run(main(), timeout_s=90)


# -- 5. host_list ---------------------------------------------------------------------------


SIZES_MB = {"m1.tiny": 512, "m1.small": 2048}


def _live_mb(records: list[dict[str, Any]], cell: str) -> int:
    return sum(
        SIZES_MB[r["flavor"]] for r in records if r["cell"] == cell and r["status"] != "DELETED"
    )


def _usage_matches(hosts: list[dict[str, Any]], records: list[dict[str, Any]]) -> bool:
    """Whether each host's used RAM is what the live instances on it take."""
    used: dict[tuple[str, str], int] = {}
    for record in records:
        if record["status"] != "DELETED" and record["host"] is not None:
            key = (record["cell"], record["host"])
            used[key] = used.get(key, 0) + SIZES_MB[record["flavor"]]
    return all(h["memory_mb_used"] == used.get((h["cell"], h["name"]), 0) for h in hosts)


Seen = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # hosts, instance records


def test_host_list_shows_every_host_and_what_is_used(tree: CellTree) -> None:
    async def main() -> None:
        async with tree.client(timeout_s=30) as ops:

            async def consistent() -> Seen | None:
                """Hosts and the index's records, once every host's usage matches its instances."""
                listed = await answer(ops, "host_list", {})
                assert listed["errors"] == []
                records = [r for r in await every_server(ops) if r["cell"] in WITH_HOSTS]
                ok = _usage_matches(listed["hosts"], records)
                return (listed["hosts"], records) if ok else None

            hosts, records = await until(consistent, 30, "host usage to match the instances")
            assert [(h["cell"], h["name"]) for h in hosts] == [
                (cell, name) for cell in WITH_HOSTS for name in ("h001", "h002")
            ]
            for host in hosts:
                assert host["enabled"]
                sizes = (host["memory_mb"], host["disk_gb"], host["vcpus"])
                assert sizes == (HOST_RAM_MB, HOST_DISK_GB, HOST_VCPUS)
            g1 = "api!c1!g1"
            used_before = sum(h["memory_mb_used"] for h in hosts if h["cell"] == g1)
            live_before = _live_mb(records, g1)

            create = {"name": "hosted", "flavor": "m1.small", "image": "cirros", "count": 4}
            create["hints"] = {"target_cell": g1}  # an admin may aim a build
            created = (await answer(ops, "server_create", create))["servers"]
            rows = await until(lambda: status_is(ops, created, "ACTIVE"), 30, "hosted ACTIVE")
            assert {r["cell"] for r in rows} == {g1}
            hosts, records = await until(consistent, 30, "host usage to count the new servers")
            used_after = sum(h["memory_mb_used"] for h in hosts if h["cell"] == g1)
            # What went meanwhile (deletes finishing) is all that can offset the growth.
            gone = live_before + 4 * 2048 - _live_mb(records, g1)
            assert used_after == used_before + 4 * 2048 - gone and used_after >= 4 * 2048
            for host in hosts:
                on_it = [r for r in rows if (r["cell"], r["host"]) == (host["cell"], host["name"])]
                assert host["memory_mb_used"] >= 2048 * len(on_it)
                assert host["vcpus_used"] >= len(on_it)

            # `cell` keeps to a subtree; the cell a client talks to lists its own subtree.
            for cell, expected in (
                ("api!c1", set(WITH_HOSTS)),
                (g1, {g1}),
                ("api!c2", set()),
            ):
                part = await answer(ops, "host_list", {"cell": cell})
                assert {h["cell"] for h in part["hosts"]} == expected and part["errors"] == []
                assert len(part["hosts"]) == 2 * len(expected)
            async with tree.client("c1", timeout_s=30) as c1:
                own = await answer(c1, "host_list", {})
                listed = {(h["cell"], h["name"]) for h in own["hosts"]}
                assert listed == {(h["cell"], h["name"]) for h in hosts}

            for uuid in created:
                await answer(ops, "server_action", {"uuid": uuid, "action": "delete"})
            await until(lambda: status_is(ops, created, "DELETED"), 30, "hosted deleted")
            hosts, records = await until(consistent, 30, "host usage to drop the deleted ones")
            assert all(r["status"] == "DELETED" for r in records if r["uuid"] in created)

    run(main(), timeout_s=90)


# -- 6. resync ------------------------------------------------------------------------------


def test_cell_sync_requeues_a_subtree_and_the_index_still_agrees(tree: CellTree) -> None:
    async def main() -> None:
        async with tree.client(timeout_s=30) as ops:
            created = (await answer(ops, "server_create", {"name": "synced", **TINY, "count": 4}))[
                "servers"
            ]
            await until(lambda: status_is(ops, created, "ACTIVE"), 30, "synced ACTIVE")
            await answer(ops, "server_action", {"uuid": created[0], "action": "delete"})
            index, held = await until(
                lambda: index_agrees_with_cells(ops, tree, COMPUTE), 30, "index == cells"
            )
            own_c1 = await held_by_cells(tree, ["c1"])
            own_g1 = await held_by_cells(tree, ["g1"])

            synced = await answer(ops, "cell_sync", {"cell": "api!c1"})
            assert synced["cell"] == "api!c1"
            assert synced["cells"] == {"api!c1": len(own_c1), "api!c1!g1": len(own_g1)}
            assert synced["errors"] == {}
            empty = await answer(ops, "cell_sync", {"cell": "api!c2"})
            assert empty["cells"] == {"api!c2": 0}
            assert isinstance(await refused(ops, "cell_sync", {"cell": "api"}), InvalidRequest)

            after, _ = await until(
                lambda: index_agrees_with_cells(ops, tree, COMPUTE), 30, "index == cells again"
            )
            assert after.keys() >= index.keys() == held.keys()
            for uuid, (_, _, _, version) in index.items():
                assert after[uuid][3] >= version, uuid

    run(main(), timeout_s=90)


def test_cell_sync_keeps_the_answers_of_a_subtree_with_a_frozen_cell(tree: CellTree) -> None:
    async def main() -> None:
        async with tree.client(timeout_s=30) as ops:
            await until(lambda: tree_is_whole(ops), 30, "the tree to be whole")
            own_c1 = await held_by_cells(tree, ["c1"])
            tree.signal("g1", signal.SIGSTOP)
            try:
                synced = await answer(ops, "cell_sync", {"cell": "api!c1"})
            finally:
                tree.signal("g1", signal.SIGCONT)
            assert synced["cells"] == {"api!c1": len(own_c1)}
            assert synced["errors"]["api!c1!g1"]["code"] == "E_TIMEOUT"
            await until(lambda: tree_is_whole(ops), 30, "the tree to be whole again")

    run(main(), timeout_s=90)


# -- 7. delete everywhere, with a cell that does not answer -----------------------------------


def test_delete_of_a_server_in_no_known_cell_waits_for_every_cell(tree: CellTree) -> None:
    async def main() -> None:
        async with tree.client(timeout_s=30) as ops:
            await until(lambda: tree_is_whole(ops), 30, "the tree to be whole")
            tree.signal("c1", signal.SIGSTOP)
            try:
                # c2 has no hosts and c1 is frozen: the build cannot be placed.
                create = {"name": "frozen", **TINY, "request_id": "frozen-create"}
                [uuid] = (await answer(ops, "server_create", create))["servers"]
                assert (await show(ops, uuid))["cell"] is None
                delete = {"uuid": uuid, "action": "delete", "request_id": "frozen-delete"}
                silent = await refused(ops, "server_action", delete)
                assert isinstance(silent, CellUnreachable), silent
                assert "api!c1" in silent.message and "try again" in silent.message
                assert (await show(ops, uuid))["status"] != "DELETED"
                # A broadcast from a handler answers with what it has, c1 as an error.
                listed = await answer(ops, "host_list", {})
                assert listed["hosts"] == []
                assert [e["cell"] for e in listed["errors"]] == ["api!c1"]
                assert listed["errors"][0]["error"] in ("E_TIMEOUT", "E_UNREACHABLE")
            finally:
                tree.signal("c1", signal.SIGCONT)
            await until(lambda: tree_is_whole(ops), 30, "c1 to be back")

            # Now every cell answers: the delete goes to wherever the server is, or
            # the top records it if the build failed meanwhile. Either way it ends
            # deleted at the top and in any cell that holds it, the same record.
            retry = {**delete, "request_id": "frozen-delete-2"}
            first = await answer(ops, "server_action", retry)
            assert first["uuid"] == uuid

            async def deleted_everywhere() -> bool:
                top = await show(ops, uuid)
                held = await held_by_cells(tree, COMPUTE)
                if top["status"] != "DELETED" or top["task_state"] is not None:
                    return False
                if uuid not in held:
                    return top["cell"] is None
                return held[uuid] == summary([top])[uuid]

            await until(deleted_everywhere, 30, "the server deleted at the top and in its cell")

    run(main(), timeout_s=90)
