"""Hostile peers holding registered keys, against a tree of real `zcells serve` processes.

The tree is api -> {c1 -> g1, c2}; every key an attacker here holds is
legitimately registered (a reader client, a child cell, a grandchild). Each
test reproduces one way a key used to crash, hijack, corrupt or wedge a cell
(SECURITY.md §5 rows 25-32), asserts the refusal or the repair, and ends by
checking that every cell still answers a broadcast ping.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.utils.monitor

from tests.fakes import child_request, run
from tests.integration.trees import answer, servers
from tests.polling import until
from tests.unit.scripted_node import instance
from zcells import codec
from zcells.devtree import CellProc, CellTree, running_tree
from zcells.errors import CellUnreachable, TooLarge
from zcells.instances import VmState, placed
from zcells.messages import Direction, Heartbeat, Response, Targeted, new_message_id

TREE = {"api": {"c1": {"g1": {}}, "c2": {}}}
CELLS = ("api", "api!c1", "api!c1!g1", "api!c2")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellTree]:
    clients = {"eve": ("reader", "p-eve"), "mallory": ("member", "p-mallory")}
    with running_tree(TREE, tmp_path_factory.mktemp("hostile"), clients=clients) as cells:
        yield cells


def every_cell_answers(tree: CellTree, timeout_s: float = 30.0) -> None:
    """A broadcast ping from the top reaches every cell (links a test broke may take a
    moment to come back), and no cell process has exited."""
    for cell in tree.cells.values():
        assert cell.proc is not None and cell.proc.poll() is None, f"{cell.name} exited"

    async def check() -> list[Any] | None:
        async with tree.client(timeout_s=15) as client:
            rows = await client.ping_all(timeout_s=10)
        return None if sorted(row.cell for row in rows if row.ok) != list(CELLS) else rows

    run(until(check, timeout_s, "every cell answering a broadcast ping"), timeout_s + 30)


class Dealer:
    """A raw DEALER holding a registered key, dialling one of a cell's ROUTERs."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        server: CellProc,
        keys: tuple[str, str],
        *,
        api: bool = False,
        routing_id: bytes | None = None,
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvtimeo = 5000
        self.sock.curve_serverkey = server.keys.public.encode()
        self.sock.curve_publickey = keys[0].encode()
        self.sock.curve_secretkey = keys[1].encode()
        if routing_id is not None:
            self.sock.routing_id = routing_id
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        )
        port = server.api_port if api else server.cells_port
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def handshake(self, timeout_s: float = 30.0) -> int:
        """The event that settled the handshake."""
        if not self.monitor.poll(int(timeout_s * 1000)):
            raise AssertionError("no handshake outcome")
        event = zmq.utils.monitor.recv_monitor_message(self.monitor)["event"]
        return int(event)

    def send(self, message: Targeted) -> None:
        self.sock.send_multipart(codec.encode(message))

    def answer_to(self, request_id: bytes, timeout_s: float = 10.0) -> Response:
        """The response to `request_id`, skipping hellos and heartbeats (bounded)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.sock.poll(200):
                continue
            message = codec.decode(self.sock.recv_multipart())
            if isinstance(message, Response) and message.reply_to == request_id:
                return message
        raise AssertionError("no answer")

    def ask(self, message: Targeted) -> Response:
        self.send(message)
        return self.answer_to(message.id)

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def cell_keys(tree: CellTree, name: str) -> tuple[str, str]:
    keys = tree.cells[name].keys
    return keys.public, keys.secret


def client_keys(tree: CellTree, name: str) -> tuple[str, str]:
    keys = tree.clients[name]
    return keys.public, keys.secret


# -- finding 1: a peer-chosen routing id equal to the ROUTER's next one ------------------

_UNSEEDED = """
import ctypes
libc = ctypes.CDLL(None)
libc.srand(1)
print(" ".join(str(libc.rand()) for _ in range(24)))
"""


def unseeded_router_ids(per_draw: int) -> list[bytes]:
    """The ids libzmq assigns first in a process that never seeded rand(), and the next ones.

    Each ROUTER draws its starting number from two rand() calls (low, then the
    bit above); the attacker cannot know how many draws came before, so it
    covers the first few.
    """
    out = subprocess.run(
        [sys.executable, "-c", _UNSEEDED], capture_output=True, text=True, check=True, timeout=60
    )
    draws = [int(x) for x in out.stdout.split()]
    ids = []
    for i in range(0, 20, 2):
        start = draws[i] | ((draws[i + 1] & 1) << 31)
        ids += [b"\x00" + ((start + k) & 0xFFFFFFFF).to_bytes(4, "big") for k in range(per_draw)]
    return ids


def test_chosen_routing_ids_cannot_abort_a_cell(tree: CellTree) -> None:
    """Row 25: a reader holds connections on every id libzmq would assign next, then one more."""
    ctx: zmq.Context[Any] = zmq.Context()
    held: list[Dealer] = []
    try:
        for routing_id in unseeded_router_ids(per_draw=25):
            dealer = Dealer(
                ctx, tree.cells["api"], client_keys(tree, "eve"), api=True, routing_id=routing_id
            )
            held.append(dealer)
        for dealer in held:
            assert dealer.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        for _ in range(3):  # ordinary connections: the ROUTER numbers these itself
            plain = Dealer(ctx, tree.cells["api"], client_keys(tree, "eve"), api=True)
            held.append(plain)
            assert plain.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
            assert plain.ask(ping_request()).results[0].cell == "api"  # answered
        # and on the cells endpoint, with a child's key
        child = Dealer(ctx, tree.cells["api"], cell_keys(tree, "c2"), routing_id=b"\x00" * 5)
        held.append(child)
        assert child.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        every_cell_answers(tree)
    finally:
        for dealer in held:
            dealer.close()
        ctx.destroy(linger=0)


def ping_request(**changes: Any) -> Targeted:
    """A client's ping to the top: empty path, no hops."""
    fields: dict[str, Any] = {"path": (), "hops": 0, "direction": Direction.DOWN, **changes}
    return child_request(**fields)


