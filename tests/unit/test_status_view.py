"""The status view: snapshots built from broadcast results, and what a user sees of them."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from rich.console import Console, RenderableType
from zcells.cli.status_view import (
    HEALTHY,
    LATE,
    MUTE,
    UNREACHABLE,
    CellStatus,
    Snapshot,
    failed_snapshot,
    render,
    snapshot_of,
)

from zcells.capacity import cell_capacity
from zcells.errors import CellUnreachable
from zcells.messages import CellResult, Outcome
from zcells.records import Flavor, Host

TAKEN_AT = 1_700_000_000.0  # 22:13:20 UTC

HOSTS = {
    "up": 2,
    "total": 2,
    "memory_mb": 16384,
    "memory_mb_free": 6144,
    "disk_gb": 200,
    "disk_gb_free": 150,
    "vcpus": 16,
    "vcpus_free": 12,
}
NO_HOSTS = dict.fromkeys(HOSTS, 0)
COUNTS = {"BUILD": 1, "ACTIVE": 3, "SHUTOFF": 0, "REBOOT": 0, "ERROR": 0}
NO_BACKLOG = {"count": 0, "oldest_s": None}


def answer(
    cell: str,
    children: dict[str, tuple[str, float | None]] | None = None,
    *,
    backlog: dict[str, Any] | None = None,
    msgs_per_s: float = 12.34,
    problems: list[Any] | None = None,
) -> CellResult:
    """A cell's `status` answer, as the handler makes it."""
    top = "!" not in cell
    return CellResult(
        cell,
        Outcome.OK,
        value={
            "cell": cell,
            "cell_type": "api" if top else "compute",
            "children": {
                name: {"state": state, "heard_s_ago": heard}
                for name, (state, heard) in (children or {}).items()
            },
            "hosts": NO_HOSTS if top else HOSTS,
            "servers": {"source": "index" if top else "own", "counts": COUNTS},
            "backlog": backlog or NO_BACKLOG,
            "msgs_per_s": msgs_per_s,
            "problems": problems or [],
        },
    )


def shown(renderable: RenderableType, width: int = 160) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def style_of(renderable: RenderableType, word: str) -> str:
    """The style the view gives the first piece of text that is exactly `word`."""
    console = Console(width=160, force_terminal=True, color_system="standard")
    for segment in console.render(renderable):
        if segment.text == word:
            return str(segment.style)
    raise AssertionError(f"{word!r} not drawn on its own")


def line_of(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if f" {name}  " in f" {line}")


def healthy() -> Snapshot:
    return snapshot_of(
        [
            answer("api", {"c1": ("alive", 0.3), "c2": ("alive", 2.04)}),
            answer("api!c1", {"g1": ("alive", 0.5)}, msgs_per_s=7.0),
            answer("api!c1!g1"),
            answer("api!c2"),
        ],
        "api",
        TAKEN_AT,
    )


def test_a_healthy_tree_shows_every_cell_with_its_figures() -> None:
    text = shown(render(healthy()))

    assert text.splitlines()[0] == "zcells status  api  4 cells: 4 healthy  at 22:13:20 UTC"
    assert "api  api  healthy  connected  12.3 msg/s  backlog 0" in text
    assert "no hosts  servers (index) 1 BUILD, 3 ACTIVE" in text
    c2 = text.splitlines().index(line_of(text, "c2"))
    assert line_of(text, "c2").endswith(
        "c2  compute  healthy  heard 2.0s ago  12.3 msg/s  backlog 0"
    )
    assert text.splitlines()[c2 + 1].endswith(
        "hosts 2/2  free: RAM █████░░░ 6.0/16.0 GiB  disk ██░░░░░░ 150/200 GB  vCPUs 12/16"
        "  servers 1 BUILD, 3 ACTIVE"
    )
    assert "c1  compute  healthy  heard 0.3s ago  7.0 msg/s" in text
    # the tree: g1 under c1, c1 and c2 under api
    assert "├── c1" in text and "│   └── g1" in text and "└── c2" in text
    assert style_of(render(healthy()), HEALTHY) == "green"


