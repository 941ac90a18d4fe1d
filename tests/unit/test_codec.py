"""The codec against good messages and hostile bytes (SECURITY.md §5 rows 7-10, 13)."""

from __future__ import annotations

import msgpack
import pytest

from zcells import codec
from zcells.errors import (
    DecodeError,
    FrameError,
    SchemaError,
    UnknownCell,
    VersionMismatch,
)
from zcells.messages import (
    Broadcast,
    CellResult,
    Direction,
    Heartbeat,
    Hello,
    Outcome,
    RequestContext,
    Response,
    Targeted,
    new_message_id,
)

ID = new_message_id()


def targeted(**changes: object) -> Targeted:
    fields: dict[str, object] = dict(
        id=ID,
        method="ping",
        body={"a": [1, 2.5, "x", b"y", None, True]},
        direction=Direction.DOWN,
        path=("api", "api!c1"),
        hops=2,
        max_hops=10,
        want_response=True,
        timeout_ms=5000,
        sent_at=1700000000.5,
        context=RequestContext("r-1", "ops", None, ("admin",)),
        target="api!c1!g1",
    )
    fields.update(changes)
    return Targeted(**fields)  # type: ignore[arg-type]


def header_of(message: Targeted) -> dict[str, object]:
    return msgpack.unpackb(codec.encode(message)[0])  # type: ignore[no-any-return]


def frames_with_header(**changes: object) -> list[bytes]:
    header = header_of(targeted())
    header.update(changes)
    return [msgpack.packb(header), msgpack.packb({})]


@pytest.mark.parametrize(
    "message",
    [
        targeted(),
        targeted(context=None, body={}),
        Broadcast(
            id=ID,
            method="ping",
            body={},
            direction=Direction.UP,
            path=(),
            hops=0,
            max_hops=3,
            want_response=False,
            timeout_ms=0,
            sent_at=0.0,
            context=None,
            run_locally=False,
        ),
        Response(
            id=ID,
            reply_to=new_message_id(),
            path=("api",),
            sent_at=2.0,
            held_ms=1.5,
            results=(
                CellResult("api", Outcome.OK, {"x": 1}, rtt_ms=0.25),
                CellResult("api!c1", Outcome.TIMED_OUT),
                CellResult("api!c2", Outcome.ERROR, error=UnknownCell("no such cell", "api!c2")),
            ),
        ),
        Hello(id=ID, sent_at=1.0, cell_type="compute", path="api!c1", your_path="api!c1!g1"),
        Hello(id=ID, sent_at=1.0, cell_type="client"),
        Heartbeat(id=ID, sent_at=1.0, path="api"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip(message: object) -> None:
    frames = codec.encode(message)  # type: ignore[arg-type]
    assert len(frames) == 2
    decoded = codec.decode(frames)
    if isinstance(message, Response):
        assert isinstance(decoded, Response)
        assert [(r.cell, r.outcome, r.value, r.rtt_ms) for r in decoded.results] == [
            (r.cell, r.outcome, r.value, r.rtt_ms) for r in message.results
        ]
        error = decoded.results[2].error
        assert isinstance(error, UnknownCell) and error.cell == "api!c2"
    else:
        assert decoded == message


@pytest.mark.parametrize("count", [0, 1, 3, 1000])
def test_wrong_frame_count(count: int) -> None:
    with pytest.raises(FrameError, match=f"got {count}"):
        codec.decode([b"\x80"] * count)


def test_oversized_frame_is_refused_before_decoding() -> None:
    with pytest.raises(FrameError, match="exceeds"):
        codec.decode([b"\x80" * 2000, b"\x80"], max_frame_bytes=1024)


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"\xc1",
        b"\x81",
        b"\xa3ab",
        b"\x93\x01",
        b"\x81\xa1v\xc4\xff",
        b"\xff" * 10,
        msgpack.packb({"v": 1}) + b"\x00",  # trailing bytes
        b"\xa2\xff\xfe",  # invalid UTF-8
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",  # 2^32 lengths
        b"\x91" * 1025 + b"\xc0",  # nesting past msgpack's stack
        msgpack.packb(msgpack.ExtType(5, b"x")),
        msgpack.packb({1: 2}),
        b"\xd6\xff\x00\x00\x00\x01",
    ],  # a Timestamp ext
    ids=lambda b: b[:6].hex() or "empty",
)
def test_garbage_header_is_a_decode_error(header: bytes) -> None:
    with pytest.raises((DecodeError, SchemaError)) as info:
        codec.decode([header, b"\x80"])
    assert info.value.reply_to is None


def body_of(frames: list[bytes]) -> dict[str, object]:
    """Decode a request and then its body: the body is only checked where it is used."""
    message = codec.decode(frames)
    assert isinstance(message, Targeted)
    return dict(message.body)


def test_deep_nesting_in_body_is_a_schema_error() -> None:
    body: object = 1
    for _ in range(20):
        body = [body]
    frames = codec.encode(targeted())
    with pytest.raises(SchemaError, match="nested deeper"):
        body_of([frames[0], msgpack.packb({"a": body})])


def test_a_forwarded_body_is_passed_on_byte_for_byte() -> None:
    frames = codec.encode(targeted())
    odd = msgpack.packb({"b": 1, "a": [1.5, "x"]})
    message = codec.decode([frames[0], odd])
    assert codec.encode(message)[1] == odd  # not decoded, not re-encoded
    assert dict(message.body) == {"b": 1, "a": [1.5, "x"]}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hops": "2"}, "hops"),
        ({"hops": True}, "hops"),  # bool is not int
        ({"want": 1}, "want"),
        ({"id": "x" * 16}, "id"),
        ({"path": ["api", 5]}, "path"),
        ({"ttl_ms": 2.5}, "ttl_ms"),
        ({"ts": 5}, "ts"),
        ({"extra": 1}, "extra"),
        ({"target": b"api"}, "target"),
        ({"ctx": {"request_id": "r"}}, "ctx"),
    ],
)
def test_mistyped_header_fields_are_named(changes: dict[str, object], field: str) -> None:
    with pytest.raises(SchemaError, match=field) as info:
        codec.decode(frames_with_header(**changes))
    if field != "id":
        assert info.value.reply_to == ID


