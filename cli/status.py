"""`zcells status [--watch] [--json]`: the health of the tree below the connected cell.

Rules kept here:

* One broadcast of `status` gathers a snapshot; `zcells.cli.status_view`
  turns it into plain data and draws it.
* `--watch` is one task: a gather every second, each bounded by
  min(--timeout, 1.5 s) so a dead cell never stalls the view, drawn by
  ``Live(auto_refresh=False)``. Ctrl-C ends it with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.live import Live
from zcells.cli.common import WIDE, print_json
from zcells.cli.connect import (
    ClientKey,
    Endpoint,
    ServerKey,
    Target,
    Timeout,
    resolve,
    with_client,
)
from zcells.cli.status_view import (
    UNREACHABLE,
    Snapshot,
    failed_snapshot,
    render,
    snapshot_of,
)

from zcells.client import CellClient
from zcells.errors import ValidationError, WireError
from zcells.names import check_cell_path
from zcells.routing import is_below
from zcells.sockets.transport import ZmqClient

WATCH_INTERVAL_S: Final = 1.0
WATCH_TIMEOUT_S: Final = 1.5


# -- gathering ------------------------------------------------------------------------------


async def gather(
    client: CellClient,
    timeout_s: float,
    flavor: str | Mapping[str, Any] | None = None,
    focus: str | None = None,
) -> Snapshot:
    """One `status` broadcast through `client`: the snapshot of the tree below its cell.

    Free room is counted for `flavor` (a name, or the flavor as an earlier
    snapshot chose it), or the smallest flavor the cell knows; with `focus`,
    only that cell and the cells below it are kept.
    """
    results, _ = await client.broadcast("status", timeout_s=timeout_s)
    snapshot = snapshot_of(results, client.cell_path or "?", time.time())
    if focus is not None:
        kept = tuple(cell for cell in snapshot.cells if is_below(cell.cell, focus))
        snapshot = replace(snapshot, cells=kept)
    chosen = flavor if isinstance(flavor, Mapping) else await _flavor(client, flavor)
    return replace(snapshot, flavor=chosen)


async def _flavor(client: CellClient, name: str | None) -> Mapping[str, Any] | None:
    result = await client.call("flavor_list", {})
    listed = result.value.get("flavors") if isinstance(result.value, dict) else None
    flavors = [f for f in listed or [] if isinstance(f, dict) and isinstance(f.get("name"), str)]
    if name is not None:
        named = [f for f in flavors if f["name"] == name]
        if not named:
            raise ValidationError("--flavor", name, "a flavor the connected cell knows")
        return named[0]
    sizes = [(f.get("memory_mb", 0), f.get("disk_gb", 0), f.get("vcpus", 0), f) for f in flavors]
    return min(sizes, key=lambda s: s[:3])[3] if sizes else None


class _Link:
    """One link to the connected cell for a watch, dialled again after any failure."""

    def __init__(
        self,
        target: Target,
        timeout_s: float,
        flavor: str | None = None,
        focus: str | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.flavor = flavor
        self.focus = focus
        self._chosen: Mapping[str, Any] | None = None
        self.name = target.endpoint  # until the cell says where it sits
        self._client: CellClient | None = None

    async def snapshot(self) -> Snapshot:
        """A snapshot within about `timeout_s` (plus the client's grace), whatever happens."""
        try:
            async with asyncio.timeout(self.timeout_s + 1.0):
                if self._client is None:
                    self._client = self._dial()
                    await self._client.connect()
                    self.name = self._client.cell_path or self.name
                    self._chosen = None  # a new link asks which flavor again
                snapshot = await gather(
                    self._client, self.timeout_s, self._chosen or self.flavor, self.focus
                )
                self._chosen = snapshot.flavor  # not asked again at every refresh
                return snapshot
        except (WireError, TimeoutError) as exc:
            await self.close()
            why = str(exc) or f"no answer within {self.timeout_s:g}s"
            return failed_snapshot(self.name, why, time.time())

    def _dial(self) -> CellClient:
        transport = ZmqClient(
            self.target.endpoint,
            self.target.server_key,
            (self.target.public_key, self.target.secret_key),
            connect_timeout_s=self.timeout_s,
        )
        return CellClient(transport, timeout_s=self.timeout_s)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


async def _refresh(
    target: Target,
    timeout_s: float,
    stop: asyncio.Event | None,
    duration_s: float | None,
    show: Callable[[Snapshot], None],
    flavor: str | None = None,
    focus: str | None = None,
) -> None:
    """Show a fresh snapshot every second until `stop` is set or `duration_s` has passed."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    end = None if duration_s is None else loop.time() + duration_s
    link = _Link(target, min(timeout_s, WATCH_TIMEOUT_S), flavor, focus)
    try:
        while not stop.is_set():
            started = loop.time()
            show(await link.snapshot())
            wake = (
                started + WATCH_INTERVAL_S if end is None else min(started + WATCH_INTERVAL_S, end)
            )
            if end is not None and loop.time() >= end:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(wake):
                    await stop.wait()
    finally:
        await link.close()


async def watch(
    target: Target,
    timeout_s: float = WATCH_TIMEOUT_S,
    stop: asyncio.Event | None = None,
    duration_s: float | None = None,
    *,
    console: Console | None = None,
    flavor: str | None = None,
    focus: str | None = None,
    fold: bool | None = None,
) -> None:
    """The live status view of the tree below `target`'s cell, redrawn every second.

    Runs until `stop` is set or `duration_s` seconds have passed (with neither,
    until cancelled: under `asyncio.run`, Ctrl-C raises KeyboardInterrupt in
    the caller). Each gather waits at most min(`timeout_s`, 1.5) seconds, so
    a dead cell shows as unreachable and never stalls the view; a connected
    cell that is down shows so, and is dialled again at the next refresh.
    Draws on `console` (default: a new one on stdout).
    """
    console = console or (Console() if sys.stdout.isatty() else Console(width=WIDE))
    with Live(console=console, auto_refresh=False) as live:
        await _refresh(
            target,
            timeout_s,
            stop,
            duration_s,
            lambda s: live.update(render(s, fold=fold), refresh=True),
            flavor,
            focus,
        )


async def watch_json(
    target: Target,
    timeout_s: float = WATCH_TIMEOUT_S,
    stop: asyncio.Event | None = None,
    duration_s: float | None = None,
    flavor: str | None = None,
    focus: str | None = None,
) -> None:
    """As `watch`, printing each snapshot as one line of JSON on stdout instead."""

    def line(snapshot: Snapshot) -> None:
        sys.stdout.write(json.dumps(snapshot.as_dict()) + "\n")
        sys.stdout.flush()

    await _refresh(target, timeout_s, stop, duration_s, line, flavor, focus)


# -- the command ----------------------------------------------------------------------------


def status(
    watching: Annotated[
        bool,
        typer.Option(
            "--watch", "-w", help="Redraw every second until Ctrl-C (which exits with 0)."
        ),
    ] = False,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the snapshot as JSON; with --watch, one line of JSON per refresh.",
        ),
    ] = False,
    flavor: Annotated[
        str | None,
        typer.Option("--flavor", help="Count free room for this flavor (default: the smallest)."),
    ] = None,
    cell: Annotated[
        str | None, typer.Option("--cell", help="Only this cell and the cells below it.")
    ] = None,
    show_all: Annotated[
        bool,
        typer.Option("--all", help="Show every cell; a tree of over 30 cells folds otherwise."),
    ] = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 5.0,
) -> None:
    """Health of the tree below the connected cell (admin): state, hosts, servers, backlog,
    and what each cell announces to its parent (free room, capabilities, age).

    A cell is healthy, late or mute as its parent hears it, and unreachable if
    it did not answer. Without --watch, exits with 1 when some cell is
    unreachable. With --watch, each refresh waits at most min(--timeout, 1.5) s.
    """
    if cell is not None:
        check_cell_path(cell)
    fold = False if show_all else None
    target = resolve(endpoint, server_key, key)
    if watching:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                watch_json(target, timeout, flavor=flavor, focus=cell)
                if json_output
                else watch(target, timeout, flavor=flavor, focus=cell, fold=fold)
            )
        return
    snapshot = asyncio.run(with_client(target, timeout, lambda c: gather(c, timeout, flavor, cell)))
    if json_output:
        print_json(snapshot.as_dict())
    else:
        out = Console() if sys.stdout.isatty() else Console(width=WIDE, file=sys.stdout)
        out.print(render(snapshot, fold=fold))
    if snapshot.count(UNREACHABLE):
        sys.exit(1)
