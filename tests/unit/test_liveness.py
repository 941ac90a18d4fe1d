"""Neighbour liveness on a fake clock: exact times, no sleeping."""

from __future__ import annotations

import pytest

from zcells.liveness import (
    TRANSITIONS,
    ImpossibleTransition,
    LinkEvent,
    Liveness,
    Tracker,
    next_state,
)
from zcells.neighbours import Neighbourhood
from zcells.peer import Peer, Role
from zcells.records import Neighbour


def tracker() -> Tracker:
    return Tracker(late_after_s=15.0, mute_after_s=300.0, since=1000.0)


def test_unknown_until_heard_then_alive_late_mute_alive() -> None:
    t = tracker()
    assert t.check(1010.0) is Liveness.UNKNOWN
    assert t.check(1299.9) is Liveness.UNKNOWN
    assert t.heard(1100.0) is Liveness.ALIVE
    assert t.check(1114.9) is Liveness.ALIVE
    assert t.check(1115.0) is Liveness.LATE
    assert t.check(1399.9) is Liveness.LATE
    assert t.check(1400.0) is Liveness.MUTE
    assert t.silent_for(1400.0) == 300.0
    assert t.check(1500.0) is Liveness.MUTE
    assert t.heard(1500.0) is Liveness.ALIVE


def test_never_heard_goes_mute_after_the_interval() -> None:
    t = tracker()
    assert t.check(1300.0) is Liveness.MUTE
    assert t.silent_for(1300.0) is None


def test_every_state_recovers_when_heard() -> None:
    for state in Liveness:
        assert next_state(state, LinkEvent.HEARD) is Liveness.ALIVE


@pytest.mark.parametrize(
    ("state", "event"),
    [(Liveness.UNKNOWN, LinkEvent.SILENT_LATE), (Liveness.MUTE, LinkEvent.SILENT_LATE)],
)
def test_impossible_transitions_are_typed_errors(state: Liveness, event: LinkEvent) -> None:
    assert event not in TRANSITIONS[state]
    with pytest.raises(ImpossibleTransition):
        next_state(state, event)


def test_a_hello_that_would_close_a_cycle_is_refused_once_and_kept_as_a_problem() -> None:
    """Finding 10: api -> c1 -> g1 -> api would grow paths without end; it is refused."""
    hood = Neighbourhood("api", "api", max_hop_count=10, heartbeat_interval_s=1, mute_after_s=5)
    hood.apply([Neighbour("g1", "parent", "tcp://127.0.0.1:1", "k" * 40)], [], 0.0)
    parent = Peer(Role.PARENT, "g1")
    assert hood.learn(parent, "api!c1!g1", "api!c1!g1!api", 1.0) == []
    assert hood.view.parents == {} and hood.view.paths == ("api",)  # still the top
    assert "cycle" in hood.problems["g1"]
    assert hood.learn(parent, "api!c1!g1", "api!c1!g1!api", 2.0) == []  # logged once only
    deep = "!".join(f"x{i}" for i in range(9)) + "!g1"
    assert hood.learn(parent, deep, f"{deep}!api", 3.0) == []
    assert "too deep" in hood.problems["g1"]
    assert hood.learn(parent, "top!g1", "top!g1!api", 4.0) == []  # no children to tell
    assert hood.view.parents == {"g1": "top!g1"} and hood.problems == {}


def test_a_second_parent_in_the_table_is_not_dialled_and_is_shown() -> None:
    hood = Neighbourhood("g1", "compute", max_hop_count=10, heartbeat_interval_s=1, mute_after_s=5)
    topology = hood.apply(
        [
            Neighbour("c1", "parent", "tcp://127.0.0.1:1", "a" * 40),
            Neighbour("c2", "parent", "tcp://127.0.0.1:2", "b" * 40),
        ],
        [],
        0.0,
    )
    assert list(topology.parents) == ["c1"] and list(hood.view.parents) == ["c1"]
    assert "a second parent" in hood.problems["c2"]
    hood.apply([Neighbour("c1", "parent", "tcp://127.0.0.1:1", "a" * 40)], [], 1.0)
    assert hood.problems == {}
