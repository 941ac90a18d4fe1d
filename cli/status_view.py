"""The status view, pure: a `status` broadcast's results as a snapshot, and its drawing.

Rules kept here:

* `snapshot_of` turns one broadcast's results into plain data (`Snapshot`,
  JSON-able through `as_dict`), and `render(snapshot)` draws it. Both are
  pure: no clock, no I/O.
* A cell's state is ``unreachable`` if it did not answer (timed out or an
  error), else what its parent says of the link to it: ``alive`` is
  ``healthy``, ``late`` and ``mute`` stay. The connected cell, when it
  answers, is healthy.
* A child that an answering cell knows of but that has no result of its own
  is shown too, unreachable, with what its parent knows of it.
* A tree of more than `FOLD_ABOVE` cells folds (`render`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final

from rich.console import Group, RenderableType
from rich.text import Text
from rich.tree import Tree

from zcells.capacity import Capacity
from zcells.errors import SchemaError
from zcells.instances import STATUSES
from zcells.messages import CellResult, Outcome
from zcells.names import PATH_SEPARATOR, last_name
from zcells.records import Flavor
from zcells.routing import parent_of

HEALTHY: Final = "healthy"
LATE: Final = "late"
MUTE: Final = "mute"
UNREACHABLE: Final = "unreachable"
STATES: Final = (HEALTHY, LATE, MUTE, UNREACHABLE)

# What a parent's view of the link to an answering child makes of it. An answer
# that came through the parent means the parent has heard from it: unknown is a race.
_FROM_LINK: Final = {"alive": HEALTHY, "unknown": HEALTHY, "late": LATE, "mute": MUTE}
_STYLE: Final = {HEALTHY: "green", LATE: "yellow", MUTE: "red", UNREACHABLE: "bold red"}

_BAR_WIDTH: Final = 8


@dataclass(frozen=True)
class CellStatus:
    """One cell as the view shows it. Figures are None for a cell that did not answer."""

    cell: str  # full path
    state: str  # healthy | late | mute | unreachable
    cell_type: str | None = None
    link: str | None = None  # the parent's view of the link: unknown/alive/late/mute
    heard_s_ago: float | None = None  # by its parent; None: never, or the connected cell
    error: str | None = None  # why it did not answer
    hosts: Mapping[str, int] | None = None  # up, total, memory_mb(_free), disk_gb(_free), ...
    servers: Mapping[str, Any] | None = None  # {"source": "own" | "index", "counts": {...}}
    backlog: Mapping[str, Any] | None = None  # {"count": int, "oldest_s": float | None}
    msgs_per_s: float | None = None
    problems: tuple[str, ...] = ()  # refused hellos, held rows, a stopped stream
    scheduling: Mapping[str, Any] | None = None  # what it announces (`CellScheduling.status`)
    announced: Mapping[str, Any] | None = None  # its parent's view: age, disabled, counted


@dataclass(frozen=True)
class Snapshot:
    """The tree below the connected cell at one moment; `cells` in tree order."""

    connected: str
    taken_at: float  # epoch seconds
    cells: tuple[CellStatus, ...]
    error: str | None = None  # the gather failed as a whole (the connected cell is down)
    flavor: Mapping[str, Any] | None = None  # the flavor whose free units are shown

    def as_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["cells"] = [dict(cell) for cell in raw["cells"]]
        return raw

    def count(self, state: str) -> int:
        return sum(1 for cell in self.cells if cell.state == state)


# -- from results to a snapshot (pure) ------------------------------------------------------


def snapshot_of(results: Iterable[CellResult], connected: str, taken_at: float) -> Snapshot:
    """The snapshot of one `status` broadcast's results."""
    answers: dict[str, Mapping[str, Any]] = {}
    errors: dict[str, str] = {}
    for result in results:
        if result.outcome is Outcome.OK and isinstance(result.value, dict):
            answers[result.cell] = result.value
        elif result.outcome is Outcome.OK:
            errors[result.cell] = "answered something other than a status record"
        elif result.outcome is Outcome.TIMED_OUT or result.error is None:
            errors[result.cell] = "timed out"
        else:
            errors[result.cell] = f"{result.error.code}: {result.error.message}"
    links = _parents_say(answers, lambda answer: answer.get("children"))
    views_of = _parents_say(  # a child's path -> its parent's view of what it announced
        answers, lambda answer: (_mapping(answer.get("scheduling")) or {}).get("children")
    )
    cells = []
    for path in sorted(answers.keys() | errors.keys() | links.keys(), key=_tree_key):
        link = links.get(path, {})
        said = _text(link.get("state"))
        heard = _number(link.get("heard_s_ago"))
        if path not in answers:
            error = errors.get(path, "no answer from it in its parent's results")
            cells.append(CellStatus(path, UNREACHABLE, None, said, heard, error))
            continue
        answer = answers[path]
        state = HEALTHY if path == connected else _FROM_LINK.get(said or "alive", HEALTHY)
        cells.append(
            CellStatus(
                cell=path,
                state=state,
                cell_type=_text(answer.get("cell_type")),
                link=said,
                heard_s_ago=heard,
                hosts=_mapping(answer.get("hosts")),
                servers=_mapping(answer.get("servers")),
                backlog=_mapping(answer.get("backlog")),
                msgs_per_s=_number(answer.get("msgs_per_s")),
                problems=_problems(answer.get("problems")),
                scheduling=_mapping(answer.get("scheduling")),
                announced=views_of.get(path),
            )
        )
    return Snapshot(connected=connected, taken_at=taken_at, cells=tuple(cells))


