"""The cell scheduler's filters and weighers: pure functions of the candidates and a build.

Rules kept here (STYLE.md §11):

1. A filter takes the candidate cells still in and the build, and returns
   the cells it keeps with the reason each other one went (`Sieved`); a
   weigher returns one number per cell. Neither has side effects. Both are
   registered by name in one table each (`FILTERS`, `WEIGHERS`); nova's
   class names are accepted where they mean the same thing (`NOVA_NAMES`).
2. Each weigher's values are normalised to [0, 1] across the candidates
   (the lowest 0, the highest 1; all equal, all 0), multiplied by the
   weigher's multiplier and added (nova's weight, shown as the total).
3. The weighers but the RAM one rank the candidates in tiers; within a tier
   the order is drawn from the generator the caller passes, each cell's
   chance in proportion to its room for the flavor, so a burst of builds
   does not pile onto one cell, and a seed replays the order.
4. `schedule` keeps, for every candidate, each filter's verdict and each
   weigher's raw and normalised value: `--explain` shows them as they are.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
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


@dataclass(frozen=True)
class Sieved:
    """What a filter made of the cells it was given: those kept, and why each other went."""

    kept: list[CellCandidate]
    removed: list[tuple[CellCandidate, str]]


Filter = Callable[[Sequence[CellCandidate], BuildSpec], Sieved]
Weigher = Callable[[Sequence[CellCandidate], BuildSpec], list[float]]
Reason = Callable[[CellCandidate, BuildSpec], str | None]  # why one cell goes, if it does


def sieved(cells: Sequence[CellCandidate], reasons: Sequence[str | None]) -> Sieved:
    """The cells whose reason is None kept, the others removed with theirs."""
    if not any(reasons):
        return Sieved(list(cells), [])
    kept = [cell for cell, reason in zip(cells, reasons, strict=True) if reason is None]
    removed = [(c, r) for c, r in zip(cells, reasons, strict=True) if r is not None]
    return Sieved(kept, removed)


def each(reason: Reason) -> Filter:
    """A filter from a function that says why one cell goes (or None if it stays)."""

    def sieve(cells: Sequence[CellCandidate], spec: BuildSpec) -> Sieved:
        return sieved(cells, [reason(cell, spec) for cell in cells])

    sieve.__doc__ = reason.__doc__
    return sieve


def _within(cell: CellCandidate, root: str) -> bool:
    """Whether `cell` is `root`, below it, or (a child, not this cell's own hosts) above it."""
    path = cell.path
    if path == root or path.startswith(root + PATH_SEPARATOR):
        return True
    return not cell.own and root.startswith(path + PATH_SEPARATOR)


# -- filters: each is given the cells still in and the build, and says which stay -------------
# Every decision runs them over every child, so the two that always run are written as one
# pass each; the others run only when the build asks for them (`_APPLIES`).


def disabled(cells: Sequence[CellCandidate], spec: BuildSpec) -> Sieved:
    """A cell its operator disabled, or that announced it takes no new builds."""
    return sieved(cells, [None if c.enabled else "disabled: takes no new builds" for c in cells])


def capacity(cells: Sequence[CellCandidate], spec: BuildSpec) -> Sieved:
    """Room for the flavor's RAM, disk and vCPUs on one host, as last announced.

    A cell that has announced nothing yet (it has just come up), or whose
    announcement does not count the flavor's sizes (the flavor has not
    reached it yet), passes: it is drawn after every cell known to have
    room, and says so itself if it has none.
    """
    flavor = spec.flavor
    rooms = [None if c.capacity is None else c.capacity.room_for(flavor) for c in cells]
    return sieved(
        cells,
        [_no_room(c, flavor) if r == 0 else None for c, r in zip(cells, rooms, strict=True)],
    )


def _no_room(cell: CellCandidate, flavor: Flavor) -> str:
    free = cell.capacity or Capacity()
    return (
        f"no room for {flavor.name}: {free.ram_free_mb} MB, {free.disk_free_gb} GB and "
        f"{free.vcpus_free} vCPUs free, not on one host"
    )


def _target_cell(cell: CellCandidate, spec: BuildSpec) -> str | None:
    """The build goes to exactly the target cell's hosts: a child passes when the target is
    it or below it; this cell's own hosts, when the target is this cell."""
    target = spec.target_cell
    if target is None or target == cell.path:
        return None
    if not cell.own and target.startswith(cell.path + PATH_SEPARATOR):
        return None
    return f"not on the way to the target cell {target}"


def _different_cell(cell: CellCandidate, spec: BuildSpec) -> str | None:
    """A cell the `different_cell` hint names, or one below it."""
    for avoided in sorted(spec.different_cell):
        if cell.path == avoided or cell.path.startswith(avoided + PATH_SEPARATOR):
            return f"the build must avoid {avoided}"
    return None


def _same_cell(cell: CellCandidate, spec: BuildSpec) -> str | None:
    """A cell outside every cell the `same_cell` hint names."""
    if not spec.same_cell or any(_within(cell, kept) for kept in spec.same_cell):
        return None
    return f"the build must stay in {', '.join(sorted(spec.same_cell))}"


def _image_properties(cell: CellCandidate, spec: BuildSpec) -> str | None:
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


target_cell = each(_target_cell)
different_cell = each(_different_cell)
same_cell = each(_same_cell)
image_properties = each(_image_properties)


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


# -- weighers: one number per cell ----------------------------------------------------------


def ram_units(cells: Sequence[CellCandidate], spec: BuildSpec) -> list[float]:
    """How many instances of the flavor each cell still has room for (0: not known)."""
    flavor = spec.flavor
    rooms = [None if c.capacity is None else c.capacity.room_for(flavor) for c in cells]
    return [0.0 if room is None else float(room) for room in rooms]


def weight_offset(cells: Sequence[CellCandidate], spec: BuildSpec) -> list[float]:
    """The operator's preference for each cell (`zcells cell update --weight-offset`), scaled."""
    return [c.weight_offset * c.weight_scale for c in cells]


def mute_child(cells: Sequence[CellCandidate], spec: BuildSpec) -> list[float]:
    """1 for a child not heard from for `mute_child_interval`, else 0."""
    return [1.0 if c.mute or not c.alive else 0.0 for c in cells]


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
DEFAULT_MULTIPLIERS: Final = {name: multiplier for name, (_, multiplier) in WEIGHERS.items()}
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


# An explanation's row of a candidate, before each weigher's (raw, normalised) pair.
CANDIDATE_FIELDS: Final = ("name", "removed_by", "reason", "total", "tier", "chance")


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
    """The candidates to try, drawn one at a time; what the filters removed; the explanation.

    Iterating draws the candidates in order, each only when the one before it
    has been tried: the first try, almost always the only one, costs one
    weighted pick, not a sort of every candidate. `order` draws them all.
    """

    def __init__(
        self,
        names: list[str],
        tiers: list[float],
        odds: list[float],
        rng: random.Random,
        removed: tuple[tuple[str, str, str], ...],
        explain: Callable[[Decision], tuple[Weighed, ...]],
    ) -> None:
        self.removed = removed  # (candidate, filter, reason) for each candidate removed
        self._names = names
        self._tiers = tiers
        self._odds = odds
        self._rng = rng
        self._left = list(range(len(names)))
        self._one_tier = len(set(tiers)) <= 1
        self._drawn: list[str] = []
        self._explain = explain

    def __iter__(self) -> Iterator[str]:
        i = 0
        while True:
            if i == len(self._drawn) and not self._draw():
                return
            yield self._drawn[i]
            i += 1

    def __bool__(self) -> bool:
        """Whether any candidate passed the filters."""
        return bool(self._names)

    @property
    def first(self) -> str | None:
        return next(iter(self), None)

    @property
    def order(self) -> tuple[str, ...]:
        """Every candidate that passed, in the order they would be tried."""
        while self._draw():
            pass
        return tuple(self._drawn)

    @functools.cached_property
    def weighed(self) -> tuple[Weighed, ...]:
        """Every candidate, in the order given, with its verdict or its weights."""
        return self._explain(self)

    def _draw(self) -> bool:
        """Draw the next candidate: from the highest tier left, in proportion to its odds."""
        left = self._left
        if not left:
            return False
        tiers, odds = self._tiers, self._odds
        if self._one_tier:
            tier = left
        else:
            best = max(tiers[i] for i in left)
            tier = [i for i in left if tiers[i] == best]
        weights = odds if len(tier) == len(odds) else [odds[i] for i in tier]
        total = sum(weights)
        if total > 0:
            at = bisect.bisect_right(
                list(itertools.accumulate(weights)), self._rng.random() * total
            )
            pick = tier[min(at, len(tier) - 1)]
        else:  # no candidate of the tier has known room: an even draw
            pick = tier[int(self._rng.random() * len(tier))]
        left.remove(pick)
        self._drawn.append(self._names[pick])
        return True


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
    multipliers = dict(DEFAULT_MULTIPLIERS if weighers is None else weighers)
    checks = [(name, FILTERS[name]) for name in filters if _APPLIES[name](spec)]
    passed = list(candidates)
    removed: list[tuple[str, str, str]] = []
    for name, sieve in checks:
        result = sieve(passed, spec)
        removed += [(cell.name, name, why) for cell, why in result.removed]
        passed = result.kept
    raw = {name: WEIGHERS[name][0](passed, spec) for name in multipliers}
    count = len(passed)
    tiers = [0.0] * count
    for name, values in raw.items():
        multiplier = multipliers[name]
        if name != SPREAD and multiplier and min(values, default=0.0) != max(values, default=0.0):
            normal = normalised(values)
            tiers = [t + multiplier * v for t, v in zip(tiers, normal, strict=True)]
    spread = multipliers.get(SPREAD, 0.0)
    odds = _odds(raw[SPREAD], spread) if spread else [1.0] * count

    def explain(decision: Decision) -> tuple[Weighed, ...]:
        normal = {name: normalised(values) for name, values in raw.items()}
        in_tier: dict[float, float] = {}
        many: dict[float, int] = {}
        for i, weight in enumerate(odds):
            in_tier[tiers[i]] = in_tier.get(tiers[i], 0.0) + weight
            many[tiers[i]] = many.get(tiers[i], 0) + 1
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
                    chance=odds[found] / pool if pool > 0 else 1.0 / many[tiers[found]],
                )
            )
        return tuple(weighed)

    names = [cell.name for cell in passed]
    return Decision(names, tiers, odds, rng, tuple(removed), explain)


def _odds(rooms: list[float], multiplier: float) -> list[float]:
    """Each candidate's weight in the draw of its tier, from its room for the flavor."""
    if multiplier > 0:
        return rooms
    return [1.0 / (1.0 + room) for room in rooms]
