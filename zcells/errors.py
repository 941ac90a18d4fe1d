"""Every error zcells raises on purpose.

The tree::

    ZcellsError                       anything zcells means to raise
    ├── UsageError                    the operator asked for something invalid (exit 2)
    │   ├── ConfigError               a config file, section, key or value is wrong
    │   ├── ValidationError           a name, endpoint, key or option is malformed
    │   ├── KeyFileError              a key file is missing, loose, corrupt or mismatched
    │   ├── AlreadyExists             a registry row with that name or key exists
    │   └── NotFound                  no registry row with that name
    ├── DatabaseError                 the cell's database failed (exit 1)
    │   ├── DatabaseBusy              locked past the busy timeout; retry later
    │   ├── DatabaseFull              disk or quota full; nothing was written
    │   └── SchemaOutOfDate           the schema is behind the code; run `zcells db sync`
    ├── ServiceError                  the daemon cannot run (exit 1)
    │   ├── EnvironmentMismatch       libzmq or msgpack too old, CURVE missing
    │   └── AlreadyRunning            another process holds the cell's pid file
    └── WireError                     can cross the wire as {code, message, cell}
        ├── RoutingError
        │   ├── UnknownCell           E_UNKNOWN_CELL   no such cell / next hop
        │   ├── MaxHopsExceeded       E_MAX_HOPS       the hop limit was passed
        │   └── RoutingInconsistency  E_ROUTING        path, target or direction disagree
        ├── CallTimeout               E_TIMEOUT        no response before the deadline
        ├── CellUnreachable           E_UNREACHABLE    no live link to that neighbour
        ├── NoCellsAvailable          E_NO_CELLS       no cell can take the request
        ├── ProtocolError             a peer sent something malformed
        │   ├── FrameError            E_FRAMES         wrong frame count or size
        │   ├── DecodeError           E_DECODE         not valid msgpack
        │   ├── SchemaError           E_SCHEMA         a field is missing or mistyped
        │   ├── VersionMismatch       E_VERSION        unsupported protocol version
        │   ├── UnknownMethod         E_UNKNOWN_METHOD no such method for that kind
        │   └── StaleMessage          E_STALE          too old, or from the future
        ├── AccessDenied              refused for who the sender is
        │   ├── Forbidden             E_FORBIDDEN      role may not call that method
        │   ├── SenderMismatch        E_SENDER_MISMATCH  claims to be another cell
        │   └── KeyRevoked            E_REVOKED        key no longer registered
        ├── Busy                      E_BUSY           too many requests in flight
        ├── InvalidRequest            E_INVALID        the arguments make no sense
        ├── NotFoundRemote            E_NOT_FOUND      the thing asked for does not exist
        ├── Conflict                  E_CONFLICT       not allowed in the current state
        ├── NoValidHost               E_NO_VALID_HOST  no host or cell can take the instance
        ├── TooLarge                  E_TOO_LARGE      a message would not fit the frame limit
        ├── QuotaExceeded             E_QUOTA          a project's quota would be passed
        ├── InternalError             E_INTERNAL       a handler failed (log has the id)
        └── TransportError            local only, never sent
            ├── TransportClosed       E_CLOSED         we closed it
            └── TransportBroken       E_BROKEN         ZeroMQ failed under us

A `WireError` raised in one cell reaches the caller as the same class, with
`cell` naming the cell that raised it. Classes are found from the code through
the fixed table `WIRE_ERRORS`; nothing from the wire names a Python class.

A `UsageError` is something the person at the keyboard can fix by typing
something else; the command line prints it as one line and exits with status 2.
Everything else is the world misbehaving and exits with status 1.
"""

from __future__ import annotations


class ZcellsError(Exception):
    """Base of every error zcells raises on purpose."""

    exit_code = 1


class UsageError(ZcellsError):
    """The operator asked for something invalid; retyping fixes it."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration value is wrong; names the file, section, key and value."""

    def __init__(
        self, path: str, section: str, key: str | None, value: str | None, expected: str
    ) -> None:
        self.path = path
        self.section = section
        self.key = key
        self.value = value
        self.expected = expected
        where = f"[{section}]" if key is None else f"[{section}] {key}"
        got = "" if value is None else f" = {value!r}"
        super().__init__(f"{path}: {where}{got}: expected {expected}")


class ValidationError(UsageError):
    """A single field is malformed; names the field, the value and what was expected."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        shown = value if isinstance(value, str) else repr(value)
        if isinstance(shown, str) and len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid {field} {shown!r}: expected {expected}")


class KeyFileError(UsageError):
    """A key file cannot be used; names the path and how to fix it."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}; {fix}")


class AlreadyExists(UsageError):
    """A registry row with that name or key already exists."""

    def __init__(self, what: str, field: str, value: str) -> None:
        self.what = what
        self.field = field
        self.value = value
        super().__init__(f"a {what} with {field} {value!r} already exists")