def test_missing_field_is_named() -> None:
    header = header_of(targeted())
    del header["target"]
    with pytest.raises(SchemaError, match="missing field 'target'"):
        codec.decode([msgpack.packb(header), msgpack.packb({})])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hops": 2**64 - 1}, "hops"),
        ({"max_hops": 10**9}, "max_hops"),
        ({"method": ""}, "method"),
        ({"method": "a.b"}, "method"),
        ({"method": "x" * 65}, "method"),
        ({"method": "x" * 10_000}, "header is not valid msgpack"),
        ({"target": "api!!x"}, "target"),
        ({"path": ["a!b!", "x"]}, "path"),
        ({"dir": "sideways"}, "dir"),
        ({"ts": float("nan")}, "ts"),
        ({"ts": float("inf")}, "ts"),
    ],
)
def test_values_out_of_range_are_schema_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises((SchemaError, DecodeError), match=message):
        codec.decode(frames_with_header(**changes))


@pytest.mark.parametrize(
    "body",
    [{"x": float("nan")}, {"x": float("-inf")}, {"x": [{"y": float("nan")}]}],
)
def test_non_finite_floats_in_body(body: dict[str, object]) -> None:
    frames = codec.encode(targeted())
    with pytest.raises(SchemaError, match="finite"):
        body_of([frames[0], msgpack.packb(body)])


def test_body_must_be_a_map_of_plain_values() -> None:
    frames = codec.encode(targeted())
    for body in ([1, 2], "text", 5):
        with pytest.raises(SchemaError, match="expected a map"):
            body_of([frames[0], msgpack.packb(body)])
    with pytest.raises(DecodeError):  # an ext type anywhere in the body
        body_of([frames[0], msgpack.packb({"x": msgpack.ExtType(1, b"")})])
    with pytest.raises(DecodeError):
        body_of([frames[0], b"\xc1"])


def test_other_protocol_versions_are_refused() -> None:
    with pytest.raises(VersionMismatch, match="version 2"):
        codec.decode(frames_with_header(v=2))


def test_hello_must_have_an_empty_body() -> None:
    frames = codec.encode(Hello(id=ID, sent_at=1.0, cell_type="api"))
    with pytest.raises(SchemaError, match="empty"):
        codec.decode([frames[0], msgpack.packb({"x": 1})])
    # a malformed non-request is never answered
    try:
        codec.decode([frames[0], msgpack.packb({"x": 1})])
    except SchemaError as exc:
        assert exc.reply_to is None


def test_response_with_unknown_error_code_maps_to_internal_error() -> None:
    r = Response(
        id=ID,
        reply_to=ID,
        path=(),
        sent_at=1.0,
        results=(CellResult("api", Outcome.ERROR, error=UnknownCell("x", "api")),),
    )
    frames = codec.encode(r)
    body = msgpack.unpackb(frames[1])
    body["results"][0]["error"]["code"] = "E_WHATEVER"
    decoded = codec.decode([frames[0], msgpack.packb(body)])
    assert isinstance(decoded, Response)
    error = decoded.results[0].error
    assert error is not None and error.code == "E_INTERNAL" and "E_WHATEVER" in error.message
