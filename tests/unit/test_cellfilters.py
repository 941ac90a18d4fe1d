"""The cell scheduler's filters and weighers, by tables; normalisation, multipliers, ties."""

from __future__ import annotations

import random
from typing import Any

import pytest

from zcells.capacity import cell_capacity
from zcells.cellfilters import (
    FILTERS,
    NOVA_NAMES,
    WEIGHERS,
    BuildSpec,
    CellCandidate,
    normalised,
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
    ("target_cell", cell("c2"), BuildSpec(TINY, target_cell="api!c1"), "not on the way"),
    ("target_cell", cell("c10"), BuildSpec(TINY, target_cell="api!c1"), "not on the way"),
    ("different_cell", cell(), BuildSpec(TINY, different_cell=frozenset({"api!c1"})), "avoid"),
    ("different_cell", cell(), BuildSpec(TINY, different_cell=frozenset({"api!c11"})), None),
    ("same_cell", cell(), BuildSpec(TINY, same_cell=frozenset({"api!c2"})), "must stay in"),
    ("same_cell", cell(), BuildSpec(TINY, same_cell=frozenset({"api!c1!g1"})), None),
    ("capacity", cell(capacity=None), BuildSpec(TINY), "announced no capacity"),
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
    reason = FILTERS[name](candidate, spec)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


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
    assert WEIGHERS[name][0](candidate, BuildSpec(TINY)) == value


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


def test_more_room_comes_first_and_a_mute_child_last_whatever_its_room() -> None:
    cells = [
        cell("small", capacity=room(1024)),
        cell("big", capacity=room(16384)),
        cell("mute", capacity=room(65536), mute=True),
    ]
    decision = schedule(cells, BuildSpec(TINY), random.Random(7))
    assert decision.order == ("big", "small", "mute")
    by_name = {w.name: w for w in decision.weighed}
    assert by_name["big"].normal["ram_by_instance_type"] < 1.0  # mute has the most room
    assert by_name["mute"].total == pytest.approx(10.0 - 10000.0)


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
    ram_only = schedule(
        cells, BuildSpec(TINY), random.Random(1), weighers={"ram_by_instance_type": 1}
    )
    offset_only = schedule(cells, BuildSpec(TINY), random.Random(1), weighers={"weight_offset": 1})
    assert ram_only.order[0] == "roomy" and offset_only.order[0] == "liked"
    assert set(NOVA_NAMES.values()) <= set(FILTERS) | set(WEIGHERS)