class NotFound(UsageError):
    """No registry row with that name."""

    def __init__(self, what: str, name: str) -> None:
        self.what = what
        self.name = name
        super().__init__(f"no {what} named {name!r}")


class DatabaseError(ZcellsError):
    """The cell's database failed; nothing from the failed transaction was kept."""


class DatabaseBusy(DatabaseError):
    """The database stayed locked past the busy timeout."""


class DatabaseFull(DatabaseError):
    """The disk or the database's size limit is full."""


class SchemaOutOfDate(DatabaseError):
    """The database schema is older (or newer) than this code."""


class ServiceError(ZcellsError):
    """The daemon cannot run in this environment."""


class EnvironmentMismatch(ServiceError):
    """A library is too old or lacks a feature zcells needs."""


class AlreadyRunning(ServiceError):
    """Another live process holds the cell's pid file."""


class WireError(ZcellsError):
    """An error that crosses the wire as ``{code, message, cell}``."""

    code = "E_INTERNAL"

    def __init__(self, message: str, cell: str | None = None) -> None:
        self.message = message
        self.cell = cell
        super().__init__(message if cell is None else f"{message} (in cell {cell})")

    def to_wire(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "cell": self.cell}


class RoutingError(WireError):
    code = "E_ROUTING"


class UnknownCell(RoutingError):
    code = "E_UNKNOWN_CELL"


class MaxHopsExceeded(RoutingError):
    code = "E_MAX_HOPS"


class RoutingInconsistency(RoutingError):
    code = "E_ROUTING"


class CallTimeout(WireError):
    code = "E_TIMEOUT"


class CellUnreachable(WireError):
    code = "E_UNREACHABLE"


class NoCellsAvailable(WireError):
    code = "E_NO_CELLS"


class ProtocolError(WireError):
    code = "E_SCHEMA"
    # The id of the request that was malformed, when its header named one, so the
    # receiver can answer it with this error.
    reply_to: bytes | None = None


class FrameError(ProtocolError):
    code = "E_FRAMES"


class DecodeError(ProtocolError):
    code = "E_DECODE"


class SchemaError(ProtocolError):
    code = "E_SCHEMA"


class VersionMismatch(ProtocolError):
    code = "E_VERSION"


class UnknownMethod(ProtocolError):
    code = "E_UNKNOWN_METHOD"


class StaleMessage(ProtocolError):
    code = "E_STALE"


class AccessDenied(WireError):
    code = "E_FORBIDDEN"


class Forbidden(AccessDenied):
    code = "E_FORBIDDEN"


class SenderMismatch(AccessDenied):
    code = "E_SENDER_MISMATCH"


class KeyRevoked(AccessDenied):
    code = "E_REVOKED"


class Busy(WireError):
    code = "E_BUSY"


class InvalidRequest(WireError):
    code = "E_INVALID"


class NotFoundRemote(WireError):
    code = "E_NOT_FOUND"


class Conflict(WireError):
    code = "E_CONFLICT"


class NoValidHost(WireError):
    code = "E_NO_VALID_HOST"


class TooLarge(WireError):
    """A message this cell would send is over the frame or depth limit; sent instead of it."""

    code = "E_TOO_LARGE"


class QuotaExceeded(WireError):
    """The request would take a project past one of its quotas."""

    code = "E_QUOTA"


class InternalError(WireError):
    code = "E_INTERNAL"


class TransportError(WireError):
    code = "E_BROKEN"


class TransportClosed(TransportError):
    code = "E_CLOSED"


class TransportBroken(TransportError):
    code = "E_BROKEN"


# code -> class, for errors coming off the wire. One class per code; where two
# classes share a code (RoutingError, RoutingInconsistency) the concrete one wins.
WIRE_ERRORS: dict[str, type[WireError]] = {
    cls.code: cls
    for cls in (
        UnknownCell,
        MaxHopsExceeded,
        RoutingInconsistency,
        CallTimeout,
        CellUnreachable,
        NoCellsAvailable,
        FrameError,
        DecodeError,
        SchemaError,
        VersionMismatch,
        UnknownMethod,
        StaleMessage,
        Forbidden,
        SenderMismatch,
        KeyRevoked,
        Busy,
        InvalidRequest,
        NotFoundRemote,
        Conflict,
        NoValidHost,
        TooLarge,
        QuotaExceeded,
        InternalError,
        TransportClosed,
        TransportBroken,
    )
}


def error_from_wire(code: object, message: object, cell: object) -> WireError:
    """Rebuild a typed error from its wire form; an unknown code becomes `InternalError`."""
    cls = WIRE_ERRORS.get(code) if isinstance(code, str) else None
    text = message if isinstance(message, str) else "malformed error"
    where = cell if isinstance(cell, str) else None
    if cls is None:
        return InternalError(f"unknown error code {str(code)[:40]!r}: {text}", where)
    return cls(text, where)
