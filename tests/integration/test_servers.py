"""Servers across a tree of real `zcells serve` processes with fake hosts.

api ── c1 ── g1
 └──── c2

Builds go down, state comes up through the outboxes; the API cell's index
must end up equal to what the owning cells hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fakes import run
from tests.integration.trees import index_agrees_with_cells, servers
from tests.polling import until
from zcells.devtree import CellTree, running_tree
from zcells.errors import NotFoundRemote

TREE = {"api": {"c1": {"g1": {}}, "c2": {}}}
COMPUTE = {"c1": "api!c1", "g1": "api!c1!g1", "c2": "api!c2"}


@pytest.fixture
def tree(tmp_path: Path):  # type: ignore[no-untyped-def]
    with running_tree(
        TREE,
        tmp_path,
        log_level="info",
        compute={"fake_hosts": 4, "fake_build_seconds": 0.05},
        scheduler_retry_delay=0.2,
    ) as cells:
        yield cells
        assert "Traceback" not in cells.logs(), cells.logs()


def test_servers_build_act_and_agree_with_their_cells(tree: CellTree) -> None:
    async def main() -> None:
        async with tree.client(timeout_s=30) as client:
            created: list[str] = []
            for _ in range(4):
                answer = await client.call(
                    "server_create",
                    {"name": "web", "flavor": "m1.tiny", "image": "cirros", "count": 50},
                )
                created += answer.unwrap()["servers"]
            assert len(set(created)) == 200

            async def all_active() -> list[dict[str, Any]] | None:
                rows = await servers(client)
                done = [r for r in rows if r["status"] == "ACTIVE"]
                return rows if len(done) == 200 else None

            rows = await until(all_active, 90, "200 servers ACTIVE at the top")
            assert {r["uuid"] for r in rows} == set(created)
            assert all(r["cell"] in COMPUTE.values() and r["host"] for r in rows)

            sample = created[:8]
            for uuid, action in zip(sample, ["stop", "reboot", "stop", "delete"] * 2, strict=True):
                shown = await client.call("server_action", {"uuid": uuid, "action": action})
                assert shown.unwrap()["uuid"] == uuid
            await client.call("server_action", {"uuid": sample[0], "action": "start"})

            async def settled() -> bool:
                rows = {r["uuid"]: r for r in await servers(client, status=None)}
                deleted = await servers(client, status="DELETED")
                return (
                    rows[sample[0]]["status"] == "ACTIVE"
                    and rows[sample[1]]["status"] == "ACTIVE"
                    and rows[sample[2]]["status"] == "SHUTOFF"
                    and {r["uuid"] for r in deleted} == {sample[3], sample[7]}
                    and all(r["task_state"] is None for r in rows.values())
                )

            await until(settled, 60, "actions to finish and reach the top")

            index, _ = await until(
                lambda: index_agrees_with_cells(client, tree, COMPUTE),
                30,
                "the index to equal the cells' own records",
            )
            assert len(index) == 200

            with pytest.raises(NotFoundRemote):
                missing = {"uuid": "00000000-0000-4000-8000-000000000000"}
                (await client.call("server_show", missing)).unwrap()

    run(main(), timeout_s=240)