# -- finding 3: a grandchild speaking for its parent's stream ----------------------------


async def create_in(tree: CellTree, cell: str, name: str) -> dict[str, Any]:
    """One server built in `cell` (an admin's hint), once ACTIVE at the top."""
    async with tree.client(timeout_s=30) as ops:
        body = {"name": name, "flavor": "m1.tiny", "image": "cirros", "count": 1}
        body["hints"] = {"target_cell": cell}
        made = {"uuid": (await answer(ops, "server_create", body))["servers"][0]}

        async def active() -> dict[str, Any] | None:
            shown = await answer(ops, "server_show", {"uuid": made["uuid"]})
            return shown if shown["status"] == "ACTIVE" else None

        shown: dict[str, Any] = await until(active, 60, f"{name} ACTIVE in {cell}")
        return shown


def forged_row(uuid: str, cell: str, seq: int, version: int) -> list[Any]:
    """An outbox row saying `uuid` of `cell` was deleted, at `version`."""
    record = replace(placed(instance(uuid), cell, "h001", time.time()), version=version)
    record = replace(record, vm_state=VmState.DELETED)
    return [seq, "instance", msgpack.packb(record.to_wire(), use_bin_type=True)]


def grandchild_request(method: str, target: str, body: dict[str, Any]) -> Targeted:
    return child_request(
        path=("api!c1!g1",), method=method, target=target, body=body, timeout_ms=5000
    )


