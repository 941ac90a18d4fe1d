"""What a cell, or a whole subtree, can still take: capacities, and their aggregation.

Pure: hosts, flavors and announcements in, figures out; no I/O, no clock.

Rules kept here:

1. A host's room is what is free on it after keeping `reserve_percent` of
   its size free (nova's `reserve_percent`, default 10). A disabled host has
   no room.
2. A cell's capacity, for each distinct RAM size, disk size and vCPU count
   among the flavors, is how many instances of that size still fit, counted
   host by host (an instance never spans hosts) and summed; with the total
   free RAM, disk and vCPUs beside. A flavor fits a cell only if its RAM, its
   disk and its vCPUs each have a unit left (`fits`).
3. A subtree's capacity is its own cell's plus its live children's latest
   announcements, added figure by figure; a child not alive adds nothing, so
   a dead subtree never draws builds.
4. An announcement carries a version that only grows for its cell (`Version`:
   the cell's start, then a counter). An older one never replaces a newer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from zcells.errors import SchemaError
from zcells.records import Flavor, Host

DEFAULT_RESERVE_PERCENT: Final = 10.0


@dataclass(frozen=True)
class Capacity:
    """Free resources in all, and instances of each size that still fit, summed over hosts."""

    ram_free_mb: int = 0
    disk_free_gb: int = 0
    vcpus_free: int = 0
    ram_units: Mapping[int, int] = field(default_factory=dict)  # memory_mb -> instances
    disk_units: Mapping[int, int] = field(default_factory=dict)  # disk_gb -> instances
    vcpu_units: Mapping[int, int] = field(default_factory=dict)  # vcpus -> instances

    def room_for(self, flavor: Flavor) -> int | None:
        """How many instances of `flavor` fit: the scarcest of its RAM, disk and vCPUs; None
        when a size of it is not counted here (the cell announced before it knew the flavor).

        Asked by a filter and a weigher for every candidate of every decision:
        the last answer is kept (a capacity never changes; a flavor is a value).
        """
        last = self.__dict__.get("_room")
        if last is not None and last[0] is flavor:
            known: int | None = last[1]
            return known
        memory, disk, vcpus = flavor.memory_mb, flavor.disk_gb, flavor.vcpus
        room: int | None = _MAX_FIGURE
        if memory > 0:
            room = self.ram_units.get(memory, -1)
        if disk > 0 and room is not None and room >= 0:
            count = self.disk_units.get(disk, -1)
            room = count if count < room else room
        if vcpus > 0 and room is not None and room >= 0:
            count = self.vcpu_units.get(vcpus, -1)
            room = count if count < room else room
        if room is not None and room < 0:
            room = None
        self.__dict__["_room"] = (flavor, room)  # not a field: neither compared nor sent
        return room

    def units_for(self, flavor: Flavor) -> int:
        """How many instances of `flavor` fit; a size not counted here counts as none."""
        return self.room_for(flavor) or 0

    def fits(self, flavor: Flavor) -> bool:
        return self.units_for(flavor) > 0

    def only(self, sizes: Capacity) -> Capacity:
        """This capacity counted only for the sizes `sizes` lists (a cell's own flavors):
        what a child said of sizes no flavor here has is dropped, not kept or passed up."""
        return replace(
            self,
            ram_units={s: n for s, n in self.ram_units.items() if s in sizes.ram_units},
            disk_units={s: n for s, n in self.disk_units.items() if s in sizes.disk_units},
            vcpu_units={s: n for s, n in self.vcpu_units.items() if s in sizes.vcpu_units},
        )

    def less(self, flavor: Flavor, count: int = 1) -> Capacity:
        """This capacity once `count` instances of `flavor` were placed in it (a parent's view
        between announcements); never below zero."""

        def minus(units: Mapping[int, int], size: int) -> dict[int, int]:
            if size <= 0:
                return dict(units)
            # Not knowing which host took it, count it against every size, conservatively:
            # an instance of `size` uses up ceil(size / s) instances of size s.
            return {s: max(0, n - (count * size + s - 1) // s) for s, n in units.items()}

        return Capacity(
            ram_free_mb=max(0, self.ram_free_mb - count * flavor.memory_mb),
            disk_free_gb=max(0, self.disk_free_gb - count * flavor.disk_gb),
            vcpus_free=max(0, self.vcpus_free - count * flavor.vcpus),
            ram_units=minus(self.ram_units, flavor.memory_mb),
            disk_units=minus(self.disk_units, flavor.disk_gb),
            vcpu_units=minus(self.vcpu_units, flavor.vcpus),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "ram_free_mb": self.ram_free_mb,
            "disk_free_gb": self.disk_free_gb,
            "vcpus_free": self.vcpus_free,
            "ram_units": {str(k): v for k, v in sorted(self.ram_units.items())},
            "disk_units": {str(k): v for k, v in sorted(self.disk_units.items())},
            "vcpu_units": {str(k): v for k, v in sorted(self.vcpu_units.items())},
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Capacity:
        """A capacity as a child sent it; `SchemaError` naming what is wrong."""
        if type(raw) is not dict or set(raw) != _WIRE_KEYS:
            raise SchemaError(f"capacity: expected the keys {sorted(_WIRE_KEYS)}")
        totals = [raw["ram_free_mb"], raw["disk_free_gb"], raw["vcpus_free"]]
        if any(type(v) is not int or not 0 <= v <= _MAX_FIGURE for v in totals):
            raise SchemaError("capacity: free figures must be whole numbers >= 0")
        return cls(
            ram_free_mb=totals[0],
            disk_free_gb=totals[1],
            vcpus_free=totals[2],
            ram_units=_units_from_wire(raw["ram_units"], "ram_units"),
            disk_units=_units_from_wire(raw["disk_units"], "disk_units"),
            vcpu_units=_units_from_wire(raw["vcpu_units"], "vcpu_units"),
        )


_WIRE_KEYS: Final = frozenset(
    {"ram_free_mb", "disk_free_gb", "vcpus_free", "ram_units", "disk_units", "vcpu_units"}
)
_MAX_FIGURE: Final = 2**53  # larger than any real cloud; keeps sums exact in every client
_MAX_SIZES: Final = 1000  # distinct sizes a capacity may list


def _units_from_wire(raw: Any, name: str) -> dict[int, int]:
    if type(raw) is not dict or len(raw) > _MAX_SIZES:
        raise SchemaError(f"capacity: {name} must be a map of at most {_MAX_SIZES} sizes")
    units: dict[int, int] = {}
    for key, value in raw.items():
        if type(key) is not str or not key.isdigit() or len(key) > 15:
            raise SchemaError(f"capacity: {name} keys are sizes, whole numbers")
        if type(value) is not int or not 0 <= value <= _MAX_FIGURE:
            raise SchemaError(f"capacity: {name} values are counts, whole numbers >= 0")
        units[int(key)] = value
    return units


def host_room(host: Host, reserve_percent: float) -> tuple[int, int, int]:
    """(RAM MB, disk GB, vCPUs) free on `host` after its reserve; nothing if disabled."""
    if not host.enabled:
        return 0, 0, 0
    keep = reserve_percent / 100.0
    free = host.free
    return (
        max(0, free.memory_mb - int(host.memory_mb * keep)),
        max(0, free.disk_gb - int(host.disk_gb * keep)),
        max(0, free.vcpus - int(host.vcpus * keep)),
    )


def cell_capacity(
    hosts: Sequence[Host],
    flavors: Sequence[Flavor],
    reserve_percent: float = DEFAULT_RESERVE_PERCENT,
) -> Capacity:
    """This cell's own capacity, from its hosts, for the sizes among `flavors`."""
    if not 0 <= reserve_percent < 100:
        raise ValueError(f"reserve_percent must be 0 to under 100, not {reserve_percent}")
    rooms = [host_room(host, reserve_percent) for host in hosts]
    sizes = (
        sorted({f.memory_mb for f in flavors if f.memory_mb > 0}),
        sorted({f.disk_gb for f in flavors if f.disk_gb > 0}),
        sorted({f.vcpus for f in flavors if f.vcpus > 0}),
    )
    units = [
        {size: sum(room[axis] // size for room in rooms) for size in sizes[axis]}
        for axis in range(3)
    ]
    return Capacity(
        ram_free_mb=sum(room[0] for room in rooms),
        disk_free_gb=sum(room[1] for room in rooms),
        vcpus_free=sum(room[2] for room in rooms),
        ram_units=units[0],
        disk_units=units[1],
        vcpu_units=units[2],
    )


def added(parts: Iterable[Capacity]) -> Capacity:
    """Capacities added figure by figure: a subtree's, from its cells'.

    Each figure stops at the largest a capacity may carry on the wire, so
    children that claim the most they may cannot make the sum one that this
    cell's parent would refuse.
    """
    total = Capacity()
    ram: dict[int, int] = {}
    disk: dict[int, int] = {}
    vcpu: dict[int, int] = {}
    ram_free = disk_free = vcpus_free = 0
    for part in parts:
        ram_free += part.ram_free_mb
        disk_free += part.disk_free_gb
        vcpus_free += part.vcpus_free
        for into, units in (
            (ram, part.ram_units),
            (disk, part.disk_units),
            (vcpu, part.vcpu_units),
        ):
            for size, count in units.items():
                into[size] = into.get(size, 0) + count
    if not (ram or disk or vcpu or ram_free or disk_free or vcpus_free):
        return total
    return Capacity(
        min(ram_free, _MAX_FIGURE),
        min(disk_free, _MAX_FIGURE),
        min(vcpus_free, _MAX_FIGURE),
        *(
            {size: min(count, _MAX_FIGURE) for size, count in units.items()}
            for units in (ram, disk, vcpu)
        ),
    )


@dataclass(frozen=True, order=True)
class Version:
    """An announcement's place among its cell's: the cell's start (ms), then a counter."""

    started_ms: int
    counter: int


@dataclass(frozen=True)
class Announcement:
    """What a cell said of its subtree: capacity and capabilities, with their version.

    `enabled` False: the cell takes no new builds (`[cells] enable = False`).
    """

    version: Version
    capacity: Capacity
    capabilities: Mapping[str, frozenset[str]] = field(default_factory=dict)
    enabled: bool = True

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": [self.version.started_ms, self.version.counter],
            "capacity": self.capacity.to_wire(),
            "capabilities": capabilities_to_wire(self.capabilities),
            "enabled": self.enabled,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Announcement:
        """An announcement as a child sent it; `SchemaError` naming what is wrong."""
        if type(raw) is not dict or set(raw) != _ANNOUNCEMENT_KEYS:
            raise SchemaError(f"announcement: expected the keys {sorted(_ANNOUNCEMENT_KEYS)}")
        version = raw["version"]
        if (
            type(version) is not list
            or len(version) != 2
            or any(type(v) is not int or not 0 <= v <= _MAX_FIGURE for v in version)
        ):
            raise SchemaError("announcement: version must be [started_ms, counter]")
        if type(raw["enabled"]) is not bool:
            raise SchemaError("announcement: enabled must be true or false")
        return cls(
            Version(version[0], version[1]),
            Capacity.from_wire(raw["capacity"]),
            capabilities_from_wire(raw["capabilities"]),
            raw["enabled"],
        )


_ANNOUNCEMENT_KEYS: Final = frozenset({"version", "capacity", "capabilities", "enabled"})
MAX_CAPABILITIES: Final = 64  # keys a cell may announce, and values per key
MAX_CAPABILITY_LENGTH: Final = 64


def capabilities_to_wire(capabilities: Mapping[str, frozenset[str]]) -> dict[str, list[str]]:
    return {key: sorted(values) for key, values in sorted(capabilities.items())}


def capabilities_from_wire(raw: Any) -> dict[str, frozenset[str]]:
    """Capabilities as a child sent them: at most `MAX_CAPABILITIES` keys of short strings.

    A subtree's capabilities are its cells' unioned, so the bound holds for
    the union too: a child cannot make its parent hold more than it allows.
    """
    if type(raw) is not dict or len(raw) > MAX_CAPABILITIES:
        raise SchemaError(f"capabilities: a map of at most {MAX_CAPABILITIES} keys")
    capabilities: dict[str, frozenset[str]] = {}
    for key, values in raw.items():
        if type(key) is not str or not 0 < len(key) <= MAX_CAPABILITY_LENGTH:
            raise SchemaError(f"capabilities: keys are strings of 1 to {MAX_CAPABILITY_LENGTH}")
        if type(values) is not list or len(values) > MAX_CAPABILITIES:
            raise SchemaError(f"capabilities: {key[:40]!r} must list at most {MAX_CAPABILITIES}")
        if any(type(v) is not str or not 0 < len(v) <= MAX_CAPABILITY_LENGTH for v in values):
            raise SchemaError(f"capabilities: values are strings of 1 to {MAX_CAPABILITY_LENGTH}")
        capabilities[key] = frozenset(values)
    return capabilities


def unioned(
    parts: Iterable[Mapping[str, frozenset[str]]],
) -> dict[str, frozenset[str]]:
    """Capabilities unioned key by key, within `MAX_CAPABILITIES` keys and values per key."""
    union: dict[str, frozenset[str]] = {}
    for part in parts:
        for key, values in part.items():
            if key not in union and len(union) >= MAX_CAPABILITIES:
                continue
            merged = union.get(key, frozenset()) | values
            union[key] = merged if len(merged) <= MAX_CAPABILITIES else _first(merged)
    return union


def _first(values: frozenset[str]) -> frozenset[str]:
    return frozenset(sorted(values)[:MAX_CAPABILITIES])


@dataclass
class ChildViews:
    """A parent's latest announcement from each child, and what it placed there since.

    An older announcement never replaces a newer one, unless the newer one
    was kept for `stale_after_s` without a newer coming (a child whose clock
    went back across a restart is heard again, not ignored for good).
    """

    stale_after_s: float = 180.0
    latest: dict[str, Announcement] = field(default_factory=dict)
    heard_at: dict[str, float] = field(default_factory=dict)  # child -> node clock

    def take(self, child: str, announcement: Announcement, now: float) -> bool:
        """Keep `announcement` unless one as new or newer is kept; whether it was taken."""
        kept = self.latest.get(child)
        fresh = now - self.heard_at.get(child, now) < self.stale_after_s
        if kept is not None and kept.version >= announcement.version and fresh:
            return False
        self.latest[child] = announcement
        self.heard_at[child] = now
        return True

    def keep_only(self, children: Iterable[str]) -> None:
        """Forget the children no longer registered."""
        wanted = set(children)
        for name in [n for n in self.latest if n not in wanted]:
            del self.latest[name]
            self.heard_at.pop(name, None)

    def placed(self, child: str, flavor: Flavor) -> None:
        """One instance of `flavor` went to `child`: take it off until the child says anew."""
        kept = self.latest.get(child)
        if kept is not None:
            self.latest[child] = replace(kept, capacity=kept.capacity.less(flavor))

    def subtree(
        self,
        own: Capacity,
        own_capabilities: Mapping[str, frozenset[str]],
        counted: Iterable[str],
    ) -> tuple[Capacity, dict[str, frozenset[str]]]:
        """This cell's subtree: its own capacity plus the `counted` children's; capabilities
        unioned.

        The caller counts the children that are alive and take builds: a
        mute or disabled child adds neither capacity nor capabilities.
        """
        live = [self.latest[name] for name in sorted(set(counted)) if name in self.latest]
        capabilities = unioned([own_capabilities, *(a.capabilities for a in live)])
        return added([own, *(a.capacity for a in live)]), capabilities
