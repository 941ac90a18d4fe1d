"""SECURITY.md §5 rows 3, 8-10 and 12-15 against a real `zcells serve` over CURVE.

A registered child key is held by a raw DEALER that writes every frame by
hand. Each bad message gets its typed error back when its request id can be
read, or is counted and dropped when it cannot; after each one the cell must
still answer an admin's ping. (Rows 1, 2, 4-7, 11, 16 and 17 are in
test_zmq_security.py; row 22 needs a handler that fails, in tests/unit/test_node.py.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from tests.fakes import child_request, run
from zcells import codec
from zcells.devtree import CellTree, running_tree
from zcells.messages import Direction, Response, Targeted

TREE = {"api": {"r": {}}}


class Rogue:
    """A raw DEALER with the registered child key of `r`, dialling api's cells endpoint."""

    def __init__(self, tree: CellTree) -> None:
        api, me = tree.cells["api"], tree.cells["r"]
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.curve_serverkey = api.keys.public.encode()
        self.sock.curve_publickey = me.keys.public.encode()
        self.sock.curve_secretkey = me.keys.secret.encode()
        self.sock.linger = 0
        self.sock.rcvtimeo = 5000
        self.sock.connect(f"tcp://127.0.0.1:{api.cells_port}")

    def request(self, **changes: Any) -> Targeted:
        return child_request(**changes)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def answer_to(self, request_id: bytes) -> Response:
        """The response to `request_id`, skipping hellos and heartbeats (bounded)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = codec.decode(self.sock.recv_multipart())
            if isinstance(message, Response) and message.reply_to == request_id:
                return message
        raise AssertionError("no answer")

    def ask(self, message: Targeted) -> Response:
        self.send(codec.encode(message))
        return self.answer_to(message.id)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellTree]:
    with running_tree(TREE, tmp_path_factory.mktemp("bad-input"), idle=("r",)) as cells:
        yield cells


@pytest.fixture
def rogue(tree: CellTree) -> Iterator[Rogue]:
    r = Rogue(tree)
    assert r.ask(r.request()).results[0].ok  # the link works before anything bad
    yield r
    r.close()


def still_serving(tree: CellTree) -> dict[str, Any]:
    async def check() -> dict[str, Any]:
        async with tree.client(timeout_s=5) as client:
            assert (await client.ping("api")).ok
            stats: dict[str, Any] = (await client.call("stats", {})).unwrap()
            return stats

    result: dict[str, Any] = run(check())
    return result


def header(message: Targeted, **changes: Any) -> bytes:
    raw = msgpack.unpackb(codec.encode(message)[0])
    raw.update(changes)
    return msgpack.packb(raw)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"path": ("api!other",)}, "E_SENDER_MISMATCH"),  # row 3
        ({"path": ("api!c2", "api!r"), "hops": 2}, "E_SENDER_MISMATCH"),  # a forged origin
        ({"method": "__init__"}, "E_UNKNOWN_METHOD"),  # row 12
        ({"method": "_private"}, "E_UNKNOWN_METHOD"),
        ({"method": "getattr"}, "E_UNKNOWN_METHOD"),
        ({"body": {"payload": "not a map"}}, "E_SCHEMA"),  # row 13
        ({"body": {"unexpected": 1}}, "E_SCHEMA"),
        ({"sent_at": time.time() - 86400}, "E_STALE"),  # row 14
        ({"max_hops": 1}, "E_MAX_HOPS"),  # row 15
        ({"direction": Direction.DOWN}, "E_ROUTING"),  # row 15: down from a child
    ],
)
def test_bad_requests_get_typed_errors(
    tree: CellTree, rogue: Rogue, changes: dict[str, Any], code: str
) -> None:
    answer = rogue.ask(rogue.request(**changes))
    (result,) = answer.results
    assert result.error is not None and result.error.code == code, result
    assert "Traceback" not in result.error.message
    still_serving(tree)


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"hops": "1"}, "E_SCHEMA"),  # row 13: str for int
        ({"want": 1}, "E_SCHEMA"),  # int for bool
        ({"ttl_ms": 2**64 - 1}, "E_SCHEMA"),
        ({"max_hops": 10**9}, "E_SCHEMA"),  # row 15
        ({"target": "api!!x"}, "E_SCHEMA"),  # row 15: bad name
        ({"path": ["api!r", 5]}, "E_SCHEMA"),
        ({"extra": True}, "E_SCHEMA"),
        ({"v": 99}, "E_VERSION"),
        ({"dir": ["up"]}, "E_SCHEMA"),  # an array where a string goes
        ({"method": {"a": 1}}, "E_SCHEMA"),  # a map where a string goes
        ({"method": "m" * 5000}, "E_DECODE"),  # past the header's string limit
        ({"path": ["api!r"] * 200}, "E_DECODE"),  # past its array limit
        ({"ctx": {f"k{i}": 1 for i in range(40)}}, "E_DECODE"),  # past its map limit
        ({"target": b"x" * 100}, "E_DECODE"),  # past its bin limit
    ],
)
def test_malformed_headers_with_a_readable_id_are_answered(
    tree: CellTree, rogue: Rogue, changes: dict[str, Any], code: str
) -> None:
    message = rogue.request()
    rogue.send([header(message, **changes), msgpack.packb({})])
    (result,) = rogue.answer_to(message.id).results
    assert result.error is not None and result.error.code == code
    still_serving(tree)


def test_a_header_with_trailing_bytes_is_answered(tree: CellTree, rogue: Rogue) -> None:
    message = rogue.request()
    rogue.send([codec.encode(message)[0] + b"\x00\x01", msgpack.packb({})])
    (result,) = rogue.answer_to(message.id).results
    assert result.error is not None and result.error.code == "E_DECODE"
    still_serving(tree)


@pytest.mark.parametrize("kind", [["targeted"], {"targeted": 1}])
def test_a_kind_of_another_shape_is_counted_and_the_link_still_works(
    tree: CellTree, rogue: Rogue, kind: Any
) -> None:
    before = still_serving(tree)["transport"].get("malformed", 0)
    rogue.send([header(rogue.request(), kind=kind), msgpack.packb({})])
    deadline = time.monotonic() + 5
    while still_serving(tree)["transport"].get("malformed", 0) <= before:
        assert time.monotonic() < deadline, "the bad header was not counted"
    assert rogue.ask(rogue.request()).results[0].ok


def nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


@pytest.mark.parametrize(
    "frames",
    [
        [b"", b""],  # row 8: empty
        [b"\x00\x01\x02garbage", b"\x80"],  # random bytes
        [codec.encode(child_request())[0][:-3], b"\x80"],  # truncated
        [msgpack.packb({"v": 1}) + b"\x00", b"\x80"],  # trailing bytes
        [b"\xc1", b"\x80"],  # never-used byte
        [b"\xa2\xff\xfe", b"\x80"],  # invalid UTF-8
        [b"\xdd\xff\xff\xff\xff", b"\x80"],  # row 9: array32 bomb
        [b"\xdf\xff\xff\xff\xff", b"\x80"],  # map32 bomb
        [b"\xdb\xff\xff\xff\xff", b"\x80"],  # str32 bomb
        [nested(10), b"\x80"],  # row 10
        [nested(1000), b"\x80"],
        [nested(1025), b"\x80"],
    ],
    ids=lambda f: f[0][:6].hex() or "empty",
)
def test_undecodable_frames_are_counted_and_dropped(
    tree: CellTree, rogue: Rogue, frames: list[bytes]
) -> None:
    before = still_serving(tree)["transport"].get("malformed", 0)
    rogue.send(frames)
    deadline = time.monotonic() + 5
    while still_serving(tree)["transport"].get("malformed", 0) <= before:
        assert time.monotonic() < deadline, "the bad frames were not counted"
    assert rogue.ask(rogue.request()).results[0].ok  # the same link still works


def test_deep_body_is_answered_with_a_schema_error(tree: CellTree, rogue: Rogue) -> None:
    message = rogue.request(body={})
    deep: object = 1
    for _ in range(12):
        deep = [deep]
    rogue.send([codec.encode(message)[0], msgpack.packb({"payload": {"a": deep}})])
    (result,) = rogue.answer_to(message.id).results
    assert result.error is not None and result.error.code == "E_SCHEMA"
    assert "nested deeper" in result.error.message
    still_serving(tree)


def test_same_request_twice_is_answered_once(tree: CellTree, rogue: Rogue) -> None:
    message = rogue.request()
    first = rogue.ask(message)
    before = still_serving(tree).get("duplicates", 0)
    second = rogue.ask(message)  # byte-for-byte the same message again
    assert second.results[0].value == first.results[0].value
    assert still_serving(tree).get("duplicates", 0) == before + 1
