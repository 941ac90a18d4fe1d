"""The wire codec: messages to two msgpack frames and back.

Rules kept here (docs/protocol.md states them for implementers):

* A message is exactly two frames, header then body, each one msgpack map.
* Decoding never trusts a length: every msgpack limit is set well under the
  frame size, ext types (Timestamp included) are refused, map keys must be
  strings, text must be UTF-8.
* The header of each kind has an exact set of keys with exact types (a bool
  is not an int); a missing, extra or mistyped key is a `SchemaError` naming
  the key. Bodies are maps of plain values at most `MAX_BODY_DEPTH` deep with
  finite floats.
* Every failure is a `ProtocolError` subclass, whatever the bytes (a seeded
  fuzzer checks it); when the header names a request, even one that broke a
  limit or was followed by extra bytes, the error carries `reply_to` so the
  receiver can answer with a typed error instead of dropping silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]

from zcells.errors import (
    DecodeError,
    FrameError,
    ProtocolError,
    SchemaError,
    TooLarge,
    VersionMismatch,
    WireError,
    error_from_wire,
)
from zcells.messages import (
    PROTOCOL_VERSION,
    Broadcast,
    CellResult,
    Direction,
    Heartbeat,
    Hello,
    Kind,
    Message,
    Outcome,
    RequestContext,
    Response,
    Targeted,
    from_fields,
)

FRAMES_PER_MESSAGE: Final = 2
DEFAULT_MAX_FRAME_BYTES: Final = 1 << 20
# What CURVE adds to each frame before libzmq checks it against MAXMSGSIZE at the
# receiver: a frame within `max_frame_bytes` but not within this much less is dropped
# there with the connection, so a sender keeps to `usable_frame_bytes`.
CURVE_OVERHEAD_BYTES: Final = 33
MAX_BODY_DEPTH: Final = 8
# A result's value sits three levels into a response body ({results: [{value: ...}]}).
MAX_VALUE_DEPTH: Final = MAX_BODY_DEPTH - 3
_HEADER_LIMITS: Final = {
    "max_str_len": 4096,
    "max_bin_len": 64,
    "max_array_len": 128,
    "max_map_len": 32,
    "max_ext_len": 0,
}
_BODY_LIMITS: Final = {
    "max_str_len": 1 << 20,
    "max_bin_len": 1 << 20,
    "max_array_len": 1 << 17,
    "max_map_len": 1 << 16,
    "max_ext_len": 0,
}


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def _unpack(frame: bytes, limits: Mapping[str, int], what: str) -> Any:
    try:
        return msgpack.unpackb(
            frame, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext, **limits
        )
    except (ValueError, TypeError) as exc:  # every msgpack decode error is a ValueError
        raise DecodeError(f"{what} is not valid msgpack ({type(exc).__name__})") from None
    except RecursionError:
        raise DecodeError(f"{what} nests too deeply") from None


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def packb(value: Any) -> bytes:
    """`value` as it goes on the wire, to measure it."""
    return _pack(value)


# -- body values ------------------------------------------------------------------------


_SCALARS: Final = frozenset({str, int, bool, bytes, type(None)})


def check_body_value(value: Any, where: str = "body", max_depth: int = MAX_BODY_DEPTH) -> None:
    """Accept plain msgpack values: maps with str keys, lists, str, bytes, int, finite float.

    Iterative, and scalars are checked inline: a body is walked once per hop.
    """
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        container, depth = pending.pop()
        if depth > max_depth:
            raise SchemaError(f"{where}: nested deeper than {max_depth} levels")
        if type(container) is dict:
            if not all(type(k) is str for k in container):
                raise SchemaError(f"{where}: map keys must be strings")
            items: Any = container.values()
        elif type(container) is list:
            items = container
        else:
            items = (container,)
            depth -= 1
        for item in items:
            kind = type(item)
            if kind is dict or kind is list:
                pending.append((item, depth + 1))
            elif kind is float:
                if not math.isfinite(item):
                    raise SchemaError(f"{where}: floats must be finite")
            elif kind not in _SCALARS:
                raise SchemaError(f"{where}: {kind.__name__} values are not allowed")


def nests_deeper(value: Any, max_depth: int) -> bool:
    """Whether `value`'s maps and lists nest more than `max_depth` levels (an answer's check)."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        container, depth = pending.pop()
        kind = type(container)
        if kind is dict:
            items: Any = container.values()
        elif kind is list or kind is tuple:
            items = container
        else:
            continue
        if depth >= max_depth:
            return True
        pending.extend((item, depth + 1) for item in items if type(item) in _CONTAINERS)
    return False


_CONTAINERS: Final = frozenset({dict, list, tuple})


