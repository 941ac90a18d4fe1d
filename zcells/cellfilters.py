"""The cell scheduler's filters and weighers: pure functions of a candidate and a build.

Rules kept here (STYLE.md §11):

1. A filter takes one candidate cell and the build, and returns None when the
   candidate passes or the reason it does not; it has no side effects. A
   weigher returns a number. Both are registered by name in one table each
   (`FILTERS`, `WEIGHERS`); nova's class names are accepted where they mean
   the same thing (`NOVA_NAMES`).
2. Each weigher's values are normalised to [0, 1] across the candidates
   (the lowest 0, the highest 1; all equal, all 0), multiplied by the
   weigher's multiplier and added. The highest total goes first.
3. Candidates of equal total are ordered by a draw from the generator the
   caller passes, so a burst of builds does not pile onto one cell, and a
   seed replays the order.
4. `schedule` keeps, for every candidate, each filter's verdict and each
   weigher's raw and normalised value: `--explain` shows them as they are.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from zcells.capacity import Capacity
from zcells.names import PATH_SEPARATOR
from zcells.records import Flavor

IMAGE_PROPERTIES: Final = ("hypervisor_type", "architecture", "hypervisor_version_requires")


@dataclass(frozen=True)
class BuildSpec:
    """What the scheduler knows of a build: its flavor, its image's properties, its hints."""

    flavor: Flavor
    image_properties: Mapping[str, str] = field(default_factory=dict)
    target_cell: str | None = None  # admin hint: this cell's path, or one below it
    different_cell: frozenset[str] = frozenset()  # paths to avoid, with their subtrees
    same_cell: frozenset[str] = frozenset()  # paths the build must stay under


@dataclass(frozen=True)
class CellCandidate:
    """A child (or this cell itself) as the scheduler sees it when it weighs a build."""

    name: str
    path: str
    enabled: bool = True
    alive: bool = True
    mute: bool = False
    capacity: Capacity | None = None  # None: nothing announced yet
    capabilities: Mapping[str, frozenset[str]] = field(default_factory=dict)
    weight_offset: float = 0.0
    weight_scale: float = 1.0
    own: bool = False  # this cell's own hosts (`HERE`), not a child


Filter = Callable[[CellCandidate, BuildSpec], str | None]
Weigher = Callable[[CellCandidate, BuildSpec], float]


def _within(cell: CellCandidate, root: str) -> bool:
    """Whether `cell` is `root`, below it, or (a child, not this cell's own hosts) above it."""
    path = cell.path
    if path == root or path.startswith(root + PATH_SEPARATOR):
        return True
    return not cell.own and root.startswith(path + PATH_SEPARATOR)


def disabled(cell: CellCandidate, spec: BuildSpec) -> str | None:
    return None if cell.enabled else "disabled: takes no new builds"


def target_cell(cell: CellCandidate, spec: BuildSpec) -> str | None:
    """The build goes to exactly the target cell's hosts: a child passes when the target is
    it or below it; this cell's own hosts, when the target is this cell."""
    target = spec.target_cell
    if target is None or target == cell.path:
        return None
    if not cell.own and target.startswith(cell.path + PATH_SEPARATOR):
        return None
    return f"not on the way to the target cell {target}"


def different_cell(cell: CellCandidate, spec: BuildSpec) -> str | None:
    for avoided in sorted(spec.different_cell):
        if cell.path == avoided or cell.path.startswith(avoided + PATH_SEPARATOR):
            return f"the build must avoid {avoided}"
    return None


def same_cell(cell: CellCandidate, spec: BuildSpec) -> str | None:
    if not spec.same_cell or any(_within(cell, kept) for kept in spec.same_cell):
        return None
    return f"the build must stay in {', '.join(sorted(spec.same_cell))}"


def capacity(cell: CellCandidate, spec: BuildSpec) -> str | None:
    """Room for the flavor's RAM, disk and vCPUs on one host, as last announced.

    A cell that has announced nothing yet (it has just come up), or whose
    announcement does not count the flavor's sizes (the flavor has not
    reached it yet), passes: it is drawn after every cell known to have
    room, and says so itself if it has none.
    """
    free = cell.capacity
    room = None if free is None else free.room_for(spec.flavor)
    if free is None or room is None or room > 0:
        return None
    flavor = spec.flavor
    return (
        f"no room for {flavor.name}: {free.ram_free_mb} MB, {free.disk_free_gb} GB and "
        f"{free.vcpus_free} vCPUs free, not on one host"
    )


def image_properties(cell: CellCandidate, spec: BuildSpec) -> str | None:
    """The image's hypervisor type, architecture and required version against capabilities."""
    for key in IMAGE_PROPERTIES:
        wanted = spec.image_properties.get(key)
        if wanted is None:
            continue
        offered = cell.capabilities.get(_CAPABILITY_OF[key], frozenset())
        if key == "hypervisor_version_requires":
            if not any(_version_satisfies(v, wanted) for v in offered):
                return (
                    f"no hypervisor version {wanted} (has {', '.join(sorted(offered)) or 'none'})"
                )
        elif wanted not in offered:
            shown = ", ".join(sorted(offered)) or "none"
            return f"image wants {key}={wanted}; cell offers {shown}"
    return None


