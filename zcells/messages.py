"""The messages cells and clients exchange: one frozen dataclass per kind.

Rules kept here:

* A message is built only valid: `__post_init__` checks every field, so the
  codec, the routing core and handlers never see a half-formed message.
* Message ids are 16 random bytes; a response names the request it answers
  in `reply_to`.
* A routing path is the tuple of full cell names the message has visited, the
  origin first. The sender of a cell-to-cell message is always the last entry.
* Time on the wire is relative (`timeout_ms`, the budget left), because cells'
  clocks differ; `sent_at` (wall clock) only guards against replays of old
  messages.
* The protocol version is a constant; a peer speaking another is refused.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, TypeVar

from zcells import entropy
from zcells.errors import CallTimeout, SchemaError, ValidationError, WireError
from zcells.names import check_cell_path, check_name

PROTOCOL_VERSION: Final = 1
MESSAGE_ID_BYTES: Final = 16
MAX_METHOD_LENGTH: Final = 64
MAX_HOPS_LIMIT: Final = 64
MAX_TIMEOUT_MS: Final = 24 * 3600 * 1000


class Kind(StrEnum):
    TARGETED = "targeted"
    BROADCAST = "broadcast"
    RESPONSE = "response"
    HELLO = "hello"
    HEARTBEAT = "heartbeat"


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"


class Outcome(StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMED_OUT = "timed_out"


class _RandomIds:
    """Message ids cut from a pool of random bytes (`zcells.entropy`), refilled 256 at a time.

    One getrandom system call per id cost a forwarding hop more than any
    other single step. The pool is refilled in a forked child before use, so
    parent and child never hand out the same bytes, and a lock keeps two
    threads from taking the same id.
    """

    _POOL_IDS: Final = 256

    def __init__(self) -> None:
        self._start()
        os.register_at_fork(after_in_child=self._start)
        entropy.on_change(self._start)

    def _start(self) -> None:
        self._lock = threading.Lock()  # a child's own: the parent's may have been held
        self._refill()

    def _refill(self) -> None:
        self._pool = entropy.token_bytes(MESSAGE_ID_BYTES * self._POOL_IDS)
        self._at = 0

    def next(self) -> bytes:
        with self._lock:
            at = self._at
            if at >= len(self._pool):
                self._refill()
                at = 0
            self._at = at + MESSAGE_ID_BYTES
            return self._pool[at : at + MESSAGE_ID_BYTES]


_random_ids = _RandomIds()


def new_message_id() -> bytes:
    """A fresh random id of `MESSAGE_ID_BYTES` bytes."""
    return _random_ids.next()


def _require(condition: bool, field_name: str, expected: str) -> None:
    if not condition:
        raise SchemaError(f"field {field_name!r}: expected {expected}")


# The checks below run for every message on every hop: each tests first and
# builds its error text only when it fails.


def _check_id(value: object, field_name: str = "id") -> None:
    if type(value) is not bytes or len(value) != MESSAGE_ID_BYTES:
        raise SchemaError(f"field {field_name!r}: expected {MESSAGE_ID_BYTES} bytes")


def _check_method(value: object) -> None:
    if (
        type(value) is not str
        or not 0 < len(value) <= MAX_METHOD_LENGTH
        or not value.isascii()
        or not value.replace("_", "a").isalnum()
    ):
        raise SchemaError("field 'method': expected a method name of letters, digits and '_'")


def _check_path(path: object) -> None:
    if type(path) is not tuple or len(path) > MAX_HOPS_LIMIT + 1:
        raise SchemaError("field 'path': expected a tuple of at most 65 cell paths")
    for entry in path:
        _check_cell(entry, "path")


@functools.lru_cache(maxsize=4096)
def _valid_cell_path(value: str) -> bool:
    try:
        check_cell_path(value)
    except ValidationError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _valid_name(value: str) -> bool:
    try:
        check_name("name", value)
    except ValidationError:
        return False
    return True


def _check_cell(value: object, field_name: str) -> None:
    if type(value) is not str or not _valid_cell_path(value):
        raise SchemaError(f"field {field_name!r}: expected a cell path like api!eu")


def _check_int(value: object, field_name: str, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise SchemaError(f"field {field_name!r}: expected an integer from {low} to {high}")


def _check_time(value: object) -> None:
    if type(value) is not float or not 0 <= value < math.inf:  # NaN fails both
        raise SchemaError(
            "field 'ts': expected a non-negative finite float (seconds since the epoch)"
        )


_ROLES: Final = ("admin", "member", "reader")


@dataclass(frozen=True)
class RequestContext:
    """Who a request is for: set by the cell that took it from a client, never by a child."""

    request_id: str
    client: str | None = None
    project: str | None = None
    roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        request_id, roles = self.request_id, self.roles
        if type(request_id) is not str or not 0 < len(request_id) <= 64:
            raise SchemaError("field 'ctx.request_id': expected a string of 1-64 characters")
        for name, value in (("client", self.client), ("project", self.project)):
            if value is not None and (type(value) is not str or not _valid_name(value)):
                raise SchemaError(f"field 'ctx.{name}': expected a name")
        if type(roles) is not tuple or len(roles) > 8 or not all(r in _ROLES for r in roles):
            raise SchemaError("field 'ctx.roles': expected a list of roles: admin, member, reader")


@dataclass(frozen=True)
class _Request:
    id: bytes
    method: str
    body: Mapping[str, Any]
    direction: Direction
    path: tuple[str, ...]
    hops: int
    max_hops: int
    want_response: bool
    timeout_ms: int
    sent_at: float
    context: RequestContext | None

    def _check_request(self) -> None:
        _check_id(self.id)
        _check_method(self.method)
        body = self.body
        if type(body) is not dict and not isinstance(body, Mapping):  # dict: no ABC lookup
            raise SchemaError("field 'body': expected a map")
        if type(self.direction) is not Direction:
            raise SchemaError("field 'dir': expected up or down")
        _check_path(self.path)
        _check_int(self.hops, "hops", 0, MAX_HOPS_LIMIT)
        _check_int(self.max_hops, "max_hops", 1, MAX_HOPS_LIMIT)
        if type(self.want_response) is not bool:
            raise SchemaError("field 'want': expected true or false")
        _check_int(self.timeout_ms, "ttl_ms", 0, MAX_TIMEOUT_MS)
        _check_time(self.sent_at)
        if self.context is not None and type(self.context) is not RequestContext:
            raise SchemaError("field 'ctx': expected a request context")


@dataclass(frozen=True)
class Targeted(_Request):
    """A request for one cell, named by its full path."""

    target: str = ""
    kind: Kind = field(default=Kind.TARGETED, init=False)

    def __post_init__(self) -> None:
        self._check_request()
        _check_cell(self.target, "target")


@dataclass(frozen=True)
class Broadcast(_Request):
    """A request for every cell of a subtree (down) or every ancestor (up)."""

    run_locally: bool = True
    kind: Kind = field(default=Kind.BROADCAST, init=False)

    def __post_init__(self) -> None:
        self._check_request()
        _require(type(self.run_locally) is bool, "local", "true or false")


@dataclass(frozen=True)
class CellResult:
    """One cell's answer: a value, a typed error, or nothing before the deadline."""

    cell: str
    outcome: Outcome
    value: Any = None
    error: WireError | None = None
    # Round trip from the cell that asked, excluding time spent waiting for siblings.
    rtt_ms: float | None = None

    def __post_init__(self) -> None:
        _check_cell(self.cell, "results.cell")
        rtt_ms = self.rtt_ms
        if rtt_ms is not None and (type(rtt_ms) is not float or not math.isfinite(rtt_ms)):
            raise SchemaError("field 'results.rtt_ms': expected a finite float or nil")
        if type(self.outcome) is not Outcome:
            raise SchemaError("field 'results.outcome': expected ok, error or timed_out")
        if (self.error is not None) != (self.outcome is Outcome.ERROR):
            raise SchemaError(
                "field 'results.error': expected an error exactly when the outcome is error"
            )

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    def unwrap(self) -> Any:
        """The value, or raise the cell's error (`CallTimeout` when it timed out)."""
        if self.error is not None:
            raise self.error
        if self.outcome is Outcome.TIMED_OUT:
            raise CallTimeout("no response before the deadline", self.cell)
        return self.value


