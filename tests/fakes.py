"""Shared fakes: an in-memory tree of real nodes, built from a nested literal.

``MemoryTree({"api": {"c1": {"g1": {}}, "c2": {}}})`` starts one `Node` per
cell over `MemoryTransport`s (the real codec, routing and handlers, no
sockets) and an admin client of the top cell.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from tests.polling import until
from zcells.client import CellClient
from zcells.handlers import build_methods
from zcells.handlers.diag import DiagHandlers
from zcells.messages import Direction, Targeted, new_message_id
from zcells.methods import Method, MethodTable
from zcells.node import Node, NodeSettings
from zcells.records import Client, Neighbour
from zcells.transport import (
    Identity,
    MemoryClient,
    MemoryNetwork,
    MemoryTransport,
    ParentLink,
    Topology,
)

Tree = Mapping[str, "Tree"]


def _walk(tree: Tree, parent: str | None = None) -> list[tuple[str, str | None, list[str]]]:
    cells = []
    for name, children in tree.items():
        cells.append((name, parent, list(children)))
        cells.extend(_walk(children, name))
    return cells


class MemoryTree:
    def __init__(
        self,
        tree: Tree,
        *,
        extra_methods: Callable[[], list[Method]] | None = None,
        rogues: Mapping[str, str] | None = None,
        **settings: Any,
    ) -> None:
        """`rogues` maps a name to the cell it hangs under as a child: a raw transport, no node."""
        self.extra_methods = extra_methods or (lambda: [])
        self.rogues = dict(rogues or {})
        self.network = MemoryNetwork()
        self.shape = _walk(tree)
        self.top = self.shape[0][0]
        self.nodes: dict[str, Node] = {}
        self.transports: dict[str, MemoryTransport] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.settings = settings

    def identity(self, name: str) -> Identity:
        return Identity(
            name=name,
            public_key=f"key-{name}",
            secret_key=f"secret-{name}",
            cells_endpoint=f"mem://{name}/cells",
            api_endpoint=f"mem://{name}/api",
        )

    def registry(self, name: str) -> tuple[list[Neighbour], list[Client]]:
        neighbours = []
        for cell, parent, children in self.shape:
            if cell == name and parent is not None:
                neighbours.append(
                    Neighbour(parent, "parent", f"mem://{parent}/cells", f"key-{parent}")
                )
            if cell == name:
                neighbours.extend(
                    Neighbour(c, "child", f"mem://{c}/cells", f"key-{c}") for c in children
                )
        neighbours.extend(
            Neighbour(r, "child", f"mem://{r}/cells", f"key-{r}")
            for r, under in self.rogues.items()
            if under == name
        )
        clients = [
            Client("ops", "key-ops", "admin"),
            Client("ops2", "key-ops2", "admin"),
            Client("ann", "key-ann", "member", "p1"),
            Client("rita", "key-rita", "reader"),
        ]
        return neighbours, clients

    async def start(self) -> None:
        for name, parent, _ in self.shape:
            transport = MemoryTransport(self.network, self.identity(name))
            await transport.start()
            settings = NodeSettings(
                name=name, cell_type="api" if parent is None else "compute", **self.settings
            )
            table = build_methods(DiagHandlers(settings.cell_type, lambda: {}))
            extra = self.extra_methods()
            if extra:
                table = MethodTable([*table.entries(), *extra])
            node = Node(settings, transport, table)
            self.nodes[name] = node
            self.transports[name] = transport
        for name in self.nodes:
            self._start_node(name)
        for rogue, under in self.rogues.items():
            transport = MemoryTransport(self.network, self.identity(rogue))
            await transport.start()
            transport.apply(
                Topology(parents={under: ParentLink(f"mem://{under}/cells", f"key-{under}")})
            )
            self.transports[rogue] = transport

    def _start_node(self, name: str) -> None:
        self.nodes[name].apply_registry(*self.registry(name))
        self._tasks[name] = asyncio.create_task(self.nodes[name].run(), name=name)

    async def stop_cell(self, name: str) -> None:
        await self.transports[name].close()
        await asyncio.wait_for(self._tasks.pop(name), 5)

    async def stop(self) -> None:
        for name in list(self._tasks):
            await self.stop_cell(name)
        for rogue in self.rogues:
            await self.transports[rogue].close()

    def client(
        self, cell: str | None = None, name: str = "ops", key: str | None = None
    ) -> CellClient:
        cell = cell or self.top
        return CellClient(
            MemoryClient(
                self.network, f"mem://{cell}/api", f"key-{cell}", name, key or f"key-{name}"
            ),
            timeout_s=2.0,
        )

    async def placed(self, timeout_s: float = 5.0) -> None:
        """Wait until every cell knows its full path."""
        await until(
            lambda: all(n.view.paths for n in self.nodes.values()), timeout_s, "every cell placed"
        )


def run(coro: Awaitable[Any], timeout_s: float = 30.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


def child_request(path: tuple[str, ...] = ("api!r",), **changes: Any) -> Targeted:
    """A valid ping from a child `r` of `api` up to `api`; tests change one field at a time."""
    fields: dict[str, Any] = dict(
        id=new_message_id(),
        method="ping",
        body={},
        direction=Direction.UP,
        path=path,
        hops=len(path),
        max_hops=10,
        want_response=True,
        timeout_ms=3000,
        sent_at=time.time(),
        context=None,
        target="api",
    )
    fields.update(changes)
    return Targeted(**fields)
