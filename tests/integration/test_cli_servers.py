"""`zcells server|flavor|host` and `zcells cell sync` as a user runs them, against a real tree.

api ── c1
 └──── c2

Every command is a real process talking to the API cell (or, once, to a
compute cell) over CURVE; `--wait` does the waiting, so no test sleeps.
"""

from __future__ import annotations

import re
import uuid as uuid_module
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cli_helpers import Result, run_process
from zcells.devtree import CellTree, running_tree

UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
COMPUTE = {"api!c1", "api!c2"}
HOSTS = {"h001", "h002"}  # two fake hosts in each compute cell


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellTree]:
    with running_tree(
        {"api": {"c1": {}, "c2": {}}},
        tmp_path_factory.mktemp("servers"),
        log_level="info",
        compute={"fake_hosts": 2, "fake_build_seconds": 0.05},
        scheduler_retry_delay=0.05,
    ) as cells:
        yield cells
        assert "Traceback" not in cells.logs(), cells.logs()


def env(tree: CellTree, cell: str = "api", **extra: str) -> dict[str, str]:
    """Connection settings for `cell`'s api endpoint; output as if piped unless told."""
    return {**tree.client_env(cell), "TTY_COMPATIBLE": "0", **extra}


def zcells(tree: CellTree, *argv: str, cell: str = "api", **extra: str) -> Result:
    return run_process(*argv, env=env(tree, cell, **extra), timeout=60)


def ok_json(result: Result) -> Any:
    assert result.code == 0, result.err
    return result.json()