class RawBody(Mapping[str, Any]):
    """A request body as it came off the wire, decoded and checked on first use.

    A cell that only forwards a request never looks inside its body: it passes
    the same bytes on, and the cell that runs the method decodes and checks
    them (a malformed body is then answered with `DecodeError`/`SchemaError`).
    """

    __slots__ = ("_value", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._value: dict[str, Any] | None = None

    def decoded(self) -> dict[str, Any]:
        if self._value is None:
            value = _unpack(self.raw, _BODY_LIMITS, "body")
            if type(value) is not dict:
                raise SchemaError("body: expected a map")
            check_body_value(value)
            self._value = value
        return self._value

    def __getitem__(self, key: str) -> Any:
        return self.decoded()[key]

    def __contains__(self, key: object) -> bool:  # the dict's own, not Mapping's try/except
        return key in self.decoded()

    def __iter__(self) -> Iterator[str]:
        return iter(self.decoded())

    def __len__(self) -> int:
        return len(self.decoded())


# -- header fields: name -> (check, description). Exact types: a bool is not an int.


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_str(v: Any) -> bool:
    return type(v) is str


def _is_opt_str(v: Any) -> bool:
    return v is None or type(v) is str


def _is_bool(v: Any) -> bool:
    return type(v) is bool


def _is_bin(v: Any) -> bool:
    return type(v) is bytes


def _is_float(v: Any) -> bool:
    return type(v) is float


_STR: Final = frozenset({str})


def _is_str_list(v: Any) -> bool:
    return type(v) is list and _STR.issuperset(map(type, v))  # map: no generator per call


def _is_ctx(v: Any) -> bool:
    return v is None or type(v) is dict


Check = Callable[[Any], bool]
_COMMON: Final[dict[str, tuple[Check, str]]] = {
    "v": (_is_int, "an integer"),
    "kind": (_is_str, "a string"),
    "id": (_is_bin, "16 bytes"),
    "ts": (_is_float, "a float"),
}
# The header fields every request carries, in wire order: (wire key, the attribute of
# `Targeted`/`Broadcast` it holds, its check, what it must be). Encoding, decoding and
# checking all read this one table.
_REQUEST_FIELDS: Final[tuple[tuple[str, str, Check, str], ...]] = (
    ("method", "method", _is_str, "a string"),
    ("dir", "direction", _is_str, "up or down"),
    ("path", "path", _is_str_list, "a list of strings"),
    ("hops", "hops", _is_int, "an integer"),
    ("max_hops", "max_hops", _is_int, "an integer"),
    ("want", "want_response", _is_bool, "a boolean"),
    ("ttl_ms", "timeout_ms", _is_int, "an integer"),
)
_REQUEST: Final[dict[str, tuple[Check, str]]] = {
    **_COMMON,
    **{key: (check, expected) for key, _, check, expected in _REQUEST_FIELDS},
    "ctx": (_is_ctx, "a map or nil"),
}
HEADER_KEYS: Final[dict[Kind, dict[str, tuple[Check, str]]]] = {
    Kind.TARGETED: {**_REQUEST, "target": (_is_str, "a string")},
    Kind.BROADCAST: {**_REQUEST, "local": (_is_bool, "a boolean")},
    Kind.RESPONSE: {
        **_COMMON,
        "reply_to": (_is_bin, "16 bytes"),
        "path": (_is_str_list, "a list of strings"),
        "held_ms": (_is_float, "a float"),
    },
    Kind.HELLO: {
        **_COMMON,
        "cell_type": (_is_str, "a string"),
        "path": (_is_opt_str, "a string or nil"),
        "your_path": (_is_opt_str, "a string or nil"),
    },
    Kind.HEARTBEAT: {
        **_COMMON,
        "path": (_is_opt_str, "a string or nil"),
        "your_path": (_is_opt_str, "a string or nil"),
    },
}
_CTX_KEYS: Final = frozenset({"request_id", "client", "project", "roles"})


_KINDS: Final = {kind.value: kind for kind in Kind}
_DIRECTIONS: Final = {direction.value: direction for direction in Direction}
# Per kind: the fields checked by exact type alone, and those needing a check of their own.
_PLAIN_TYPES: Final = {_is_int: int, _is_str: str, _is_bin: bytes, _is_bool: bool, _is_float: float}
_FAST_CHECKS: Final = {
    kind: (
        tuple((k, _PLAIN_TYPES[check]) for k, (check, _) in spec.items() if check in _PLAIN_TYPES),
        tuple((k, check) for k, (check, _) in spec.items() if check not in _PLAIN_TYPES),
    )
    for kind, spec in HEADER_KEYS.items()
}


def _check_header(header: Any) -> tuple[Kind, dict[str, Any]]:
    if type(header) is not dict:
        raise SchemaError("header: expected a map")
    version = header.get("v")
    if type(version) is not int:
        raise SchemaError("header: field 'v': expected an integer")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"protocol version {version} is not supported (this cell speaks {PROTOCOL_VERSION})"
        )
    kind_value = header.get("kind")
    kind = _KINDS.get(kind_value) if type(kind_value) is str else None
    if kind is None:
        raise SchemaError(
            "header: field 'kind': expected one of " + ", ".join(k.value for k in Kind)
        )
    spec = HEADER_KEYS[kind]
    if header.keys() != spec.keys():
        for key in header:
            if key not in spec:
                raise SchemaError(f"header: unexpected field {str(key)[:40]!r}")
        missing = next(k for k in spec if k not in header)
        raise SchemaError(f"header: missing field {missing!r}")
    plain, special = _FAST_CHECKS[kind]
    for key, expected_type in plain:
        if type(header[key]) is not expected_type:
            raise SchemaError(f"header: field {key!r}: expected {spec[key][1]}")
    for key, check in special:
        if not check(header[key]):
            raise SchemaError(f"header: field {key!r}: expected {spec[key][1]}")
    return kind, header