def test_a_late_child_is_yellow_with_the_time_since_it_was_heard() -> None:
    snapshot = snapshot_of(
        [answer("api", {"c1": ("late", 4.25)}), answer("api!c1")], "api", TAKEN_AT
    )
    assert [c.state for c in snapshot.cells] == [HEALTHY, LATE]

    text = shown(render(snapshot))

    assert "4 cells" not in text and "2 cells: 1 healthy, 1 late" in text
    assert "c1  compute  late  heard 4.2s ago" in text
    assert style_of(render(snapshot), LATE) == "yellow"


def test_a_mute_child_is_red() -> None:
    snapshot = snapshot_of(
        [answer("api", {"c1": ("mute", 75.0)}), answer("api!c1")], "api", TAKEN_AT
    )
    text = shown(render(snapshot))
    assert "c1  compute  mute  heard 75s ago" in text
    assert style_of(render(snapshot), MUTE) == "red"


def test_a_cell_that_did_not_answer_is_unreachable() -> None:
    """c1 failed and c2 timed out; g2, a child c3 knows of, has no result of its own.

    Each is unreachable, with what its parent says of the link to it.
    """
    snapshot = snapshot_of(
        [
            answer("api", {"c1": ("mute", 400.0), "c2": ("late", 5.5), "c3": ("alive", 0.1)}),
            CellResult("api!c1", Outcome.ERROR, error=CellUnreachable("no link to it", "api")),
            CellResult("api!c2", Outcome.TIMED_OUT),
            answer("api!c3", {"g2": ("unknown", None)}),
        ],
        "api",
        TAKEN_AT,
    )
    states = {cell.cell: (cell.state, cell.link) for cell in snapshot.cells}
    assert states == {
        "api": (HEALTHY, None),
        "api!c1": (UNREACHABLE, "mute"),
        "api!c2": (UNREACHABLE, "late"),
        "api!c3": (HEALTHY, "alive"),
        "api!c3!g2": (UNREACHABLE, "unknown"),
    }

    text = shown(render(snapshot))

    assert "5 cells: 2 healthy, 3 unreachable" in text
    assert "c1  unreachable (its parent sees it mute)  heard 6m ago" in text
    assert "error: E_UNREACHABLE: no link to it" in text
    assert "c2  unreachable (its parent sees it late)  heard 5.5s ago" in text
    assert "error: timed out" in text
    assert "g2  unreachable (its parent sees it unknown)  never heard" in text
    assert "error: no answer from it in its parent's results" in text
    assert "└── c3" in text and "    └── g2" in text
    assert style_of(render(snapshot), UNREACHABLE) == "bold red"


def test_a_backlog_shows_its_size_and_the_age_of_its_oldest_update() -> None:
    snapshot = snapshot_of(
        [
            answer("api", {"c1": ("alive", 0.2)}),
            answer("api!c1", backlog={"count": 12, "oldest_s": 34.2}),
        ],
        "api",
        TAKEN_AT,
    )
    text = shown(render(snapshot))
    assert "c1  compute  healthy  heard 0.2s ago  12.3 msg/s  backlog 12, oldest 34s" in text
    assert "api  api  healthy  connected  12.3 msg/s  backlog 0" in text
    assert style_of(render(snapshot), "backlog 12, oldest 34s") == "yellow"


def test_the_connected_cell_below_the_top_is_the_root_and_healthy() -> None:
    snapshot = snapshot_of(
        [answer("api!c1", {"g1": ("alive", 1.0)}), answer("api!c1!g1")], "api!c1", TAKEN_AT
    )
    assert [(c.cell, c.state) for c in snapshot.cells] == [
        ("api!c1", HEALTHY),
        ("api!c1!g1", HEALTHY),
    ]
    text = shown(render(snapshot))
    assert "\napi!c1  compute  healthy  connected" in text and "└── g1  compute  healthy" in text