def _parents_say(
    answers: Mapping[str, Mapping[str, Any]],
    part: Callable[[Mapping[str, Any]], Any],
) -> dict[str, Mapping[str, Any]]:
    """What each answering parent says of each child in `part` of its answer, by child path."""
    said: dict[str, Mapping[str, Any]] = {}
    for path, answer in answers.items():
        children = part(answer)
        if isinstance(children, dict):
            for name, value in children.items():
                if isinstance(value, dict):
                    said[f"{path}{PATH_SEPARATOR}{name}"] = value
    return said


def failed_snapshot(connected: str, error: str, taken_at: float) -> Snapshot:
    """What the view shows when the connected cell itself gave no answer."""
    return Snapshot(
        connected=connected,
        taken_at=taken_at,
        cells=(CellStatus(connected, UNREACHABLE, error=error),),
        error=error,
    )


def _tree_key(path: str) -> list[str]:
    return path.split(PATH_SEPARATOR)  # each cell before its children, siblings by name


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) else None


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, dict) else None


# -- drawing (pure) -------------------------------------------------------------------------


def render(snapshot: Snapshot, *, fold: bool | None = None) -> RenderableType:
    """The status view of a snapshot: a heading, then the tree of cells, two lines each.

    A large tree (more than `FOLD_ABOVE` cells, or `fold`) is folded. The top
    and every cell that needs a look (late, mute, unreachable, disabled, not
    taking builds, with a backlog or a problem), with every cell on its way
    from the top, are unfolded: their middle children show, each as a
    summary, and their healthy leaves are counted, not shown. A middle cell
    whose whole subtree is healthy shows as its summary with how many cells
    it holds.
    """
    folding = len(snapshot.cells) > FOLD_ABOVE if fold is None else fold
    cells = snapshot.cells
    below = _subtrees(cells)
    troubled = _troubled(cells)
    known = {cell.cell for cell in cells}
    nodes: dict[str, Tree] = {}
    roots: list[Tree] = []
    hidden: dict[str, int] = {}  # a shown cell -> its children left out
    unfolded = troubled | {c.cell for c in cells if _nearest_shown(c.cell, known) is None}
    for cell in cells:
        parent = _nearest_shown(cell.cell, known)
        if folding and parent is not None and not _shows(cell.cell, parent, nodes, unfolded, below):
            if parent in nodes and parent in unfolded:
                hidden[parent] = hidden.get(parent, 0) + 1
            continue
        name = cell.cell if parent is None else last_name(cell.cell)
        label = _label(
            cell, name, connected=cell.cell == snapshot.connected, flavor=_as_flavor(snapshot)
        )
        if folding and below.get(cell.cell) and cell.cell not in unfolded:
            count = below[cell.cell]
            label.append(f"\n{count} cell{'' if count == 1 else 's'} below, all healthy", "dim")
        node = Tree(label, guide_style="dim") if parent is None else nodes[parent].add(label)
        nodes[cell.cell] = node
        if parent is None:
            roots.append(node)
    for path, count in hidden.items():
        nodes[path].add(Text(f"{count} healthy cell{'' if count == 1 else 's'} not shown", "dim"))
    return Group(_heading(snapshot), *roots)


