"""Periodic work of a running cell: the heal backstop and forgetting old request ids.

Rules kept here (DESIGN.md §4, §5):

* The heal is a backstop, not the path state takes: every
  `instance_update_interval` a cell with a parent queues again up to
  `instance_update_num_instances` of its instances changed within
  `instance_updated_at_threshold`, walking them in uuid order and starting
  over at the end. The rows go up through the outbox like any change, and a
  parent applies a version it already holds as a no-op, so a heal never
  undoes anything; it repairs a parent whose database lost a record.
* A request id answers its first result for `request_id_keep`; after that it
  is forgotten, so the request log stays bounded.
* A failed step is logged and retried next time; it never stops the cell.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from zcells import logs
from zcells.clock import SYSTEM_CLOCK, Clock
from zcells.db import instances as store
from zcells.db import outbox as outbox_store
from zcells.dbrunner import DbRunner
from zcells.errors import DatabaseError

log = logs.get_logger("housekeeping")

# The request log is trimmed this often at most, and at least once per keep window.
TRIM_EVERY_S = 3600.0


@dataclass(frozen=True)
class HousekeepingSettings:
    heal_interval_s: float
    heal_window_s: float
    heal_count: int
    request_id_keep_s: float

    @property
    def heals(self) -> bool:
        return self.heal_interval_s > 0 and self.heal_count > 0 and self.heal_window_s > 0

    @property
    def tick_s(self) -> float:
        trim = min(TRIM_EVERY_S, self.request_id_keep_s / 4)
        return min(self.heal_interval_s, trim) if self.heals else trim


class Housekeeping:
    """Runs the heal and the request-log trim on their intervals."""

    def __init__(
        self,
        db: DbRunner,
        settings: HousekeepingSettings,
        *,
        has_parents: Callable[[], bool],
        changed: Callable[[], None],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.db = db
        self.settings = settings
        self._has_parents = has_parents
        self._changed = changed
        self.clock = clock
        self._cursor = ""
        self._next_heal = 0.0
        self._next_trim = 0.0
        self.healed = 0

    async def heal_once(self) -> int:
        """Queue the next few recently changed instances again; how many."""
        since = self.clock.wall() - self.settings.heal_window_s
        count, last = await self.db.write(
            outbox_store.heal, since, self._cursor, self.settings.heal_count
        )
        self._cursor = last if last is not None and count == self.settings.heal_count else ""
        if count:
            self.healed += count
            self._changed()
        return count

    async def trim_once(self) -> int:
        """Forget request ids older than the keep window; how many."""
        older_than = self.clock.wall() - self.settings.request_id_keep_s
        return await self.db.write(store.trim_request_log, older_than)

    async def step(self) -> None:
        """Whatever is due now."""
        now = self.clock.now()
        if self.settings.heals and now >= self._next_heal and self._has_parents():
            self._next_heal = now + self.settings.heal_interval_s
            await self._guarded("heal", self.heal_once)
        if now >= self._next_trim:
            self._next_trim = now + min(TRIM_EVERY_S, self.settings.request_id_keep_s / 4)
            await self._guarded("trim_request_log", self.trim_once)

    async def run(self) -> None:
        # The first heal waits one interval: a cell just started streams its outbox anyway.
        self._next_heal = self.clock.now() + self.settings.heal_interval_s
        while True:
            await self.step()
            await self.clock.sleep(self.settings.tick_s)

    async def _guarded(self, what: str, work: Callable[[], Awaitable[int]]) -> None:
        try:
            count = await work()
        except DatabaseError as exc:
            logs.event(log, logging.WARNING, "housekeeping.failed", task=what, error=exc)
            return
        if count:
            logs.event(log, logging.INFO, f"housekeeping.{what}", count=count)
