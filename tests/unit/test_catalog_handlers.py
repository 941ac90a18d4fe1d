"""Flavors and images at the front door, and global data taken from a parent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from zcells.db import catalog, migrate
from zcells.db import instances as store
from zcells.db.engine import Database

from tests.fakes import child_request, run
from tests.unit.scripted_node import ScriptedNode, client_call, parent_call, runner, scheduling
from zcells.builds import Placer, TopBuilds
from zcells.dbrunner import DbRunner
from zcells.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFoundRemote,
    SchemaError,
    SenderMismatch,
)
from zcells.handlers.catalog import CatalogHandlers
from zcells.handlers.servers import ServerHandlers
from zcells.messages import Direction, Kind
from zcells.methods import MethodTable
from zcells.peer import Peer, Role
from zcells.records import Flavor, Image
from zcells.routing import Deliver, check_own_link


@pytest.fixture
def db(synced: Database) -> Iterator[DbRunner]:
    catalog.seed_default_flavors(synced)
    catalog.seed_default_images(synced)
    runs = runner(synced)
    yield runs
    runs.close()


class Rings:
    """Counts the rings of the downward stream's bell."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def admin(method: str, **args: Any) -> Any:
    return client_call(method, args)


# -- at the API cell ------------------------------------------------------------------------


def test_image_create_set_show_delete_ring_the_stream_each_time(db: DbRunner) -> None:
    rings = Rings()
    door = CatalogHandlers(db, top=True, changed=rings)

    async def main() -> None:
        made = await door.image_create(
            admin("image_create", name="kvm", properties={"hypervisor_type": "kvm"})
        )
        assert made == {"name": "kvm", "properties": {"hypervisor_type": "kvm"}}
        changed = await door.image_set(
            admin("image_set", name="kvm", properties={"architecture": "x86_64"}, unset=None)
        )
        assert changed["properties"] == {"architecture": "x86_64", "hypervisor_type": "kvm"}
        assert await door.image_show(admin("image_show", name="kvm")) == changed
        listed = await door.image_list(admin("image_list"))
        assert [i["name"] for i in listed["images"]] == ["cirros", "kvm"]
        assert await door.image_delete(admin("image_delete", name="kvm")) == changed
        gone = await door.flavor_delete(admin("flavor_delete", name="m1.tiny"))
        assert gone == Flavor("m1.tiny", 512, 1, 1).as_dict()

    run(main())
    assert rings.count == 4
    assert catalog.get_image(db.db, "kvm") is None
    assert catalog.last_seq(db.db) == 6 + 4


@pytest.mark.parametrize(
    ("method", "args", "error"),
    [
        ("image_create", {"name": "cirros", "properties": None}, Conflict),
        ("image_create", {"name": "bad name", "properties": None}, InvalidRequest),
        ("image_create", {"name": "x", "properties": {"k": 1}}, InvalidRequest),
        ("image_show", {"name": "nope"}, NotFoundRemote),
        ("image_delete", {"name": "nope"}, NotFoundRemote),
        ("image_set", {"name": "nope", "properties": {"a": "b"}, "unset": None}, NotFoundRemote),
        ("image_set", {"name": "cirros", "properties": None, "unset": [1]}, InvalidRequest),
        ("flavor_delete", {"name": "nope"}, NotFoundRemote),
        ("flavor_create", {"name": "m1.tiny", "ram": 1, "disk": 1, "vcpus": 1}, Conflict),
        ("flavor_create", {"name": "zero", "ram": 0, "disk": 1, "vcpus": 1}, InvalidRequest),
    ],
)
def test_a_refused_change_is_a_typed_error_and_changes_nothing(
    db: DbRunner, method: str, args: dict[str, Any], error: type[Exception]
) -> None:
    rings = Rings()
    door = CatalogHandlers(db, top=True, changed=rings)
    handler = {m.name: m.handler for m in door.methods()}[method]
    with pytest.raises(error):
        run(handler(admin(method, **args)))
    assert rings.count == 0
    assert catalog.last_seq(db.db) == 6


