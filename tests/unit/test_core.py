"""The cell core driven by tables at exact times: no sockets, no loop, no clock.

The API cell `api` has children c1 and c2 and one admin client `ops`. Each
test feeds `CellCore` messages with the time and checks the actions it
returns, and when it next wants the time (`next_deadline`).
"""

from __future__ import annotations

from typing import Any

import pytest

from zcells.actions import Answer, Failed, Placed, Refused, Run, Send, SendKind, Settle
from zcells.core import CellCore, NodeSettings
from zcells.errors import Busy, CallTimeout, CellUnreachable, StaleMessage, TransportBroken
from zcells.messages import (
    Broadcast,
    CellResult,
    Direction,
    Hello,
    Kind,
    Outcome,
    Response,
    Targeted,
    new_message_id,
)
from zcells.methods import Call, Method, MethodTable
from zcells.peer import Peer, Role
from zcells.records import Client, Neighbour
from zcells.relays import (
    RELAY_TRANSITIONS,
    Relay,
    RelayEvent,
    RelayState,
    RelayStateError,
)

T0 = 100.0  # monotonic
WALL = 1_700_000_000.0
OPS = Peer(Role.CLIENT, "ops")
C1 = Peer(Role.CHILD, "c1")
C2 = Peer(Role.CHILD, "c2")
PARENT = Peer(Role.PARENT, "top")


def pong(call: Call) -> dict[str, Any]:
    return {"pong": call.cell}


METHODS = MethodTable(
    [Method("ping", pong, frozenset({Kind.TARGETED, Kind.BROADCAST}), frozenset({"admin"}))]
)


def core(name: str = "api", parent: str | None = None, **settings: Any) -> CellCore:
    made = CellCore(
        NodeSettings(name=name, cell_type="api", call_timeout_s=30.0, **settings), METHODS, T0
    )
    cells = [Neighbour(c, "child", f"ipc:///{c}", f"key-{c}") for c in ("c1", "c2")]
    if parent is not None:
        cells.append(Neighbour(parent, "parent", f"ipc:///{parent}", "key-top"))
    made.apply_registry(cells, [Client("ops", "key-ops", "admin")], T0)
    return made


def _request_fields(timeout_s: float) -> dict[str, Any]:
    return dict(
        id=new_message_id(),
        method="ping",
        body={},
        direction=Direction.DOWN,
        path=(),
        hops=0,
        max_hops=10,
        want_response=True,
        timeout_ms=int(timeout_s * 1000),
        sent_at=WALL,
        context=None,
    )


def asked(target: str = "api!c1", timeout_s: float = 10.0, **changes: Any) -> Targeted:
    return Targeted(**{**_request_fields(timeout_s), "target": target, **changes})


def answer_from(cell: str, sent: Send, value: Any = "ok", held_ms: float = 0.0) -> Response:
    return Response(
        id=new_message_id(),
        reply_to=sent.message.id,
        path=sent.message.path,
        results=(CellResult(cell, Outcome.OK, value=value),),
        sent_at=WALL,
        held_ms=held_ms,
    )


def only(actions: list[Any], kind: type) -> Any:
    [action] = actions
    assert isinstance(action, kind), action
    return action


def test_a_relay_waits_until_its_deadline_and_answers_timed_out_exactly_then() -> None:
    cell = core()
    request = asked(timeout_s=10.0)
    sent = only(cell.receive(OPS, request, T0, WALL), Send)
    assert sent.peer == C1 and sent.message.path == ("api",)
    assert sent.failed == Failed(SendKind.RELAY, C1, sent.message.id)
    assert cell.next_deadline() == T0 + 10.0
    assert cell.tick(T0 + 9.999, WALL) == []
    answer = only(cell.tick(T0 + 10.0, WALL + 10), Answer)
    assert answer.peer == OPS and answer.response.reply_to == request.id
    assert answer.response.results == (CellResult("api!c1", Outcome.TIMED_OUT),)
    assert answer.response.held_ms == pytest.approx(10_000.0)
    assert cell.next_deadline() is None
    # the child's answer after that is late: never passed on
    assert cell.receive(C1, answer_from("api!c1", sent), T0 + 11, WALL) == []
    assert cell.counters["unmatched_responses"] == 1
    assert cell.statistics()["in_flight"] == 0


