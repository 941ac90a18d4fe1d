"""The simulated tree: its shape, each cell's database and registry, starts and crashes.

Every cell is a real cell (`zcells.service.run_cell`) with its own SQLite
file, made by copying one migrated template and writing the cell's
neighbours and clients into its registry, as an operator would with
`zcells cell add`. A crash closes the cell's transport at once (its links
drop, nothing more leaves it) and cancels it; a restart runs it again on the
same database, as a process restarted after `kill -9` would.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from zcells.clock import LoopClock
from zcells.config import Config, load_config
from zcells.db import catalog, migrate, registry
from zcells.db.engine import Database
from zcells.dbrunner import InlineDbRunner
from zcells.names import child_path
from zcells.node import Node
from zcells.scheduling import CellScheduling
from zcells.service import Services, run_cell
from zcells.sim.network import SimNetwork
from zcells.transport import Identity, MemoryTransport

TOP: Final = "api"
CLIENT_PREFIX: Final = "client-"

_Z85: Final = (
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)


def z85_key(rng: random.Random) -> str:
    """A random 40-character Z85 text of 32 bytes: a well-formed public key."""
    raw = rng.randbytes(32)
    out: list[str] = []
    for at in range(0, 32, 4):
        value = int.from_bytes(raw[at : at + 4], "big")
        chunk = []
        for _ in range(5):
            value, digit = divmod(value, 85)
            chunk.append(_Z85[digit])
        out.extend(reversed(chunk))
    return "".join(out)


@dataclass(frozen=True)
class Shape:
    """A tree of `cells` cells, each with at most `fanout` children, filled level by level."""

    parent: dict[str, str | None]
    children: dict[str, list[str]]
    path: dict[str, str]

    @classmethod
    def make(cls, cells: int, fanout: int) -> Shape:
        names = [TOP] + [f"c{i}" for i in range(1, cells)]
        parent: dict[str, str | None] = {TOP: None}
        children: dict[str, list[str]] = {name: [] for name in names}
        path = {TOP: TOP}
        for index, name in enumerate(names[1:], start=1):
            above = names[(index - 1) // fanout]
            parent[name] = above
            children[above].append(name)
            path[name] = child_path(path[above], name)
        return cls(parent, children, path)

    @property
    def names(self) -> list[str]:
        return list(self.parent)

    def links(self) -> list[tuple[str, str]]:
        """(child, parent) for every link."""
        return [(c, p) for c, p in self.parent.items() if p is not None]

    def neighbours(self, name: str) -> list[str]:
        above = self.parent[name]
        return ([above] if above is not None else []) + self.children[name]

    def leaves(self) -> Iterator[str]:
        return (name for name, below in self.children.items() if not below)


@dataclass(frozen=True)
class Settings:
    hosts: int = 2  # per cell without children
    build_s: float = 2.0
    call_timeout_s: float = 30.0
    heartbeat_interval_s: float = 5.0
    clients: int = 4


@dataclass
class SimCell:
    name: str
    config: Config
    db: Database
    identity: Identity
    clock: LoopClock
    transport: MemoryTransport | None = None
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    starts: int = 0

    @property
    def up(self) -> bool:
        return self.task is not None and not self.task.done()


class SimTree:
    def __init__(
        self,
        shape: Shape,
        settings: Settings,
        network: SimNetwork,
        rng: random.Random,
        directory: Path,
        wall_at_zero: float,
    ) -> None:
        self.shape = shape
        self.settings = settings
        self.network = network
        self.directory = directory
        self.cells: dict[str, SimCell] = {}
        self.keys = {name: z85_key(rng) for name in shape.names}
        self.client_keys = {f"{CLIENT_PREFIX}{i}": z85_key(rng) for i in range(settings.clients)}
        self._wall_at_zero = wall_at_zero
        self.crashes = 0
        # Told of each cell's node as it starts: the run reads liveness and paths from it.
        self.on_node: Callable[[str, Node], None] = lambda _name, _node: None
        self.scheduling: dict[str, CellScheduling] = {}  # each running cell's, as it started

    # -- building -------------------------------------------------------------------------

    def build(self) -> None:
        """Make every cell's database from one migrated template, and its registry."""
        template = self.directory / "template.db"
        with Database(f"sqlite:///{template}") as db:
            migrate.sync(db)
        base = load_config(None, env={"ZCELLS_STATE_DIR": str(self.directory)})
        for name in self.shape.names:
            path = self.directory / f"{name}.db"
            shutil.copyfile(template, path)
            config = self._config(base, name, path)
            db = Database(config.database.connection)
            self._register(db, name)
            identity = Identity(
                name=name,
                public_key=self.keys[name],
                secret_key="-",  # noqa: S106 (the in-memory transport has no CURVE)
                cells_endpoint=config.transport.cells_endpoint,
                api_endpoint=config.transport.api_endpoint,
            )
            clock = LoopClock(self.network.loop, self._wall_at_zero)
            self.cells[name] = SimCell(name, config, db, identity, clock)

    def _config(self, base: Config, name: str, path: Path) -> Config:
        top = name == TOP
        leaf = not self.shape.children[name]
        settings = self.settings
        return replace(
            base,
            cells=replace(
                base.cells,
                name=name,
                cell_type="api" if top else "compute",
                call_timeout_s=settings.call_timeout_s,
                heartbeat_interval_s=settings.heartbeat_interval_s,
                scheduler_retry_delay_s=1.0,
            ),
            transport=replace(
                base.transport,
                cells_endpoint=f"ipc:///sim/{name}/cells",
                api_endpoint=f"ipc:///sim/{name}/api",
            ),
            database=replace(base.database, connection=f"sqlite:///{path}"),
            compute=replace(
                base.compute,
                fake_hosts=settings.hosts if leaf and not top else 0,
                fake_build_s=settings.build_s,
            ),
        )

    def _register(self, db: Database, name: str) -> None:
        parent = self.shape.parent[name]
        if parent is not None:
            registry.add_cell(
                db,
                parent,
                kind="parent",
                endpoint=f"ipc:///sim/{parent}/cells",
                public_key=self.keys[parent],
            )
        for child in self.shape.children[name]:
            registry.add_cell(
                db,
                child,
                kind="child",
                endpoint=f"ipc:///sim/{child}/cells",
                public_key=self.keys[child],
            )
        if name == TOP:
            registry.seed_default_flavors(db)
            catalog.seed_default_images(db)
            for client, key in self.client_keys.items():
                registry.add_client(db, client, public_key=key, role="admin")

    # -- running ----------------------------------------------------------------------------

    def start(self, name: str) -> None:
        cell = self.cells[name]
        transport = MemoryTransport(self.network, cell.identity, queue_size=10_000)
        cell.transport = transport
        cell.stop = asyncio.Event()
        runner = InlineDbRunner(cell.db)
        cell.task = asyncio.get_running_loop().create_task(
            run_cell(
                cell.config,
                cell.db,
                transport,
                cell.clock,
                runner,
                cell.stop,
                lambda watch, services: self._started(name, watch.node, services),
            ),
            name=f"cell-{name}",
        )
        cell.starts += 1
        self.network.attach(name, transport)

    def _started(self, name: str, node: Node, services: Services) -> None:
        self.scheduling[name] = services.announcer.scheduling
        self.on_node(name, node)

    async def crash(self, name: str) -> bool:
        """Kill cell `name` at once; False if it was down already."""
        cell = self.cells[name]
        if not cell.up or cell.transport is None or cell.task is None:
            return False
        self.crashes += 1
        self.network.cells.pop(name, None)
        await cell.transport.close()
        cell.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await cell.task
        return True

    async def stop_all(self) -> None:
        for cell in self.cells.values():
            cell.stop.set()
        tasks = [c.task for c in self.cells.values() if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        for cell in self.cells.values():
            cell.db.close()