def _context(raw: dict[str, Any] | None) -> RequestContext | None:
    if raw is None:
        return None
    if raw.keys() != _CTX_KEYS:
        raise SchemaError("header: field 'ctx': expected request_id, client, project, roles")
    client, project, roles = raw["client"], raw["project"], raw["roles"]
    if (
        type(raw["request_id"]) is not str
        or (client is not None and type(client) is not str)
        or (project is not None and type(project) is not str)
        or not _is_str_list(roles)
    ):
        raise SchemaError("header: field 'ctx': expected request_id, client, project, roles")
    raw["roles"] = tuple(roles)
    return from_fields(RequestContext, raw)


_RESULT_KEYS: Final = frozenset({"cell", "outcome", "value", "error", "rtt_ms"})


def _result(raw: Any) -> CellResult:
    if type(raw) is not dict or type(raw.get("cell")) is not str:
        raise SchemaError("body: each result must be a map with a cell")
    if not raw.keys() <= _RESULT_KEYS:
        raise SchemaError("body: a result has only cell, outcome, value, error, rtt_ms")
    try:
        outcome = Outcome(str(raw.get("outcome")))
    except ValueError:
        raise SchemaError("body: result outcome must be ok, error or timed_out") from None
    error: WireError | None = None
    if outcome is Outcome.ERROR:
        err = raw.get("error")
        if type(err) is not dict:
            raise SchemaError("body: an error result needs an error map")
        error = error_from_wire(err.get("code"), err.get("message"), err.get("cell"))
    rtt = raw.get("rtt_ms")
    if rtt is not None and type(rtt) is not float:
        raise SchemaError("body: result rtt_ms must be a float")
    return CellResult(
        cell=raw["cell"], outcome=outcome, value=raw.get("value"), error=error, rtt_ms=rtt
    )


def _result_to_wire(result: CellResult) -> dict[str, Any]:
    raw: dict[str, Any] = {"cell": result.cell, "outcome": result.outcome.value}
    if result.error is not None:
        raw["error"] = result.error.to_wire()
    elif result.outcome is Outcome.OK:
        raw["value"] = result.value
    if result.rtt_ms is not None:
        raw["rtt_ms"] = result.rtt_ms
    return raw


# -- encode -----------------------------------------------------------------------------


def encode(message: Message) -> list[bytes]:
    """The two frames of `message`.

    Kind and direction go in as the enum members themselves: they are `str`
    subclasses, which msgpack packs as the same strings as their values, and
    this runs for every message sent.
    """
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": message.kind,
        "id": message.id,
        "ts": message.sent_at,
    }
    body: Any = {}
    if isinstance(message, (Targeted, Broadcast)):
        ctx = message.context
        for key, attribute, _, _ in _REQUEST_FIELDS:
            header[key] = getattr(message, attribute)
        header["path"] = list(message.path)  # in its place: the key is there already
        header["ctx"] = (
            None
            if ctx is None
            else {
                "request_id": ctx.request_id,
                "client": ctx.client,
                "project": ctx.project,
                "roles": list(ctx.roles),
            }
        )
        if isinstance(message, Targeted):
            header["target"] = message.target
        else:
            header["local"] = message.run_locally
        if type(message.body) is RawBody:  # passed on as it came
            return [_pack(header), message.body.raw]
        body = dict(message.body)
    elif isinstance(message, Response):
        header.update(reply_to=message.reply_to, path=list(message.path), held_ms=message.held_ms)
        body = {"results": [_result_to_wire(r) for r in message.results]}
    elif isinstance(message, Hello):
        header.update(cell_type=message.cell_type, path=message.path, your_path=message.your_path)
    else:
        header.update(path=message.path, your_path=message.your_path)
    return [_pack(header), _pack(body)]


