"""The closed method table (SECURITY.md §5 row 12, Salt CVE-2020-11651)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from zcells.errors import Forbidden, SchemaError, UnknownMethod
from zcells.handlers import HANDLER_CLASSES, build_methods
from zcells.handlers.diag import DiagHandlers
from zcells.messages import Kind
from zcells.methods import Call, Method, MethodTable, Param


def _bare(cls: type[Any]) -> Any:
    """A handler object whose `methods()` works without its collaborators (no I/O here)."""
    handler = object.__new__(cls)
    return handler


def table() -> MethodTable:
    return build_methods(DiagHandlers("api", lambda: {}))


def test_every_public_handler_is_registered_and_nothing_else() -> None:
    """A coroutine on a handler class is a wire method only through the table."""
    instances = {cls: _bare(cls) for cls in HANDLER_CLASSES}
    instances[DiagHandlers] = DiagHandlers("api", lambda: {})
    assert set(instances) == set(HANDLER_CLASSES), "add new handler classes to this test"
    registered = {getattr(h, "__func__", h) for h in build_methods(*instances.values()).handlers()}
    public = {
        func
        for cls in HANDLER_CLASSES
        for name, func in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name != "methods"
    }
    assert public - registered == set(), "reachable on a handler class but not in the table"
    assert registered - public == set(), "in the table but not a public handler method"


@pytest.mark.parametrize(
    "name",
    [
        "__init__",
        "_private",
        "getattr",
        "methods",
        "",
        "x" * 10_000,
        "statistics",
        "__class__",
        "ping.__globals__",
    ],
)
def test_names_outside_the_table_are_unknown(name: str) -> None:
    with pytest.raises(UnknownMethod) as info:
        table().resolve(Kind.TARGETED, name, "admin")
    assert len(str(info.value)) < 200


def test_kind_and_role_are_checked() -> None:
    t = table()
    assert t.resolve(Kind.TARGETED, "ping", "admin").name == "ping"
    assert t.resolve(Kind.BROADCAST, "ping", "parent").name == "ping"
    with pytest.raises(Forbidden, match="member may not call ping"):
        t.resolve(Kind.TARGETED, "ping", "member")
    with pytest.raises(Forbidden):
        t.resolve(Kind.TARGETED, "ping", "reader")
    with pytest.raises(UnknownMethod):
        t.resolve(Kind.HELLO, "ping", "admin")


async def _noop(call: Call) -> None:
    return None


def test_arguments_are_checked_exactly() -> None:
    method = Method(
        "m",
        _noop,
        frozenset({Kind.TARGETED}),
        frozenset({"admin"}),
        {
            "n": Param(int),
            "s": Param(str, required=False, default="d"),
            "f": Param(float, required=False),
        },
    )
    assert MethodTable.arguments(method, {"n": 3}) == {"n": 3, "s": "d", "f": None}
    assert MethodTable.arguments(method, {"n": 3, "f": 2})["f"] == 2
    for body, message in [
        ({}, "missing argument 'n'"),
        ({"n": "3"}, "'n' must be int"),
        ({"n": True}, "'n' must be int"),
        ({"n": 1, "x": 1}, "unexpected"),
        ({"n": 1, "s": b"x"}, "'s' must be str"),
    ]:
        with pytest.raises(SchemaError, match=message):
            MethodTable.arguments(method, body)


def test_table_refuses_duplicates_and_bad_declarations() -> None:
    m = Method("m", _noop, frozenset({Kind.TARGETED}), frozenset({"admin"}))
    with pytest.raises(ValueError, match="twice"):
        MethodTable([m, m])
    with pytest.raises(ValueError, match="unknown caller roles"):
        Method("m", _noop, frozenset({Kind.TARGETED}), frozenset({"root"}))
    with pytest.raises(ValueError, match="carry methods"):
        Method("m", _noop, frozenset({Kind.HELLO}), frozenset({"admin"}))