FOLD_ABOVE: Final = 30  # cells in a view before healthy subtrees fold


def _subtrees(cells: Iterable[CellStatus]) -> dict[str, int]:
    """How many cells each cell has below it, in the snapshot."""
    counts: dict[str, int] = {}
    for cell in cells:
        parent = parent_of(cell.cell)
        while parent is not None:
            counts[parent] = counts.get(parent, 0) + 1
            parent = parent_of(parent)
    return counts


def _troubled(cells: Iterable[CellStatus]) -> set[str]:
    """The cells that need a look, and every cell above each: these never fold."""
    found: set[str] = set()
    for cell in cells:
        backlog = _int(cell.backlog or {}, "count")
        announced = cell.announced or {}
        if (
            cell.state != HEALTHY
            or cell.problems
            or backlog
            or announced.get("disabled") is True
            or (cell.scheduling or {}).get("enabled") is False
        ):
            path: str | None = cell.cell
            while path is not None and path not in found:
                found.add(path)
                path = parent_of(path)
    return found


def _shows(
    path: str, parent: str, nodes: Mapping[str, Tree], unfolded: set[str], below: dict[str, int]
) -> bool:
    """Whether a folded view shows `path`: under a shown, unfolded parent, a cell that needs
    a look or a middle cell (as its summary); a healthy leaf, never."""
    if parent not in nodes or parent not in unfolded:
        return False
    return path in unfolded or bool(below.get(path))


def _nearest_shown(path: str, known: set[str]) -> str | None:
    parent = parent_of(path)
    while parent is not None and parent not in known:
        parent = parent_of(parent)
    return parent


def _heading(snapshot: Snapshot) -> Text:
    at = datetime.fromtimestamp(snapshot.taken_at, UTC).strftime("%H:%M:%S UTC")
    counts = [
        Text(f"{snapshot.count(state)} {state}", _STYLE[state])
        for state in STATES
        if snapshot.count(state)
    ]
    cells = len(snapshot.cells)
    return Text.assemble(
        ("zcells status", "bold"),
        f"  {snapshot.connected}  {cells} cell{'' if cells == 1 else 's'}: ",
        Text(", ").join(counts),
        ("  at " + at, "dim"),
    )


def _as_flavor(snapshot: Snapshot) -> Flavor | None:
    raw = snapshot.flavor or {}
    name, memory, disk, vcpus = (raw.get(k) for k in ("name", "memory_mb", "disk_gb", "vcpus"))
    if not isinstance(name, str) or not all(type(v) is int for v in (memory, disk, vcpus)):
        return None
    return Flavor(name, int(memory or 0), int(disk or 0), int(vcpus or 0))


def _scheduling(cell: CellStatus, flavor: Flavor | None) -> Text:
    """What the cell announces: room for `flavor` (its own, its subtree's), capabilities,
    whether it takes builds, and how old its parent's copy is."""
    said = cell.scheduling or {}
    shown = Text("")
    if flavor is not None and said:
        subtree, own = _room(said.get("subtree"), flavor), _room(said.get("own"), flavor)
        shown.append(f"room for {flavor.name}: {subtree}")
        if own not in ("-", subtree) and _int(cell.hosts or {}, "total"):
            shown.append(f" (own hosts {own})")
    capabilities = _mapping(said.get("capabilities")) or {}
    if capabilities:
        shown.append(
            "  " + ", ".join(f"{k}={';'.join(map(str, v))}" for k, v in capabilities.items())
        )
    if said.get("enabled") is False:
        shown.append("  takes no new builds", "yellow")
    view = cell.announced or {}
    if view.get("disabled") is True:
        shown.append("  disabled by its parent", "yellow")
    age = _number(view.get("age_s"))
    if age is not None:
        shown.append(f"  announced {_ago(age)} ago", "dim")
    elif cell.announced is not None:
        shown.append("  not announced yet", "yellow")
    return shown


def _room(raw: Any, flavor: Flavor) -> str:
    try:
        room = Capacity.from_wire(raw).room_for(flavor)
    except SchemaError:
        return "-"
    return "?" if room is None else f"{room:,}"


