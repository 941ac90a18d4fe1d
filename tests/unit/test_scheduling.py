"""One cell's scheduling state: its subtree from its children's announcements, its candidates."""

from __future__ import annotations

import random

import pytest

from tests.unit.scripted_node import ScriptedNode
from zcells.capacity import Announcement, Capacity, Version, added, cell_capacity
from zcells.cellfilters import BuildSpec
from zcells.cellsched import HERE
from zcells.errors import SchemaError
from zcells.liveness import Liveness
from zcells.peer import Peer, Role
from zcells.records import Flavor, Host
from zcells.scheduling import CellScheduling, SchedulerSettings

TINY = Flavor("m1.tiny", 512, 1, 1)


def room(hosts: int) -> Capacity:
    made = [Host(f"h{i}", True, 8192, 100, 16) for i in range(hosts)]
    return cell_capacity(made, [TINY], reserve_percent=0.0)


class Node(ScriptedNode):
    mute: frozenset[str] = frozenset()

    def liveness(self) -> dict[Peer, Liveness]:
        return {
            Peer(Role.CHILD, name): Liveness.MUTE if name in self.mute else Liveness.ALIVE
            for name in self.children
        }


def cell(**settings: object) -> tuple[Node, CellScheduling]:
    node = Node(here="api!m", children=("g1", "g2", "g3"), parents={"api": "api"})
    return node, CellScheduling(node.as_node(), SchedulerSettings(**settings), random.Random(1))  # type: ignore[arg-type]


def test_a_middle_cell_announces_its_own_hosts_plus_its_live_children() -> None:
    node, scheduling = cell(capabilities={"hypervisor": frozenset({"kvm"})})
    scheduling.set_own(room(1))
    xen = {"hypervisor": frozenset({"xen"})}
    for name, hosts in (("g1", 1), ("g2", 2), ("g3", 4)):
        assert scheduling.take(name, Announcement(Version(1, 1), room(hosts), xen))
    node.mute = frozenset({"g3"})  # not heard from: its capacity is left out
    told = scheduling.announcement(Version(9, 1))
    assert told.capacity == added([room(1), room(1), room(2)])
    assert told.capabilities == {"hypervisor": frozenset({"kvm", "xen"})}
    node.disabled = {"g2"}  # an operator's disabled child adds nothing either
    assert scheduling.announcement(Version(9, 2)).capacity == added([room(1), room(1)])
    status = scheduling.status()
    assert status["children"]["g3"]["counted"] is False
    assert status["children"]["g1"]["counted"] is True


def test_an_old_announcement_never_replaces_a_newer_one_and_strangers_are_ignored() -> None:
    _, scheduling = cell()
    assert scheduling.take("g1", Announcement(Version(5, 2), room(2)))
    assert not scheduling.take("g1", Announcement(Version(5, 1), room(9)))
    assert scheduling.views.latest["g1"].capacity == room(2)
    assert not scheduling.take("stranger", Announcement(Version(1, 1), room(9)))
    assert "stranger" not in scheduling.views.latest


def test_a_mute_child_is_weighed_last_and_a_child_that_takes_no_builds_is_removed() -> None:
    node, scheduling = cell()
    for name in node.children:
        scheduling.take(name, Announcement(Version(1, 1), room(4), enabled=name != "g2"))
    node.mute = frozenset({"g1"})
    decision = scheduling.decide(BuildSpec(TINY), "api!m", has_hosts=False)
    assert decision.order == ("g3", "g1")
    removed = {w.name: w.removed_by for w in decision.weighed}
    assert removed == {"g1": None, "g2": "disabled", "g3": None}


def test_this_cell_s_own_hosts_are_a_candidate_only_where_the_target_allows() -> None:
    _, scheduling = cell()
    scheduling.set_own(room(1))
    to_g1 = BuildSpec(TINY, target_cell="api!m!g1")
    assert scheduling.decide(to_g1, "api!m", has_hosts=True).order == ("g1",)
    here = scheduling.decide(BuildSpec(TINY, target_cell="api!m"), "api!m", has_hosts=True)
    assert HERE in here.order
    # what this cell places on its own hosts comes off its own capacity at once
    scheduling.placed(HERE, TINY)
    assert scheduling.own.ram_units[512] == room(1).ram_units[512] - 1


@pytest.mark.parametrize("bad", [{"version": [1, 1]}, "x", {"capacity": {}, "extra": 1}])
def test_an_announcement_that_is_not_one_is_refused(bad: object) -> None:
    with pytest.raises(SchemaError):
        Announcement.from_wire(bad)
