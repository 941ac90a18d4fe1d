"""Build routing against a scripted node and a real database: refusals, deadlines, repeats."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from zcells.db import hosts as hosts_store
from zcells.db import instances as store
from zcells.db import orphans as orphans_store
from zcells.db.engine import Database

from tests.fakes import run
from tests.unit.scripted_node import (
    ScriptedNode,
    instance,
    ok,
    parent_call,
    runner,
    scheduling,
    uuids,
)
from zcells.builds import (
    HostView,
    Placer,
    TopBuilds,
    orphan_request_id,
    time_left_s,
)
from zcells.capacity import Announcement, Capacity, Version
from zcells.clock import FakeClock
from zcells.compute import FakeDriver, fake_hosts
from zcells.dbrunner import DbRunner
from zcells.errors import CellUnreachable, NoCellsAvailable, NoValidHost
from zcells.handlers.compute import ComputeHandlers
from zcells.instances import Action, Fault, Instance, VmState, begin, failed, finish, placed
from zcells.messages import CellResult, Outcome
from zcells.orphans import Orphans
from zcells.records import Host

UUID = next(iter(uuids(1)))
C1_FIRST = {"c1": (1.0, 1.0)}  # a weight offset that puts c1 before c2


@pytest.fixture
def db(synced: Database) -> Iterator[DbRunner]:
    runs = runner(synced)
    yield runs
    runs.close()


def placer(node: ScriptedNode, db: DbRunner) -> Placer:
    return Placer(node.as_node(), db, scheduling(node.as_node()), None, lambda: None)


def refusal(cell: str, error: Exception) -> CellResult:
    assert isinstance(error, NoValidHost | NoCellsAvailable)
    return CellResult(cell, Outcome.ERROR, error=error)


def test_time_left_keeps_a_margin_and_never_goes_below_zero() -> None:
    node = ScriptedNode(clock=FakeClock(start=100.0)).as_node()
    assert time_left_s(node, None) is None
    assert time_left_s(node, 105.0) == pytest.approx(4.5)
    assert time_left_s(node, 100.5) == pytest.approx(0.45)
    assert time_left_s(node, 99.0) == 0.0


def test_a_cell_with_no_hosts_and_no_children_has_no_valid_host(db: DbRunner) -> None:
    node = ScriptedNode(here="api!c2")
    with pytest.raises(NoValidHost) as info:
        run(placer(node, db).place(instance(UUID), {}, "build-1", "api!c2", plan=[0.0]))
    assert "no hosts and no cells below it" in info.value.message
    assert info.value.cell == "api!c2" and node.sent == []


def test_a_target_hint_matching_no_cell_is_no_cell_available(db: DbRunner) -> None:
    node = ScriptedNode(children=("c1",))
    with pytest.raises(NoCellsAvailable) as info:
        hints = {"target_cell": "api!c9"}
        run(placer(node, db).place(instance(UUID), hints, "build-1", "api", plan=[0.0]))
    assert "api!c9" in info.value.message and node.sent == []


def test_children_that_cannot_be_tried_are_no_cell_available(db: DbRunner) -> None:
    node = ScriptedNode(children=("c1",), disabled={"c1"})
    with pytest.raises(NoCellsAvailable) as info:
        run(placer(node, db).place(instance(UUID), {}, "build-1", "api", plan=[0.0]))
    assert "at api the filters removed c1: disabled (disabled: takes no new builds)" in (
        info.value.message
    )
    assert node.sent == []


def test_no_room_announced_anywhere_fails_at_once_naming_what_each_filter_removed(
    db: DbRunner,
) -> None:
    node = ScriptedNode(children=("c1", "c2"))
    port = node.as_node()
    here = Placer(port, db, scheduling(port), None, lambda: None)
    full = Capacity(ram_free_mb=256, ram_units={512: 0}, disk_units={1: 9}, vcpu_units={1: 9})
    for name in node.children:
        assert here.scheduling.take(name, Announcement(Version(1, 1), full))
    with pytest.raises(NoValidHost) as info:
        run(here.place(instance(UUID), {}, "build-1", "api", plan=[0.0, 5.0, 5.0]))
    assert node.sent == []  # not one child asked, no retry waited for
    assert "c1: capacity (no room for m1.tiny" in info.value.message
    assert "c2: capacity (no room for m1.tiny" in info.value.message


def test_a_child_that_announced_room_and_had_none_is_retried_by_the_plan(db: DbRunner) -> None:
    node = ScriptedNode(children=("c1",))
    port = node.as_node()
    here = Placer(port, db, scheduling(port), None, lambda: None)
    roomy = Capacity(ram_free_mb=9999, ram_units={512: 9}, disk_units={1: 9}, vcpu_units={1: 9})
    assert here.scheduling.take("c1", Announcement(Version(1, 1), roomy))
    node.calls[("build", "api!c1")] = refusal("api!c1", NoValidHost("full after all", "api!c1"))
    with pytest.raises(NoValidHost) as info:
        run(here.place(instance(UUID), {}, "build-1", "api", plan=[0.0, 0.0, 0.0]))
    assert [sent.target for sent in node.sent] == ["api!c1"] * 3
    assert "after 3 attempts" in info.value.message
    # a refused try takes nothing off the view; a placement does, until c1 speaks again
    assert here.scheduling.views.latest["c1"].capacity.ram_units[512] == 9
    taken = placed(instance(UUID), "api!c1", "h001", 2.0)
    node.calls[("build", "api!c1")] = ok("api!c1", {"instance": taken.to_wire()})
    run(here.place(instance(UUID), {}, "build-2", "api", plan=[0.0]))
    assert here.scheduling.views.latest["c1"].capacity.ram_units[512] == 8


def test_every_child_without_a_host_makes_no_valid_host_naming_each(db: DbRunner) -> None:
    node = ScriptedNode(children=("c1", "c2"))
    for name in node.children:
        error = NoValidHost(f"no valid host in api!{name}: 2 hosts, 2 short of RAM", f"api!{name}")
        node.calls[("build", f"api!{name}")] = refusal(f"api!{name}", error)
    with pytest.raises(NoValidHost) as info:
        run(placer(node, db).place(instance(UUID), {}, "build-1", "api", plan=[0.0, 0.0]))
    assert "after 4 attempts" in info.value.message
    assert "c1: no valid host in api!c1" in info.value.message
    assert "c2: no valid host in api!c2" in info.value.message


def test_a_call_to_a_child_gets_the_time_the_request_has_left(db: DbRunner) -> None:
    node = ScriptedNode(here="api!c1", children=("g1",), clock=FakeClock(start=50.0))
    taken = placed(instance(UUID), "api!c1!g1", "h001", 51.0)
    node.calls[("build", "api!c1!g1")] = ok("api!c1!g1", {"instance": taken.to_wire()})
    got = run(
        placer(node, db).place(instance(UUID), {}, "b-1", "api!c1", plan=[0.0], deadline=54.0)
    )
    assert got == taken
    [sent] = node.sent
    assert sent.timeout_s == pytest.approx(3.6)  # 4 s left, less a tenth
    assert sent.body["request_id"] == "b-1"


def _top_builds(node: ScriptedNode, db: DbRunner) -> TopBuilds:
    return TopBuilds(placer(node, db), db, retries=0, retry_delay_s=0.0)


async def _drained(builds: TopBuilds) -> None:
    async with asyncio.timeout(5):
        while builds.statistics()["running"]:
            await asyncio.sleep(0)


def test_a_build_is_started_only_for_an_instance_waiting_to_be_scheduled(db: DbRunner) -> None:
    node = ScriptedNode(children=("c1",))
    node.calls[("build", "api!c1")] = refusal("api!c1", NoValidHost("full", "api!c1"))
    waiting = instance(UUID)
    in_error = failed(waiting, Fault("E_NO_VALID_HOST", "full", "api"), 2.0)
    deleted = finish(begin(waiting, Action.DELETE, 2.0), 2.0)

    async def main() -> None:
        builds = _top_builds(node, db)
        for record in (in_error, deleted, placed(waiting, "api!c1", "h001", 2.0)):
            builds.start(record)
            assert builds.statistics()["running"] == 0
        await db.write(store.index_create, [waiting], "create-1")
        builds.start(waiting)
        builds.start(waiting)  # running already: not twice
        assert builds.statistics()["running"] == 1
        await _drained(builds)
        assert [s.method for s in node.sent] == ["build"]
        held = await db.read(store.get, UUID)
        assert held is not None and held.vm_state is VmState.ERROR
        assert held.fault is not None and held.fault.code == NoValidHost.code

    run(main())


def test_a_placement_that_lands_after_the_top_deleted_the_instance_is_deleted(
    db: DbRunner,
) -> None:
    node = ScriptedNode(children=("c1",))
    db.db.wall = node.clock.wall  # one clock for the cell and its database
    waiting = instance(UUID)
    taken = placed(waiting, "api!c1", "h001", 2.0)
    deleting = begin(taken, Action.DELETE, 3.0)

    async def main() -> None:
        await db.write(store.index_create, [waiting], "create-1")
        tombstone = finish(begin(waiting, Action.DELETE, 2.0), 2.0)

        async def build(body: dict[str, object]) -> CellResult:
            # The top records its own delete while the child is placing the instance.
            assert await db.write(store.index_put, tombstone)
            return ok("api!c1", {"instance": taken.to_wire()})

        node.calls[("build", "api!c1")] = build
        node.calls[("instance_action", "api!c1")] = ok("api!c1", {"instance": deleting.to_wire()})
        builds = _top_builds(node, db)
        builds.start(waiting)
        await _drained(builds)
        assert [(s.method, s.target) for s in node.sent] == [("build", "api!c1")]
        due = node.clock.wall()
        assert await db.read(orphans_store.due, due, 10) == [(UUID, "api!c1", 0)]
        sweeper = Orphans(node.as_node(), db)
        assert await sweeper.sweep() == 1
        assert [(s.method, s.target) for s in node.sent][1:] == [("instance_action", "api!c1")]
        assert node.sent[1].body == {
            "uuid": UUID,
            "action": "delete",
            "request_id": orphan_request_id(UUID),
        }
        held = await db.read(store.get, UUID)
        assert held is not None and held.deleted
        assert await db.read(orphans_store.count) == 0

    run(main())


def test_an_orphan_delete_that_fails_is_tried_again_until_acknowledged(db: DbRunner) -> None:
    """Finding 9: a cell frozen when its orphan was found still gets the delete later."""
    clock = FakeClock()
    node = ScriptedNode(children=("c1",), clock=clock)
    db.db.wall = clock.wall
    taken = placed(instance(UUID), "api!c1", "h001", 2.0)
    deleting = begin(taken, Action.DELETE, 3.0)

    async def main() -> None:
        await db.write(orphans_store.note_now, [(UUID, "api!c1")])
        sweeper = Orphans(node.as_node(), db)
        node.calls[("instance_action", "api!c1")] = CellResult(
            "api!c1", Outcome.ERROR, error=CellUnreachable("frozen", "api")
        )
        assert await sweeper.sweep() == 1
        assert await sweeper.sweep() == 0  # not due yet: it backs off
        [(_, _, attempts)] = await db.read(orphans_store.due, clock.wall() + 5, 10)
        assert attempts == 1
        node.calls[("instance_action", "api!c1")] = ok("api!c1", {"instance": deleting.to_wire()})
        clock.advance(5)
        assert await sweeper.sweep() == 1
        assert await db.read(orphans_store.count) == 0
        assert sweeper.statistics() == {"deleted": 1, "failed": 1}

    run(main())


def test_a_placement_the_index_already_holds_newer_is_left_alone(db: DbRunner) -> None:
    node = ScriptedNode(children=("c1",))
    waiting = instance(UUID)
    taken = placed(waiting, "api!c1", "h001", 2.0)
    active = finish(taken, 3.0)

    async def main() -> None:
        await db.write(store.index_create, [waiting], "create-1")

        async def build(body: dict[str, object]) -> CellResult:
            assert await db.write(store.index_put, active)  # the outbox came up first
            return ok("api!c1", {"instance": taken.to_wire()})

        node.calls[("build", "api!c1")] = build
        builds = _top_builds(node, db)
        builds.start(waiting)
        await _drained(builds)
        assert [s.method for s in node.sent] == ["build"]
        assert await db.read(store.get, UUID) == active

    run(main())


def test_a_resumed_build_keeps_its_hints_and_ended_builds_drop_theirs(db: DbRunner) -> None:
    """After a restart each unplaced instance is built again where it was asked to go."""
    node = ScriptedNode(children=("c1", "c2"))
    for child in node.children:

        def take(body: dict[str, Any], cell: str = f"api!{child}") -> CellResult:
            taken = placed(Instance.from_wire(body["instance"]), cell, "h001", 2.0)
            return ok(cell, {"instance": taken.to_wire()})

        node.calls[("build", f"api!{child}")] = take
    hinted, plain, done = (instance(uuid) for uuid in sorted(uuids(3)))
    to_c2 = {"target_cell": "api!c2"}

    async def main() -> None:
        await db.write(store.index_create, [hinted], "create-1", to_c2)
        await db.write(store.index_create, [plain], "create-2")
        await db.write(store.index_create, [done], "create-3", to_c2)
        # placed before a crash that came ahead of forgetting its hints
        assert await db.write(store.index_put, placed(done, "api!c2", "h001", 2.0))
        assert await db.write(store.unplaced_builds) == [(hinted, to_c2), (plain, {})]

        builds = _top_builds(node, db)
        assert await builds.resume() == 2
        await _drained(builds)
        sent = {s.body["instance"]["uuid"]: s for s in node.sent}
        assert sent.keys() == {hinted.uuid, plain.uuid}
        assert (sent[hinted.uuid].target, sent[hinted.uuid].body["hints"]) == ("api!c2", to_c2)
        assert sent[plain.uuid].body["hints"] == {}
        assert await db.write(store.unplaced_builds) == []
        held = await db.read(store.get, hinted.uuid)
        assert held is not None and held.cell == "api!c2"

    run(main())
    with db.db.read() as session:  # every build ended: no hints are kept
        assert session.connection().execute(text("SELECT count(*) FROM build_hints")).scalar() == 0


def test_a_burst_of_builds_spreads_over_the_hosts(db: DbRunner) -> None:
    """Each build weighs the hosts with the claims of the builds before it."""
    run(db.write(hosts_store.sync_hosts, fake_hosts(4, 4096, 100, 8)))
    node = ScriptedNode(here="api!c1")

    async def burst() -> list[Instance]:
        driver = FakeDriver(db, 60.0, lambda: None)
        cell = Placer(node.as_node(), db, scheduling(node.as_node()), driver, lambda: None)
        try:
            return await asyncio.gather(
                *(
                    cell.place(instance(uuid), {}, f"build-{n}", "api!c1", plan=[0.0])
                    for n, uuid in enumerate(uuids(8))
                )
            )
        finally:
            await driver.close()

    hosts = Counter(taken.host for taken in run(burst()))
    assert hosts == {"h001": 2, "h002": 2, "h003": 2, "h004": 2}


def test_a_host_freed_since_the_view_was_read_is_found_before_a_build_is_refused(
    db: DbRunner,
) -> None:
    """The host view is a guide only: what the database holds decides a refusal."""
    run(db.write(hosts_store.sync_hosts, [Host("h001", True, 512, 1, 1)]))
    node = ScriptedNode(here="api!c1")
    first, second = uuids(2)

    async def main() -> None:
        driver = FakeDriver(db, 60.0, lambda: None)
        cell = Placer(node.as_node(), db, scheduling(node.as_node()), driver, lambda: None)
        cell.hosts = HostView(max_age_s=3600, clock=cell.clock.now)  # read again only when told
        try:
            taken = await cell.place(instance(first), {}, "build-1", "api!c1", plan=[0.0])
            assert taken.host == "h001"  # the view now holds h001 full
            await db.write(
                store.change,
                first,
                lambda held: finish(begin(held, Action.DELETE, 3.0), 4.0),
                request_id=None,
                method="instance_action",
            )
            again = await cell.place(instance(second), {}, "build-2", "api!c1", plan=[0.0])
            assert again.host == "h001"
        finally:
            await driver.close()

    run(main())


# -- finding 9: one copy, learnt before going elsewhere ----------------------------------


def test_a_child_that_timed_out_is_asked_again_before_another_is_tried(db: DbRunner) -> None:
    node = ScriptedNode(here="api", children=("c1", "c2"), weights=C1_FIRST)
    taken = placed(instance(UUID), "api!c1", "h001", 2.0)
    answers = iter(
        [CellResult("api!c1", Outcome.TIMED_OUT), ok("api!c1", {"instance": taken.to_wire()})]
    )
    node.calls[("build", "api!c1")] = lambda body: next(answers)
    node.calls[("build", "api!c2")] = ok("api!c2", {"instance": taken.to_wire()})
    scheduler = placer(node, db)
    got = run(scheduler.place(instance(UUID), {}, "build-1", "api", plan=[0.0]))
    assert got == taken
    assert [(s.method, s.target, s.body["request_id"]) for s in node.sent] == [
        ("build", "api!c1", "build-1"),
        ("build", "api!c1", "build-1"),
    ]


def test_a_middle_cell_places_one_build_once_however_often_it_is_asked(db: DbRunner) -> None:
    node = ScriptedNode(here="api!c1", children=("g1",))
    taken = placed(instance(UUID), "api!c1!g1", "h001", 2.0)
    release = asyncio.Event()

    async def slow_build(body: dict[str, Any]) -> CellResult:
        await release.wait()
        return ok("api!c1!g1", {"instance": taken.to_wire()})

    node.calls[("build", "api!c1!g1")] = slow_build
    handlers = ComputeHandlers(db, placer(node, db), None, lambda: None)
    args = {
        "instance": instance(UUID).to_wire(),
        "hints": None,
        "valid_until": None,
        "request_id": "build-1",
    }

    async def main() -> None:
        first = asyncio.create_task(handlers.build(parent_call("build", args)))
        second = asyncio.create_task(handlers.build(parent_call("build", args)))
        await asyncio.sleep(0)
        release.set()
        answers = await asyncio.gather(first, second)
        again = await handlers.build(parent_call("build", args))
        assert answers == [again, again] and again["instance"] == taken.to_wire()
        assert len(node.sent) == 1  # one placement, asked three times

    run(main())


def test_a_build_whose_lease_ran_out_is_not_placed(db: DbRunner) -> None:
    """A parent that heard nothing twice builds elsewhere only after the lease it sent."""
    hosts_store.sync_hosts(db.db, fake_hosts(1, 4096, 100, 8))
    node = ScriptedNode(here="api!c1")
    here = Placer(node.as_node(), db, scheduling(node.as_node()), None, lambda: None)
    here.driver = FakeDriver(db, 0.0, lambda: None)

    async def main() -> None:
        with pytest.raises(NoCellsAvailable, match="lease ran out"):
            await here.place(
                instance(UUID), {}, "build-1", "api!c1", plan=[0.0], valid_until=time.time() - 1
            )
        assert await db.read(store.get, UUID) is None
        taken = await here.place(
            instance(UUID), {}, "build-1", "api!c1", plan=[0.0], valid_until=time.time() + 60
        )
        assert taken.cell == "api!c1"
        await here.driver.close()  # type: ignore[union-attr]

    run(main())


def test_a_child_silent_twice_is_fenced_before_another_is_tried(db: DbRunner) -> None:
    node = ScriptedNode(here="api", children=("c1", "c2"), weights=C1_FIRST)
    taken = placed(instance(UUID), "api!c2", "h001", 2.0)
    node.calls[("build", "api!c1")] = CellResult("api!c1", Outcome.TIMED_OUT)
    node.calls[("build", "api!c2")] = ok("api!c2", {"instance": taken.to_wire()})
    scheduler = placer(node, db)
    scheduler.call_timeout_s = 0.2

    async def main() -> None:
        placing = asyncio.create_task(
            scheduler.place(instance(UUID), {}, "build-1", "api", plan=[0.0])
        )
        for _ in range(100):  # the fence waits on the cell's clock: move it on
            if placing.done():
                break
            await node.clock.run_for(0.5)
        assert await placing == taken
        first, second, elsewhere = node.sent
        assert [s.target for s in node.sent] == ["api!c1", "api!c1", "api!c2"]
        # c2 was asked only once the last lease sent to c1 had run out
        assert (
            elsewhere.body["valid_until"] > second.body["valid_until"] >= first.body["valid_until"]
        )

    run(main())
