"""`zcells image ...` and `zcells flavor delete` as a user runs them, against a real tree.

api ── c1

Every command is a real process talking to a cell over CURVE; what reaches
the compute cell is polled under a deadline, never slept for.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cli_helpers import Result, run_process
from zcells.devtree import CellTree, running_tree, wait_until

WAIT_S = 60  # a safety net for a loaded machine


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellTree]:
    with running_tree(
        {"api": {"c1": {}}}, tmp_path_factory.mktemp("images"), log_level="info"
    ) as cells:
        yield cells
        assert "Traceback" not in cells.logs(), cells.logs()


def zcells(tree: CellTree, *argv: str, cell: str = "api") -> Result:
    env = {**tree.client_env(cell), "TTY_COMPATIBLE": "0"}
    return run_process(*argv, env=env, timeout=60)


def ok_json(result: Result) -> Any:
    assert result.code == 0, result.err
    return result.json()


def one_line_error(result: Result, *needles: str) -> None:
    assert result.code != 0, result.out
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zcells: error: "), result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_image_create_list_show_set_and_delete(tree: CellTree) -> None:
    made = ok_json(
        zcells(
            tree,
            "image",
            "create",
            "cli-kvm",
            "--property",
            "hypervisor_type=kvm",
            "--property",
            "os_distro=cirros",
            "--json",
        )
    )
    assert made == {
        "name": "cli-kvm",
        "properties": {"hypervisor_type": "kvm", "os_distro": "cirros"},
    }
    listed = ok_json(zcells(tree, "image", "list", "--json"))
    assert made in listed and {"name": "cirros", "properties": {}} in listed
    table = zcells(tree, "image", "list")
    assert table.code == 0
    assert re.search(r"^cli-kvm\s+hypervisor_type=kvm, os_distro=cirros\s*$", table.out, re.M)
    assert re.search(r"^cirros\s+-\s*$", table.out, re.M)

    shown = zcells(tree, "image", "show", "cli-kvm")
    assert shown.code == 0 and "name: cli-kvm" in shown.out
    assert re.search(r"^hypervisor_type\s+kvm\s+yes\s*$", shown.out, re.M)  # the scheduler's
    assert re.search(r"^os_distro\s+cirros\s*$", shown.out, re.M)

    changed = ok_json(
        zcells(
            tree,
            "image",
            "set",
            "cli-kvm",
            "--property",
            "architecture=x86_64",
            "--unset",
            "os_distro",
            "--json",
        )
    )
    assert changed["properties"] == {"architecture": "x86_64", "hypervisor_type": "kvm"}
    assert ok_json(zcells(tree, "image", "show", "cli-kvm", "--json")) == changed

    deleted = zcells(tree, "image", "delete", "cli-kvm")
    assert deleted.code == 0 and "deleted image cli-kvm" in deleted.err
    one_line_error(zcells(tree, "image", "show", "cli-kvm"), "no image 'cli-kvm'")
    one_line_error(zcells(tree, "image", "delete", "cli-kvm"), "cli-kvm")


def test_bad_images_are_refused_in_one_line(tree: CellTree) -> None:
    one_line_error(zcells(tree, "image", "create", "cirros"), "cirros", "already exists")
    one_line_error(zcells(tree, "image", "create", "bad", "--property", "noequals"), "--property")
    one_line_error(
        zcells(tree, "image", "create", "bad", "--property", "hypervisor_version_requires=soon"),
        "hypervisor_version_requires",
    )
    one_line_error(zcells(tree, "image", "create", "bad!name"), "image name")
    assert "bad" not in {i["name"] for i in ok_json(zcells(tree, "image", "list", "--json"))}


def test_changes_reach_the_compute_cell_which_refuses_its_own(tree: CellTree) -> None:
    ok_json(zcells(tree, "image", "create", "cli-down", "--property", "architecture=arm", "--json"))
    args = ["flavor", "create", "cli.gone", "--ram", "256", "--disk", "1", "--vcpus", "1"]
    assert zcells(tree, *args).code == 0

    def at_c1(kind: str) -> set[str]:
        return {e["name"] for e in ok_json(zcells(tree, kind, "list", "--json", cell="c1"))}

    wait_until(lambda: "cli-down" in at_c1("image"), WAIT_S, "the image to reach c1", 0.2)
    wait_until(lambda: "cli.gone" in at_c1("flavor"), WAIT_S, "the flavor to reach c1", 0.2)
    shown = ok_json(zcells(tree, "image", "show", "cli-down", "--json", cell="c1"))
    assert shown == {"name": "cli-down", "properties": {"architecture": "arm"}}

    deleted = zcells(tree, "flavor", "delete", "cli.gone", "--json")
    assert ok_json(deleted) == {"name": "cli.gone", "memory_mb": 256, "disk_gb": 1, "vcpus": 1}
    wait_until(lambda: "cli.gone" not in at_c1("flavor"), WAIT_S, "the delete to reach c1", 0.2)
    one_line_error(zcells(tree, "flavor", "delete", "cli.gone"), "cli.gone")

    one_line_error(zcells(tree, "image", "create", "local", cell="c1"), "compute cell")
    one_line_error(zcells(tree, "flavor", "delete", "m1.tiny", cell="c1"), "compute cell")
    assert "local" not in at_c1("image")


def test_a_build_naming_a_missing_image_fails_clearly(tree: CellTree) -> None:
    args = ["server", "create", "web", "--flavor", "m1.tiny", "--image", "no-such-image"]
    one_line_error(zcells(tree, *args), "no image 'no-such-image'")
    listed = ok_json(zcells(tree, "server", "list", "--all-projects", "--json"))
    assert all(server["name"] != "web" for server in listed)
