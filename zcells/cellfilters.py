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


Filter = Callable[[CellCandidate, BuildSpec], str | None]
Weigher = Callable[[CellCandidate, BuildSpec], float]


def _within(path: str, root: str) -> bool:
    return (
        path == root
        or path.startswith(root + PATH_SEPARATOR)
        or root.startswith(path + PATH_SEPARATOR)
    )


def disabled(cell: CellCandidate, spec: BuildSpec) -> str | None:
    return None if cell.enabled else "disabled: takes no new builds"


def target_cell(cell: CellCandidate, spec: BuildSpec) -> str | None:
    if spec.target_cell is None or _within(cell.path, spec.target_cell):
        return None
    return f"not on the way to the target cell {spec.target_cell}"


def different_cell(cell: CellCandidate, spec: BuildSpec) -> str | None:
    for avoided in sorted(spec.different_cell):
        if cell.path == avoided or cell.path.startswith(avoided + PATH_SEPARATOR):
            return f"the build must avoid {avoided}"
    return None


def same_cell(cell: CellCandidate, spec: BuildSpec) -> str | None:
    if not spec.same_cell or any(_within(cell.path, kept) for kept in spec.same_cell):
        return None
    return f"the build must stay in {', '.join(sorted(spec.same_cell))}"


def capacity(cell: CellCandidate, spec: BuildSpec) -> str | None:
    if cell.capacity is None:
        return "has announced no capacity yet"
    if cell.capacity.fits(spec.flavor):
        return None
    flavor = spec.flavor
    free = cell.capacity
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
    return 0.0 if cell.capacity is None else float(cell.capacity.units_for(spec.flavor))


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
NOVA_NAMES: Final = {
    "TargetCellFilter": "target_cell",
    "DifferentCellFilter": "different_cell",
    "ImagePropertiesFilter": "image_properties",
    "RamByInstanceTypeWeigher": "ram_by_instance_type",
    "WeightOffsetWeigher": "weight_offset",
    "MuteChildWeigher": "mute_child",
}


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
    total: float = 0.0


@dataclass(frozen=True)
class Decision:
    order: tuple[str, ...]  # the candidates to try, best first
    weighed: tuple[Weighed, ...]  # every candidate, in the order given


def schedule(
    candidates: Sequence[CellCandidate],
    spec: BuildSpec,
    rng: random.Random,
    *,
    filters: Sequence[str] = tuple(FILTERS),
    weighers: Mapping[str, float] | None = None,
) -> Decision:
    """Filter, weigh and order `candidates` for `spec`; every step kept for the explanation."""
    multipliers = {name: m for name, (_, m) in WEIGHERS.items()} if weighers is None else weighers
    verdicts: list[tuple[str | None, str | None]] = []
    for cell in candidates:
        verdict: tuple[str | None, str | None] = (None, None)
        for name in filters:
            reason = FILTERS[name](cell, spec)
            if reason is not None:
                verdict = (name, reason)
                break
        verdicts.append(verdict)
    passed = [c for c, (by, _) in zip(candidates, verdicts, strict=True) if by is None]
    raw = {name: [WEIGHERS[name][0](c, spec) for c in passed] for name in multipliers}
    normal = {name: normalised(values) for name, values in raw.items()}
    totals = [
        sum(multipliers[name] * normal[name][i] for name in multipliers) for i in range(len(passed))
    ]
    draws = [rng.random() for _ in passed]  # ties go by a draw, never by the caller's order
    best_first = sorted(range(len(passed)), key=lambda i: (-totals[i], draws[i]))
    index = {c.name: i for i, c in enumerate(passed)}
    weighed = []
    for cell, (by, reason) in zip(candidates, verdicts, strict=True):
        i = index.get(cell.name)
        if by is not None or i is None:
            weighed.append(Weighed(cell.name, by, reason))
            continue
        weighed.append(
            Weighed(
                cell.name,
                None,
                None,
                raw={name: raw[name][i] for name in multipliers},
                normal={name: normal[name][i] for name in multipliers},
                total=totals[i],
            )
        )
    return Decision(tuple(passed[i].name for i in best_first), tuple(weighed))
