"""Flavors and images flow down a tree of real `zcells serve` processes.

api ── c1 ── g1
 └──── c2

What the API cell creates, changes and deletes shows in every cell's
`flavor_list` and `image_list`; a cell frozen meanwhile (SIGSTOP), and one
stopped and started again, catch up when they return. Every wait is a
condition polled under a deadline.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import run
from tests.integration.trees import answer, refused
from tests.polling import until
from zcells.devtree import CellTree, running_tree
from zcells.errors import Forbidden, InvalidRequest, NotFoundRemote

TREE = {"api": {"c1": {"g1": {}}, "c2": {}}}
BELOW = ("c1", "g1", "c2")
WAIT_S = 90  # a safety net for a loaded machine, never an expectation

Catalog = tuple[list[dict[str, Any]], list[dict[str, Any]]]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[CellTree]:
    with running_tree(
        TREE, tmp_path, log_level="info", clients={"alice": ("member", "proj-a")}
    ) as cells:
        yield cells
        assert "Traceback" not in cells.logs(), cells.logs()


async def catalog_of(tree: CellTree, cell: str | None = None) -> Catalog:
    """The flavors and images cell `cell` (default: the top) lists, as it lists them."""
    async with tree.client(cell, timeout_s=5) as client:
        flavors = (await answer(client, "flavor_list"))["flavors"]
        images = (await answer(client, "image_list"))["images"]
    return flavors, images


async def every_cell_shows(tree: CellTree, cells: Iterable[str] = BELOW) -> Catalog:
    """Wait until each of `cells` lists what the top does; the top's catalog."""
    top = await catalog_of(tree)
    for cell in cells:

        async def same(cell: str = cell) -> bool:
            return await catalog_of(tree, cell) == top

        await until(same, WAIT_S, f"{cell} to list the top's flavors and images", 0.2)
    return top


def names(entries: list[dict[str, Any]]) -> list[str]:
    return sorted(entry["name"] for entry in entries)


def test_flavors_and_images_reach_every_cell_and_a_frozen_or_restarted_one_catches_up(
    tree: CellTree,
) -> None:
    async def main() -> None:
        flavors, images = await every_cell_shows(tree)  # the seeded ones, to start with
        assert "m1.tiny" in names(flavors) and names(images) == ["cirros"]

        async with tree.client() as ops:
            await answer(
                ops, "flavor_create", {"name": "gd.one", "ram": 1024, "disk": 5, "vcpus": 2}
            )
            await answer(
                ops, "image_create", {"name": "gd-kvm", "properties": {"hypervisor_type": "kvm"}}
            )
            await answer(
                ops, "image_set", {"name": "gd-kvm", "properties": {"architecture": "x86_64"}}
            )
            await answer(ops, "flavor_delete", {"name": "m1.xlarge"})
        flavors, images = await every_cell_shows(tree)
        assert "gd.one" in names(flavors) and "m1.xlarge" not in names(flavors)
        kvm = {"architecture": "x86_64", "hypervisor_type": "kvm"}
        assert {"name": "gd-kvm", "properties": kvm} in images

        # c1 frozen: c2 still hears of every change; c1 and g1 catch up once c1 thaws
        tree.signal("c1", signal.SIGSTOP)
        try:
            async with tree.client() as ops:
                await answer(ops, "image_create", {"name": "gd-frozen"})
                await answer(ops, "image_delete", {"name": "gd-kvm"})
                await answer(ops, "flavor_delete", {"name": "gd.one"})
            await every_cell_shows(tree, ["c2"])
        finally:
            tree.signal("c1", signal.SIGCONT)
        flavors, images = await every_cell_shows(tree)
        assert names(images) == ["cirros", "gd-frozen"] and "gd.one" not in names(flavors)

        # g1 stopped: the changes made while it is down reach it when it is back
        tree.signal("g1", signal.SIGTERM)
        async with tree.client() as ops:
            await answer(
                ops, "flavor_create", {"name": "gd.two", "ram": 512, "disk": 1, "vcpus": 1}
            )
            await answer(ops, "image_delete", {"name": "gd-frozen"})
        await every_cell_shows(tree, ["c1", "c2"])
        tree.start("g1")
        flavors, images = await every_cell_shows(tree)
        assert "gd.two" in names(flavors) and names(images) == ["cirros"]

    run(main(), timeout_s=600)


def test_only_an_admin_at_the_api_cell_changes_them(tree: CellTree) -> None:
    async def main() -> None:
        async with tree.client("c1") as ops_at_c1:
            error = await refused(ops_at_c1, "image_create", {"name": "local"})
            assert isinstance(error, InvalidRequest) and "compute cell" in error.message
            error = await refused(ops_at_c1, "flavor_delete", {"name": "m1.tiny"})
            assert isinstance(error, InvalidRequest)
        async with tree.client(as_client="alice") as alice:
            assert names((await answer(alice, "image_list"))["images"]) == ["cirros"]
            assert (await answer(alice, "image_show", {"name": "cirros"}))["properties"] == {}
            for method, body in [
                ("image_create", {"name": "mine"}),
                ("image_delete", {"name": "cirros"}),
                ("flavor_delete", {"name": "m1.tiny"}),
            ]:
                assert isinstance(await refused(alice, method, body), Forbidden)
            build = {"name": "web", "flavor": "m1.tiny", "image": "no-such-image"}
            error = await refused(alice, "server_create", build)
            assert isinstance(error, NotFoundRemote) and "no-such-image" in error.message
        async with tree.client() as ops:
            assert isinstance(await refused(ops, "image_show", {"name": "nope"}), NotFoundRemote)
        await every_cell_shows(tree)  # nothing that was refused reached anyone
        assert names((await catalog_of(tree, "g1"))[1]) == ["cirros"]

    run(main(), timeout_s=300)