def _label(cell: CellStatus, name: str, *, connected: bool, flavor: Flavor | None = None) -> Text:
    first = Text.assemble((name, "bold"), "  ")
    if cell.cell_type:
        first.append(f"{cell.cell_type}  ", "dim")
    first.append(cell.state, _STYLE.get(cell.state, ""))
    if cell.state == UNREACHABLE and cell.link is not None:
        first.append(f" (its parent sees it {cell.link})", "dim")
    heard = _heard(cell, connected=connected)
    if heard:
        first.append(f"  {heard}")
    if cell.msgs_per_s is not None:
        first.append(f"  {cell.msgs_per_s:.1f} msg/s")
    if cell.backlog is not None:
        first.append("  ")
        first.append_text(_backlog(cell.backlog))
    if cell.error is not None:
        return Text.assemble(first, "\n", (f"error: {cell.error}", "red"))
    parts = [*_hosts(cell.hosts), _servers(cell.servers)]
    shown = Text.assemble(first, "\n", Text("  ").join(p for p in parts if p.plain))
    scheduling = _scheduling(cell, flavor)
    if scheduling.plain:
        shown.append_text(Text.assemble("\n", scheduling))
    for problem in cell.problems:
        shown.append_text(Text.assemble("\n", (f"problem: {problem}", "red")))
    return shown


def _problems(raw: Any) -> tuple[str, ...]:
    if type(raw) is not list:
        return ()
    return tuple(item[:300] for item in raw[:20] if type(item) is str)


def _heard(cell: CellStatus, *, connected: bool) -> str:
    if cell.heard_s_ago is not None:
        return f"heard {_ago(cell.heard_s_ago)} ago"
    if connected:
        return "connected" if cell.state != UNREACHABLE else ""
    return "never heard" if cell.link == "unknown" else "heard -"


def _ago(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds // 60:.0f}m"
    if seconds < 172800:
        return f"{seconds // 3600:.0f}h"
    return f"{seconds // 86400:.0f}d"


def _backlog(backlog: Mapping[str, Any]) -> Text:
    count = _number(backlog.get("count")) or 0
    oldest = _number(backlog.get("oldest_s"))
    if not count:
        return Text("backlog 0")
    text = f"backlog {count:.0f}" + ("" if oldest is None else f", oldest {_ago(oldest)}")
    return Text(text, "yellow")


def _hosts(hosts: Mapping[str, int] | None) -> list[Text]:
    if hosts is None:
        return []
    total = _int(hosts, "total")
    if total == 0:
        return [Text("no hosts", "dim")]
    up = _int(hosts, "up")
    ram, ram_free = _int(hosts, "memory_mb"), _int(hosts, "memory_mb_free")
    disk, disk_free = _int(hosts, "disk_gb"), _int(hosts, "disk_gb_free")
    cpus, cpus_free = _int(hosts, "vcpus"), _int(hosts, "vcpus_free")
    return [
        Text(f"hosts {up}/{total}", "" if up == total else "yellow"),
        Text.assemble("free: RAM ", _bar(ram_free, ram), f" {_gib(ram_free)}/{_gib(ram)} GiB"),
        Text.assemble("disk ", _bar(disk_free, disk), f" {disk_free}/{disk} GB"),
        Text(f"vCPUs {cpus_free}/{cpus}"),
    ]


def _gib(mb: int) -> str:
    gib = mb / 1024
    return f"{gib:.0f}" if gib >= 100 else f"{gib:.1f}"


def _int(values: Mapping[str, Any], key: str) -> int:
    value = values.get(key)
    return value if type(value) is int else 0


def _bar(free: int, total: int) -> Text:
    """How full: used in solid blocks, free in light ones; coloured by what is left."""
    share = free / total if total > 0 else 0.0
    empty = round(_BAR_WIDTH * share)
    style = "green" if share >= 0.25 else "yellow" if share >= 0.10 else "red"
    return Text("█" * (_BAR_WIDTH - empty) + "░" * empty, style)


def _servers(servers: Mapping[str, Any] | None) -> Text:
    if servers is None:
        return Text()
    counts = servers.get("counts")
    counts = counts if isinstance(counts, dict) else {}
    shown = [f"{counts[s]} {s}" for s in STATUSES if type(counts.get(s)) is int and counts[s]]
    source = " (index)" if servers.get("source") == "index" else ""
    return Text(f"servers{source} " + (", ".join(shown) or "0"))
