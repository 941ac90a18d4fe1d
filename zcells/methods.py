"""The closed table of methods a message can reach.

Rules kept here:

* The table is built once at start-up from `Method` entries; a method name
  from the wire is only ever a key into it. There is no attribute lookup on a
  wire name anywhere in zcells.
* Each method says which message kinds may carry it and which callers may
  use it. A caller is a neighbour role (``parent``, ``child``) or, for a
  request a client handed to this cell, the client's role (``admin``,
  ``member``, ``reader``) from this cell's own database.
* Each method declares its parameters with exact types; a missing, extra or
  mistyped argument is refused before the handler runs, naming the argument.
* A method marked `own_link` is spoken between neighbours only, by a cell for
  itself (the upward stream's `progress` and `updates`): it must start at the
  neighbour that sends it and end at this cell. A copy relayed from further
  away would make this cell take a grandchild's words as its child's.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from zcells.errors import Forbidden, SchemaError, UnknownMethod
from zcells.messages import Kind, RequestContext
from zcells.peer import Peer

CALLER_ROLES: Final = frozenset({"parent", "child", "admin", "member", "reader"})


@dataclass(frozen=True)
class Param:
    """One argument: its exact type, whether it must be present, and its default."""

    type: type
    required: bool = True
    default: Any = None


@dataclass(frozen=True)
class Call:
    """What a handler gets: checked arguments and who asked, never raw wire data."""

    method: str
    args: Mapping[str, Any]
    sender: Peer
    caller: str
    context: RequestContext | None
    cell: str
    deadline: float


# A handler is a plain function (runs inline: no I/O, no waiting) or a coroutine
# function (runs as a task under the request's deadline).
Handler = Callable[[Call], Any]


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    kinds: frozenset[Kind]
    allowed: frozenset[str]
    params: Mapping[str, Param] = field(default_factory=dict)
    own_link: bool = False

    @functools.cached_property  # asked once per request
    def is_coroutine(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)

    def __post_init__(self) -> None:
        if not self.kinds <= {Kind.TARGETED, Kind.BROADCAST}:
            raise ValueError(f"method {self.name}: only targeted and broadcast carry methods")
        if not self.allowed <= CALLER_ROLES:
            raise ValueError(
                f"method {self.name}: unknown caller roles {sorted(self.allowed - CALLER_ROLES)}"
            )


class MethodTable:
    """Methods by name, resolved by message kind and caller role."""

    def __init__(self, methods: Iterable[Method]) -> None:
        table: dict[str, Method] = {}
        for method in methods:
            if method.name in table:
                raise ValueError(f"method {method.name} registered twice")
            table[method.name] = method
        self._table: Final = table

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def names(self) -> list[str]:
        return sorted(self._table)

    def entries(self) -> list[Method]:
        """Every method, to build a larger table from this one."""
        return [self._table[name] for name in sorted(self._table)]

    def handlers(self) -> set[Handler]:
        return {m.handler for m in self._table.values()}

    def resolve(self, kind: Kind, name: str, caller: str) -> Method:
        method = self._table.get(name)
        if method is None or kind not in method.kinds:
            shown = name if len(name) <= 64 else name[:61] + "..."
            raise UnknownMethod(f"no method {shown!r} for {kind.value} messages")
        if caller not in method.allowed:
            raise Forbidden(f"{caller} may not call {name}")
        return method

    @staticmethod
    def arguments(method: Method, body: Mapping[str, Any]) -> dict[str, Any]:
        """The body checked against the method's parameters."""
        args: dict[str, Any] = {}
        for key in body:
            if key not in method.params:
                raise SchemaError(f"{method.name}: unexpected argument {str(key)[:40]!r}")
        for key, param in method.params.items():
            if key not in body:
                if param.required:
                    raise SchemaError(f"{method.name}: missing argument {key!r}")
                args[key] = param.default
                continue
            value = body[key]
            if type(value) is not param.type and not (param.type is float and type(value) is int):
                raise SchemaError(
                    f"{method.name}: argument {key!r} must be "
                    f"{param.type.__name__}, not {type(value).__name__}"
                )
            args[key] = value
        return args
