"""Deleting orphan copies until each cell acknowledges it, across restarts (DESIGN.md §5).

Rules kept here:

* An orphan is a copy of an instance in a cell the index does not hold it
  under. It is noted durably where it is found (`zcells.db.orphans`), never
  only in memory, and this sweeper sends that cell the delete, with the
  request id ``orphan-<uuid>`` so repeats are free, until the cell answers.
* A cell that answers the delete (or that no longer holds the copy) settles
  the orphan; any other failure is tried again later, backing off from 1 s
  to `MAX_BACKOFF_S`. Nothing is given up on.
* After a restart the sweeper picks up where it was: the table is the state.
"""

from __future__ import annotations

import asyncio
import logging

from zcells import logs
from zcells.builds import orphan_request_id
from zcells.db import instances as store
from zcells.db import orphans as orphans_store
from zcells.dbrunner import DbRunner
from zcells.errors import Conflict, DatabaseError, NotFoundRemote, WireError
from zcells.instances import Instance
from zcells.port import CellPort

log = logs.get_logger("orphans")

MAX_BACKOFF_S = 60.0
BATCH = 64


def backoff_s(attempts: int) -> float:
    """The wait before the next try of an orphan that failed `attempts` + 1 times."""
    return min(MAX_BACKOFF_S, 2.0 ** min(attempts, 16))


class Orphans:
    """The API cell's sweeper of orphan copies."""

    def __init__(
        self,
        node: CellPort,
        db: DbRunner,
        *,
        idle_s: float = 1.0,
        call_timeout_s: float = 10.0,
    ) -> None:
        self.node = node
        self.db = db
        self.idle_s = idle_s
        self.call_timeout_s = call_timeout_s
        self._bell = asyncio.Event()
        self.deleted = 0
        self.failed = 0

    def wake(self) -> None:
        """New orphans were noted: look at once."""
        self._bell.set()

    async def run(self) -> None:
        """Sweep until cancelled."""
        while True:
            try:
                swept = await self.sweep()
            except DatabaseError as exc:
                logs.event(log, logging.WARNING, "orphans.db_failed", error=exc.__class__.__name__)
                swept = 0
            if swept == 0:
                self._bell.clear()
                try:
                    async with self.node.clock.timeout(self.idle_s):
                        await self._bell.wait()
                except TimeoutError:
                    pass

    async def sweep(self) -> int:
        """Try every orphan due now; how many were tried."""
        due = await self.db.read(orphans_store.due, self.node.clock.wall(), BATCH)
        await asyncio.gather(*(self._delete(uuid, cell, attempts) for uuid, cell, attempts in due))
        return len(due)

    async def _delete(self, uuid: str, cell: str, attempts: int) -> None:
        body = {"uuid": uuid, "action": "delete", "request_id": orphan_request_id(uuid)}
        try:
            result = await self.node.call(
                "instance_action", body, target=cell, timeout_s=self.call_timeout_s
            )
            answer = result.unwrap()
            record = answer.get("instance") if isinstance(answer, dict) else None
            await self.db.write(store.index_put, Instance.from_wire(record))
        except (NotFoundRemote, Conflict):
            pass  # the cell holds no copy now, or deletes it already: nothing is left to do
        except WireError as exc:
            self.failed += 1
            wait = backoff_s(attempts)
            logs.event(
                log,
                logging.WARNING,
                "orphan.delete_failed",
                uuid=uuid,
                cell=cell,
                code=exc.code,
                attempts=attempts + 1,
                retry_in_s=wait,
            )
            await self.db.write(orphans_store.retry, uuid, cell, wait, exc.code)
            return
        self.deleted += 1
        logs.event(log, logging.INFO, "orphan.deleted", uuid=uuid, cell=cell)
        await self.db.write(orphans_store.done, uuid, cell)

    def statistics(self) -> dict[str, int]:
        return {"deleted": self.deleted, "failed": self.failed}
