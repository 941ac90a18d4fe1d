"""A throwaway tree of real cell processes on loopback, for tests, benchmarks and demos.

`CellTree({"api": {"c1": {"g1": {}}, "c2": {}}}, directory)` writes keys,
configs and databases for every cell (through the same code the CLI uses),
registers each link on both sides and the clients at every cell (the admin
"ops", and any others asked for with their role and project), then starts
one `zcells serve` process per cell on free loopback ports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zcells.client import CellClient
from zcells.errors import ServiceError, WireError
from zcells.names import child_path
from zcells.sockets.keys import KeyPair, generate_keypair
from zcells.sockets.transport import ZmqClient

Tree = Mapping[str, "Tree"]


class CellFailed(ServiceError):
    """A cell of the local tree exited, or did not answer in time."""


def _port_span() -> tuple[int, int]:
    """Ports outgoing connections never use: below the kernel's ephemeral range."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return 10000, max(10001, min(low, 65536))


_HANDED_OUT: set[int] = set()


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, taken below the ephemeral range.

    Kernel-chosen ports come from the range outgoing connections use too, so
    one could be taken before the cell binds it. Parallel test workers draw
    from separate slices, so they never race each other for a port.
    """
    start, end = _port_span()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        slice_size = max(200, (end - start) // 16)
        start += (int(worker[2:]) % 16) * slice_size
        end = min(end, start + slice_size)
    ports: list[int] = []
    for port in random.sample(range(start, end), end - start):
        if port in _HANDED_OUT:  # given to a cell that may not have bound it yet
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            _HANDED_OUT.update(ports)
            return ports
    raise OSError(f"no {count} free ports between {start} and {end}")


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise CellFailed(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class CellProc:
    name: str
    path: str
    parent: str | None
    directory: Path
    config: Path
    keys: KeyPair
    cells_port: int
    api_port: int
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"  # where it listens and is dialled (a test host of its own, say)

    @property
    def log(self) -> Path:
        return self.directory / "serve.log"

    @property
    def api_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.api_port}"

    @property
    def cells_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.cells_port}"

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


class CellTree:
    def __init__(
        self,
        tree: Tree,
        root: Path,
        *,
        log_level: str = "debug",
        idle: tuple[str, ...] = (),
        extra_clients: tuple[str, ...] = (),
        clients: Mapping[str, tuple[str, str | None]] | None = None,
        compute: Mapping[str, Any] | None = None,
        cell_compute: Mapping[str, Mapping[str, Any]] | None = None,
        cell_options: Mapping[str, Mapping[str, Any]] | None = None,
        new_session: bool = False,
        hosts: Mapping[str, str] | None = None,
        launcher: Callable[[str], list[str]] | None = None,
        **cells_options: Any,
    ) -> None:
        """`idle` cells are registered and given keys but never started.

        `hosts` maps a cell to the address it listens on and is dialled at
        (default 127.0.0.1), and `launcher` gives the command that starts a
        cell's process before its own argv (``ip netns exec NS``, say): a tree
        of test hosts in network namespaces of its own.

        With `new_session`, each cell runs in a session of its own: Ctrl-C at
        the terminal does not reach it, and it outlives the process that
        started it (`zcells dev --detach`).

        `extra_clients` are more admins; `clients` maps more client names to
        their (role, project), say ``{"alice": ("member", "proj-a")}``.
        `compute` is the `[compute]` section of every compute cell, and
        `cell_compute` overrides it per cell (say, a cell with no hosts), as
        `cell_options` overrides `[cells]` options per cell (its capabilities).
        """
        self.compute = {"fake_hosts": 2, "fake_build_seconds": 0.05, **(compute or {})}
        self.cell_compute = cell_compute or {}
        self.cell_options = cell_options or {}
        self.root = root
        self.log_level = log_level
        self.idle = idle
        self.new_session = new_session
        self.hosts = dict(hosts or {})
        self.launcher = launcher
        self.options = {
            "heartbeat_interval": 0.5,
            "mute_child_interval": 3,
            "call_timeout": 10,
            "db_check_interval": 1,
            **cells_options,
        }
        self.cells: dict[str, CellProc] = {}
        # "ops" is the admin client of every cell; more clients on request.
        self.roles: dict[str, tuple[str, str | None]] = {
            **{name: ("admin", None) for name in ("ops", *extra_clients)},
            **(clients or {}),
        }
        if self.roles["ops"] != ("admin", None):
            raise ValueError('"ops" is the admin client of every cell')
        self.clients = {name: generate_keypair(root / "client-keys", name) for name in self.roles}
        self.client_keys = self.clients["ops"]
        self._add(tree, None, None)
        for cell in self.cells.values():
            self._write(cell)

    def _add(self, tree: Tree, parent: str | None, parent_path: str | None) -> None:
        for name, children in tree.items():
            path = name if parent_path is None else child_path(parent_path, name)
            directory = self.root / name
            cells_port, api_port = free_ports(2)
            keys = generate_keypair(directory / "keys", name)
            self.cells[name] = CellProc(
                name,
                path,
                parent,
                directory,
                directory / "cell.conf",
                keys,
                cells_port,
                api_port,
                host=self.hosts.get(name, "127.0.0.1"),
            )
            self._add(children, name, path)

    def _write(self, cell: CellProc) -> None:
        chosen = {**self.options, **self.cell_options.get(cell.name, {})}
        options = "\n".join(f"{k} = {v}" for k, v in chosen.items())
        compute = {**self.compute, **self.cell_compute.get(cell.name, {})}
        compute_section = "".join(f"{k} = {v}\n" for k, v in compute.items())
        cell.config.write_text(
            f"[cells]\nname = {cell.name}\n"
            f"cell_type = {'api' if cell.parent is None else 'compute'}\n{options}\n"
            f"[transport]\ncells_endpoint = {cell.cells_endpoint}\n"
            f"api_endpoint = {cell.api_endpoint}\nkeys_dir = keys\n"
            f"[service]\nstate_dir = state\nlog_level = {self.log_level}\n"
            + (f"[compute]\n{compute_section}" if cell.parent is not None else "")
        )
        from zcells.db import catalog, migrate, registry  # noqa: PLC0415 - a client command must not load the database libraries
        from zcells.db.engine import Database  # noqa: PLC0415

        with Database(f"sqlite:///{cell.directory / 'state' / cell.name}.db") as db:
            migrate.sync(db)
            if cell.parent is None:
                registry.seed_default_flavors(db)
                catalog.seed_default_images(db)
            else:
                parent = self.cells[cell.parent]
                registry.add_cell(
                    db,
                    parent.name,
                    kind="parent",
                    endpoint=parent.cells_endpoint,
                    public_key=parent.keys.public,
                )
            for child in self.cells.values():
                if child.parent == cell.name:
                    registry.add_cell(
                        db,
                        child.name,
                        kind="child",
                        endpoint=child.cells_endpoint,
                        public_key=child.keys.public,
                    )
            for client, keys in self.clients.items():
                role, project = self.roles[client]
                registry.add_client(db, client, public_key=keys.public, role=role, project=project)

    def start(
        self,
        name: str | None = None,
        timeout_s: float = 30.0,
        on_ready: Callable[[CellProc], None] | None = None,
    ) -> None:
        """Start the cells (all, or one) and wait until each answers a ping.

        `on_ready` is called with each cell as it first answers.
        """
        chosen = (
            [self.cells[name]]
            if name
            else [c for c in self.cells.values() if c.name not in self.idle]
        )
        for cell in chosen:
            with cell.log.open("a") as log:
                prefix = self.launcher(cell.name) if self.launcher is not None else []
                cell.proc = subprocess.Popen(
                    [
                        *prefix,
                        sys.executable,
                        "-m",
                        "zcells.cli.app",
                        "--config",
                        str(cell.config),
                        "serve",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    start_new_session=self.new_session,
                )
        for cell in chosen:
            wait_until(
                functools.partial(self._answers, cell),
                timeout_s,
                f"{cell.name} to answer on {cell.api_endpoint}",
                interval_s=0.1,
            )
            if on_ready is not None:
                on_ready(cell)

    def _answers(self, cell: CellProc) -> bool:
        if cell.proc is not None and cell.proc.poll() is not None:
            raise CellFailed(
                f"{cell.name} exited with {cell.proc.returncode}; its log, {cell.log}, ends:\n"
                + cell.log_text()[-3000:]
            )

        async def ping() -> bool:
            async with self.client(cell.name, timeout_s=1.0) as client:
                return (await client.ping()).ok

        # A thread of its own, so this works whether or not the caller runs a loop.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                return pool.submit(asyncio.run, ping()).result()
            except WireError:
                return False

    def signal(self, name: str, signum: int) -> None:
        proc = self.cells[name].proc
        assert proc is not None
        os.kill(proc.pid, signum)
        if signum in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=10)

    def stop(self) -> None:
        for cell in self.cells.values():
            if cell.proc is not None and cell.proc.poll() is None:
                os.kill(cell.proc.pid, signal.SIGCONT)
                cell.proc.terminate()
        for cell in self.cells.values():
            if cell.proc is not None:
                try:
                    cell.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    cell.proc.kill()
                    cell.proc.wait()

    def client(
        self, name: str | None = None, timeout_s: float = 5.0, *, as_client: str = "ops"
    ) -> CellClient:
        """A connection to cell `name` (default: the top) as the client `as_client`."""
        cell = self.cells[name] if name else self.top
        keys = self.clients[as_client]
        transport = ZmqClient(
            cell.api_endpoint,
            cell.keys.public,
            (keys.public, keys.secret),
            connect_timeout_s=min(timeout_s, 5.0),
        )
        return CellClient(transport, timeout_s=timeout_s)

    @property
    def top(self) -> CellProc:
        """The tree's root cell, the one clients talk to by default."""
        return next(iter(self.cells.values()))

    def client_env(self, name: str | None = None) -> dict[str, str]:
        """The ZCELLS_* variables that point client commands at cell `name` (default: the top)."""
        cell = self.cells[name] if name else self.top
        return {
            "ZCELLS_ENDPOINT": cell.api_endpoint,
            "ZCELLS_SERVER_KEY": cell.keys.public,
            "ZCELLS_KEY": str(self.client_keys.secret_path),
        }

    def logs(self) -> str:
        return "\n".join(f"--- {c.name}\n{c.log_text()[-4000:]}" for c in self.cells.values())


@contextlib.contextmanager
def running_tree(
    tree: Tree,
    root: Path,
    *,
    log_level: str = "debug",
    idle: tuple[str, ...] = (),
    **options: Any,
) -> Iterator[CellTree]:
    cells = CellTree(tree, root, log_level=log_level, idle=idle, **options)
    try:
        cells.start()
        yield cells
    finally:
        cells.stop()