def usable_frame_bytes(max_frame_bytes: int) -> int:
    """The largest frame a peer whose limit is `max_frame_bytes` takes under CURVE."""
    return max_frame_bytes - CURVE_OVERHEAD_BYTES


def encode_within(message: Message, max_frame_bytes: int) -> list[bytes]:
    """The frames of `message`, or `TooLarge` if one would not fit the receiver's limit.

    A frame over the limit makes libzmq drop the connection at the receiving
    end instead of delivering anything, so it is never sent.
    """
    frames = encode(message)
    usable = max_frame_bytes - CURVE_OVERHEAD_BYTES
    for frame in frames:
        if len(frame) > usable:
            raise TooLarge(
                f"a {message.kind.value} of {len(frame)} bytes is over the frame limit "
                f"of {usable} bytes"
            )
    return frames


# -- decode -----------------------------------------------------------------------------


def decode(frames: list[bytes], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """The message in `frames`, or a `ProtocolError` saying what is wrong with it."""
    if len(frames) != FRAMES_PER_MESSAGE:
        raise FrameError(f"expected {FRAMES_PER_MESSAGE} frames, got {len(frames)}")
    for frame in frames:
        if len(frame) > max_frame_bytes:
            raise FrameError(f"a frame of {len(frame)} bytes exceeds {max_frame_bytes}")
    try:
        raw = _unpack(frames[0], _HEADER_LIMITS, "header")
    except ProtocolError as exc:
        exc.reply_to = _salvaged_request_id(frames[0])
        raise
    try:
        kind, header = _check_header(raw)
        return _build(kind, header, frames[1])
    except ProtocolError as exc:
        exc.reply_to = _request_id(raw)
        raise


def _salvaged_request_id(frame: bytes) -> bytes | None:
    """The request id of a header refused whole (a value past a limit, trailing bytes).

    Decoded again under msgpack's own limits, which are the frame's length,
    so this costs no more memory than the frame itself; only the id is used.
    """
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except msgpack.ExtraData as extra:  # a whole header, then more bytes
        raw = extra.unpacked
    except Exception:  # anything else: there is no id to answer
        return None
    return _request_id(raw)


def _request_id(raw: Any) -> bytes | None:
    """The id of a request header, however broken the rest of it is; None for other kinds."""
    if type(raw) is not dict or raw.get("kind") not in (Kind.TARGETED, Kind.BROADCAST):
        return None
    value = raw.get("id")
    return value if type(value) is bytes and len(value) == 16 else None


def _build(kind: Kind, h: dict[str, Any], body_frame: bytes) -> Message:
    if kind is Kind.TARGETED or kind is Kind.BROADCAST:
        direction = _DIRECTIONS.get(h["dir"])
        if direction is None:
            raise SchemaError("header: field 'dir': expected up or down")
        fields: dict[str, Any] = {attribute: h[key] for key, attribute, _, _ in _REQUEST_FIELDS}
        fields["direction"] = direction
        fields["path"] = tuple(h["path"])
        fields["id"] = h["id"]
        fields["body"] = RawBody(body_frame)
        fields["sent_at"] = h["ts"]
        fields["context"] = _context(h["ctx"])
        fields["kind"] = kind
        if kind is Kind.TARGETED:
            fields["target"] = h["target"]
            return from_fields(Targeted, fields)
        fields["run_locally"] = h["local"]
        return from_fields(Broadcast, fields)
    body = _unpack(body_frame, _BODY_LIMITS, "body")
    if type(body) is not dict:
        raise SchemaError("body: expected a map")
    check_body_value(body)
    if kind is Kind.RESPONSE:
        results = body.get("results")
        if set(body) != {"results"} or type(results) is not list:
            raise SchemaError("body: a response body is {results: [...]}")
        return Response(
            id=h["id"],
            reply_to=h["reply_to"],
            path=tuple(h["path"]),
            results=tuple(_result(r) for r in results),
            sent_at=h["ts"],
            held_ms=h["held_ms"],
        )
    if body:
        raise SchemaError(f"body: a {kind.value} body must be empty")
    if kind is Kind.HELLO:
        return Hello(
            id=h["id"],
            sent_at=h["ts"],
            cell_type=h["cell_type"],
            path=h["path"],
            your_path=h["your_path"],
        )
    return Heartbeat(id=h["id"], sent_at=h["ts"], path=h["path"], your_path=h["your_path"])
