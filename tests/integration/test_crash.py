"""Crash safety: kill -9 a compute cell, the middle cell and the API cell while work flows.

api ── c1 ── g1      c1 has hosts and a child; g1 and c2 have hosts.
 └──── c2

A client keeps creating servers and acting on them while each cell in turn
is killed with SIGKILL and started again. Afterwards the API cell's index
must equal the union of the compute cells' own records: the same uuids,
states and versions; no server lost, none alive in two cells, none stale;
every build ACTIVE or ERROR with a fault.
"""

from __future__ import annotations

import asyncio
import random
import signal
import uuid as uuid_module
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import run
from tests.integration import trees
from tests.polling import until
from zcells.devtree import CellTree, running_tree
from zcells.errors import WireError

TREE = {"api": {"c1": {"g1": {}}, "c2": {}}}
COMPUTE = ("c1", "g1", "c2")
SETTLED = {"ACTIVE", "SHUTOFF", "ERROR", "DELETED"}


class Workload:
    """Creates servers and acts on them until told to stop, riding out every outage."""

    def __init__(self, tree: CellTree) -> None:
        self.tree = tree
        self.stop = asyncio.Event()
        self.created: list[str] = []  # every uuid the API cell answered with
        self.failures = 0
        self.refusals: dict[str, int] = {}  # error code of a refused action -> how many
        self.rng = random.Random(4)
        # A create the API cell may have done without the client hearing of it (the
        # cell died, or the answer was late) is sent again with the same request id,
        # as a real client does, so its answer is the first one and no server goes
        # unnoticed.
        self.unanswered: dict[str, Any] | None = None

    async def run(self) -> None:
        for _ in range(100_000):
            if self.stop.is_set():
                return
            try:
                async with self.tree.client("api", timeout_s=3) as client:
                    await self._burst(client)
            except (WireError, OSError):
                self.failures += 1
                await asyncio.sleep(0.1)

    async def _create(self, client: Any, body: dict[str, Any]) -> None:
        self.unanswered = body
        result = await client.call("server_create", body)
        self.unanswered = None  # answered: the request id's first result is final
        self.created += result.unwrap()["servers"]

    async def finish_unanswered(self) -> None:
        """Send the last unanswered create again until it is answered."""
        for _ in range(100):
            if self.unanswered is None:
                return
            try:
                async with self.tree.client("api", timeout_s=10) as client:
                    await self._create(client, self.unanswered)
            except (WireError, OSError):
                await asyncio.sleep(0.1)
        raise AssertionError(f"a create was never answered: {self.unanswered}")

    async def _burst(self, client: Any) -> None:
        for _ in range(1000):
            if self.stop.is_set():
                return
            body = self.unanswered or {
                "name": "crash",
                "flavor": "m1.tiny",
                "image": "cirros",
                "count": 3,
                "request_id": str(uuid_module.uuid4()),
            }
            await self._create(client, body)
            uuid = self.rng.choice(self.created)
            action = self.rng.choice(["stop", "start", "reboot", "delete", "stop", "start"])
            result = await client.call("server_action", {"uuid": uuid, "action": action})
            if not result.ok and result.error is not None:
                self.refusals[result.error.code] = self.refusals.get(result.error.code, 0) + 1
            await asyncio.sleep(0.02)


async def records(tree: CellTree, name: str) -> dict[str, dict[str, Any]]:
    """uuid -> server, as cell `name` holds them, deleted ones included."""
    async with tree.client(name, timeout_s=30) as client:
        return {row["uuid"]: row for row in await trees.every_server(client)}


async def agreement(tree: CellTree, created: list[str]) -> str | None:
    """Why the index and the cells disagree, or None when they agree."""
    top = await records(tree, "api")
    missing = set(created) - top.keys()
    if missing:
        return f"created but not in the index: {sorted(missing)[:5]}"
    unsettled = [u for u, r in top.items() if r["status"] not in SETTLED or r["task_state"]]
    if unsettled:
        return f"not settled at the top: {[top[u]['status'] for u in unsettled[:5]]}"
    alive: dict[str, list[str]] = {}
    held: dict[str, dict[str, Any]] = {}
    for name in COMPUTE:
        for uuid, row in (await records(tree, name)).items():
            if row["status"] != "DELETED":
                alive.setdefault(uuid, []).append(row["cell"])
            # an orphan's tombstone in a cell the index does not name is history, not a copy
            if top.get(uuid, {}).get("cell") == row["cell"]:
                held[uuid] = row
            elif row["status"] != "DELETED":
                return f"{uuid} alive in {row['cell']} but indexed under {top.get(uuid)}"
    twice = {u: cells for u, cells in alive.items() if len(cells) > 1}
    if twice:
        return f"alive in two cells: {twice}"
    for uuid, row in top.items():
        if row["cell"] is None:
            if row["status"] not in {"ERROR", "DELETED"}:
                return f"{uuid} has no cell and is {row['status']}"
            if row["status"] == "ERROR" and not row.get("fault"):
                return f"{uuid} is ERROR without a fault"
            continue
        own = held.get(uuid)
        if own is None:
            return f"{uuid} indexed under {row['cell']}, which does not hold it"
        fields = ("status", "vm_state", "task_state", "power_state", "host", "version")
        if any(own[f] != row[f] for f in fields):
            return f"{uuid} differs: top {row} cell {own}"
    return None


