"""The cell scheduler on a tree of real cells: proportion, filters, fail fast, explain.

api -> {c1, c2, c4, off}: c1 has one host, c2 two, c4 four, all alike, so
their room for m1.tiny is 1:2:4; c1's host alone has the disk for
`big.disk`; c2 alone offers the xen hypervisor; `off` runs with
`[cells] enable = False` and takes no builds. Every wait is a condition
polled under a deadline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from zcells.cli.schedule import candidates_of

from tests.cli_helpers import Result, run_process
from tests.fakes import run
from tests.integration.trees import answer, servers
from tests.polling import until
from zcells.devtree import CellTree

TREE = {"api": {"c1": {}, "c2": {}, "c4": {}, "off": {}}}
HOSTS = {"c1": 1, "c2": 2, "c4": 4, "off": 4}
BUILDS = 140
# Each child's share of BUILDS draws is within this many points of its share of the room
# (c4's share, 4/7, has a standard deviation of 4.2 points over 140 independent draws;
# taking each build off the parent's view only narrows it).
SHARE_BOUND = 0.14


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellTree]:
    cells = CellTree(
        TREE,
        tmp_path_factory.mktemp("scheduling"),
        log_level="info",
        compute={"fake_host_vcpus": 64, "fake_build_seconds": 0.01},
        cell_compute={
            name: {"fake_hosts": hosts, **({"fake_host_disk_gb": 2000} if name == "c1" else {})}
            for name, hosts in HOSTS.items()
        },
        cell_options={
            "c1": {"capabilities": "hypervisor=kvm"},
            "c2": {"capabilities": "hypervisor=xen"},
            "c4": {"capabilities": "hypervisor=kvm"},
            "off": {"capabilities": "hypervisor=kvm", "enable": "false"},
        },
        capability_interval=5,
    )
    try:
        cells.start()
        yield cells
    finally:
        cells.stop()


async def explained(tree: CellTree, flavor: str, **extra: Any) -> dict[str, Any]:
    async with tree.client(timeout_s=15) as ops:
        found: dict[str, Any] = await answer(ops, "schedule_explain", {"flavor": flavor, **extra})
        return found


def top_level(explanation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return candidates_of(explanation["levels"][0])


def wait_for_view(tree: CellTree, flavor: str, wanted: dict[str, str | None]) -> dict[str, Any]:
    """Wait until the top removes (or passes, None) each child as `wanted` says, for `flavor`."""
    last: dict[str, Any] = {}

    async def seen() -> bool:
        nonlocal last
        last = await explained(tree, flavor)
        verdicts = {n: c["removed_by"] for n, c in top_level(last).items()}
        known = all(
            c["removed_by"] is not None or c["raw"]["ram_by_instance_type"] > 0
            for n, c in top_level(last).items()
            if wanted.get(n, "") is None
        )
        return known and all(verdicts.get(n) == v for n, v in wanted.items())

    run(until(seen, 60, f"the top's view of {flavor} to be {wanted}"))
    return last


async def create(tree: CellTree, flavor: str, count: int, **extra: Any) -> list[str]:
    async with tree.client(timeout_s=30) as ops:
        body = {"name": f"s-{flavor}", "flavor": flavor, "image": "cirros", "count": count}
        made: list[str] = (await answer(ops, "server_create", {**body, **extra}))["servers"]
        return made


async def settled(tree: CellTree, uuids: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    async with tree.client(timeout_s=30) as ops:

        async def done() -> bool:
            nonlocal found
            rows = {r["uuid"]: r for r in await servers(ops) if r["uuid"] in uuids}
            found = rows
            return len(rows) == len(uuids) and all(
                r["status"] in ("ACTIVE", "ERROR") for r in rows.values()
            )

        await until(done, 120, f"{len(uuids)} servers ACTIVE or ERROR")
    return found


def zcells(tree: CellTree, *argv: str) -> Result:
    keys = tree.client_keys
    env = {
        "ZCELLS_ENDPOINT": tree.top.api_endpoint,
        "ZCELLS_SERVER_KEY": tree.top.keys.public,
        "ZCELLS_KEY": str(keys.secret_path),
    }
    return run_process(*argv, env=env, timeout=60)


def flavor(tree: CellTree, name: str, ram: int, disk: int, vcpus: int) -> None:
    async def made() -> None:
        async with tree.client(timeout_s=15) as ops:
            body = {"name": name, "ram": ram, "disk": disk, "vcpus": vcpus}
            await answer(ops, "flavor_create", body)

    run(made())


def test_children_of_room_1_2_4_take_builds_in_about_that_proportion(tree: CellTree) -> None:
    view = wait_for_view(tree, "m1.tiny", {"c1": None, "c2": None, "c4": None, "off": "disabled"})
    rooms = {n: c["raw"]["ram_by_instance_type"] for n, c in top_level(view).items() if n != "off"}
    assert rooms["c2"] == 2 * rooms["c1"] and rooms["c4"] == 4 * rooms["c1"]
    made = run(create(tree, "m1.tiny", BUILDS))
    rows = run(settled(tree, made))
    assert all(r["status"] == "ACTIVE" for r in rows.values())
    per_cell = Counter(r["cell"] for r in rows.values())
    assert "api!off" not in per_cell  # enable = False: no new builds
    for name, share in (("c1", 1 / 7), ("c2", 2 / 7), ("c4", 4 / 7)):
        got = per_cell[f"api!{name}"] / BUILDS
        assert abs(got - share) <= SHARE_BOUND, (name, dict(per_cell))


def test_a_flavor_that_fits_one_cell_lands_only_there_and_explain_says_why(
    tree: CellTree,
) -> None:
    flavor(tree, "big.disk", 512, 1500, 1)  # 1,500 GB: only c1's host has the disk
    wait_for_view(tree, "big.disk", {"c1": None, "c2": "capacity", "c4": "capacity"})
    shown = zcells(tree, "schedule", "explain", "--flavor", "big.disk")
    assert shown.code == 0, shown.err
    text = shown.out
    assert "at api:" in text and "at api!c1:" in text
    assert text.count("removed by capacity: no room for big.disk") == 2  # c2 and c4
    assert "removed by disabled: disabled: takes no new builds" in text  # off
    assert "order: c1\n" in text
    assert "order: this cell's hosts" in text  # c1 places it on its own host
    rows = run(settled(tree, run(create(tree, "big.disk", 1))))
    assert [(r["status"], r["cell"]) for r in rows.values()] == [("ACTIVE", "api!c1")]


def test_a_build_that_fits_nowhere_fails_at_once_without_asking_any_cell(tree: CellTree) -> None:
    flavor(tree, "too.big", 4 * 65536, 10, 1)  # more RAM than any host has
    wait_for_view(
        tree, "too.big", {"c1": "capacity", "c2": "capacity", "c4": "capacity", "off": "disabled"}
    )
    [uuid] = run(create(tree, "too.big", 1))
    rows = run(settled(tree, [uuid]))
    fault = rows[uuid]["fault"]
    assert rows[uuid]["status"] == "ERROR"
    assert fault["code"] == "E_NO_VALID_HOST"
    assert "at api the filters removed" in fault["message"]
    assert "attempt" not in fault["message"]  # no cell was asked: no try to report
    for name in ("c1", "c2", "c4"):
        assert f"{name}: capacity (no room for too.big" in fault["message"]
        assert uuid not in tree.cells[name].log_text()  # never reached a child


def test_an_image_matched_by_one_cell_s_capabilities_lands_there(tree: CellTree) -> None:
    async def image() -> None:
        async with tree.client(timeout_s=15) as ops:
            body = {"name": "xen-only", "properties": {"hypervisor_type": "xen"}}
            await answer(ops, "image_create", body)

    run(image())
    view = wait_for_view(tree, "m1.tiny", {"c2": None})
    assert view  # the children are announced
    weighed = run(explained(tree, "m1.tiny", image="xen-only"))
    verdicts = {n: c["removed_by"] for n, c in top_level(weighed).items()}
    assert verdicts == {
        "c1": "image_properties",
        "c2": None,
        "c4": "image_properties",
        "off": "disabled",
    }
    made = run(create(tree, "m1.tiny", 5, image="xen-only"))
    rows = run(settled(tree, made))
    assert {(r["status"], r["cell"]) for r in rows.values()} == {("ACTIVE", "api!c2")}