def test_a_deadline_is_the_smaller_of_the_request_s_and_the_cell_s() -> None:
    cell = core()
    cell.receive(OPS, asked(timeout_s=600.0), T0, WALL)
    assert cell.next_deadline() == T0 + 30.0  # call_timeout_s


def test_an_answer_in_time_goes_back_to_the_requester_and_clears_the_timer() -> None:
    cell = core()
    request = asked()
    sent = only(cell.receive(OPS, request, T0, WALL), Send)
    answer = only(cell.receive(C1, answer_from("api!c1", sent), T0 + 0.25, WALL), Answer)
    assert answer.peer == OPS and answer.response.reply_to == request.id
    assert answer.response.results[0].value == "ok"
    assert answer.response.held_ms == pytest.approx(250.0)
    assert cell.next_deadline() is None
    assert cell.relays == {}


def test_only_the_neighbour_asked_may_answer_and_only_for_its_subtree() -> None:
    cell = core()
    sent = only(cell.receive(OPS, asked(), T0, WALL), Send)
    assert cell.receive(C2, answer_from("api!c2", sent), T0, WALL) == []  # not asked: ignored
    refused, answer = cell.receive(C1, answer_from("api!c2", sent), T0, WALL)
    assert isinstance(refused, Refused) and refused.error.code == "E_SENDER_MISMATCH"
    assert isinstance(answer, Answer) and answer.response.results[0].outcome is Outcome.ERROR


def test_a_duplicate_is_answered_from_memory_once_the_answer_went_out() -> None:
    cell = core()
    request = asked(target="api")
    run = only(cell.receive(OPS, request, T0, WALL), Run)
    assert cell.receive(OPS, request, T0, WALL) == []  # still running: dropped
    answer = only(cell.ran(run.token, CellResult("api", Outcome.OK, value=1), T0 + 1, WALL), Answer)
    cell.answered(answer, size=120)
    again = only(cell.receive(OPS, request, T0 + 2, WALL), Send)
    assert again.message == answer.response
    assert cell.counters["duplicates"] == 2
    assert cell.statistics()["remembered_bytes"] == 120


def test_the_duplicate_memory_is_bounded_by_bytes() -> None:
    cell = core(remember_bytes=300, remember_answer_bytes=200)
    answers = []
    for _ in range(3):
        run = only(cell.receive(OPS, asked(target="api"), T0, WALL), Run)
        answers.append(only(cell.ran(run.token, CellResult("api", Outcome.OK), T0, WALL), Answer))
    cell.answered(answers[0], 150)
    cell.answered(answers[1], 150)
    cell.answered(answers[2], 250)  # larger than any answer kept: not kept
    assert cell.statistics()["remembered_bytes"] == 300
    cell.answered(answers[2], 100)  # over 300 in all: the oldest goes
    assert cell.statistics()["remembered_bytes"] == 250


def test_requests_in_flight_per_peer_are_bounded() -> None:
    cell = core(max_in_flight_per_peer=2)
    for _ in range(2):
        only(cell.receive(OPS, asked(), T0, WALL), Send)
    refused, answer = cell.receive(OPS, asked(), T0, WALL)
    assert isinstance(refused.error, Busy)
    assert answer.response.results[0].error.code == "E_BUSY"
    cell.tick(T0 + 30, WALL)  # both relays expire: room again
    assert isinstance(only(cell.receive(OPS, asked(), T0 + 30, WALL), Send), Send)