def test_when_the_connected_cell_is_down_the_view_says_so() -> None:
    snapshot = failed_snapshot("tcp://127.0.0.1:7751", "no handshake within 1.5 s", TAKEN_AT)
    text = shown(render(snapshot))
    assert "1 cell: 1 unreachable" in text
    assert "\ntcp://127.0.0.1:7751  unreachable\nerror: no handshake within 1.5 s\n" in text
    assert snapshot.as_dict()["error"] == "no handshake within 1.5 s"


def test_a_narrow_terminal_wraps_but_keeps_every_cell_and_state() -> None:
    text = shown(render(healthy()), width=60)
    for name in ("api", "c1", "g1", "c2"):
        assert f"{name}  " in text
    assert text.count("healthy") == 5  # the heading and four cells


def test_the_snapshot_is_plain_json_in_tree_order() -> None:
    snapshot = snapshot_of(
        [
            answer("api!c2"),
            answer("api!c1!g1"),
            CellResult("api!c1!g0", Outcome.TIMED_OUT),
            answer("api", {"c1": ("alive", 0.3), "c2": ("late", 5.0)}),
            answer("api!c1", {"g0": ("mute", 9.0), "g1": ("alive", 0.5)}),
        ],
        "api",
        TAKEN_AT,
    )
    raw = json.loads(json.dumps(snapshot.as_dict()))
    assert set(raw) == {"connected", "taken_at", "cells", "error", "flavor"}
    assert [c["cell"] for c in raw["cells"]] == [
        "api",
        "api!c1",
        "api!c1!g0",
        "api!c1!g1",
        "api!c2",
    ]
    assert [c["state"] for c in raw["cells"]] == [HEALTHY, HEALTHY, UNREACHABLE, HEALTHY, LATE]
    c1 = raw["cells"][1]
    assert set(c1) == set(CellStatus.__dataclass_fields__)
    assert c1["hosts"] == HOSTS and c1["servers"] == {"source": "own", "counts": COUNTS}
    assert c1["backlog"] == NO_BACKLOG and c1["msgs_per_s"] == 12.34
    assert (c1["link"], c1["heard_s_ago"], c1["error"]) == ("alive", 0.3, None)
    g0 = raw["cells"][2]
    assert g0["hosts"] is None and g0["error"] == "timed out" and g0["link"] == "mute"


@pytest.mark.parametrize(
    "value",
    [None, [], "status", {"children": "nope", "hosts": 3, "backlog": [], "msgs_per_s": "x"}],
)
def test_an_odd_answer_never_breaks_the_view(value: Any) -> None:
    snapshot = snapshot_of(
        [answer("api", {"c1": ("alive", 0.1)}), CellResult("api!c1", Outcome.OK, value=value)],
        "api",
        TAKEN_AT,
    )
    text = shown(render(snapshot))
    assert "c1" in text
    c1 = snapshot.cells[1]
    assert c1.state == (UNREACHABLE if not isinstance(value, dict) else HEALTHY)


def test_a_cells_problems_are_shown_in_red_under_it() -> None:
    """Held rows, a refused hello and a stopped stream are never shown as merely healthy."""
    problems = [
        "parent g1: cycle in the registry: parent path api!c1!g1 holds api already",
        "3 rows refused by parent api, held aside",
        "stream to parent api stopped: E_TIMEOUT",
        7,  # not text: left out
    ]
    snapshot = snapshot_of(
        [answer("api", {"c1": ("alive", 0.2)}), answer("api!c1", problems=problems)],
        "api",
        TAKEN_AT,
    )
    text = shown(render(snapshot), width=200)
    for problem in problems[:3]:
        assert f"problem: {problem}" in text
    assert "problem: 7" not in text
    assert style_of(render(snapshot), "problem: 3 rows refused by parent api, held aside") == "red"


