"""Capacities: a cell's from its hosts, a subtree's from its live children, versions in order."""

from __future__ import annotations

import pytest

from zcells.capacity import (
    MAX_CAPABILITIES,
    Announcement,
    Capacity,
    ChildViews,
    Version,
    added,
    cell_capacity,
    host_room,
    unioned,
)
from zcells.errors import SchemaError
from zcells.records import Flavor, Host

TINY = Flavor("m1.tiny", 512, 1, 1)
SMALL = Flavor("m1.small", 2048, 20, 1)
LARGE = Flavor("m1.large", 8192, 80, 4)
FLAVORS = [TINY, SMALL, LARGE]


def host(name: str, ram: int = 8192, disk: int = 100, vcpus: int = 8, **used: int) -> Host:
    return Host(name, True, ram, disk, vcpus, **used)


@pytest.mark.parametrize(
    ("made", "reserve", "room"),
    [
        (host("h1"), 0.0, (8192, 100, 8)),
        (host("h1"), 10.0, (7373, 90, 8)),  # int(819.2) MB, 10 GB, int(0.8) vCPUs kept
        (host("h1", memory_mb_used=7000), 10.0, (373, 90, 8)),
        (host("h1", memory_mb_used=8000), 10.0, (0, 90, 8)),  # inside the reserve: none
        (Host("h1", False, 8192, 100, 8), 0.0, (0, 0, 0)),  # disabled
    ],
)
def test_a_host_s_room_keeps_its_reserve(made: Host, reserve: float, room: tuple[int, ...]) -> None:
    assert host_room(made, reserve) == room


def test_units_are_counted_host_by_host_for_each_flavor_size() -> None:
    # 3000 MB free on each of two hosts: one 2048 MB instance fits on each, not three in all.
    hosts = [host("h1", ram=3000), host("h2", ram=3000)]
    capacity = cell_capacity(hosts, FLAVORS, reserve_percent=0.0)
    assert capacity.ram_free_mb == 6000
    assert capacity.ram_units == {512: 10, 2048: 2, 8192: 0}
    assert capacity.disk_units == {1: 200, 20: 10, 80: 2}
    assert capacity.vcpu_units == {1: 16, 4: 4}
    assert capacity.units_for(SMALL) == 2
    assert not capacity.fits(LARGE)  # RAM is what it lacks
    assert capacity.units_for(Flavor("diskless", 512, 0, 1)) == 10  # no disk needed


def test_a_subtree_adds_its_live_children_only() -> None:
    own = cell_capacity([host("h1")], FLAVORS, 0.0)
    views = ChildViews()
    views.take("c1", Announcement(Version(1, 1), own, {"hypervisor": frozenset({"kvm"})}), 0.0)
    views.take("c2", Announcement(Version(1, 1), own, {"hypervisor": frozenset({"xen"})}), 0.0)
    total, capabilities = views.subtree(own, {"os": frozenset({"linux"})}, ["c1"])
    assert total == added([own, own])
    assert total.ram_units[512] == 2 * own.ram_units[512]
    assert capabilities == {"os": frozenset({"linux"}), "hypervisor": frozenset({"kvm"})}
    everyone, _ = views.subtree(own, {}, ["c1", "c2", "gone"])
    assert everyone == added([own, own, own])


def test_an_older_announcement_never_replaces_a_newer() -> None:
    views = ChildViews()
    newer = Announcement(Version(2, 1), Capacity(ram_free_mb=10))
    assert views.take("c1", newer, 0.0)
    assert not views.take("c1", Announcement(Version(1, 99), Capacity(ram_free_mb=99)), 1.0)
    assert not views.take("c1", Announcement(Version(2, 1), Capacity(ram_free_mb=99)), 2.0)
    assert views.take("c1", Announcement(Version(2, 2), Capacity(ram_free_mb=5)), 3.0)
    assert views.latest["c1"].capacity.ram_free_mb == 5