def test_a_request_sent_far_from_this_cell_s_clock_is_refused() -> None:
    cell = core(max_clock_skew_s=300.0)
    refused, answer = cell.receive(OPS, asked(sent_at=WALL - 301), T0, WALL)
    assert isinstance(refused.error, StaleMessage)
    assert answer.response.results[0].error.code == "E_STALE"
    assert only(cell.receive(OPS, asked(sent_at=WALL - 299), T0, WALL), Send)


def test_a_relay_whose_send_fails_is_answered_unreachable_at_once() -> None:
    cell = core()
    request = asked()
    sent = only(cell.receive(OPS, request, T0, WALL), Send)
    error = cell.as_own(C1, TransportBroken("link down"))
    assert isinstance(error, CellUnreachable) and error.cell == "api"
    refused, answer = cell.send_failed(sent.failed, error, WALL)
    assert isinstance(refused, Refused)
    assert answer.peer == OPS and answer.response.reply_to == request.id
    assert answer.response.results[0].error.code == "E_UNREACHABLE"
    assert cell.next_deadline() is None
    assert cell.send_failed(sent.failed, error, WALL) == []  # once only


def test_a_broadcast_gathers_the_subtree_and_times_out_the_silent() -> None:
    cell = core()
    request = Broadcast(**_request_fields(5.0), run_locally=True)
    actions = cell.receive(OPS, request, T0, WALL)
    sends = [a for a in actions if isinstance(a, Send)]
    run = only([a for a in actions if isinstance(a, Run)], Run)
    assert [s.peer for s in sends] == [C1, C2]
    assert cell.next_deadline() == T0 + 5.0
    assert cell.ran(run.token, CellResult("api", Outcome.OK, value="here"), T0 + 1, WALL) == []
    assert cell.receive(C1, answer_from("api!c1", sends[0]), T0 + 2, WALL) == []
    answer = only(cell.tick(T0 + 5.0, WALL), Answer)
    by_cell = {r.cell: r.outcome for r in answer.response.results}
    assert by_cell == {"api": Outcome.OK, "api!c1": Outcome.OK, "api!c2": Outcome.TIMED_OUT}


def test_this_cell_s_own_call_settles_with_the_answer_or_the_timeout() -> None:
    cell = core()
    token, actions = cell.call("ping", {}, "api!c2", 4.0, T0, WALL)
    sent = only(actions, Send)
    assert sent.peer == C2 and cell.next_deadline() == T0 + 4.0
    settled = only(cell.receive(C2, answer_from("api!c2", sent), T0 + 1, WALL), Settle)
    assert settled.token == token and settled.response is not None
    token, actions = cell.call("ping", {}, "api!c2", 4.0, T0, WALL)
    settled = only(cell.tick(T0 + 4.0, WALL), Settle)
    assert settled.token == token and isinstance(settled.error, CallTimeout)


def test_a_parent_s_hello_places_the_cell_and_tells_its_children() -> None:
    cell = core("mid", parent="top")
    hello = Hello(
        id=new_message_id(), sent_at=WALL, cell_type="api", path="top", your_path="top!mid"
    )
    actions = cell.receive(PARENT, hello, T0, WALL)
    assert Placed("top!mid") in actions
    told = sorted(a.peer.name for a in actions if isinstance(a, Send))
    assert told == ["c1", "c2"]
    assert cell.here() == "top!mid"


RELAY_MOVES = [
    (state, event, RELAY_TRANSITIONS[state].get(event))
    for state in RelayState
    for event in RelayEvent
]


@pytest.mark.parametrize(("state", "event", "following"), RELAY_MOVES)
def test_a_relay_moves_only_as_its_table_says(
    state: RelayState, event: RelayEvent, following: RelayState | None
) -> None:
    relay = Relay(C1, "api!c1", T0, T0 + 1, OPS, asked(), state=state)
    if following is None:
        with pytest.raises(RelayStateError):
            relay.move(event)
    else:
        relay.move(event)
        assert relay.state is following
        assert state is RelayState.WAITING  # only a waiting relay moves at all