_CAPABILITY_OF: Final = {
    "hypervisor_type": "hypervisor",
    "architecture": "architecture",
    "hypervisor_version_requires": "hypervisor_version",
}


def _version_satisfies(version: str, requirement: str) -> bool:
    """Whether `version` (1.2.3) meets `requirement` (>=1.2, <2, ==1.4 or a bare version)."""
    for operator in (">=", "<=", "==", ">", "<"):
        if requirement.startswith(operator):
            wanted = requirement[len(operator) :].strip()
            break
    else:
        operator, wanted = "==", requirement.strip()
    have, want = _parts(version), _parts(wanted)
    if have is None or want is None:
        return False
    return {
        ">=": have >= want,
        "<=": have <= want,
        "==": have[: len(want)] == want,
        ">": have > want,
        "<": have < want,
    }[operator]


def _parts(version: str) -> tuple[int, ...] | None:
    pieces = version.strip().split(".")
    if not pieces or not all(p.isdigit() and len(p) <= 9 for p in pieces):
        return None
    return tuple(int(p) for p in pieces)


def ram_units(cell: CellCandidate, spec: BuildSpec) -> float:
    """How many instances of the flavor the cell still has room for."""
    room = None if cell.capacity is None else cell.capacity.room_for(spec.flavor)
    return 0.0 if room is None else float(room)  # not known: drawn after every known cell


def weight_offset(cell: CellCandidate, spec: BuildSpec) -> float:
    """The operator's preference for the cell (`zcells cell update --weight-offset`), scaled."""
    return cell.weight_offset * cell.weight_scale


def mute_child(cell: CellCandidate, spec: BuildSpec) -> float:
    return 1.0 if cell.mute or not cell.alive else 0.0


FILTERS: Final[dict[str, Filter]] = {
    "disabled": disabled,
    "target_cell": target_cell,
    "different_cell": different_cell,
    "same_cell": same_cell,
    "capacity": capacity,
    "image_properties": image_properties,
}
# name -> (weigher, its default multiplier), nova's defaults
WEIGHERS: Final[dict[str, tuple[Weigher, float]]] = {
    "ram_by_instance_type": (ram_units, 10.0),
    "weight_offset": (weight_offset, 1.0),
    "mute_child": (mute_child, -10000.0),
}
SPREAD: Final = "ram_by_instance_type"  # the weigher whose raw value sets the draw in a tier

# A filter with nothing to check for a build is not run (a decision over a thousand
# children must stay well under a millisecond).
_APPLIES: Final[dict[str, Callable[[BuildSpec], bool]]] = {
    "disabled": lambda spec: True,
    "target_cell": lambda spec: spec.target_cell is not None,
    "different_cell": lambda spec: bool(spec.different_cell),
    "same_cell": lambda spec: bool(spec.same_cell),
    "capacity": lambda spec: True,
    "image_properties": lambda spec: any(k in spec.image_properties for k in IMAGE_PROPERTIES),
}
NOVA_NAMES: Final = {
    "TargetCellFilter": "target_cell",
    "DifferentCellFilter": "different_cell",
    "ImagePropertiesFilter": "image_properties",
    "RamByInstanceTypeWeigher": "ram_by_instance_type",
    "WeightOffsetWeigher": "weight_offset",
    "MuteChildWeigher": "mute_child",
}


_ALL: Final = frozenset(
    {"all", "nova.cells.filters.all_filters", "nova.cells.weights.all_weighers"}
)


def resolve(names: Sequence[str], table: Mapping[str, object]) -> tuple[str, ...]:
    """Filter or weigher names as configured, in zcells' names; nova's accepted.

    A nova class path counts by its last part (`nova.cells.filters.target_cell.
    TargetCellFilter`), and nova's `all_filters`/`all_weighers` name the whole
    table. `ValueError` names the first unknown name and the known ones.
    """
    resolved: list[str] = []
    for name in names:
        if name in _ALL:
            resolved += list(table)
            continue
        ours = NOVA_NAMES.get(name.rsplit(".", 1)[-1], name)
        if ours not in table:
            raise ValueError(f"unknown name {name!r}; known: {', '.join(table)}")
        resolved.append(ours)
    return tuple(dict.fromkeys(resolved))


def normalised(values: Sequence[float]) -> list[float]:
    """`values` scaled to [0, 1]: the lowest 0, the highest 1; all equal, all 0."""
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:
        return [0.0] * len(values)
    return [(v - low) / (high - low) for v in values]


@dataclass(frozen=True)
class Weighed:
    """One candidate's part in a decision, as `--explain` shows it."""

    name: str
    removed_by: str | None  # the first filter that removed it, or None
    reason: str | None
    raw: Mapping[str, float] = field(default_factory=dict)
    normal: Mapping[str, float] = field(default_factory=dict)
    total: float = 0.0  # every weigher, normalised and multiplied, added (nova's weight)
    tier: float = 0.0  # the same without the spreading weigher: the rank of its tier
    chance: float = 0.0  # its chance of going first among the candidates of its tier