def test_a_grandchild_cannot_speak_for_its_parents_stream(tree: CellTree) -> None:
    """Row 26: g1's `updates`/`progress` addressed to the top are refused by c1, the first hop."""
    shown = run(create_in(tree, "api!c1", "c1-own"), timeout_s=90)
    uuid, version = shown["uuid"], shown["version"]
    ctx: zmq.Context[Any] = zmq.Context()
    g1 = Dealer(ctx, tree.cells["c1"], cell_keys(tree, "g1"))
    try:
        assert g1.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        huge = (1 << 63) - 1
        rows = [forged_row(uuid, "api!c1", huge, (1 << 62) - 1)]
        for method, body in (("updates", {"rows": rows}), ("progress", {})):
            result = g1.ask(grandchild_request(method, "api", body)).results[0]
            assert result.error is not None and result.error.code == "E_ROUTING", result
            assert result.error.cell == "api!c1"  # refused at the first hop, not relayed
        # Addressed to c1 itself: g1's own stream, but not a record of c1's, nor a seq past the
        # columns.
        request = grandchild_request(
            "updates", "api!c1", {"rows": [forged_row(uuid, "api!c1", 1, 5)]}
        )
        result = g1.ask(request).results[0]  # refused alone: g1 would hold it aside
        assert result.ok and result.value["refused"][0][:2] == [1, "E_SENDER_MISMATCH"], result
        row = forged_row(uuid, "api!c1!g1", huge, 5)
        result = g1.ask(grandchild_request("updates", "api!c1", {"rows": [row]})).results[0]
        assert result.error is not None and result.error.code == "E_SCHEMA", result
    finally:
        g1.close()
        ctx.destroy(linger=0)

    async def still_c1s() -> None:
        async with tree.client(timeout_s=30) as ops:
            await answer(ops, "server_action", {"uuid": uuid, "action": "stop"})

            async def stopped() -> dict[str, Any] | None:
                now = await answer(ops, "server_show", {"uuid": uuid})
                return now if now["status"] == "SHUTOFF" else None

            now = await until(stopped, 60, "the stop to reach the top")
            assert now["cell"] == "api!c1" and now["version"] > version
        # c1's own writes and builds still work: its outbox counter is untouched
        await create_in(tree, "api!c1", "c1-after")

    run(still_c1s(), timeout_s=150)
    every_cell_answers(tree)


# -- finding 4: answers bounded like requests --------------------------------------------


def test_an_answer_over_the_limits_is_a_typed_error_and_no_link_drops(tree: CellTree) -> None:
    """Row 27: ping echoes its payload; an echo too large or too deep is E_TOO_LARGE."""
    usable = codec.usable_frame_bytes(codec.DEFAULT_MAX_FRAME_BYTES)
    deep: Any = 1
    for _ in range(5):
        deep = {"a": deep}

    async def scenario() -> None:
        async with tree.client(timeout_s=30) as ops:
            for target in ("api", "api!c1!g1"):
                big = {"d": "x" * (usable - 30)}  # the request fits; its echo does not
                result = await ops.call("ping", {"payload": big}, target=target)
                assert result.error is not None and result.error.code == "E_TOO_LARGE", result
                assert result.error.cell == target
                result = await ops.call("ping", {"payload": deep}, target=target)
                assert result.error is not None and result.error.code == "E_TOO_LARGE", result
                assert (await ops.ping(target)).ok  # the same links still work
            with pytest.raises(TooLarge):  # a request over the limit never leaves the client
                await ops.call("ping", {"payload": {"d": "x" * usable}}, target="api!c2")
            assert (await ops.ping("api!c2")).ok

    run(scenario(), timeout_s=120)
    every_cell_answers(tree)


# -- finding 5: a member cannot deny service to everyone ---------------------------------


