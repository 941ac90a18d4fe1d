"""A node whose calls and broadcasts answer from a script, for handler and build tests.

It has what `Placer`, `TopBuilds` and `ServerHandlers` use of a `Node`: the
view (children, home path), disabled neighbours, liveness, a clock, `call`
and `broadcast`. Every call and broadcast is recorded with its timeout.
"""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

from zcells.db.engine import Database

from zcells.clock import Clock, FakeClock
from zcells.dbrunner import DbRunner
from zcells.instances import Instance, new_instance
from zcells.liveness import Liveness
from zcells.messages import CellResult, Outcome, RequestContext
from zcells.methods import Call
from zcells.peer import Peer, Role
from zcells.port import CellPort
from zcells.scheduling import CellScheduling, SchedulerSettings

# A result, or a function of the body making one (it may be a coroutine function).
Answer = CellResult | Callable[[dict[str, Any]], CellResult | Awaitable[CellResult]]


@dataclass
class Sent:
    method: str
    body: dict[str, Any]
    target: str | None
    timeout_s: float | None


@dataclass
class ScriptedNode:
    here: str = "api"
    children: tuple[str, ...] = ()
    parents: dict[str, str] = field(default_factory=dict)  # name -> its full path
    disabled: set[str] = field(default_factory=set)
    weights: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Its wall time starts at the real one: the test database stamps rows by the real clock.
    clock: Clock = field(default_factory=lambda: FakeClock(1000.0, time.time() - 1000.0))
    calls: dict[tuple[str, str], Answer] = field(default_factory=dict)  # (method, target)
    broadcasts: dict[str, Answer | tuple[CellResult, ...]] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)

    cell_type: str = "api"
    problems: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.view = SimpleNamespace(
            children={name: None for name in self.children},
            parents=self.parents,
            home_path=lambda target=None: self.here,
        )

    def liveness(self) -> dict[Peer, Liveness]:
        return {Peer(Role.CHILD, name): Liveness.ALIVE for name in self.children}

    def silence(self) -> dict[Peer, float | None]:
        return {Peer(Role.CHILD, name): 0.0 for name in self.children}

    async def call(
        self, method: str, body: dict[str, Any], target: str, timeout_s: float | None = None
    ) -> CellResult:
        self.sent.append(Sent(method, dict(body), target, timeout_s))
        return await _answer(self.calls[(method, target)], body)

    async def broadcast(
        self, method: str, body: dict[str, Any], timeout_s: float | None = None
    ) -> tuple[CellResult, ...]:
        self.sent.append(Sent(method, dict(body), None, timeout_s))
        answer = self.broadcasts[method]
        return answer if isinstance(answer, tuple) else (await _answer(answer, body),)

    def as_node(self) -> CellPort:
        """This scripted cell where a `CellPort` is wanted (it is one, structurally)."""
        port: CellPort = self
        return port


def scheduling(node: CellPort) -> CellScheduling:
    """The cell scheduler of `node` with default settings and a fixed seed."""
    return CellScheduling(node, SchedulerSettings(), random.Random(1))


async def _answer(answer: Answer, body: dict[str, Any]) -> CellResult:
    if not callable(answer):
        return answer
    made = answer(body)
    return await made if inspect.isawaitable(made) else made


def ok(cell: str, value: Any) -> CellResult:
    return CellResult(cell, Outcome.OK, value=value)


def client_call(
    method: str,
    args: dict[str, Any],
    *,
    client: str = "ops",
    role: str = "admin",
    project: str | None = None,
    deadline: float = 1010.0,
) -> Call:
    """A request from a client as the API cell's dispatcher hands it to a handler."""
    context = RequestContext(
        request_id="0b5e4c1e-8d0e-4a51-9a33-3c2f3f0d7a10",
        client=client,
        project=project,
        roles=(role,),
    )
    return Call(
        method=method,
        args=args,
        sender=Peer(Role.CLIENT, client),
        caller=role,
        context=context,
        cell="api",
        deadline=deadline,
    )


def parent_call(method: str, args: dict[str, Any], *, cell: str = "api!c1") -> Call:
    """A request from this cell's parent, as the dispatcher hands it to a handler."""
    parent = cell.rsplit("!", 1)[0]
    return Call(
        method=method,
        args=args,
        sender=Peer(Role.PARENT, parent.rsplit("!", 1)[-1]),
        caller="parent",
        context=None,
        cell=cell,
        deadline=1010.0,
    )


def instance(uuid: str, project: str = "ops", **changes: Any) -> Instance:
    made = new_instance(
        uuid=uuid,
        name="web",
        project=project,
        user=project,
        flavor="m1.tiny",
        memory_mb=512,
        disk_gb=1,
        vcpus=1,
        image="cirros",
        metadata={},
        now=1.0,
    )
    return replace(made, **changes)


def runner(db: Database) -> DbRunner:
    return DbRunner(db, readers=1)


def uuids(count: int) -> Iterable[str]:
    return (f"00000000-0000-4000-8000-{i:012d}" for i in range(1, count + 1))