class Decision:
    """The order to try, what the filters removed, and (made when asked) every candidate's part."""

    def __init__(
        self,
        order: tuple[str, ...],
        removed: tuple[tuple[str, str, str], ...],
        explain: Callable[[], tuple[Weighed, ...]],
    ) -> None:
        self.order = order  # the candidates to try, best first
        self.removed = removed  # (candidate, filter, reason) for each candidate removed
        self._explain = explain

    @functools.cached_property
    def weighed(self) -> tuple[Weighed, ...]:
        """Every candidate, in the order given, with its verdict or its weights."""
        return self._explain()


def multipliers_of(names: Sequence[str], overrides: Mapping[str, float]) -> dict[str, float]:
    """The multiplier of each weigher named, nova's default unless overridden."""
    return {name: overrides.get(name, WEIGHERS[name][1]) for name in names}


def schedule(
    candidates: Sequence[CellCandidate],
    spec: BuildSpec,
    rng: random.Random,
    *,
    filters: Sequence[str] = tuple(FILTERS),
    weighers: Mapping[str, float] | None = None,
) -> Decision:
    """Filter, weigh and order `candidates` for `spec`; every step kept for the explanation.

    The weighers other than the spreading one (`SPREAD`) rank the candidates
    in tiers, highest first. Within a tier the order is drawn, each
    candidate's chance of going next in proportion to its room for the
    flavor (its `SPREAD` raw value) when that weigher's multiplier is
    positive, to the inverse of its room when negative (filling the fullest
    first), evenly when zero or not configured. So children of capacities
    1:2:4 take builds in that proportion, and a burst between two
    announcements does not pile onto one cell.
    """
    multipliers = multipliers_of(tuple(WEIGHERS), {}) if weighers is None else dict(weighers)
    checks = [(name, FILTERS[name]) for name in filters if _APPLIES[name](spec)]
    passed = list(candidates)
    removed: list[tuple[str, str, str]] = []
    for name, check in checks:  # filter by filter: the common case removes no one
        kept = [cell for cell in passed if check(cell, spec) is None]
        if len(kept) < len(passed):
            removed += [(c.name, name, why) for c in passed if (why := check(c, spec)) is not None]
        passed = kept
    raw = {}
    for name in multipliers:
        weigh = WEIGHERS[name][0]
        raw[name] = [weigh(cell, spec) for cell in passed]
    normal = {name: normalised(values) for name, values in raw.items()}
    count = len(passed)
    tiers = [0.0] * count
    for name, values in normal.items():
        multiplier = multipliers[name]
        if name != SPREAD and multiplier and any(values):
            tiers = [t + multiplier * v for t, v in zip(tiers, values, strict=True)]
    spread = multipliers.get(SPREAD, 0.0)
    odds = [_odds(room, spread) for room in raw[SPREAD]] if spread else [1.0] * count
    keys = [_draw_key(rng, weight) for weight in odds]
    best_first = sorted(range(count), key=lambda i: (-tiers[i], keys[i]))
    order = tuple(passed[i].name for i in best_first)

    def explain() -> tuple[Weighed, ...]:
        in_tier: dict[float, float] = {}
        for i, weight in enumerate(odds):
            in_tier[tiers[i]] = in_tier.get(tiers[i], 0.0) + weight
        index = {id(c): i for i, c in enumerate(passed)}
        why = {name: (by, reason) for name, by, reason in removed}
        weighed = []
        for cell in candidates:
            found = index.get(id(cell))
            if found is None:
                by, reason = why.get(cell.name, (None, None))
                weighed.append(Weighed(cell.name, by, reason))
                continue
            pool = in_tier[tiers[found]]
            spread_part = spread * normal[SPREAD][found] if spread else 0.0
            weighed.append(
                Weighed(
                    cell.name,
                    None,
                    None,
                    raw={name: raw[name][found] for name in multipliers},
                    normal={name: normal[name][found] for name in multipliers},
                    total=tiers[found] + spread_part,
                    tier=tiers[found],
                    chance=odds[found] / pool if pool > 0 else 0.0,
                )
            )
        return tuple(weighed)

    return Decision(order, tuple(removed), explain)


def _odds(room: float, multiplier: float) -> float:
    """A candidate's weight in the draw of its tier, from its room for the flavor."""
    if multiplier > 0:
        return room
    if multiplier < 0:
        return 1.0 / (1.0 + room)
    return 1.0


def _draw_key(rng: random.Random, weight: float) -> float:
    """A key whose order, lowest first, is a draw in proportion to `weight`.

    Sorting by -log(u) / weight (u uniform in (0, 1]) draws without
    replacement with those weights (Efraimidis and Spirakis); a weight of 0
    goes after every other, in an even draw of its own.
    """
    u = 1.0 - rng.random()
    if weight <= 0:
        return _LAST + u
    return -math.log(u) / weight


_LAST: Final = 1e300  # past any key of a weight > 0
