"""A tree of real nodes over the in-memory transport: routing, errors and limits end to end.

SECURITY.md §5 rows 3, 12-15, 19 and 22 at the message level; the same rows
over real sockets are in tests/integration.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from tests.fakes import MemoryTree, child_request, run
from tests.polling import until
from zcells.clock import FakeClock
from zcells.errors import (
    AccessDenied,
    CallTimeout,
    CellUnreachable,
    Forbidden,
    SenderMismatch,
    UnknownCell,
)
from zcells.messages import (
    CellResult,
    Direction,
    Kind,
    Outcome,
    Response,
    Targeted,
    new_message_id,
)
from zcells.methods import Call, Method
from zcells.peer import Peer, Role
from zcells.transport import Received

TREE = {"api": {"c1": {"g1": {}, "g2": {}}, "c2": {}}}
CELLS = ["api", "api!c1", "api!c1!g1", "api!c1!g2", "api!c2"]


async def boom(call: Call) -> None:
    raise RuntimeError("secret internal detail")


async def hang(call: Call) -> None:
    await asyncio.sleep(3600)


def boom_now(call: Call) -> None:
    raise ValueError("secret internal detail")


def faulty_methods() -> list[Method]:
    anyone = frozenset({"admin", "parent", "child"})
    return [
        Method("boom", boom, frozenset({Kind.TARGETED}), anyone),
        Method("boom_now", boom_now, frozenset({Kind.TARGETED}), anyone),
        Method("hang", hang, frozenset({Kind.TARGETED, Kind.BROADCAST}), anyone),
    ]


def test_ping_every_cell_and_all() -> None:
    async def main() -> None:
        tree = MemoryTree(TREE)
        await tree.start()
        await tree.placed()
        async with tree.client() as client:
            assert client.cell_path == "api"
            for cell in CELLS:
                ping = await client.ping(cell)
                assert ping.cell == cell and ping.rtt_ms is not None and ping.rtt_ms > 0
            rows = await client.ping_all()
            assert [r.cell for r in rows] == CELLS and all(r.ok for r in rows)
            assert all(r.rtt_ms is not None and r.rtt_ms >= 0 for r in rows)
        async with tree.client("c1") as client:
            assert client.cell_path == "api!c1"
            assert [r.cell for r in await client.ping_all()] == CELLS[1:4]
            assert (await client.ping("api!c2")).cell == "api!c2"  # up, then down
        await tree.stop()

    run(main())


def test_unknown_path_names_the_hop() -> None:
    async def main() -> None:
        tree = MemoryTree(TREE)
        await tree.start()
        await tree.placed()
        async with tree.client() as client:
            with pytest.raises(UnknownCell) as info:
                await client.ping("api!c1!nope")
            assert info.value.cell == "api!c1" and "nope" in info.value.message
            with pytest.raises(UnknownCell) as info:
                await client.ping("elsewhere")
            assert info.value.cell == "api"
        await tree.stop()

    run(main())


def test_dead_and_stalled_cells_give_partial_results() -> None:
    async def main() -> None:
        tree = MemoryTree(TREE)
        await tree.start()
        await tree.placed()
        async with tree.client() as client:
            await tree.stop_cell("c2")  # gone: its link is down
            with pytest.raises(CellUnreachable):
                await client.ping("api!c2", timeout_s=1)
            rows = {r.cell: r for r in await client.ping_all(timeout_s=1)}
            assert [c for c in CELLS if rows[c].ok] == CELLS[:4]
            assert rows["api!c2"].code == "E_UNREACHABLE"
            # g1 stops reading: its link stays up but nobody answers
            tree._tasks.pop("g1").cancel()
            with pytest.raises(CallTimeout):
                await client.ping("api!c1!g1", timeout_s=0.5)
            rows = {r.cell: r for r in await client.ping_all(timeout_s=0.5)}
            assert rows["api!c1!g1"].error == "timed out" and not rows["api!c1!g1"].ok
            assert rows["api!c1!g2"].ok and rows["api!c1"].ok and rows["api"].ok
        await tree.stop()

    run(main())


def test_client_roles() -> None:
    async def main() -> None:
        tree = MemoryTree(TREE)
        await tree.start()
        await tree.placed()
        async with tree.client(name="ann") as member:
            with pytest.raises(Forbidden, match="member may not call ping"):
                await member.ping("api")
        async with tree.client(name="rita") as reader:
            with pytest.raises(Forbidden, match="reader may not call ping"):
                await reader.ping("api")
        with pytest.raises(AccessDenied):
            await tree.client(name="stranger").connect()
        with pytest.raises(AccessDenied):  # a name is nothing without its own key
            await tree.client(name="ops", key="key-ann").connect()
        async with tree.client(name="ops") as admin:
            assert (await admin.ping("api")).ok
        await tree.stop()

    run(main())


class Rogue:
    """A child cell whose every message the test writes by hand."""

    def __init__(self, tree: MemoryTree, name: str = "r", parent: str = "api") -> None:
        self.transport = tree.transports[name]
        self.parent = Peer(Role.PARENT, parent)
        self.path = f"{parent}!{name}"

    def request(self, **changes: Any) -> Targeted:
        return child_request(**{"path": (self.path,), **changes})

    async def ask(self, message: Targeted) -> Response:
        self.transport.send(self.parent, message)
        async with asyncio.timeout(5):
            while True:
                event = await self.transport.recv()
                answer = event.message if isinstance(event, Received) else None
                if isinstance(answer, Response) and answer.reply_to == message.id:
                    return answer


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"path": ("api!c1",)}, "E_SENDER_MISMATCH"),  # row 3: speaks as another cell
        ({"method": "__init__"}, "E_UNKNOWN_METHOD"),  # row 12
        ({"method": "getattr"}, "E_UNKNOWN_METHOD"),
        ({"body": {"x": 1}}, "E_SCHEMA"),  # row 13: wrong arguments
        ({"body": {"payload": {"x": float("nan")}}}, "E_SCHEMA"),
        ({"body": {"payload": "text"}}, "E_SCHEMA"),
        ({"sent_at": time.time() - 3600}, "E_STALE"),  # row 14: stale
        ({"max_hops": 1}, "E_MAX_HOPS"),  # row 15
        ({"direction": Direction.DOWN}, "E_ROUTING"),  # row 15: down from a child
        ({"hops": 5}, "E_ROUTING"),
        ({"method": "boom"}, "E_INTERNAL"),  # row 22: handler raises
        ({"method": "boom_now"}, "E_INTERNAL"),  # an inline handler raises
        ({"method": "hang", "timeout_ms": 200}, "E_TIMEOUT"),  # row 22: handler hangs
    ],
)
def test_bad_requests_from_a_child_get_typed_errors(changes: dict[str, Any], code: str) -> None:
    async def main() -> None:
        tree = MemoryTree(TREE, extra_methods=faulty_methods, rogues={"r": "api"})
        await tree.start()
        await tree.placed()
        rogue = Rogue(tree)
        await until(lambda: "api" in tree.transports["r"].statistics()["parents_up"], 5, "up")
        answer = await rogue.ask(rogue.request(**changes))
        (result,) = answer.results
        assert result.outcome is Outcome.ERROR and result.error is not None
        assert result.error.code == code
        assert "secret internal detail" not in result.error.message
        assert "Traceback" not in result.error.message
        # the cell still answers afterwards
        ok = await rogue.ask(rogue.request())
        assert ok.results[0].outcome is Outcome.OK
        await tree.stop()

    run(main())


def test_duplicate_request_is_answered_once_from_memory() -> None:
    calls = []

    async def count(call: Call) -> int:
        calls.append(call)
        return len(calls)

    def methods() -> list[Method]:
        return [Method("count", count, frozenset({Kind.TARGETED}), frozenset({"child"}))]

    async def main() -> None:
        tree = MemoryTree(TREE, extra_methods=methods, rogues={"r": "api"})
        await tree.start()
        await tree.placed()
        rogue = Rogue(tree)
        message = rogue.request(method="count")
        first = await rogue.ask(message)
        second = await rogue.ask(replace(message, sent_at=time.time()))
        assert first.results[0].value == second.results[0].value == 1
        assert len(calls) == 1
        assert tree.nodes["api"].counters["duplicates"] == 1
        await tree.stop()

    run(main())


def test_in_flight_requests_per_peer_are_bounded() -> None:
    async def main() -> None:
        tree = MemoryTree(
            TREE, extra_methods=faulty_methods, rogues={"r": "api"}, max_in_flight_per_peer=2
        )
        await tree.start()
        await tree.placed()
        rogue = Rogue(tree)
        for _ in range(2):
            rogue.transport.send(rogue.parent, rogue.request(method="hang", timeout_ms=60000))
        answer = await rogue.ask(rogue.request(method="hang"))
        assert answer.results[0].error is not None
        assert answer.results[0].error.code == "E_BUSY"
        await tree.stop()

    run(main())


def test_revoked_client_is_refused_on_its_next_message() -> None:
    async def main() -> None:
        tree = MemoryTree(TREE)
        await tree.start()
        await tree.placed()
        async with tree.client() as client:
            assert (await client.ping("api")).ok
            neighbours, clients = tree.registry("api")
            tree.nodes["api"].apply_registry(neighbours, [c for c in clients if c.name != "ops"])
            with pytest.raises(CallTimeout):  # the revoked key gets no answer
                await client.ping("api", timeout_s=0.3)
        assert tree.transports["api"].statistics()["revoked"] == 1
        await tree.stop()

    run(main())


def test_a_middle_cell_learns_its_path_and_tells_its_children() -> None:
    async def main() -> None:
        tree = MemoryTree(TREE)
        await tree.start()
        await tree.placed()
        assert tree.nodes["g1"].view.paths == ("api!c1!g1",)
        assert tree.nodes["c1"].view.parents == {"api": "api"}
        await tree.stop()

    run(main())


def test_heartbeats_drive_liveness_on_an_injected_clock() -> None:
    clock = FakeClock(start=1000.0)

    async def main() -> None:
        tree = MemoryTree({"api": {"c1": {}}}, heartbeat_interval_s=3600, mute_after_s=300)
        await tree.start()
        await tree.placed()
        api = tree.nodes["api"]
        api.clock = clock
        api.neighbours.trackers[Peer(Role.CHILD, "c1")].since = clock.now()
        api.neighbours.trackers[Peer(Role.CHILD, "c1")].last_heard = clock.now()
        child = Peer(Role.CHILD, "c1")
        assert api.liveness()[child].value in ("alive", "unknown")
        clock.advance(10_000)  # c1 silent well past the mute interval
        api.beat()
        assert api.liveness()[child].value == "mute"
        tree.nodes["c1"].beat()  # c1's heartbeat reaches api
        await until(lambda: api.liveness()[child].value == "alive", 5, "c1 alive again")
        await tree.stop()

    run(main())


def test_errors_from_deep_in_the_tree_reach_the_client() -> None:
    async def main() -> None:
        tree = MemoryTree({"api": {"c1": {"g1": {"x1": {}}}}})
        await tree.start()
        await tree.placed()
        async with tree.client() as client:
            with pytest.raises(UnknownCell) as info:  # answered: a timeout is CallTimeout
                await client.ping("api!c1!g1!nope")
            assert info.value.cell == "api!c1!g1"
            assert (await client.ping("api!c1!g1!x1")).ok
        await tree.stop()

    run(main())


def test_a_timed_out_relay_names_the_target() -> None:
    async def main() -> None:
        tree = MemoryTree(TREE)
        await tree.start()
        await tree.placed()
        tree._tasks.pop("g2").cancel()  # g2 stops reading
        async with tree.client() as client:
            with pytest.raises(CallTimeout) as info:
                await client.ping("api!c1!g2", timeout_s=0.5)
            assert info.value.cell == "api!c1!g2"
        await tree.stop()

    run(main())


def test_forged_response_from_a_client_goes_nowhere() -> None:
    async def main() -> None:
        tree = MemoryTree(TREE)
        await tree.start()
        await tree.placed()
        async with tree.client() as client:
            forged = Response(
                id=new_message_id(),
                reply_to=new_message_id(),
                path=("api!c1", "api", "ops"),
                sent_at=time.time(),
                results=(),
            )
            await client.transport.send(forged)
            await until(
                lambda: tree.nodes["api"].counters["unmatched_responses"] == 1,
                5,
                "the forged response counted",
            )
            assert (await client.ping("api")).ok
        assert tree.nodes["c1"].counters["unmatched_responses"] == 0
        assert tree.transports["c1"].counters["received"] > 0  # c1 did hear the tree...
        await tree.stop()

    run(main())


def test_broadcast_without_the_origin_runs_everywhere_else() -> None:
    async def main() -> None:
        tree = MemoryTree(TREE)
        await tree.start()
        await tree.placed()
        async with tree.client() as client:
            results, _ = await client.broadcast("ping", run_locally=False)
            assert [r.cell for r in results] == CELLS[1:]
            assert all(r.ok for r in results)
        await tree.stop()

    run(main())


def test_two_clients_may_use_the_same_message_id() -> None:
    async def main() -> None:
        tree = MemoryTree(TREE)
        await tree.start()
        await tree.placed()
        async with tree.client() as ops, tree.client(name="ops2") as other:
            shared = new_message_id()
            answers = []
            for client in (ops, other):
                message = Targeted(
                    id=shared,
                    method="ping",
                    body={},
                    direction=Direction.DOWN,
                    path=(),
                    hops=0,
                    max_hops=10,
                    want_response=True,
                    timeout_ms=2000,
                    sent_at=time.time(),
                    context=None,
                    target="api!c1",
                )
                answers.append(asyncio.ensure_future(client._request(message, 2.0)))
            done = await asyncio.gather(*answers)
            assert all(r.results[0].ok for r in done)
            assert tree.nodes["c1"].counters["duplicates"] == 0
        await tree.stop()

    run(main())


def test_a_child_cannot_answer_for_a_cell_outside_its_subtree() -> None:
    async def main() -> None:
        tree = MemoryTree(TREE, rogues={"r": "api"})
        await tree.start()
        await tree.placed()
        rogue = Rogue(tree)
        async with tree.client() as client:
            asked = asyncio.ensure_future(client.ping("api!r", timeout_s=2))
            async with asyncio.timeout(5):
                while True:  # the rogue reads the ping api forwarded to it
                    event = await rogue.transport.recv()
                    if isinstance(event, Received) and isinstance(event.message, Targeted):
                        request = event.message
                        break
            forged = Response(
                id=new_message_id(),
                reply_to=request.id,
                path=request.path,
                sent_at=time.time(),
                results=(CellResult("api!c1", Outcome.OK, {"cell": "api!c1"}),),
            )
            rogue.transport.send(rogue.parent, forged)
            with pytest.raises(SenderMismatch):
                await asked
            assert (await client.ping("api!c1")).ok
        await tree.stop()

    run(main())
