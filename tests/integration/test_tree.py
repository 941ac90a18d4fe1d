"""A tree of real `zcells serve` processes on loopback: routing, failures, recovery.

api ── c1 ── g1
 │      └─── g2
 └──── c2
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from tests.fakes import run
from zcells.client import CellClient, Ping
from zcells.devtree import CellTree, running_tree
from zcells.errors import CallTimeout, CellUnreachable, UnknownCell, WireError

TREE = {"api": {"c1": {"g1": {}, "g2": {}}, "c2": {}}}
CELLS = ["api", "api!c1", "api!c1!g1", "api!c1!g2", "api!c2"]


async def ping_all_until(
    client: CellClient, predicate: object, timeout_s: float, what: str, ping_timeout_s: float = 2.0
) -> list[Ping]:
    """Ping the tree until `predicate(rows)` holds; bounded by `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    rows: list[Ping] = []
    while time.monotonic() < deadline:
        rows = await client.ping_all(timeout_s=ping_timeout_s)
        if predicate(rows):  # type: ignore[operator]
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last rows: {rows}")


def all_ok(rows: list[Ping]) -> bool:
    return [r.cell for r in rows] == CELLS and all(r.ok for r in rows)


@pytest.fixture
def tree(tmp_path: Path):  # type: ignore[no-untyped-def]
    with running_tree(TREE, tmp_path) as cells:
        yield cells
        assert "Traceback" not in cells.logs(), cells.logs()


def test_ping_every_cell_then_kill_restart_and_freeze(tree: CellTree) -> None:
    async def main() -> None:
        async with tree.client() as client:
            await ping_all_until(client, all_ok, 30, "every cell to answer")
            for cell in CELLS:
                ping = await client.ping(cell)
                assert ping.cell == cell and ping.ok
            with pytest.raises(UnknownCell) as info:
                await client.ping("api!c1!nope")
            assert info.value.cell == "api!c1"

            # kill -9 c2: a typed error within the call timeout; the others still answer
            tree.signal("c2", signal.SIGKILL)
            with pytest.raises((CellUnreachable, CallTimeout)):
                await client.ping("api!c2", timeout_s=3)
            rows = await ping_all_until(
                client, lambda rs: not {r.cell: r for r in rs}["api!c2"].ok, 10, "c2 down"
            )
            by_cell = {r.cell: r for r in rows}
            assert [c for c in CELLS if by_cell[c].ok] == CELLS[:4]
            assert by_cell["api!c2"].error is not None

            # restart c2 alone: it is back without touching anything else
            tree.start("c2")
            await ping_all_until(client, all_ok, 30, "c2 back")

            # freeze c1 past the mute interval, then thaw: its subtree comes back
            tree.signal("c1", signal.SIGSTOP)
            try:
                rows = await ping_all_until(
                    client,
                    lambda rs: not {r.cell: r for r in rs}["api!c1"].ok,
                    10,
                    "c1 silent",
                    ping_timeout_s=1.0,
                )
                assert {r.cell: r for r in rows}["api!c2"].ok
                mute_after = float(tree.options["mute_child_interval"])
                await asyncio.sleep(0)  # the log line below is what we wait for
                deadline = time.monotonic() + mute_after + 10
                while "neighbour.mute peer=child:c1" not in tree.cells["api"].log_text():
                    assert time.monotonic() < deadline, tree.cells["api"].log_text()[-3000:]
                    await asyncio.sleep(0.1)
            finally:
                tree.signal("c1", signal.SIGCONT)
            await ping_all_until(client, all_ok, 30, "c1's subtree back")

    run(main(), timeout_s=150)


def test_client_connected_to_a_middle_cell(tree: CellTree) -> None:
    async def main() -> None:
        async with tree.client() as top:
            await ping_all_until(top, all_ok, 30, "every cell to answer")
        async with tree.client("c1") as client:
            assert client.cell_path == "api!c1"
            rows = await client.ping_all()
            assert [r.cell for r in rows] == ["api!c1", "api!c1!g1", "api!c1!g2"]
            assert (await client.ping("api!c2")).ok  # up to api, down to c2

    run(main(), timeout_s=60)


def test_registry_changes_apply_without_restart(tree: CellTree) -> None:
    from zcells.db import registry
    from zcells.db.engine import Database

    async def main() -> None:
        async with tree.client() as client:
            await ping_all_until(client, all_ok, 30, "every cell to answer")
            api = tree.cells["api"]
            with Database(f"sqlite:///{api.directory / 'state' / 'api.db'}") as db:
                registry.remove_client(db, "ops")
            tree.signal("api", signal.SIGHUP)
            deadline = time.monotonic() + 10
            while True:  # the open connection is refused on its next message
                try:
                    await client.ping("api", timeout_s=0.5)
                except WireError:
                    break
                assert time.monotonic() < deadline, "removed client still served"
                await asyncio.sleep(0.05)
        assert "registry.loaded" in tree.cells["api"].log_text()

    run(main(), timeout_s=60)
