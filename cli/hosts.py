"""`zcells host list` and `zcells cell sync PATH`: an admin's view of the hosts, and a resync.

Both gather answers from many cells. A cell that did not answer is one line
on stderr and makes the exit status 1; the others' answers are still shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Annotated, Any

import typer
from zcells.cli.common import note, print_json, print_table, stderr
from zcells.cli.connect import ClientKey, Endpoint, ServerKey, Timeout, ask, resolve, with_client
from zcells.cli.status import gather

from zcells.client import CellClient
from zcells.errors import CallTimeout
from zcells.names import check_cell_path
from zcells.routing import is_below, parent_of

host_app = typer.Typer(help="The compute hosts of the tree.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print as JSON.")]


@host_app.command("list")
def host_list(
    cell: Annotated[
        str | None, typer.Option("--cell", help="Only hosts of this cell and below it.")
    ] = None,
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """List every host below the connected cell, with what is used of it (admin)."""
    if cell is not None:
        check_cell_path(cell)
    body = {} if cell is None else {"cell": cell}
    target = resolve(endpoint, server_key, key)
    answer: dict[str, Any] = ask(target, timeout, "host_list", body)
    hosts, errors = list(answer["hosts"]), list(answer["errors"])
    if json_output:
        print_json(answer)
    else:
        print_table(
            "hosts",
            ("CELL", "HOST", "ENABLED", "RAM MB", "DISK GB", "VCPUS"),
            [
                (
                    h["cell"],
                    h["name"],
                    "yes" if h["enabled"] else "no",
                    f"{h['memory_mb_used']}/{h['memory_mb']}",
                    f"{h['disk_gb_used']}/{h['disk_gb']}",
                    f"{h['vcpus_used']}/{h['vcpus']}",
                )
                for h in hosts
            ],
        )
    for error in errors:
        note(f"zcells: error: cell {error['cell']} did not answer: {error['error']}")
    if errors:
        sys.exit(1)


def cell_sync(
    path: Annotated[str, typer.Argument(help="Full path of a cell below the API cell.")],
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Then wait until the requeued records have reached the top."),
    ] = False,
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 60.0,
) -> None:
    """Send every instance of a subtree up to the API cell again (admin).

    With --wait, the command returns once nothing is left in the upward
    backlog of PATH, the cells below it and the cells between it and the
    top, or fails after --timeout.
    """
    check_cell_path(path)
    target = resolve(endpoint, server_key, key)

    async def work(client: CellClient) -> dict[str, Any]:
        with _spinner(f"requeueing every instance of {path} and below"):
            answer: dict[str, Any] = await client.request("cell_sync", {"cell": path})
        if wait and not answer.get("errors"):
            await _drained(client, path, timeout)
        return answer

    answer = asyncio.run(with_client(target, timeout, work))
    if json_output:
        print_json(answer)
    for cell, count in sorted(answer.get("cells", {}).items()):
        if not json_output:
            print(f"{cell}: requeued {count}")
    errors = answer.get("errors", {})
    for cell, error in sorted(errors.items()):
        note(f"zcells: error: cell {cell} did not resync: {error['code']}: {error['message']}")
    if errors:
        sys.exit(1)


def _spinner(what: str) -> contextlib.AbstractContextManager[Any]:
    """A spinner on a terminal while `what` runs; nothing when piped."""
    if stderr.is_terminal:
        return stderr.status(what)
    return contextlib.nullcontext()


async def _drained(client: CellClient, path: str, timeout_s: float) -> None:
    """Wait until the cells that carry PATH's records up have no backlog left."""
    carriers: set[str] = set()
    step: str | None = path
    while step is not None:  # PATH and every cell above it: at most max_hop_count steps
        carriers.add(step)
        step = parent_of(step)
    deadline = time.monotonic() + timeout_s
    left = -1
    with _spinner("waiting for the top to apply them") as shown:
        while time.monotonic() < deadline:
            snapshot = await gather(client, min(5.0, max(0.5, deadline - time.monotonic())))
            left = sum(
                int((cell.backlog or {}).get("count", 0))
                for cell in snapshot.cells
                if cell.cell in carriers or is_below(cell.cell, path)
            )
            if left == 0:
                note(f"every record of {path} has reached the top")
                return
            if shown is not None:
                shown.update(f"waiting for the top to apply them: {left} left")
            else:
                note(f"{left} records still on their way up")
            await asyncio.sleep(0.5)
    raise CallTimeout(f"{left} records of {path} had not reached the top after {timeout_s:g}s")