def rss_mb(cell: CellProc) -> float:
    assert cell.proc is not None
    for line in Path(f"/proc/{cell.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_quotas_and_pages_bound_what_a_member_can_make_the_top_hold(tree: CellTree) -> None:
    """Row 28: quotas refuse the flood; every listing page arrives; answers are not hoarded."""
    wide = {f"k{i:02}": "\U0001f600" * 255 for i in range(64)}  # ~65 KB of metadata
    heavy = {f"k{i:02}": "v" * 250 for i in range(60)}  # ~15 KB, within the byte limit

    async def scenario() -> None:
        async with tree.client(timeout_s=30, as_client="mallory") as member:
            body = {"name": "flood", "flavor": "m1.tiny", "image": "cirros", "count": 100}
            error = (await member.call("server_create", body)).error
            assert error is not None and error.code == "E_QUOTA", error
            body = {**body, "count": 1, "metadata": wide}
            error = (await member.call("server_create", body)).error
            assert error is not None and error.code == "E_QUOTA", error
            made = []
            for i in range(10):  # up to the default quota of 10 servers
                body = {"name": f"h{i}", "flavor": "m1.tiny", "image": "cirros", "count": 1}
                body["metadata"] = heavy
                made += (await answer(member, "server_create", body))["servers"]
            body = {"name": "one-more", "flavor": "m1.tiny", "image": "cirros"}
            error = (await member.call("server_create", body)).error
            assert error is not None and error.code == "E_QUOTA"
            shown = await answer(member, "quota_show", {})
            assert shown["in_use"]["servers"] == 10 and shown["quota"]["servers"] == 10

        async with tree.client(timeout_s=30) as ops:
            limits = {"servers": 80, "vcpus": 80, "ram_mb": -1}
            await answer(ops, "quota_set", {"project": "p-mallory", "limits": limits})
        async with tree.client(timeout_s=30, as_client="mallory") as member:
            body = {"name": "more", "flavor": "m1.tiny", "image": "cirros", "count": 60}
            body["metadata"] = heavy
            made += (await answer(member, "server_create", body))["servers"]

        top = tree.cells["api"]
        async with tree.client(timeout_s=30) as ops:
            listed = await servers(ops)  # page by page: each answer arrived
            assert set(made) <= {row["uuid"] for row in listed}
            before = rss_mb(top)
            for _ in range(50):
                body = {"all_projects": True, "limit": 1000}
                page = await answer(ops, "server_list", body)
                assert page["next_marker"] is not None  # 70 x 15 KB: more than a page
            grown = rss_mb(top) - before
            print(f"api RSS {before:.0f} MB, grew {grown:.1f} MB over 50 listings")
            assert grown < 40, f"the API cell grew by {grown:.0f} MB over 50 listings"

    run(scenario(), timeout_s=240)
    every_cell_answers(tree)


# -- finding 7: logs do not amplify an attack --------------------------------------------


def test_a_flood_of_malformed_frames_writes_a_bounded_log(tree: CellTree) -> None:
    """Row 30: thousands of bad frames from one child key; a handful of lines, with counts."""
    api = tree.cells["api"]
    ctx: zmq.Context[Any] = zmq.Context()
    c2 = Dealer(ctx, api, cell_keys(tree, "c2"))
    try:
        assert c2.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        before = api.log_text().count("transport.malformed")
        sent = 5000
        for i in range(sent):
            c2.sock.send_multipart([b"\xc1" + i.to_bytes(4, "big"), b"\x80"])
        c2.sock.send_multipart([b"\xc1", b"\x80", b"\x80"])  # a frame count, too
        ping = child_request(path=("api!c2",))
        assert c2.ask(ping).results[0].ok  # after the flood, on the same link

        async def counted() -> bool:
            async with tree.client(timeout_s=10) as ops:
                stats = await answer(ops, "stats", {})
                return bool(stats["transport"].get("malformed", 0) >= sent)

        run(until(counted, 60, "every bad frame counted"))
        lines = api.log_text().count("transport.malformed") - before
        assert 0 < lines <= 60, f"{lines} log lines for {sent} bad frames"
    finally:
        c2.close()
        ctx.destroy(linger=0)
    every_cell_answers(tree)


# -- finding 11: answers after restarts say what happened ---------------------------------


def test_a_frozen_cell_is_reported_as_silent_not_as_a_wrong_key(tree: CellTree) -> None:
    tree.signal("api", signal.SIGSTOP)
    try:

        async def dial() -> None:
            async with tree.client(timeout_s=4):
                raise AssertionError("a frozen cell finished a handshake")

        with pytest.raises(CellUnreachable) as caught:
            run(dial())
        assert "frozen or overloaded" in caught.value.message
        assert "server key" not in caught.value.message
    finally:
        tree.signal("api", signal.SIGCONT)
    every_cell_answers(tree)


def test_a_restarted_middle_cell_answers_try_again_not_impersonation(tree: CellTree) -> None:
    """c1 restarts: until api says hello its answers are E_UNREACHABLE, never a mismatch."""
    tree.signal("c1", signal.SIGKILL)
    ctx: zmq.Context[Any] = zmq.Context()
    g1 = Dealer(ctx, tree.cells["c1"], cell_keys(tree, "g1"))
    codes: set[str] = set()

    async def progress_answered() -> bool:
        result = g1.ask(grandchild_request("progress", "api!c1", {})).results[0]
        if result.error is not None:
            codes.add(result.error.code)
        return result.ok

    async def ping_answered() -> bool:
        async with tree.client(timeout_s=10) as ops:
            ping = await ops.call("ping", target="api!c1")
        if ping.error is not None:
            codes.add(ping.error.code)
        return ping.ok

    try:
        tree.start("c1")
        assert g1.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        run(until(progress_answered, 60, "c1 taking g1's progress again"), timeout_s=90)
    finally:
        g1.close()  # the real g1 is c1's g1 again
        ctx.destroy(linger=0)
    run(until(ping_answered, 60, "c1 answering pings again"), timeout_s=90)
    assert codes <= {"E_UNREACHABLE", "E_TIMEOUT"}, codes
    every_cell_answers(tree)


# -- where docs/protocol.md and the code disagreed ---------------------------------------


def test_a_clients_refused_path_is_not_echoed_back(tree: CellTree) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    ops = Dealer(ctx, tree.cells["api"], client_keys(tree, "ops"), api=True)
    try:
        assert ops.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        answer_ = ops.ask(ping_request(path=("api!c2",), hops=1))
        assert answer_.path == ()
        (result,) = answer_.results
        assert result.error is not None and result.error.code == "E_SENDER_MISMATCH"
        up = ops.ask(ping_request(target="api"))  # a targeted dir is the route's to choose
        assert up.results[0].ok
    finally:
        ops.close()
        ctx.destroy(linger=0)


# -- finding 2: a sibling cannot receive another cell's traffic --------------------------


def test_a_sibling_holding_guessable_ids_gets_nothing_meant_for_an_absent_cell(
    tree: CellTree,
) -> None:
    """Row 25: c2 is down; c1's key holds the ids libzmq would have numbered c2 with."""
    tree.signal("c2", signal.SIGKILL)
    ctx: zmq.Context[Any] = zmq.Context()
    held: list[Dealer] = []
    try:
        for routing_id in unseeded_router_ids(per_draw=3):
            dealer = Dealer(ctx, tree.cells["api"], cell_keys(tree, "c1"), routing_id=routing_id)
            held.append(dealer)
        for dealer in held:
            assert dealer.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
            dealer.sock.send_multipart(codec.encode(heartbeat_from("api!c1")))

        async def unreachable() -> int:
            async with tree.client(timeout_s=10) as ops:
                stats = await answer(ops, "stats", {})
            return int(stats.get("send_E_UNREACHABLE", 0))

        before = run(unreachable())
        # api tries c2 on every heartbeat and finds no route: wait for a few tries
        run(until(lambda: _more(unreachable, before + 3), 30, "api trying c2 again"), 60)
        got: list[Any] = []
        for dealer in held:
            while dealer.sock.poll(0):
                got.append(codec.decode(dealer.sock.recv_multipart()))
        assert not [m for m in got if getattr(m, "your_path", None) == "api!c2"], got
    finally:
        for dealer in held:
            dealer.close()
        ctx.destroy(linger=0)
        tree.start("c2")
    every_cell_answers(tree)


async def _more(count: Any, than: int) -> bool:
    return bool(await count() >= than)


def heartbeat_from(path: str) -> Heartbeat:
    return Heartbeat(id=new_message_id(), sent_at=time.time(), path=path, your_path=None)
