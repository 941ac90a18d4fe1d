"""Cell scheduling at one cell: its children's announcements, its own, and its decisions.

Rules kept here (DESIGN.md §6):

1. A cell's own capacity comes from its hosts and the flavors it knows, after
   `reserve_percent`; its capabilities from `[cells] capabilities`. It
   announces its subtree (its own capacity plus that of its children that
   are alive and take builds; capabilities unioned) to its parent: soon
   after anything changed (at most once per `debounce_s`), every
   `interval_s`, and when a link to its parent comes up.
2. A child is heard only for itself, over its own link (the `announce`
   method is `own_link`, for children only); an older announcement never
   replaces a newer one (`ChildViews`). A child whose announcement is taken
   makes this cell announce again, so a change climbs the tree.
3. A decision weighs the children (and this cell's own hosts, `HERE`) as the
   announcements say, less what this cell placed in each since
   (`placed`), so a burst between two announcements spreads.
4. A cell that is not alive adds nothing to its parent's subtree, and is
   weighed down (the mute child weigher), not dropped: it is the last resort.
5. `[cells] enable = False`: the cell announces that it takes no new builds;
   its parent's `disabled` filter removes it, and a build sent all the same
   is refused here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from zcells import entropy, logs
from zcells.capacity import (
    DEFAULT_RESERVE_PERCENT,
    Announcement,
    Capacity,
    ChildViews,
    Version,
    cell_capacity,
)
from zcells.cellfilters import (
    DEFAULT_MULTIPLIERS,
    FILTERS,
    BuildSpec,
    CellCandidate,
    Decision,
    schedule,
)
from zcells.cellsched import HERE
from zcells.db import catalog
from zcells.db import hosts as hosts_store
from zcells.db.engine import Database
from zcells.dbrunner import DbRunner
from zcells.errors import DatabaseError, SchemaError, WireError
from zcells.liveness import Liveness
from zcells.messages import CellResult, Outcome
from zcells.names import child_path
from zcells.peer import Peer, Role
from zcells.port import CellPort
from zcells.records import Flavor

log = logs.get_logger("scheduling")

_ALIVE: Final = frozenset({Liveness.ALIVE, Liveness.LATE})
ALIVE_REFRESH_S: Final = 1.0
MAX_FLAVORS_KEPT: Final = 1000


@dataclass(frozen=True)
class SchedulerSettings:
    """`[cells]` options of the cell scheduler, in zcells' names."""

    filters: tuple[str, ...] = tuple(FILTERS)
    weighers: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MULTIPLIERS))
    reserve_percent: float = DEFAULT_RESERVE_PERCENT
    capabilities: Mapping[str, frozenset[str]] = field(default_factory=dict)
    enabled: bool = True
    interval_s: float = 60.0
    debounce_s: float = 0.5