@dataclass(frozen=True)
class Response:
    """The answer to a request: one result per cell that was asked.

    `path` is the request's routing path, which the response retraces from
    its end back to its origin. `held_ms` is how long the responding hop held
    the request, so the hop that asked can tell link time from work time.
    """

    id: bytes
    reply_to: bytes
    path: tuple[str, ...]
    results: tuple[CellResult, ...]
    sent_at: float
    held_ms: float = 0.0
    kind: Kind = field(default=Kind.RESPONSE, init=False)

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_id(self.reply_to, "reply_to")
        _check_path(self.path)
        _require(
            type(self.results) is tuple and all(isinstance(r, CellResult) for r in self.results),
            "results",
            "a list of cell results",
        )
        _check_time(self.sent_at)
        _require(
            type(self.held_ms) is float and math.isfinite(self.held_ms) and self.held_ms >= 0,
            "held_ms",
            "a non-negative float",
        )


@dataclass(frozen=True)
class Hello:
    """First message on a link, both ways: versions spoken and where the sender sits.

    A parent's hello tells the child its full path (`your_path`); a child's
    says what kind of cell it is.
    """

    id: bytes
    sent_at: float
    cell_type: str
    path: str | None = None
    your_path: str | None = None
    kind: Kind = field(default=Kind.HELLO, init=False)

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_time(self.sent_at)
        _require(
            self.cell_type in ("api", "compute", "client"), "cell_type", "api, compute or client"
        )
        if self.path is not None:
            _check_cell(self.path, "path")
        if self.your_path is not None:
            _check_cell(self.your_path, "your_path")


@dataclass(frozen=True)
class Heartbeat:
    """A link is alive; a parent's heartbeat repeats the child's full path."""

    id: bytes
    sent_at: float
    path: str | None = None
    your_path: str | None = None
    kind: Kind = field(default=Kind.HEARTBEAT, init=False)

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_time(self.sent_at)
        if self.path is not None:
            _check_cell(self.path, "path")
        if self.your_path is not None:
            _check_cell(self.your_path, "your_path")


Request = Targeted | Broadcast
Message = Targeted | Broadcast | Response | Hello | Heartbeat
MessageT = TypeVar(
    "MessageT",
    bound=Targeted | Broadcast | Response | Hello | Heartbeat | CellResult | RequestContext,
)


def from_fields(cls: type[MessageT], fields: dict[str, Any]) -> MessageT:
    """A `cls` from `fields` (all of them, `kind` too), checked as its constructor checks it.

    For the codec, once per message on every hop: the same `__post_init__`
    checks, without the frozen dataclass setting each field in turn through
    `object.__setattr__`.
    """
    new = object.__new__(cls)
    new.__dict__.update(fields)
    new.__post_init__()
    return new


def evolve(message: MessageT, **changes: Any) -> MessageT:
    """A copy of an already valid message with fields changed, without checking it again.

    Only for changes this cell computes itself (the next hop's path, hop count,
    direction, id, time budget), never for anything taken from the wire.
    """
    new = object.__new__(type(message))
    fields = new.__dict__  # frozen dataclasses forbid setattr, not their own __dict__
    fields.update(message.__dict__)
    fields.update(changes)
    return new
