"""The routing core as tables: no sockets, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from zcells import routing
from zcells.errors import (
    CallTimeout,
    CellUnreachable,
    MaxHopsExceeded,
    RoutingInconsistency,
    SenderMismatch,
    UnknownCell,
)
from zcells.messages import (
    Broadcast,
    CellResult,
    Direction,
    Outcome,
    Targeted,
    new_message_id,
)
from zcells.peer import Peer, Role

API = routing.View("api", children=frozenset({"c1", "c2"}))
C1 = routing.View("c1", children=frozenset({"g1", "g2"}), parents={"api": "api"})
G1 = routing.View("g1", parents={"c1": "api!c1"})
C1_UNPLACED = routing.View("c1", children=frozenset({"g1"}), parents={"api": None})

CLIENT = Peer(Role.CLIENT, "ops")
FROM_API = Peer(Role.PARENT, "api")
FROM_C1_UP = Peer(Role.CHILD, "c1")
FROM_G1 = Peer(Role.CHILD, "g1")


def targeted(
    target: str,
    path: tuple[str, ...] = (),
    direction: Direction = Direction.DOWN,
    max_hops: int = 10,
) -> Targeted:
    return Targeted(
        id=new_message_id(),
        method="ping",
        body={},
        direction=direction,
        path=path,
        hops=len(path),
        max_hops=max_hops,
        want_response=True,
        timeout_ms=1000,
        sent_at=1.0,
        context=None,
        target=target,
    )


def broadcast(path: tuple[str, ...] = (), direction: Direction = Direction.DOWN) -> Broadcast:
    return Broadcast(
        id=new_message_id(),
        method="ping",
        body={},
        direction=direction,
        path=path,
        hops=len(path),
        max_hops=10,
        want_response=True,
        timeout_ms=1000,
        sent_at=1.0,
        context=None,
    )


def test_paths_of_cells() -> None:
    assert API.paths == ("api",)
    assert C1.paths == ("api!c1",)
    assert C1_UNPLACED.paths == ()
    with pytest.raises(UnknownCell, match="does not know its place"):
        C1_UNPLACED.home_path()
    assert routing.parent_of("api!c1!g1") == "api!c1"
    assert routing.parent_of("api") is None
    assert routing.is_below("api!c1!g1", "api!c1") and routing.is_below("api", "api")
    assert not routing.is_below("api!c10", "api!c1")


@pytest.mark.parametrize(
    ("view", "sender", "message", "path", "decision", "to"),
    [
        (API, CLIENT, targeted("api"), ("api",), routing.Deliver, None),
        (API, CLIENT, targeted("api!c1!g1"), ("api",), routing.Forward, Peer(Role.CHILD, "c1")),
        (
            C1,
            FROM_API,
            targeted("api!c1!g1", ("api",)),
            ("api", "api!c1"),
            routing.Forward,
            Peer(Role.CHILD, "g1"),
        ),
        (
            G1,
            Peer(Role.PARENT, "c1"),
            targeted("api!c1!g1", ("api", "api!c1")),
            ("api", "api!c1", "api!c1!g1"),
            routing.Deliver,
            None,
        ),
        # a client at a middle cell reaching a sibling subtree: up, then down
        (C1, CLIENT, targeted("api!c2"), ("api!c1",), routing.Forward, Peer(Role.PARENT, "api")),
        (
            API,
            FROM_C1_UP,
            targeted("api!c2", ("api!c1",), Direction.UP),
            ("api!c1", "api"),
            routing.Forward,
            Peer(Role.CHILD, "c2"),
        ),
        (G1, CLIENT, targeted("api"), ("api!c1!g1",), routing.Forward, Peer(Role.PARENT, "c1")),
    ],
)
def test_targeted_next_hop(
    view: routing.View,
    sender: Peer,
    message: Targeted,
    path: tuple[str, ...],
    decision: type,
    to: Peer | None,
) -> None:
    stamped = routing.accept(view, sender, message)
    assert stamped.path == path and stamped.hops == len(path)
    result = routing.route_targeted(view, stamped, sender)
    assert isinstance(result, decision)
    if to is not None:
        assert isinstance(result, routing.Forward) and result.to == to
        expected = Direction.DOWN if to.role is Role.CHILD else Direction.UP
        assert result.message.direction is expected  # type: ignore[union-attr]


def test_unknown_next_hop_names_the_cell_where_routing_stopped() -> None:
    stamped = routing.accept(C1, FROM_API, targeted("api!c1!zz", ("api",)))
    with pytest.raises(UnknownCell) as info:
        routing.route_targeted(C1, stamped, FROM_API)
    assert info.value.cell == "api!c1" and "'zz'" in info.value.message


def test_target_outside_the_tree() -> None:
    stamped = routing.accept(API, CLIENT, targeted("other!x"))
    with pytest.raises(UnknownCell, match="no cell other!x"):
        routing.route_targeted(API, stamped, CLIENT)


def test_parent_sending_outside_subtree_is_inconsistent() -> None:
    stamped = routing.accept(C1, FROM_API, targeted("api!c2", ("api",)))
    with pytest.raises(RoutingInconsistency, match="outside its subtree"):
        routing.route_targeted(C1, stamped, FROM_API)


@pytest.mark.parametrize(
    ("view", "sender", "message", "error"),
    [
        # a child claiming to be another cell
        (API, FROM_C1_UP, targeted("api", ("api!c2",), Direction.UP), SenderMismatch),
        (C1, Peer(Role.CHILD, "g2"), targeted("api", ("api!c1!g1",), Direction.UP), SenderMismatch),
        # a parent's path must end with the parent
        (C1, FROM_API, targeted("api!c1", ("other",)), SenderMismatch),
        # direction must match the neighbour
        (C1, FROM_API, targeted("api!c1", ("api",), Direction.UP), RoutingInconsistency),
        (API, FROM_C1_UP, targeted("api", ("api!c1",), Direction.DOWN), RoutingInconsistency),
        # clients start with an empty path
        (API, CLIENT, targeted("api", ("api",)), SenderMismatch),
        # hop count must match the path
        (C1, FROM_API, replace(targeted("api!c1", ("api",)), hops=0), RoutingInconsistency),
        # a loop
        (C1, FROM_API, targeted("api!c1!g1", ("api!c1", "api")), RoutingInconsistency),
        # a parent that has not said hello
        (C1_UNPLACED, FROM_API, targeted("api!c1", ("api",)), CellUnreachable),
        # a child's request to a cell that has just started: try again, not an impersonation
        (
            routing.View("c1", children=frozenset({"g1"}), parents={"api": None}),
            FROM_G1,
            targeted("api!c1", ("api!c1!g1",), Direction.UP),
            CellUnreachable,
        ),
        # a forged origin: every hop must neighbour the one before (finding 8)
        (C1, FROM_G1, targeted("api", ("api!c2", "api!c1!g1"), Direction.UP), SenderMismatch),
        (API, FROM_C1_UP, targeted("api", ("api!c2!x", "api!c1"), Direction.UP), SenderMismatch),
        # from a child, never a step down before it
        (
            API,
            FROM_C1_UP,
            targeted("api", ("api!c1", "api!c1!g1", "api!c1"), Direction.UP),
            SenderMismatch,
        ),
        # from a parent, up then down, never up again
        (G1, Peer(Role.PARENT, "c1"), targeted("api!c1!g1", ("api!c2", "api", "api!c1")), None),
        (
            G1,
            Peer(Role.PARENT, "c1"),
            targeted("api!c1!g1", ("api!c1!g2", "api", "api!c1")),
            SenderMismatch,
        ),
    ],
)
def test_accept_refuses(
    view: routing.View, sender: Peer, message: Targeted, error: type[Exception] | None
) -> None:
    if error is None:  # the shape that is allowed, beside the ones that are not
        assert routing.accept(view, sender, message).path[-1] == "api!c1!g1"
        return
    with pytest.raises(error):
        routing.accept(view, sender, message)


def test_max_hop_count_uses_the_smaller_limit() -> None:
    path = tuple(f"api{'!x' * i}" for i in range(3))
    view = routing.View("x", parents={"x": path[-1]}, max_hop_count=3)
    with pytest.raises(MaxHopsExceeded) as info:
        routing.accept(view, Peer(Role.PARENT, "x"), targeted("api!x!x!x", path, max_hops=10))
    assert "past the limit of 3" in info.value.message
    # a sender cannot raise the limit: its own max_hops only lowers it
    view = replace(view, max_hop_count=10)
    with pytest.raises(MaxHopsExceeded):
        routing.accept(view, Peer(Role.PARENT, "x"), targeted("api!x!x!x", path, max_hops=3))
    assert (
        routing.accept(view, Peer(Role.PARENT, "x"), targeted("api!x!x!x", path, max_hops=4)).hops
        == 4
    )


def test_broadcast_fans_out_down_and_up() -> None:
    down = routing.route_broadcast(C1, routing.accept(C1, FROM_API, broadcast(("api",))))
    assert down.local and down.to == (Peer(Role.CHILD, "g1"), Peer(Role.CHILD, "g2"))
    up = routing.route_broadcast(G1, routing.accept(G1, CLIENT, broadcast(direction=Direction.UP)))
    assert up.to == (Peer(Role.PARENT, "c1"),)
    leaf = routing.route_broadcast(G1, routing.accept(G1, CLIENT, broadcast()))
    assert leaf.to == ()


def test_aggregation_keeps_partial_results() -> None:
    agg = routing.Aggregation(
        "api", (Peer(Role.CHILD, "c1"), Peer(Role.CHILD, "c2"), Peer(Role.CHILD, "c3")), local=True
    )
    assert not agg.done
    agg.add_local(CellResult("api", Outcome.OK, {}, rtt_ms=0.1))
    agg.add(
        Peer(Role.CHILD, "c1"),
        (
            CellResult("api!c1", Outcome.OK, {}, rtt_ms=0.2),
            CellResult("api!c1!g1", Outcome.OK, {}, rtt_ms=0.5),
        ),
        link_ms=1.0,
    )
    agg.fail(Peer(Role.CHILD, "c3"), UnknownCell("gone", "api"))
    assert not agg.done and agg.expects(Peer(Role.CHILD, "c2"))
    results = {r.cell: r for r in agg.finish()}
    assert set(results) == {"api", "api!c1", "api!c1!g1", "api!c2", "api!c3"}
    assert results["api!c2"].outcome is Outcome.TIMED_OUT
    assert results["api!c3"].outcome is Outcome.ERROR
    assert results["api!c1!g1"].rtt_ms == pytest.approx(1.5)
    assert results["api"].rtt_ms == pytest.approx(0.1)


def test_aggregation_refuses_results_outside_a_subtree() -> None:
    agg = routing.Aggregation("api", (Peer(Role.CHILD, "c1"),), local=False)
    with pytest.raises(SenderMismatch):
        agg.add(Peer(Role.CHILD, "c1"), (CellResult("api!c2", Outcome.OK, {}),))
    assert agg.expects(Peer(Role.CHILD, "c1"))  # still waiting for a proper answer


def test_aggregation_reports_a_local_handler_that_did_not_finish() -> None:
    agg = routing.Aggregation("api", (), local=True)
    (result,) = agg.finish()
    assert result.outcome is Outcome.ERROR and isinstance(result.error, CallTimeout)


@pytest.mark.parametrize(
    ("budget", "forwarded"), [(60_000, 59_000), (1000, 900), (100, 80), (10, 0), (0, 0)]
)
def test_forward_budget_keeps_a_margin(budget: int, forwarded: int) -> None:
    assert routing.forward_budget_ms(budget) == forwarded