class CellScheduling:
    """What one cell knows for its cell scheduler, and the decisions it takes from it.

    Pure of I/O: the `Announcer` feeds it the cell's own capacity and its
    children's announcements; the `Placer` asks it for decisions.
    """

    def __init__(
        self, node: CellPort, settings: SchedulerSettings, rng: random.Random | None = None
    ) -> None:
        self.node = node
        self.settings = settings
        # Placement, not secrets; seeded through `entropy` so a simulation replays it.
        self.rng = rng or random.Random(entropy.token_bytes(16))  # noqa: S311
        self.views = ChildViews(stale_after_s=3 * settings.interval_s)
        self.own = Capacity()
        self.own_known = False  # whether `own` was read from the hosts yet
        # The candidates as last made (see `candidates`).
        self._alive: frozenset[str] = frozenset()
        self._alive_at: float | None = None
        self._made: tuple[object, ...] | None = None
        self._list: list[CellCandidate] = []
        self._index: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._flavors: dict[Flavor, Flavor] = {}

    # -- what the cell knows ----------------------------------------------------------------

    def set_own(self, capacity: Capacity) -> None:
        self.own = capacity
        self.own_known = True
        self._dirty.add(HERE)

    def take(self, child: str, announcement: Announcement) -> bool:
        """A child's announcement, if it is newer than the one kept; whether it was taken."""
        if child not in self.node.view.children:
            return False
        # Kept whole (the wire bounds it): a flavor a child counts may reach this cell a moment
        # after the child's announcement; what this cell announces keeps only its own sizes.
        taken = self.views.take(child, announcement, self.node.clock.now())
        if taken:
            self._dirty.add(child)
        return taken

    def placed(self, name: str, flavor: Flavor) -> None:
        """One instance of `flavor` went to `name` (or `HERE`): off the view until it speaks."""
        if name == HERE:
            self.own = self.own.less(flavor)
        else:
            self.views.placed(name, flavor)
        self._dirty.add(name)

    def counted(self) -> list[str]:
        """The children whose announcements add to this cell's subtree: alive and enabled."""
        liveness = self.node.liveness()
        return [
            name
            for name in self.node.view.children
            if liveness.get(Peer(Role.CHILD, name)) in _ALIVE
            and name not in self.node.disabled
            and (name not in self.views.latest or self.views.latest[name].enabled)
        ]

    def subtree(self) -> tuple[Capacity, dict[str, frozenset[str]]]:
        capacity, capabilities = self.views.subtree(
            self.own, self.settings.capabilities, self.counted()
        )
        return (capacity.only(self.own) if self.own_known else capacity), capabilities

    # -- decisions ----------------------------------------------------------------------------

    def candidates(self, here: str, has_hosts: bool) -> list[CellCandidate]:
        """Every child with a path below `here`, and `HERE` when this cell has hosts.

        Kept between decisions: a candidate is made again only when what it
        shows changed (an announcement, a placement, the registry, liveness,
        which is read again at most every `ALIVE_REFRESH_S`), so a decision
        over a thousand children does not make a thousand objects.
        """
        now = self.node.clock.now()
        if self._alive_at is None or now - self._alive_at >= ALIVE_REFRESH_S:
            liveness = self.node.liveness()
            alive = frozenset(
                name
                for name in self.node.view.children
                if liveness.get(Peer(Role.CHILD, name)) in _ALIVE
            )
            self._alive_at = now
            if alive != self._alive:
                self._alive = alive
                self._made = None
        key = (here, has_hosts, self.node.view.children, self.node.disabled, self.node.weights)
        if self._made is None or any(a is not b for a, b in zip(key, self._made, strict=True)):
            self._made = key
            self._dirty.clear()
            self.views.keep_only(self.node.view.children)  # the registry may have changed
            self._list = [self._candidate(here, name) for name in sorted(self.node.view.children)]
            if has_hosts:
                self._list.append(self._own_candidate(here))
            self._index = {c.name: i for i, c in enumerate(self._list)}
        elif self._dirty:
            for name in self._dirty:
                i = self._index.get(name)
                if i is not None:
                    made = (
                        self._own_candidate(here) if name == HERE else self._candidate(here, name)
                    )
                    self._list[i] = made
            self._dirty.clear()
        return self._list

    def _candidate(self, here: str, name: str) -> CellCandidate:
        told = self.views.latest.get(name)
        offset, scale = self.node.weights.get(name, (0.0, 1.0))
        alive = name in self._alive
        return CellCandidate(
            name=name,
            path=child_path(here, name),
            enabled=name not in self.node.disabled and (told is None or told.enabled),
            alive=alive,
            mute=not alive,
            capacity=None if told is None else told.capacity,
            capabilities={} if told is None else told.capabilities,
            weight_offset=offset,
            weight_scale=scale,
        )

    def _own_candidate(self, here: str) -> CellCandidate:
        return CellCandidate(
            name=HERE,
            path=here,
            enabled=self.settings.enabled,
            capacity=self.own if self.own_known else None,
            capabilities=self.settings.capabilities,
            own=True,
        )

    def decide(self, spec: BuildSpec, here: str, has_hosts: bool) -> Decision:
        # One object per flavor: a capacity keeps its room for the last flavor it was asked
        # about, so the next build of that flavor finds it there instead of counting again.
        flavor = spec.flavor
        kept = self._flavors.setdefault(flavor, flavor)
        if kept is not flavor:
            spec = replace(spec, flavor=kept)
        if len(self._flavors) > MAX_FLAVORS_KEPT:
            self._flavors.clear()
        return schedule(
            self.candidates(here, has_hosts),
            spec,
            self.rng,
            filters=self.settings.filters,
            weighers=self.settings.weighers,
        )

    # -- what the cell says of itself -----------------------------------------------------------

    def announcement(self, version: Version) -> Announcement:
        capacity, capabilities = self.subtree()
        return Announcement(version, capacity, capabilities, self.settings.enabled)

    def status(self) -> dict[str, Any]:
        """This cell's own and subtree capacity, and each child's announcement with its age."""
        now = self.node.clock.now()
        counted = set(self.counted())
        capacity, capabilities = self.subtree()
        return {
            "enabled": self.settings.enabled,
            "capabilities": {k: sorted(v) for k, v in sorted(capabilities.items())},
            "own": self.own.to_wire() if self.own_known else None,
            "subtree": capacity.to_wire(),
            # Each child answers `status` with its own figures; here, what this cell heard.
            "children": {
                name: {
                    "disabled": name in self.node.disabled,  # by this cell's operator
                    "enabled": None if told is None else told.enabled,  # as the child says
                    "age_s": None if told is None else round(now - self.views.heard_at[name], 1),
                    "counted": name in counted,
                }
                for name in sorted(self.node.view.children)
                for told in [self.views.latest.get(name)]
            },
        }