def one_line_error(result: Result, *needles: str) -> str:
    """The command failed with exactly one line on stderr, holding every needle."""
    assert result.code != 0, result.out
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("zcells: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def create(tree: CellTree, name: str, count: int, *more: str) -> list[dict[str, Any]]:
    args = ["server", "create", name, "--flavor", "m1.tiny", "--image", "cirros"]
    views = ok_json(zcells(tree, *args, "--count", str(count), "--wait", "--json", *more))
    assert isinstance(views, list) and len(views) == count
    return views


def test_flavor_create_and_list(tree: CellTree) -> None:
    made = ok_json(
        zcells(
            tree,
            "flavor",
            "create",
            "cli.small",
            "--ram",
            "512",
            "--disk",
            "2",
            "--vcpus",
            "1",
            "--json",
        )
    )
    assert made == {"name": "cli.small", "memory_mb": 512, "disk_gb": 2, "vcpus": 1}
    flavors = ok_json(zcells(tree, "flavor", "list", "--json"))
    assert made in flavors and "m1.tiny" in {f["name"] for f in flavors}
    table = zcells(tree, "flavor", "list")
    assert table.code == 0 and re.search(r"^cli\.small\s+512\s+2\s+1\s*$", table.out, re.M)
    again = zcells(
        tree, "flavor", "create", "cli.small", "--ram", "1", "--disk", "1", "--vcpus", "1"
    )
    one_line_error(again, "cli.small")


def test_create_wait_show_and_every_action(tree: CellTree) -> None:
    views = create(tree, "web", 3, "--meta", "team=blue")
    assert [v["name"] for v in views] == ["web-1", "web-2", "web-3"]
    for view in views:
        assert view["status"] == "ACTIVE" and view["task_state"] is None
        assert view["cell"] in COMPUTE and view["host"] in HOSTS
        assert view["metadata"] == {"team": "blue"}
    uuid = views[0]["uuid"]

    shown = ok_json(zcells(tree, "server", "show", uuid, "--json"))
    assert shown["uuid"] == uuid and shown["status"] == "ACTIVE" and "fault" not in shown
    table = zcells(tree, "server", "show", uuid)
    assert table.code == 0
    assert re.search(rf"^cell\s+{re.escape(views[0]['cell'])}\s*$", table.out, re.M)
    assert re.search(r"^metadata\s+team=blue\s*$", table.out, re.M)

    stopped = ok_json(zcells(tree, "server", "stop", uuid, "--wait", "--json"))
    assert (stopped["status"], stopped["power_state"]) == ("SHUTOFF", "shutdown")
    assert stopped["task_state"] is None and stopped["version"] > shown["version"]
    started = zcells(tree, "server", "start", uuid, "--wait")
    assert started.code == 0 and started.out == f"{uuid}: ACTIVE\n", started.err
    rebooted = ok_json(zcells(tree, "server", "reboot", uuid, "--wait", "--json"))
    assert rebooted["status"] == "ACTIVE" and rebooted["task_state"] is None
    assert rebooted["version"] > stopped["version"] + 1  # start and reboot each moved it on

    asked = zcells(tree, "server", "delete", views[1]["uuid"])
    assert asked.code == 0 and f"{views[1]['uuid']}: delete accepted" in asked.out
    deleted = ok_json(zcells(tree, "server", "delete", uuid, "--wait", "--json"))
    assert deleted["status"] == "DELETED" and deleted["task_state"] is None
    assert ok_json(zcells(tree, "server", "show", uuid, "--json"))["status"] == "DELETED"
    listed = {v["uuid"] for v in ok_json(zcells(tree, "server", "list", "--name", "web", "--json"))}
    assert uuid not in listed and views[2]["uuid"] in listed


def test_list_filters_and_pages(tree: CellTree) -> None:
    args = ["server", "create", "pager", "--flavor", "m1.tiny", "--image", "cirros"]
    # Nine: more than the CLI polls one by one, so --wait follows them through listings.
    piped = zcells(tree, *args, "--count", "9", "--wait")
    assert piped.code == 0, piped.err
    lines = piped.out.splitlines()
    assert len(lines) == 9
    for line in lines:  # one plain line per server as it settles
        uuid, name, status, cell, host = line.split()
        assert UUID.fullmatch(uuid) and name.startswith("pager-") and status == "ACTIVE"
        assert cell in COMPUTE and host in HOSTS

    everything = ok_json(zcells(tree, "server", "list", "--name", "PAGER", "--json"))
    assert sorted(v["name"] for v in everything) == sorted(f"pager-{i}" for i in range(1, 10))
    in_order = [v["uuid"] for v in everything]
    assert set(in_order) == {line.split()[0] for line in lines}

    by_cell: set[str] = set()
    for cell in sorted(COMPUTE):
        rows = ok_json(
            zcells(
                tree,
                "server",
                "list",
                "--name",
                "pager",
                "--cell",
                cell,
                "--status",
                "active",
                "--json",
            )
        )
        assert all(r["cell"] == cell and r["status"] == "ACTIVE" for r in rows)
        by_cell |= {r["uuid"] for r in rows}
    assert by_cell == set(in_order)
    assert (
        ok_json(zcells(tree, "server", "list", "--name", "pager", "--status", "SHUTOFF", "--json"))
        == []
    )

    seen: list[str] = []
    sizes: list[int] = []
    marker: list[str] = []
    for _ in range(5):  # 9 servers, 4 a page: three pages, the last without a marker
        page = zcells(tree, "server", "list", "--name", "pager", "--limit", "4", *marker)
        assert page.code == 0, page.err
        rows = [line.split() for line in page.out.splitlines()[1:]]
        assert rows and all(row[2] == "ACTIVE" for row in rows)
        seen += [row[0] for row in rows]
        sizes.append(len(rows))
        found = re.fullmatch(r"more servers follow: --marker (\S+)\n", page.err)
        if found is None:
            assert page.err == ""
            break
        assert found.group(1) == rows[-1][0]
        marker = ["--marker", found.group(1)]
    assert seen == in_order and sizes == [4, 4, 1]
    json_page = ok_json(
        zcells(
            tree,
            "server",
            "list",
            "--name",
            "pager",
            "--limit",
            "2",
            "--marker",
            in_order[1],
            "--json",
        )
    )
    assert [v["uuid"] for v in json_page] == in_order[2:4]


def test_user_errors_are_one_line(tree: CellTree) -> None:
    args = ["server", "create", "bad", "--image", "cirros"]
    one_line_error(zcells(tree, *args, "--flavor", "no.such.flavor"), "no flavor 'no.such.flavor'")
    missing = str(uuid_module.uuid4())
    one_line_error(zcells(tree, "server", "show", missing), f"no server {missing}")
    one_line_error(zcells(tree, "server", "stop", missing, "--wait"), f"no server {missing}")
    hint = zcells(tree, *args, "--flavor", "m1.tiny", "--hint", "target_cell")
    assert hint.code == 2
    one_line_error(hint, "--hint", "'target_cell'", "KEY=VALUE")
    meta = zcells(tree, *args, "--flavor", "m1.tiny", "--meta", "=x")
    assert meta.code == 2
    one_line_error(meta, "--meta")
    one_line_error(zcells(tree, "server", "show", "not-a-uuid"), "server uuid", "not-a-uuid")
    one_line_error(zcells(tree, "server", "list", "--limit", "0"), "--limit")
    one_line_error(zcells(tree, "server", "list", "--status", "SLEEPING"), "SLEEPING")
    # Nothing was created by any of them.
    assert ok_json(zcells(tree, "server", "list", "--name", "bad", "--json")) == []


def test_wait_gives_up_with_one_line_and_error_builds_fail(tree: CellTree) -> None:
    args = ["server", "create", "slow", "--flavor", "m1.tiny", "--image", "cirros"]
    gave_up = zcells(tree, *args, "--wait", "--wait-timeout", "0.001")
    one_line_error(gave_up, "gave up waiting after 0.001s", "1 of 1 server(s)")
    assert gave_up.code == 1

    made = zcells(
        tree, "flavor", "create", "cli.huge", "--ram", "10000000", "--disk", "1", "--vcpus", "1"
    )
    assert made.code == 0, made.err
    big = ["server", "create", "huge", "--flavor", "cli.huge", "--image", "cirros", "--wait"]
    failed = zcells(tree, *big, "--json")
    assert failed.code == 1
    (view,) = failed.json()
    assert view["status"] == "ERROR" and view["fault"]["code"] == "E_NO_VALID_HOST"
    error = one_line_error(failed, view["uuid"], "is in ERROR", "E_NO_VALID_HOST")
    assert view["fault"]["message"] in error


def test_host_list(tree: CellTree) -> None:
    answer = ok_json(zcells(tree, "host", "list", "--json"))
    assert answer["errors"] == []
    pairs = [(h["cell"], h["name"]) for h in answer["hosts"]]
    assert pairs == [(c, h) for c in sorted(COMPUTE) for h in sorted(HOSTS)]
    for host in answer["hosts"]:
        assert host["enabled"] is True and 0 <= host["memory_mb_used"] <= host["memory_mb"]
    table = zcells(tree, "host", "list")
    assert table.code == 0 and table.err == ""
    rows = [line.split() for line in table.out.splitlines()]
    assert rows[0] == ["CELL", "HOST", "ENABLED", "RAM", "MB", "DISK", "GB", "VCPUS"]
    # Used amounts may move between the two calls (a build or delete finishing): check
    # the totals exactly and that each used amount fits in its host.
    assert len(rows) == 1 + len(answer["hosts"])
    for row, host in zip(rows[1:], answer["hosts"], strict=True):
        assert row[:3] == [host["cell"], host["name"], "yes"]
        for shown, total in zip(row[3:], ("memory_mb", "disk_gb", "vcpus"), strict=True):
            used, _, size = shown.partition("/")
            assert size == str(host[total]) and 0 <= int(used) <= host[total]
    only = ok_json(zcells(tree, "host", "list", "--cell", "api!c2", "--json"))
    assert [(h["cell"], h["name"]) for h in only["hosts"]] == [("api!c2", h) for h in sorted(HOSTS)]


def test_cell_sync(tree: CellTree) -> None:
    answer = ok_json(zcells(tree, "cell", "sync", "api!c1", "--json"))
    assert answer["cell"] == "api!c1"
    assert list(answer["cells"]) == ["api!c1"] and isinstance(answer["cells"]["api!c1"], int)
    assert answer["errors"] == {}
    text = zcells(tree, "cell", "sync", "api!c2")
    assert text.code == 0, text.err
    assert re.fullmatch(r"api!c2: requeued \d+\n", text.out)
    waited = zcells(tree, "cell", "sync", "api!c1", "--wait")
    assert waited.code == 0, waited.err
    assert "every record of api!c1 has reached the top" in waited.err
    one_line_error(zcells(tree, "cell", "sync", "api"), "below the API cell")
    one_line_error(zcells(tree, "cell", "sync", "api!nope"), "nope")


def test_compute_cell_lists_its_own_records(tree: CellTree) -> None:
    views = create(tree, "pinned", 2, "--hint", "target_cell=api!c2")
    assert {v["cell"] for v in views} == {"api!c2"}
    wanted = {v["uuid"] for v in views}
    own = ok_json(
        zcells(tree, "server", "list", "--all-projects", "--name", "pinned", "--json", cell="c2")
    )
    assert {v["uuid"] for v in own} == wanted
    assert all(v["cell"] == "api!c2" and v["status"] == "ACTIVE" for v in own)
    other = zcells(
        tree, "server", "list", "--all-projects", "--name", "pinned", "--json", cell="c1"
    )
    assert ok_json(other) == []
    refused = zcells(
        tree, "server", "create", "x", "--flavor", "m1.tiny", "--image", "i", cell="c2"
    )
    one_line_error(refused, "compute cell")


def test_terminal_wait_shows_a_table(tree: CellTree) -> None:
    args = ["server", "create", "tty", "--flavor", "m1.tiny", "--image", "cirros", "--count", "3"]
    shown = zcells(tree, *args, "--wait", TTY_COMPATIBLE="1", COLUMNS="200")
    assert shown.code == 0, shown.err
    assert "3/3" in shown.out and "3 active, 0 error" in shown.out  # the progress bar's end
    listed = ok_json(zcells(tree, "server", "list", "--name", "tty", "--json"))
    assert len(listed) == 3
    rows = [line for line in shown.out.splitlines() if UUID.search(line)]
    assert {UUID.findall(row)[0] for row in rows} == {v["uuid"] for v in listed}
    assert all(" ACTIVE " in row for row in rows)
