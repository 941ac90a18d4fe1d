"""`zcells host list` and `zcells cell sync PATH`: an admin's view of the hosts, and a resync.

Both gather answers from many cells. A cell that did not answer is one line
on stderr and makes the exit status 1; the others' answers are still shown.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import typer
from zcells.cli.common import note, print_json, print_table
from zcells.cli.connect import ClientKey, Endpoint, ServerKey, Timeout, resolve, with_client

from zcells.names import check_cell_path

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
    answer: dict[str, Any] = asyncio.run(
        with_client(target, timeout, lambda c: c.request("host_list", body))
    )
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
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 60.0,
) -> None:
    """Send every instance of a subtree up to the API cell again (admin)."""
    check_cell_path(path)
    target = resolve(endpoint, server_key, key)
    answer: dict[str, Any] = asyncio.run(
        with_client(target, timeout, lambda c: c.request("cell_sync", {"cell": path}))
    )
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