def own_capacity(db: Database, reserve_percent: float) -> Capacity:
    """This cell's own capacity, from its hosts and flavors as the database holds them."""
    return cell_capacity(hosts_store.list_hosts(db), catalog.list_flavors(db), reserve_percent)


class Announcer:
    """Reads this cell's own capacity and announces its subtree to its parent.

    Runs in every cell; a cell with no parent (the API cell) only keeps its
    own capacity fresh for its decisions.
    """

    def __init__(
        self,
        node: CellPort,
        db: DbRunner,
        scheduling: CellScheduling,
        *,
        call_timeout_s: float = 10.0,
    ) -> None:
        self.node = node
        self.db = db
        self.scheduling = scheduling
        self.call_timeout_s = call_timeout_s
        self.version = Version(int(node.clock.wall() * 1000), 0)
        self._bell = asyncio.Event()
        self._bell.set()  # the first announcement goes at once

    def changed(self) -> None:
        """Something this cell would announce may have changed: announce soon."""
        self._bell.set()

    def link_up(self, peer: Peer) -> None:
        if peer.role is Role.PARENT:
            self._bell.set()

    def heard(self, child: str, raw: Any) -> bool:
        """A child's announcement from the wire; whether it was taken."""
        try:
            announcement = Announcement.from_wire(raw)
        except SchemaError as exc:
            raise SchemaError(f"announce: {exc.message}") from None
        taken = self.scheduling.take(child, announcement)
        if taken:
            self._bell.set()
        return taken

    async def run(self) -> None:
        settings = self.scheduling.settings
        while True:
            try:
                async with self.node.clock.timeout(settings.interval_s):
                    await self._bell.wait()
            except TimeoutError:
                pass
            self._bell.clear()
            await self.announce()
            await self.node.clock.sleep(settings.debounce_s)  # changes meanwhile wait for it

    async def announce(self) -> None:
        """Read the own capacity afresh and send the subtree's to every parent."""
        # Read in every cell: with no hosts, it still lists the sizes of the flavors here.
        try:
            own = await self.db.read(own_capacity, self.scheduling.settings.reserve_percent)
        except DatabaseError as exc:
            logs.limited(log, logging.WARNING, "announce.unreadable", "db", error=exc)
        else:
            self.scheduling.set_own(own)
        parents = [path for path in self.node.view.parents.values() if path is not None]
        if not parents:
            return
        self.version = Version(self.version.started_ms, self.version.counter + 1)
        body = {"announcement": self.scheduling.announcement(self.version).to_wire()}
        for path in parents:
            try:
                result = await self.node.call(
                    "announce", body, target=path, timeout_s=self.call_timeout_s
                )
            except WireError as exc:  # no link to the parent now: the next link up announces
                result = CellResult(path, Outcome.ERROR, error=exc)
            if result.error is not None:
                logs.limited(
                    log,
                    logging.WARNING,
                    "announce.failed",
                    path,
                    parent=path,
                    code=result.error.code,
                    error=result.error.message,
                )


def check_image_properties(raw: Any) -> dict[str, str]:
    """Image properties as a parent passes them down with a build: a short map of strings."""
    if raw is None:
        return {}
    if type(raw) is not dict or len(raw) > 32:
        raise SchemaError("image_properties: a map of at most 32 properties")
    for key, value in raw.items():
        if type(key) is not str or type(value) is not str or len(key) > 64 or len(value) > 255:
            raise SchemaError("image_properties: keys and values are short strings")
    return dict(raw)
