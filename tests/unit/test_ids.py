"""Routing ids bound to peers only by their own messages, while their connection is open."""

from __future__ import annotations

import subprocess
import sys

from zcells.sockets.ids import Routes, new_routing_id, seed_router_ids


def test_a_name_routes_to_the_id_its_latest_message_came_on() -> None:
    routes = Routes()
    routes.heard("A", b"a1", 10)
    routes.heard("A", b"a2", 11)
    assert routes.latest("A") == b"a2"
    assert routes.owns("A", b"a1") and routes.owns("A", b"a2")
    assert routes.names() == ["A"]


def test_closing_a_connection_unbinds_its_ids() -> None:
    routes = Routes()
    routes.heard("A", b"a1", 10)
    routes.heard("B", b"b1", 11)
    assert routes.closed(10) == 1
    assert routes.latest("A") is None and not routes.owns("A", b"a1")
    assert routes.latest("B") == b"b1"
    assert routes.closed(10) == 0


def test_another_key_speaking_on_an_id_takes_it_from_the_first() -> None:
    routes = Routes()
    routes.heard("A", b"x", 10)
    routes.heard("B", b"x", 12)
    assert routes.latest("A") is None and not routes.owns("A", b"x")
    assert routes.latest("B") == b"x"
    routes.closed(10)  # A's old connection closing late leaves B's binding alone
    assert routes.latest("B") == b"x"


def test_an_id_that_found_no_connection_is_forgotten_for_its_name_only() -> None:
    routes = Routes()
    routes.heard("A", b"x", 10)
    routes.forget("B", b"x")
    assert routes.latest("A") == b"x"
    routes.forget("A", b"x")
    assert routes.latest("A") is None and len(routes) == 0


def test_bindings_are_bounded() -> None:
    routes = Routes(limit=3)
    for i in range(10):
        routes.heard(f"c{i}", bytes([i]), i)
    assert len(routes) == 3
    assert routes.names() == ["c7", "c8", "c9"]


def test_new_routing_ids_are_random_and_never_start_with_zero() -> None:
    ids = {new_routing_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(rid) == 16 and rid[0] != 0 for rid in ids)


_FIRST_ID = """
import sys, zmq
from zcells.sockets.ids import seed_router_ids
if sys.argv[1] == "seed":
    assert seed_router_ids()
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
port = router.bind_to_random_port("tcp://127.0.0.1")
dealer = ctx.socket(zmq.DEALER)
dealer.connect(f"tcp://127.0.0.1:{port}")
dealer.send(b"x")
print(router.recv_multipart()[0].hex())
ctx.destroy(linger=0)
"""


def _first_assigned_id(mode: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_ID, mode],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_seeding_moves_the_first_id_a_router_assigns() -> None:
    """Unseeded, libzmq's first id is the same in every process; seeded, it is not."""
    assert _first_assigned_id("plain") == _first_assigned_id("plain")
    seeded = {_first_assigned_id("seed") for _ in range(3)}
    assert _first_assigned_id("plain") not in seeded
    assert len(seeded) == 3
    assert seed_router_ids()


def test_a_name_falls_back_to_its_earlier_connection_when_the_latest_closes() -> None:
    routes = Routes()
    routes.heard("A", b"a1", 10)
    routes.heard("A", b"a2", 11)
    routes.closed(11)
    assert routes.latest("A") == b"a1"
    routes.heard("A", b"a1", 10)
    assert routes.latest("A") == b"a1" and len(routes) == 1
