"""`zcells cell ping PATH | --all`: a targeted or broadcast round trip through the tree."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from zcells.cli.common import print_json, print_table
from zcells.cli.connect import ClientKey, Endpoint, ServerKey, Timeout, resolve, with_client

from zcells.client import CellClient, Ping
from zcells.errors import ValidationError, WireError
from zcells.names import check_cell_path

T = TypeVar("T")


def ping(
    path: Annotated[str | None, typer.Argument(help="Full cell path, e.g. api!eu!eu-1.")] = None,
    all_cells: Annotated[
        bool,
        typer.Option("--all", help="Ping every cell below the connected one, itself included."),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 10.0,
    wait: Annotated[
        float,
        typer.Option("--wait", help="Retry for up to this many seconds until every cell answers."),
    ] = 0.0,
) -> None:
    """Round-trip to one cell (PATH) or to every cell of the subtree (--all)."""
    if all_cells == (path is not None):
        raise ValidationError("arguments", path or "", "either a cell PATH or --all")
    if path is not None:
        check_cell_path(path)
    target = resolve(endpoint, server_key, key)
    if path is not None:
        one = asyncio.run(
            _retrying(wait, lambda: with_client(target, timeout, lambda c: c.ping(path, timeout)))
        )
        if json_output:
            print_json({"cell": one.cell, "rtt_ms": round(one.rtt_ms or 0.0, 3)})
        else:
            print(f"{one.cell}: ok in {one.rtt_ms:.2f} ms")
        return

    async def everyone(client: CellClient) -> list[Ping]:
        return await client.ping_all(timeout)

    async def everyone_ok() -> list[Ping]:
        rows = await with_client(target, timeout, everyone)
        if not all(r.ok for r in rows):
            raise _NotYet(rows)
        return rows

    try:
        rows = asyncio.run(_retrying(wait, everyone_ok))
    except _NotYet as exc:
        rows = exc.rows
    if json_output:
        print_json([r.as_dict() for r in rows])
    else:
        print_table(
            "cells",
            ("CELL", "STATE", "RTT"),
            [
                (
                    r.cell,
                    "ok" if r.ok else f"{r.code}: {r.error}",
                    "-" if r.rtt_ms is None else f"{r.rtt_ms:.2f} ms",
                )
                for r in rows
            ],
        )
    if not all(r.ok for r in rows):
        sys.exit(1)


class _NotYet(Exception):
    def __init__(self, rows: list[Ping]) -> None:
        super().__init__("not every cell answered")
        self.rows = rows


async def _retrying(wait_s: float, attempt: Callable[[], Awaitable[T]]) -> T:
    """Run `attempt` until it succeeds or `wait_s` has passed; then its last error stands."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await attempt()
        except (WireError, _NotYet):
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