def test_what_each_cell_announces_is_shown_for_the_chosen_flavor() -> None:
    room = cell_capacity(
        [Host("h1", True, 8192, 100, 16), Host("h2", True, 8192, 100, 16)], [TINY], 0.0
    )
    own = cell_capacity([Host("h1", True, 8192, 100, 16)], [TINY], 0.0)
    top = answer("api", {"c1": ("alive", 0.2), "c2": ("alive", 0.3)})
    top.value["scheduling"] = {
        "enabled": True,
        "capabilities": {},
        "own": None,
        "subtree": room.to_wire(),
        "children": {
            "c1": {"disabled": False, "enabled": True, "age_s": 4.0, "counted": True},
            "c2": {"disabled": True, "enabled": None, "age_s": None, "counted": False},
        },
    }
    c1 = answer("api!c1")
    c1.value["scheduling"] = {
        "enabled": False,
        "capabilities": {"hypervisor": ["kvm"]},
        "own": own.to_wire(),
        "subtree": room.to_wire(),
        "children": {},
    }
    snapshot = replace(snapshot_of([top, c1, answer("api!c2")], "api", TAKEN_AT), flavor=TINY_WIRE)
    text = shown(render(snapshot), width=200)
    assert "room for m1.tiny: 32 (own hosts 16)  hypervisor=kvm  takes no new builds" in text
    assert "announced 4.0s ago" in text
    assert "disabled by its parent  not announced yet" in text  # c2, as the top sees it


TINY = Flavor("m1.tiny", 512, 1, 1)
TINY_WIRE = TINY.as_dict()


def hundred_cells(**trouble: dict[str, Any]) -> Snapshot:
    """api -> m0..m8 -> 10 compute cells each: 100 cells, every one answering."""
    middles = {f"m{i}": ("alive", 0.1) for i in range(9)}
    results = [answer("api", middles)]
    for m in middles:
        leaves = {f"c{j}": ("alive", 0.1) for j in range(10)}
        results.append(answer(f"api!{m}", leaves, **trouble.get(m, {})))
        for leaf in leaves:
            path = f"api!{m}!{leaf}"
            results.append(answer(path, **trouble.get(path, {})))
    return snapshot_of(results, "api", TAKEN_AT)


def test_a_large_healthy_tree_folds_to_a_summary_line_per_middle_cell() -> None:
    snapshot = hundred_cells()
    assert len(snapshot.cells) == 100
    text = shown(render(snapshot), width=200)
    for i in range(9):
        assert f"m{i}  compute  healthy" in text
    assert text.count("10 cells below, all healthy") == 9
    assert " c0 " not in text and "c9  compute" not in text  # the leaves are folded away
    assert len(text.splitlines()) < 50
    everything = shown(render(snapshot, fold=False), width=200)
    assert everything.count("c9  compute  healthy") == 9  # unfolded on request


def test_trouble_unfolds_the_way_to_it_and_nothing_else() -> None:
    problems = ["stream to parent api stopped: E_TIMEOUT"]
    snapshot = hundred_cells(
        **{"api!m3!c5": {"problems": problems}, "m7": {"backlog": {"count": 12, "oldest_s": 4.0}}}
    )
    text = shown(render(snapshot), width=200)
    assert "c5  compute  healthy" in text and f"problem: {problems[0]}" in text
    assert "9 healthy cells not shown" in text  # c5's siblings, counted under m3
    assert text.count("10 cells below, all healthy") == 7  # every middle cell but m3 and m7
    assert "backlog 12" in text  # m7 unfolded: its leaves counted, not shown
    assert text.count("10 healthy cells not shown") == 1


def test_a_small_tree_is_never_folded() -> None:
    snapshot = snapshot_of(
        [
            answer("api", {"c1": ("alive", 0.2)}),
            answer("api!c1", {"g1": ("alive", 0.1)}),
            answer("api!c1!g1"),
        ],
        "api",
        TAKEN_AT,
    )
    text = shown(render(snapshot), width=200)
    assert "g1  compute  healthy" in text and "not shown" not in text