def test_an_announcement_kept_too_long_gives_way_to_any_other() -> None:
    """A child whose clock went back across a restart is heard again, not ignored for good."""
    views = ChildViews(stale_after_s=60.0)
    assert views.take("c1", Announcement(Version(5_000, 1), Capacity(ram_free_mb=1)), 0.0)
    assert not views.take("c1", Announcement(Version(4_000, 1), Capacity(ram_free_mb=2)), 59.0)
    assert views.take("c1", Announcement(Version(4_000, 1), Capacity(ram_free_mb=2)), 60.0)
    assert views.latest["c1"].capacity.ram_free_mb == 2
    views.keep_only(["c2"])
    assert views.latest == {} and views.heard_at == {}


def test_an_announcement_round_trips_and_bounds_what_a_child_may_say() -> None:
    capacity = cell_capacity([host("h1")], FLAVORS, 10.0)
    told = Announcement(Version(7, 3), capacity, {"hypervisor": frozenset({"kvm", "xen"})}, False)
    assert Announcement.from_wire(told.to_wire()) == told
    wire = told.to_wire()
    for bad in (
        {**wire, "version": [7]},
        {**wire, "version": [-1, 3]},
        {**wire, "enabled": 1},
        {**wire, "capabilities": {"k" * 65: ["v"]}},
        {**wire, "capabilities": {f"k{i}": ["v"] for i in range(65)}},
        {**wire, "capabilities": {"k": [f"v{i}" for i in range(65)]}},
        {**wire, "capabilities": {"k": "kvm"}},
        {k: v for k, v in wire.items() if k != "enabled"},
    ):
        with pytest.raises(SchemaError):
            Announcement.from_wire(bad)


def test_capabilities_unioned_stay_within_their_bound() -> None:
    many = [{f"k{i}": frozenset({f"v{j}" for j in range(40)})} for i in range(100)]
    union = unioned([*many, {"k0": frozenset({f"w{j}" for j in range(40)})}])
    assert len(union) == MAX_CAPABILITIES
    assert all(len(values) <= MAX_CAPABILITIES for values in union.values())


def test_what_a_parent_placed_comes_off_its_view_until_the_child_speaks() -> None:
    views = ChildViews()
    capacity = cell_capacity([host("h1", ram=4096)], FLAVORS, 0.0)
    views.take("c1", Announcement(Version(1, 1), capacity), 0.0)
    views.placed("c1", SMALL)
    after = views.latest["c1"].capacity
    assert after.ram_free_mb == 2048
    assert after.ram_units == {512: 4, 2048: 1, 8192: 0}  # 8 - 4, 2 - 1, never below 0
    views.placed("c1", SMALL)
    assert not views.latest["c1"].capacity.fits(SMALL)


def test_the_wire_form_round_trips_and_refuses_nonsense() -> None:
    capacity = cell_capacity([host("h1"), host("h2")], FLAVORS, 10.0)
    assert Capacity.from_wire(capacity.to_wire()) == capacity
    wire = capacity.to_wire()
    for bad in (
        {**wire, "ram_free_mb": -1},
        {**wire, "ram_units": {"abc": 1}},
        {**wire, "disk_units": {"20": -3}},
        {**wire, "extra": 1},
        {k: v for k, v in wire.items() if k != "vcpu_units"},
        {**wire, "vcpu_units": {str(i): 1 for i in range(1001)}},
    ):
        with pytest.raises(SchemaError):
            Capacity.from_wire(bad)


def test_a_reserve_outside_0_to_100_is_refused() -> None:
    with pytest.raises(ValueError, match="reserve_percent"):
        cell_capacity([host("h1")], FLAVORS, 100.0)


def test_a_child_cannot_make_its_parent_hold_or_pass_up_more_than_the_wire_allows() -> None:
    most = 2**53
    huge = Capacity(most, most, most, {512: most}, {1: most}, {1: most})
    total = added([huge, huge, huge])
    assert Capacity.from_wire(total.to_wire()) == total  # the parent's parent takes it
    assert total.ram_units[512] == most
    known = cell_capacity([host("h1")], [TINY], 0.0)  # this cell's flavors: one size each
    strange = Capacity(1, 1, 1, {512: 3, 777: 9}, {1: 3, 999: 9}, {1: 3, 64: 9})
    kept = strange.only(known)
    assert (kept.ram_units, kept.disk_units, kept.vcpu_units) == ({512: 3}, {1: 3}, {1: 3})
