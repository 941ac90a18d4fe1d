"""Changes of topology on a running tree of real cells (SECURITY.md §5 row 31).

api -> {c1 -> g1, c2}. The registry is edited as an operator would, in each
cell's own SQLite database, and the cells are told with SIGHUP.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from zcells.db import registry
from zcells.db.engine import Database

from tests.fakes import run
from tests.integration.trees import answer, servers
from tests.polling import until
from zcells.devtree import CellProc, CellTree, running_tree

TREE = {"api": {"c1": {"g1": {}}, "c2": {}}}


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[CellTree]:
    with running_tree(TREE, tmp_path, log_level="info") as cells:
        yield cells


def database(cell: CellProc) -> Database:
    return Database(f"sqlite:///{cell.directory / 'state' / cell.name}.db")


def register(tree: CellTree, at: str, neighbour: str, kind: str) -> None:
    """Add `neighbour` to the cells table of `at`, as an operator would."""
    other = tree.cells[neighbour]
    with database(tree.cells[at]) as db:
        registry.add_cell(
            db, neighbour, kind=kind, endpoint=other.cells_endpoint, public_key=other.keys.public
        )


def reload(tree: CellTree, *names: str) -> None:
    for name in names:
        tree.signal(name, signal.SIGHUP)


async def pinged(tree: CellTree) -> list[str]:
    async with tree.client(timeout_s=15) as ops:
        return sorted(row.cell for row in await ops.ping_all(timeout_s=10) if row.ok)


async def status_problems(tree: CellTree) -> dict[str, list[str]]:
    async with tree.client(timeout_s=15) as ops:
        results, _ = await ops.broadcast("status", timeout_s=10)
    return {
        r.cell: list(r.value.get("problems", []))
        for r in results
        if isinstance(r.value, dict) and r.value.get("problems")
    }


def test_a_subtree_moves_to_a_new_parent_online(tree: CellTree) -> None:
    cells = tree.cells

    async def built() -> list[str]:
        async with tree.client(timeout_s=30) as ops:
            body = {"name": "g", "flavor": "m1.tiny", "image": "cirros", "count": 4}
            body["hints"] = {"target_cell": "api!c1!g1"}
            made: list[str] = (await answer(ops, "server_create", body))["servers"]

            async def active() -> bool:
                rows = await servers(ops)
                return {r["uuid"] for r in rows if r["status"] == "ACTIVE"} >= set(made)

            await until(active, 60, "the servers ACTIVE in g1")
            return made

    made = run(built(), timeout_s=90)

    # Move g1 from c1 to c2: each side's cells table, then SIGHUP.
    with database(cells["g1"]) as db:
        registry.remove_cell(db, "c1")
    register(tree, "g1", "c2", "parent")
    register(tree, "c2", "g1", "child")
    with database(cells["c1"]) as db:
        registry.remove_cell(db, "g1")
    reload(tree, "g1", "c2", "c1")

    async def moved() -> Any:
        async with tree.client(timeout_s=30) as ops:
            rows = {r["uuid"]: r for r in await servers(ops)}
        return all(rows[uuid]["cell"] == "api!c2!g1" for uuid in made) and rows

    run(until(moved, 60, "the index to follow g1 to api!c2!g1"), timeout_s=90)
    assert run(until(lambda: _has(tree, "api!c2!g1"), 60, "g1 answering under c2"), 90)

    async def act() -> None:
        async with tree.client(timeout_s=30) as ops:
            await answer(ops, "server_action", {"uuid": made[0], "action": "stop"})

            async def stopped() -> bool:
                shown = await answer(ops, "server_show", {"uuid": made[0]})
                return bool(shown["status"] == "SHUTOFF" and shown["cell"] == "api!c2!g1")

            await until(stopped, 60, "a stop to reach g1 at its new place")

    run(act(), timeout_s=90)
    assert run(pinged(tree)) == ["api", "api!c1", "api!c2", "api!c2!g1"]


async def _has(tree: CellTree, cell: str) -> bool:
    return cell in await pinged(tree)


def test_a_registry_cycle_is_refused_and_shown(tree: CellTree) -> None:
    """api -> c1 -> g1 -> api: the hello that would close the loop is refused; paths stay put."""
    cells = tree.cells
    register(tree, "api", "g1", "parent")
    register(tree, "g1", "api", "child")
    reload(tree, "api", "g1")

    async def shown() -> Any:
        problems = await status_problems(tree)
        return any("cycle" in p for p in problems.get("api", [])) and problems

    problems = run(until(shown, 60, "the cycle shown by status"), timeout_s=90)
    assert [p for p in problems["api"] if "cycle" in p]
    assert run(pinged(tree)) == ["api", "api!c1", "api!c1!g1", "api!c2"]
    log = cells["api"].log_text()
    assert log.count("hello.refused") == 1  # once, however often g1 says hello
