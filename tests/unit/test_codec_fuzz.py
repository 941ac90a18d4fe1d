"""A seeded fuzzer over the codec: no input makes `decode` raise anything but a `ProtocolError`.

Each case starts from a valid message of every kind and breaks it one way:
bytes flipped, cut, inserted or appended; a header field replaced by a value
of another shape (array, map, bin, huge int, float, nil, long string); a body
replaced by random msgpack. Every failure must be a `ProtocolError`; when
the header's request id survived intact, the error must carry it, so the
receiver can answer instead of dropping silently (protocol §8). The seed is
fixed, so a failure replays; ``ZCELLS_FUZZ_CASES`` runs more of them (`make soak`).
"""

from __future__ import annotations

import os
import random
from typing import Any

import msgpack
import pytest

from tests.unit.test_codec import targeted
from zcells import codec
from zcells.errors import ProtocolError
from zcells.messages import (
    Broadcast,
    CellResult,
    Direction,
    Heartbeat,
    Hello,
    Message,
    Outcome,
    Response,
    new_message_id,
)

CASES = int(os.environ.get("ZCELLS_FUZZ_CASES", "10000"))
SEED = int(os.environ.get("ZCELLS_FUZZ_SEED", "20261207"))


def samples() -> list[Message]:
    return [
        targeted(),
        Broadcast(
            id=new_message_id(),
            method="ping",
            body={},
            direction=Direction.UP,
            path=("api!c1",),
            hops=1,
            max_hops=10,
            want_response=True,
            timeout_ms=1000,
            sent_at=1.0,
            context=None,
            run_locally=True,
        ),
        Response(
            id=new_message_id(),
            reply_to=new_message_id(),
            path=("api",),
            results=(CellResult("api", Outcome.OK, value={"x": 1}, rtt_ms=1.5),),
            sent_at=1.0,
            held_ms=0.5,
        ),
        Hello(id=new_message_id(), sent_at=1.0, cell_type="compute", path="api", your_path=None),
        Heartbeat(id=new_message_id(), sent_at=1.0, path=None, your_path="api!c1"),
    ]


def odd_value(rng: random.Random, depth: int = 0) -> Any:
    """A value of any msgpack shape, some of them far past the codec's limits."""
    choice = rng.randrange(12 if depth < 3 else 8)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1 << 63, -(1 << 63), (1 << 64) - 1, rng.randrange(1 << 32)])
    if choice == 3:
        return rng.choice([0.5, float("nan"), float("inf"), -0.0])
    if choice == 4:
        return "x" * rng.choice([0, 1, 64, 4097, 70000])
    if choice == 5:
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 16, 65])))
    if choice == 6:
        return rng.choice(["targeted", "broadcast", "response", "hello", "up", "down", "!"])
    if choice == 7:
        return "\u00e9" * rng.randrange(10)
    if choice == 8:
        return [odd_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 3, 129]))]
    if choice == 9:
        return {f"k{i}": odd_value(rng, depth + 1) for i in range(rng.choice([0, 1, 33]))}
    if choice == 10:
        return [[[[[[[[[[1]]]]]]]]]]
    return {"results": [odd_value(rng, depth + 1)]}


def broken(rng: random.Random, frames: list[bytes]) -> tuple[list[bytes], bytes | None]:
    """One way of breaking a valid message, and the request id a reply could still carry."""
    header = msgpack.unpackb(frames[0])
    request_id = header["id"] if header["kind"] in ("targeted", "broadcast") else None
    how = rng.randrange(6)
    if how == 0:  # a header field of another shape
        key = rng.choice([*header, "extra"])
        header[key] = odd_value(rng)
        if key == "id":
            request_id = None
        return [msgpack.packb(header), frames[1]], request_id
    if how == 1:  # the body replaced
        return [frames[0], msgpack.packb(odd_value(rng))], None
    if how == 2:  # trailing bytes after a valid header
        return [frames[0] + bytes([rng.randrange(256)]) * rng.randrange(1, 4), frames[1]], (
            request_id
        )
    which = rng.randrange(2)
    data = bytearray(frames[which])
    if how == 3 and data:  # flipped bytes
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == 4:  # cut short
        del data[rng.randrange(len(data) + 1) :]
    else:  # bytes inserted
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
    out = list(frames)
    out[which] = bytes(data)
    return out, None


def test_no_input_raises_anything_but_a_protocol_error() -> None:
    rng = random.Random(SEED)
    kinds = samples()
    answered = decoded = refused = 0
    for case in range(CASES):
        frames, request_id = broken(rng, codec.encode(rng.choice(kinds)))
        try:
            message = codec.decode(frames)
            if isinstance(message, Broadcast | Response) or hasattr(message, "body"):
                _ = dict(getattr(message, "body", {}))  # a forwarded body decodes on first use
            decoded += 1
        except ProtocolError as exc:
            refused += 1
            if request_id is not None and exc.reply_to == request_id:
                answered += 1
        except Exception as exc:
            pytest.fail(f"case {case} (seed {SEED}): {type(exc).__name__}: {exc!r:.300}")
    assert refused > CASES // 4 and decoded > 0
    assert answered > 0


@pytest.mark.parametrize("kind", [["targeted"], {"a": 1}, 7, None, b"targeted"])
def test_a_kind_of_another_shape_is_a_schema_error(kind: Any) -> None:
    """Not a request as far as anyone can tell: refused, counted, not answered (protocol §8)."""
    header = msgpack.unpackb(codec.encode(targeted())[0])
    header["kind"] = kind
    with pytest.raises(ProtocolError, match="field 'kind'") as caught:
        codec.decode([msgpack.packb(header), msgpack.packb({})])
    assert caught.value.reply_to is None


@pytest.mark.parametrize(
    "changes",
    [
        {"dir": ["up"]},  # a header field of another shape
        {"method": {"x": 1}},
        {"v": [1]},
        {"method": "m" * 5000},  # a string past the header's limit
        {"path": ["api"] * 200},  # an array past it
        {"ctx": {f"k{i}": 1 for i in range(40)}},  # a map past it
        {"target": b"x" * 100},  # a bin past it
    ],
)
def test_a_header_that_names_a_request_is_answered(changes: dict[str, Any]) -> None:
    header = msgpack.unpackb(codec.encode(targeted())[0])
    request_id = header["id"]
    header.update(changes)
    with pytest.raises(ProtocolError) as caught:
        codec.decode([msgpack.packb(header), msgpack.packb({})])
    assert caught.value.reply_to == request_id


def test_trailing_bytes_after_the_header_are_answered() -> None:
    frames = codec.encode(message := targeted())
    with pytest.raises(ProtocolError) as caught:
        codec.decode([frames[0] + b"\x00", frames[1]])
    assert caught.value.reply_to == message.id
