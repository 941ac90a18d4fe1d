"""`zcells status` against a live tree: every cell healthy, then one killed, one frozen.

One tree per module (api → {c1 → {g1}, c2}); a test that breaks a cell
brings it back before it ends, and every test waits for the state it needs
under a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console
from zcells.cli.connect import Target
from zcells.cli.status import gather, watch
from zcells.cli.status_view import HEALTHY, UNREACHABLE, Snapshot

from tests.cli_helpers import ZCELLS, run_process
from tests.integration.trees import answer, servers
from tests.polling import until
from zcells.devtree import CellTree, running_tree

CELLS = ["api", "api!c1", "api!c1!g1", "api!c2"]
RAM_MB, DISK_GB, VCPUS = 4096, 100, 8


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellTree]:
    with running_tree(
        {"api": {"c1": {"g1": {}}, "c2": {}}},
        tmp_path_factory.mktemp("status"),
        log_level="info",
        mute_child_interval=2,
        compute={
            "fake_hosts": 2,
            "fake_host_ram_mb": RAM_MB,
            "fake_host_disk_gb": DISK_GB,
            "fake_host_vcpus": VCPUS,
        },
    ) as cells:
        yield cells


def target(tree: CellTree) -> Target:
    api, keys = tree.cells["api"], tree.client_keys
    return Target(api.api_endpoint, api.keys.public, keys.public, keys.secret)


def states(snapshot: Snapshot) -> dict[str, str]:
    return {cell.cell: cell.state for cell in snapshot.cells}


async def settled(tree: CellTree, timeout_s: float = 30.0) -> Snapshot:
    """A snapshot with every cell healthy and nothing waiting to go up."""
    async with tree.client(timeout_s=5) as client:

        async def check() -> Snapshot | None:
            snapshot = await gather(client, 3.0)
            calm = all(
                cell.state == HEALTHY and cell.backlog is not None and cell.backlog["count"] == 0
                for cell in snapshot.cells
            )
            return snapshot if calm and [c.cell for c in snapshot.cells] == CELLS else None

        found: Snapshot = await until(check, timeout_s, "every cell healthy, no backlog")
        return found


def test_every_cell_is_healthy_with_its_hosts_and_servers(tree: CellTree) -> None:
    async def make_servers() -> int:
        async with tree.client(timeout_s=30) as client:
            flavors = (await answer(client, "flavor_list"))["flavors"]
            tiny = next(f for f in flavors if f["name"] == "m1.tiny")
            made = await answer(
                client,
                "server_create",
                {"name": "web", "flavor": "m1.tiny", "image": "cirros", "count": 3},
            )
            assert len(made["servers"]) == 3

            async def all_active() -> bool:
                return [s["status"] for s in await servers(client)].count("ACTIVE") >= 3

            await until(all_active, 60, "three servers ACTIVE")
            return int(tiny["memory_mb"])

    tiny_mb = asyncio.run(make_servers())
    asyncio.run(settled(tree))

    result = run_process("status", "--json", env=tree.client_env())

    assert result.code == 0, result.err
    snapshot = json.loads(result.out)
    assert snapshot["connected"] == "api" and snapshot["error"] is None
    cells = {c["cell"]: c for c in snapshot["cells"]}
    assert list(cells) == CELLS
    assert {name: c["state"] for name, c in cells.items()} == dict.fromkeys(CELLS, HEALTHY)
    top = cells["api"]
    assert top["cell_type"] == "api" and top["hosts"]["total"] == 0
    assert top["servers"]["source"] == "index"
    assert top["servers"]["counts"]["ACTIVE"] >= 3
    assert top["backlog"] == {"count": 0, "oldest_s": None}
    computes = [cells[name] for name in CELLS[1:]]
    for cell in computes:
        assert cell["cell_type"] == "compute" and cell["servers"]["source"] == "own"
        hosts = cell["hosts"]
        assert (hosts["up"], hosts["total"]) == (2, 2)
        assert (hosts["memory_mb"], hosts["disk_gb"], hosts["vcpus"]) == (
            2 * RAM_MB,
            2 * DISK_GB,
            2 * VCPUS,
        )
        assert cell["msgs_per_s"] > 0  # heartbeats at least
        assert cell["link"] == "alive" and 0 <= cell["heard_s_ago"] < 2
    held = sum(cell["servers"]["counts"]["ACTIVE"] for cell in computes)
    assert held == top["servers"]["counts"]["ACTIVE"]
    used = sum(c["hosts"]["memory_mb"] - c["hosts"]["memory_mb_free"] for c in computes)
    assert used == held * tiny_mb


def test_the_plain_view_names_every_cell(tree: CellTree) -> None:
    asyncio.run(settled(tree))
    result = run_process("status", env=tree.client_env())
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("zcells status  api  4 cells: 4 healthy")
    for name in ("api", "c1", "g1", "c2"):
        assert any(f" {name}  " in f" {line}" and "healthy" in line for line in lines), name
    assert result.out.count("hosts 2/2") == 3 and "servers (index)" in result.out


def test_watch_redraws_and_ends_cleanly(tree: CellTree) -> None:
    """The function `zcells dev` runs, until its stop event; then the command until Ctrl-C."""
    asyncio.run(settled(tree))
    console = Console(record=True, width=200)

    async def watch_for_a_while() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(2.0, stop.set)
        await watch(target(tree), 1.5, stop, console=console)

    asyncio.run(watch_for_a_while())  # returns once stopped: a refresh never stalls it
    text = console.export_text()
    assert "4 cells: 4 healthy" in text and "g1  compute  healthy" in text

    proc = subprocess.Popen(
        [*ZCELLS, "status", "--watch", "--json"],
        env={**os.environ, **tree.client_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]  # one a second
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    for line in lines:
        snapshot = json.loads(line)
        assert [c["cell"] for c in snapshot["cells"]] == CELLS
    assert all(json.loads(line)["connected"] == "api" for line in out.splitlines())


def test_a_killed_cell_is_unreachable_and_a_frozen_one_never_stalls_the_view(
    tree: CellTree,
) -> None:
    asyncio.run(settled(tree))
    tree.signal("c2", signal.SIGKILL)
    try:

        async def c2_mute() -> Snapshot | None:
            async with tree.client(timeout_s=5) as client:
                snapshot = await gather(client, 2.0)
            c2 = next(c for c in snapshot.cells if c.cell == "api!c2")
            return snapshot if c2.state == UNREACHABLE and c2.link == "mute" else None

        snapshot = asyncio.run(until(c2_mute, 20, "api to see c2 mute"))
        assert states(snapshot) == {**dict.fromkeys(CELLS, HEALTHY), "api!c2": UNREACHABLE}

        result = run_process("status", "--json", "--timeout", "3", env=tree.client_env())
        assert result.code == 1, result.err
        cells = {c["cell"]: c for c in json.loads(result.out)["cells"]}
        assert cells["api!c2"]["state"] == UNREACHABLE and cells["api!c2"]["error"]
        assert cells["api!c2"]["heard_s_ago"] >= 2 and cells["api!c2"]["hosts"] is None
        assert cells["api!c1!g1"]["state"] == HEALTHY

        text = run_process("status", "--timeout", "3", env=tree.client_env())
        assert text.code == 1
        for name in ("api", "c1", "g1", "c2"):
            assert f" {name}  " in text.out or f"\n{name}  " in text.out, name
        assert "c2  unreachable (its parent sees it mute)" in text.out
        assert "4 cells: 3 healthy, 1 unreachable" in text.out

        # A frozen cell answers nothing: its parent reports it within the budget.
        tree.signal("g1", signal.SIGSTOP)
        try:
            frozen = run_process("status", "--json", "--timeout", "2", env=tree.client_env())
        finally:
            tree.signal("g1", signal.SIGCONT)
        assert frozen.code == 1
        seen: dict[str, Any] = {c["cell"]: c["state"] for c in json.loads(frozen.out)["cells"]}
        assert seen == {
            "api": HEALTHY,
            "api!c1": HEALTHY,
            "api!c1!g1": UNREACHABLE,
            "api!c2": UNREACHABLE,
        }
    finally:
        tree.start("c2")
    asyncio.run(settled(tree))
