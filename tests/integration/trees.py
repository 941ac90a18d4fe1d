"""Helpers for tests that drive a tree of real `zcells serve` processes through clients.

Nothing here sleeps to wait for convergence: `until` polls a condition under
a deadline and says what it last saw when the deadline passes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zcells.client import CellClient
from zcells.devtree import CellTree
from zcells.errors import WireError

Summary = dict[str, tuple[str, str | None, str | None, int]]


async def answer(client: CellClient, method: str, body: dict[str, Any] | None = None) -> Any:
    """The value of a call that must succeed."""
    return (await client.call(method, body or {})).unwrap()


async def refused(client: CellClient, method: str, body: dict[str, Any]) -> WireError:
    """The error of a call that must fail."""
    result = await client.call(method, body)
    assert result.error is not None, f"{method} {body} was not refused: {result.value}"
    return result.error


async def servers(
    client: CellClient, *, all_projects: bool = True, **filters: Any
) -> list[dict[str, Any]]:
    """Every server the connected cell shows this client, page by page."""
    found: list[dict[str, Any]] = []
    marker = None
    for _ in range(1000):
        body: dict[str, Any] = {"all_projects": all_projects, "limit": 100}
        body.update((k, v) for k, v in filters.items() if v is not None)
        if marker is not None:
            body["marker"] = marker
        page = await answer(client, "server_list", body)
        found += page["servers"]
        marker = page["next_marker"]
        if marker is None:
            return found
    raise AssertionError("server_list never ended")


async def every_server(client: CellClient, **filters: Any) -> list[dict[str, Any]]:
    """Every server of the connected cell, deleted ones included."""
    return await servers(client, **filters) + await servers(client, status="DELETED", **filters)


def summary(rows: Iterable[dict[str, Any]]) -> Summary:
    """uuid -> (status, cell, host, version): what the index and the cells must agree on."""
    return {r["uuid"]: (r["status"], r["cell"], r["host"], r["version"]) for r in rows}


async def held_by_cells(tree: CellTree, cells: Iterable[str]) -> Summary:
    """The own records of each named cell, as that cell lists them to the admin."""
    held: Summary = {}
    for name in cells:
        async with tree.client(name, timeout_s=30) as client:
            held.update(summary(await every_server(client)))
    return held


async def index_agrees_with_cells(
    top: CellClient, tree: CellTree, cells: Iterable[str]
) -> tuple[Summary, Summary] | None:
    """The top's index and the cells' records, when the index holds exactly what the cells do.

    Servers the index holds in no cell (never placed) are left out: no cell has them.
    """
    held = await held_by_cells(tree, cells)
    index = {
        uuid: row for uuid, row in summary(await every_server(top)).items() if row[1] is not None
    }
    return (index, held) if index == held else None
