"""`zcells dev` and `zcells dev stop`: a throwaway local tree of real cells, in one command.

Standard output carries only the three ``export`` lines, so
``eval "$(zcells dev --detach)"`` points this shell's client commands at
the new tree; everything else a person reads goes to standard error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from zcells.cli.common import note, stderr
from zcells.cli.connect import Target
from zcells.cli.status import watch

from zcells import devrun
from zcells.config import default_state_dir
from zcells.devtree import CellProc, CellTree

dev_app = typer.Typer(
    help="Start a throwaway local tree of real cells, or stop one (`zcells dev stop`).",
    invoke_without_command=True,
)


def _default_dir() -> Path:
    return default_state_dir(os.environ) / "dev"


DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Where the tree's keys, configs, databases and logs live "
        "(default: $ZCELLS_STATE_DIR/dev or ~/.local/state/zcells/dev). "
        "Emptied at start if `zcells dev` made it.",
    ),
]


@dev_app.callback()
def dev(
    ctx: typer.Context,
    directory: DirOption = None,
    children: Annotated[int, typer.Option("--children", help="Compute cells under api.")] = 2,
    grandchildren: Annotated[
        int, typer.Option("--grandchildren", help="Cells one level lower, dealt to the children.")
    ] = 1,
    hosts: Annotated[int, typer.Option("--hosts", help="Fake hosts in each compute cell.")] = 4,
    detach: Annotated[
        bool, typer.Option("--detach", help="Return once the tree is healthy; leave it running.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds each cell has to answer at start.")
    ] = 60.0,
) -> None:
    """Build and start a local tree (api, compute cells, fake hosts) and watch its health.

    In the foreground the live status view runs until Ctrl-C, which stops every
    cell; with --detach the tree keeps running until `zcells dev stop`.
    """
    if ctx.invoked_subcommand is not None:
        return
    shape = devrun.layout(children, grandchildren)
    devrun.check_hosts(hosts)
    place = devrun.DevDir(directory or _default_dir())
    with place.lock():
        place.prepare()
        tree = place.build(shape, hosts)
        try:
            _start(tree, timeout)
            place.record(tree)
        except BaseException:
            tree.stop()
            place.stop()
            raise
        _announce(place, tree, detach)
        if detach:
            return
        try:
            asyncio.run(_watch_until_stopped(tree))
        finally:
            note("stopping every cell ...")
            tree.stop()
            place.stop()
            note(f"stopped; logs and databases are kept in {place.path} until the next run")


@dev_app.command("stop")
def dev_stop(directory: DirOption = None) -> None:
    """Stop every cell of the dev tree in --dir (SIGTERM, then SIGKILL after 10 s)."""
    place = devrun.DevDir(directory or _default_dir())
    stopped = place.stop()
    if stopped:
        note(f"stopped {len(stopped)} cells: {', '.join(c.name for c in stopped)}")
    else:
        note(f"no dev tree is running in {place.path}")


def _start(tree: CellTree, timeout_s: float) -> None:
    """Start the cells, showing a bar on a terminal and a line per cell otherwise."""
    total = len(tree.cells)
    if not stderr.is_terminal:
        note(f"starting {total} cells in {tree.root}")
        tree.start(timeout_s=timeout_s, on_ready=lambda c: note(f"{c.path} answers"))
        return
    progress = Progress(
        TextColumn("starting cells"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    )
    task = progress.add_task("cells", total=total, last="")

    def ready(cell: CellProc) -> None:
        progress.update(task, advance=1, last=cell.path)

    with progress:
        tree.start(timeout_s=timeout_s, on_ready=ready)


def _announce(place: devrun.DevDir, tree: CellTree, detach: bool) -> None:
    cells = ", ".join(c.path for c in tree.cells.values())
    note(f"{len(tree.cells)} cells healthy: {cells}")
    note(f"for the client commands, in any shell: source {place.env_file}")
    for line in devrun.exports(tree):
        print(line, flush=True)
    if detach:
        note(f"stop the tree with: zcells dev stop --dir {place.path}")
    else:
        note("Ctrl-C stops every cell")


async def _watch_until_stopped(tree: CellTree) -> None:
    """The live status view until Ctrl-C, SIGTERM, or every cell has exited."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    top = tree.top
    keys = tree.clients[devrun.VIEW_CLIENT]
    target = Target(top.api_endpoint, top.keys.public, keys.public, keys.secret)
    gone = asyncio.create_task(_all_exited(tree, stop))
    try:
        await watch(target, timeout_s=2.0, stop=stop)
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone


async def _all_exited(tree: CellTree, stop: asyncio.Event) -> None:
    procs = [c.proc for c in tree.cells.values() if c.proc is not None]
    while not stop.is_set():
        if all(p.poll() is not None for p in procs):
            note("every cell has exited")
            stop.set()
            return
        await asyncio.sleep(0.5)