def grower(work: Workload, worker: asyncio.Task[None]) -> Callable[[int, str], Awaitable[None]]:
    """Wait until the workload has `by` more creates answered; fails if it died."""

    async def grown(by: int, what: str) -> None:
        wanted = len(work.created) + by

        async def enough() -> bool:
            assert not worker.done(), worker
            return len(work.created) >= wanted

        await until(enough, 90, what)

    return grown


async def agree(tree: CellTree, created: list[str]) -> None:
    """Wait until the index equals the cells' records; the reason, and the logs, if not."""
    last: list[str | None] = [None]

    async def agreed() -> bool:
        last[0] = await agreement(tree, created)
        return last[0] is None

    try:
        await until(agreed, 150, "the index to equal the cells' records")
    except AssertionError:
        raise AssertionError(f"{last[0]}\n{tree.logs()}") from None


@pytest.fixture
def tree(tmp_path: Path):  # type: ignore[no-untyped-def]
    with running_tree(
        TREE,
        tmp_path,
        log_level="info",
        compute={"fake_hosts": 4, "fake_build_seconds": 0.1},
        scheduler_retry_delay=0.3,
        call_timeout=3,
    ) as cells:
        yield cells


@pytest.mark.timeout(420)
def test_index_equals_the_cells_after_each_cell_is_killed(tree: CellTree) -> None:
    async def main() -> None:
        work = Workload(tree)
        worker = asyncio.create_task(work.run())
        grown = grower(work, worker)

        for victim in ("c2", "c1", "api"):
            await grown(15, f"creates before {victim} is killed")
            await asyncio.to_thread(tree.signal, victim, signal.SIGKILL)
            if victim != "api":  # the API cell takes creates while a cell below is down
                await grown(6, f"creates while {victim} is down")
            await asyncio.to_thread(tree.start, victim)
        await grown(15, "creates after every restart")
        work.stop.set()
        await asyncio.wait_for(worker, 30)
        await work.finish_unanswered()
        await agree(tree, work.created)
        top = await records(tree, "api")
        assert len(top) == len(set(work.created)) >= 60
        assert any(r["status"] == "ACTIVE" for r in top.values())
        # A refused action is a busy server, or a cell down or not answering in time.
        assert set(work.refusals) <= {"E_CONFLICT", "E_TIMEOUT", "E_UNREACHABLE"}, work.refusals
        assert work.failures >= 1  # the API cell's death was seen by the client

    run(main(), timeout_s=400)


async def live_copies(tree: CellTree) -> dict[str, list[str]]:
    """uuid -> the cells holding it alive."""
    alive: dict[str, list[str]] = {}
    for name in COMPUTE:
        for uuid, row in (await records(tree, name)).items():
            if row["status"] != "DELETED":
                alive.setdefault(uuid, []).append(row["cell"])
    return alive


@pytest.mark.timeout(420)
def test_one_copy_when_the_api_cell_dies_while_a_cell_is_cut_off(tree: CellTree) -> None:
    """Row 32: g1 frozen mid-build (its link silent), the API cell killed and restarted, g1 back.

    Every server ends in exactly one cell, the index agrees, and deletes
    remove every copy everywhere.
    """

    async def main() -> None:
        work = Workload(tree)
        worker = asyncio.create_task(work.run())
        grown = grower(work, worker)

        await grown(9, "creates before g1 is cut off")
        await asyncio.to_thread(tree.signal, "g1", signal.SIGSTOP)
        try:
            await grown(9, "creates while g1 is cut off")
            await asyncio.to_thread(tree.signal, "api", signal.SIGKILL)
            await asyncio.to_thread(tree.start, "api")
            await grown(6, "creates after the API cell restarted")
        finally:
            await asyncio.to_thread(tree.signal, "g1", signal.SIGCONT)
        await grown(6, "creates with g1 back")
        work.stop.set()
        await asyncio.wait_for(worker, 30)
        await work.finish_unanswered()
        await agree(tree, work.created)

        async with tree.client("api", timeout_s=30) as client:
            for uuid, row in (await records(tree, "api")).items():
                if row["status"] != "DELETED":
                    await client.call("server_action", {"uuid": uuid, "action": "delete"})

        async def all_gone() -> bool:
            return not await live_copies(tree)

        await until(all_gone, 120, "every copy deleted in every cell")

    run(main(), timeout_s=400)
