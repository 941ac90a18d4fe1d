"""The cell scheduler's filters and weighers, by tables; normalisation, multipliers, ties."""

from __future__ import annotations

import random
from typing import Any

import pytest

from zcells.capacity import Capacity, cell_capacity
from zcells.cellfilters import (
    FILTERS,
    NOVA_NAMES,
    WEIGHERS,
    BuildSpec,
    CellCandidate,
    normalised,
    resolve,
    schedule,
)
from zcells.records import Flavor, Host

TINY = Flavor("m1.tiny", 512, 1, 1)
LARGE = Flavor("m1.large", 8192, 80, 4)


def room(ram_mb: int, hosts: int = 1) -> Any:
    made = [Host(f"h{i}", True, ram_mb, 1000, 64) for i in range(hosts)]
    return cell_capacity(made, [TINY, LARGE], reserve_percent=0.0)


def cell(name: str = "c1", **fields: Any) -> CellCandidate:
    fields.setdefault("capacity", room(4096))
    return CellCandidate(name=name, path=f"api!{name}", **fields)


KVM = {"hypervisor": frozenset({"kvm"}), "hypervisor_version": frozenset({"6.2.0"})}

FILTER_CASES = [
    ("disabled", cell(enabled=False), BuildSpec(TINY), "disabled: takes no new builds"),
    ("disabled", cell(), BuildSpec(TINY), None),
    ("target_cell", cell(), BuildSpec(TINY, target_cell="api!c1!g1"), None),  # on the way
    ("target_cell", cell(), BuildSpec(TINY, target_cell="api!c1"), None),
    ("target_cell", cell(), BuildSpec(TINY, target_cell="api"), "not on the way"),  # not below
    (
        "target_cell",
        CellCandidate("own", "api!c1", own=True),
        BuildSpec(TINY, target_cell="api!c1!g1"),
        "not on the way",  # this cell's own hosts are not in its child
    ),
    ("target_cell", cell("c2"), BuildSpec(TINY, target_cell="api!c1"), "not on the way"),
    ("target_cell", cell("c10"), BuildSpec(TINY, target_cell="api!c1"), "not on the way"),
    ("different_cell", cell(), BuildSpec(TINY, different_cell=frozenset({"api!c1"})), "avoid"),
    ("different_cell", cell(), BuildSpec(TINY, different_cell=frozenset({"api!c11"})), None),
    ("same_cell", cell(), BuildSpec(TINY, same_cell=frozenset({"api!c2"})), "must stay in"),
    ("same_cell", cell(), BuildSpec(TINY, same_cell=frozenset({"api!c1!g1"})), None),
    ("capacity", cell(capacity=None), BuildSpec(TINY), None),  # not heard yet: tried last
    ("capacity", cell(), BuildSpec(Flavor("new", 1024, 1, 1)), None),  # size not counted yet
    ("capacity", cell(), BuildSpec(LARGE), "no room for m1.large"),
    ("capacity", cell(capacity=room(8192)), BuildSpec(LARGE), None),
    ("capacity", cell(capacity=room(4096, hosts=2)), BuildSpec(LARGE), "not on one host"),
    ("image_properties", cell(capabilities=KVM), BuildSpec(TINY, {"hypervisor_type": "kvm"}), None),
    (
        "image_properties",
        cell(capabilities=KVM),
        BuildSpec(TINY, {"hypervisor_type": "xen"}),
        "image wants hypervisor_type=xen; cell offers kvm",
    ),
    (
        "image_properties",
        cell(capabilities=KVM),
        BuildSpec(TINY, {"hypervisor_version_requires": ">=6.1"}),
        None,
    ),
    (
        "image_properties",
        cell(capabilities=KVM),
        BuildSpec(TINY, {"hypervisor_version_requires": "<6"}),
        "no hypervisor version <6",
    ),
    ("image_properties", cell(), BuildSpec(TINY, {"architecture": "x86_64"}), "offers none"),
]


@pytest.mark.parametrize(("name", "candidate", "spec", "expected"), FILTER_CASES)
def test_each_filter_passes_or_says_why(
    name: str, candidate: CellCandidate, spec: BuildSpec, expected: str | None
) -> None:
    result = FILTERS[name]([candidate], spec)
    if expected is None:
        assert result.kept == [candidate] and result.removed == []
    else:
        [(removed, reason)] = result.removed
        assert result.kept == [] and removed is candidate and expected in reason


@pytest.mark.parametrize(
    ("name", "candidate", "value"),
    [
        ("ram_by_instance_type", cell(capacity=room(4096)), 8.0),  # 4096 / 512
        ("ram_by_instance_type", cell(capacity=None), 0.0),
        ("weight_offset", cell(weight_offset=-1_000_000.0), -1_000_000.0),
        ("weight_offset", cell(weight_offset=2.0, weight_scale=3.0), 6.0),
        ("mute_child", cell(mute=True), 1.0),
        ("mute_child", cell(alive=False), 1.0),
        ("mute_child", cell(), 0.0),
    ],
)
def test_each_weigher_s_raw_value(name: str, candidate: CellCandidate, value: float) -> None:
    assert WEIGHERS[name][0]([candidate], BuildSpec(TINY)) == [value]


def test_normalising_maps_the_lowest_to_0_and_the_highest_to_1() -> None:
    assert normalised([2.0, 4.0, 6.0]) == [0.0, 0.5, 1.0]
    assert normalised([5.0, 5.0]) == [0.0, 0.0]
    assert normalised([]) == []