def test_a_compute_cell_answers_reads_and_refuses_changes(db: DbRunner) -> None:
    door = CatalogHandlers(db, top=False)
    listed = run(door.flavor_list(admin("flavor_list")))
    assert [f["name"] for f in listed["flavors"]][:2] == ["m1.tiny", "m1.small"]
    for method, args in [
        ("image_create", {"name": "x", "properties": None}),
        ("flavor_create", {"name": "x", "ram": 1, "disk": 1, "vcpus": 1}),
        ("image_delete", {"name": "cirros"}),
        ("flavor_delete", {"name": "m1.tiny"}),
    ]:
        handler = {m.name: m.handler for m in door.methods()}[method]
        with pytest.raises(InvalidRequest, match="compute cell"):
            run(handler(admin(method, **args)))
    assert catalog.last_seq(db.db) == 6


def test_a_build_naming_an_image_that_does_not_exist_is_refused(db: DbRunner) -> None:
    node = ScriptedNode()
    placer = Placer(node.as_node(), db, scheduling(node.as_node()), None, lambda: None)
    door = ServerHandlers(
        node.as_node(), db, TopBuilds(placer, db, retries=0, retry_delay_s=0.0), top=True
    )
    args = {
        "name": "web",
        "flavor": "m1.tiny",
        "image": "no-such-image",
        "count": 1,
        "hints": None,
        "metadata": None,
        "request_id": None,
    }
    with pytest.raises(NotFoundRemote, match="no image 'no-such-image'"):
        run(door.server_create(client_call("server_create", args)))
    assert run(db.read(store.list_instances)) == []


# -- from the parent ------------------------------------------------------------------------


def rows_of_top(db: DbRunner) -> list[list[Any]]:
    return [change.to_wire() for change in catalog.read_log(db.db, 0, 100)]


@pytest.fixture
def below(tmp_path: Path) -> Iterator[DbRunner]:
    with Database(f"sqlite:///{tmp_path / 'below.db'}") as database:
        migrate.sync(database)
        runs = runner(database)
        yield runs
        runs.close()


def test_a_batch_with_one_bad_row_applies_nothing(db: DbRunner, below: DbRunner) -> None:
    rings = Rings()
    child = CatalogHandlers(below, top=False, changed=rings)
    rows = rows_of_top(db)
    bad = [*rows[:-1], [rows[-1][0], "image", "cirros", {"name": "cirros", "properties": {"k": 1}}]]
    with pytest.raises(SchemaError, match="row 5"):
        run(child.global_updates(parent_call("global_updates", {"rows": bad})))
    assert catalog.list_flavors(below.db) == []
    assert catalog.last_seq(below.db) == 0
    assert rings.count == 0

    answer = run(child.global_updates(parent_call("global_updates", {"rows": rows})))
    assert answer == {"applied": 6}
    assert rings.count == 1  # its own children hear of it
    again = run(child.global_updates(parent_call("global_updates", {"rows": rows[2:]})))
    assert again == {"applied": 6}
    assert rings.count == 1  # a repeat changes nothing, rings nothing
    assert run(child.global_progress(parent_call("global_progress", {}))) == {"applied": 6}
    assert catalog.list_images(below.db) == [Image("cirros")]


@pytest.mark.parametrize("method", ["global_progress", "global_updates"])
@pytest.mark.parametrize("caller", ["child", "admin", "member", "reader"])
def test_global_data_is_taken_from_the_parent_alone(method: str, caller: str) -> None:
    table = MethodTable(CatalogHandlers(object(), top=False).methods())  # type: ignore[arg-type]
    assert table.resolve(Kind.TARGETED, method, "parent").own_link
    with pytest.raises(Forbidden):
        table.resolve(Kind.TARGETED, method, caller)
    with pytest.raises(Exception, match="no method"):
        table.resolve(Kind.BROADCAST, method, "parent")


def test_global_updates_relayed_from_above_the_parent_are_refused() -> None:
    """The grandparent's rows reach a cell only through its parent's own log."""
    relayed = child_request(
        path=("api", "api!c1", "api!c1!g1"),  # as stamped at g1
        method="global_updates",
        body={"rows": []},
        direction=Direction.DOWN,
        target="api!c1!g1",
    )
    with pytest.raises(SenderMismatch):
        check_own_link(relayed, Deliver(relayed), Peer(Role.PARENT, "c1"))