def test_nova_s_scenario_a_huge_negative_offset_always_goes_last() -> None:
    """The defect this replaces: an offset of -1,000,000 still took 7 of 20 random builds."""
    cells = [cell("c1"), cell("c2"), cell("c3", weight_offset=-1_000_000.0)]
    rng = random.Random(1)
    firsts = [schedule(cells, BuildSpec(TINY), rng).order for _ in range(200)]
    assert all(order[-1] == "c3" for order in firsts)
    assert {order[0] for order in firsts} == {"c1", "c2"}  # equal cells share the first place


def test_room_sets_the_chance_of_going_first_and_a_mute_child_goes_last_whatever_its_room() -> None:
    cells = [
        cell("small", capacity=room(1024)),  # 2 tiny instances
        cell("big", capacity=room(16384)),  # 32
        cell("mute", capacity=room(65536), mute=True),
    ]
    orders = [schedule(cells, BuildSpec(TINY), random.Random(seed)).order for seed in range(400)]
    assert all(order[-1] == "mute" for order in orders)
    big_first = sum(order[0] == "big" for order in orders) / len(orders)
    assert 0.88 <= big_first <= 0.99  # 32 / 34 = 0.94
    decision = schedule(cells, BuildSpec(TINY), random.Random(7))
    by_name = {w.name: w for w in decision.weighed}
    assert by_name["big"].normal["ram_by_instance_type"] < 1.0  # mute has the most room
    assert by_name["mute"].total == pytest.approx(10.0 - 10000.0)
    assert by_name["big"].chance == pytest.approx(32 / 34)
    assert by_name["mute"].chance == 1.0  # alone in its tier


def test_children_of_capacities_1_2_4_take_builds_in_that_proportion() -> None:
    """Each placement comes off the parent's view, as between two announcements."""
    views = {
        name: Capacity(ram_units={512: units}, disk_units={1: units}, vcpu_units={1: units})
        for name, units in (("a", 1000), ("b", 2000), ("c", 4000))
    }
    taken = dict.fromkeys(views, 0)
    rng = random.Random(5)
    for _ in range(3500):  # half of the room
        cells = [cell(name, capacity=capacity) for name, capacity in views.items()]
        first = schedule(cells, BuildSpec(TINY), rng).order[0]
        taken[first] += 1
        views[first] = views[first].less(TINY)
    shares = {name: count / 3500 for name, count in taken.items()}
    for name, share in zip("abc", (1 / 7, 2 / 7, 4 / 7), strict=True):
        assert abs(shares[name] - share) < 0.02, shares


def test_a_negative_ram_multiplier_fills_the_fullest_first() -> None:
    cells = [cell("roomy", capacity=room(65536)), cell("full", capacity=room(512))]
    orders = [
        schedule(cells, BuildSpec(TINY), random.Random(s), weighers={"ram_by_instance_type": -1})
        for s in range(200)
    ]
    assert sum(d.order[0] == "full" for d in orders) > 150  # chance 1/2 against 1/129


def test_a_cell_not_heard_yet_is_tried_after_every_cell_known_to_have_room() -> None:
    cells = [cell("new", capacity=None), cell("known")]
    for seed in range(50):
        assert schedule(cells, BuildSpec(TINY), random.Random(seed)).order == ("known", "new")


def test_a_decision_keeps_every_verdict_for_the_explanation() -> None:
    cells = [cell("c1", enabled=False), cell("c2", capacity=room(256)), cell("c3")]
    decision = schedule(cells, BuildSpec(TINY), random.Random(3))
    assert decision.order == ("c3",)
    assert [(w.name, w.removed_by) for w in decision.weighed] == [
        ("c1", "disabled"),
        ("c2", "capacity"),
        ("c3", None),
    ]
    assert decision.weighed[2].raw == {
        "ram_by_instance_type": 8.0,
        "weight_offset": 0.0,
        "mute_child": 0.0,
    }


def test_ties_are_drawn_from_the_seed_not_from_the_callers_order() -> None:
    cells = [cell(f"c{i}") for i in range(6)]
    first = schedule(cells, BuildSpec(TINY), random.Random(42)).order
    again = schedule(list(reversed(cells)), BuildSpec(TINY), random.Random(42)).order
    assert sorted(first) == sorted(again) == sorted(c.name for c in cells)
    spread = {schedule(cells, BuildSpec(TINY), random.Random(s)).order[0] for s in range(60)}
    assert len(spread) == 6  # every equal cell gets the first place under some seed


def test_multipliers_and_nova_names() -> None:
    cells = [cell("roomy", capacity=room(8192)), cell("liked", weight_offset=5.0)]
    ram_only = [
        schedule(cells, BuildSpec(TINY), random.Random(s), weighers={"ram_by_instance_type": 1})
        for s in range(300)
    ]
    assert 0.58 <= sum(d.order[0] == "roomy" for d in ram_only) / 300 <= 0.76  # 16 / 24
    for seed in range(50):
        offset_only = schedule(
            cells, BuildSpec(TINY), random.Random(seed), weighers={"weight_offset": 1}
        )
        assert offset_only.order == ("liked", "roomy")
    assert set(NOVA_NAMES.values()) <= set(FILTERS) | set(WEIGHERS)


def test_configured_names_resolve_to_ours_and_nova_s() -> None:
    assert resolve(["TargetCellFilter", "capacity"], FILTERS) == ("target_cell", "capacity")
    assert resolve(["nova.cells.weights.mute_child.MuteChildWeigher"], WEIGHERS) == ("mute_child",)
    assert resolve(["nova.cells.filters.all_filters"], FILTERS) == tuple(FILTERS)
    with pytest.raises(ValueError, match="unknown name 'NoSuchFilter'"):
        resolve(["NoSuchFilter"], FILTERS)
