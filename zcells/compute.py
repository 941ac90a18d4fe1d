"""The fake compute driver: hosts simulated inside the cell process.

Rules kept here:

* The driver finishes what a cell started: a spawn, a power change, a
  reboot, a delete. Each finish is its own transaction through
  `zcells.db.instances.change`, so it writes its outbox row with it.
* A finish applies only if the instance still has the task it was
  scheduled for: a delete that started meanwhile wins, and the spawn it
  interrupted is dropped.
* Nothing is kept only in memory: after a restart, `resume` finds every
  unfinished task in the database and schedules it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from zcells import logs
from zcells.db import instances as store
from zcells.dbrunner import DbRunner
from zcells.errors import Conflict, DatabaseError, NotFoundRemote
from zcells.instances import Instance, TaskState, finish
from zcells.records import Host

log = logs.get_logger("compute")

# How long each task takes, as a share of a build: powering off or on, rebooting, deleting.
_TASK_SHARE = {
    TaskState.SPAWNING: 1.0,
    TaskState.POWERING_OFF: 0.2,
    TaskState.POWERING_ON: 0.2,
    TaskState.REBOOTING: 0.5,
    TaskState.DELETING: 0.1,
}
_RETRY_S = 1.0


def fake_hosts(count: int, memory_mb: int, disk_gb: int, vcpus: int) -> list[Host]:
    """The hosts of a fake-driver cell: h001, h002, ..., all alike."""
    width = max(3, len(str(count)))
    return [Host(f"h{i:0{width}d}", True, memory_mb, disk_gb, vcpus) for i in range(1, count + 1)]


class FakeDriver:
    """Runs each instance task to its end after a simulated delay."""

    def __init__(
        self,
        db: DbRunner,
        build_s: float,
        changed: Callable[[], None],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.build_s = build_s
        self._changed = changed  # new outbox rows: wake the upward stream
        self._clock = wall_clock
        self._tasks: set[asyncio.Task[None]] = set()
        self.finished = 0

    def schedule(self, instance: Instance) -> None:
        """Finish `instance`'s current task after its simulated delay."""
        task_state = instance.task_state
        if task_state is None or task_state not in _TASK_SHARE:
            return
        task = asyncio.create_task(self._finish(instance.uuid, task_state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resume(self) -> int:
        """Schedule every unfinished task found in the database; how many."""
        pending = await self.db.read(store.unfinished)
        for instance in pending:
            self.schedule(instance)
        if pending:
            logs.event(log, logging.INFO, "compute.resumed", tasks=len(pending))
        return len(pending)

    async def _finish(self, uuid: str, task_state: TaskState) -> None:
        delay = self.build_s * _TASK_SHARE[task_state]
        if delay > 0:
            await asyncio.sleep(delay)

        def complete(instance: Instance) -> Instance:
            if instance.task_state is not task_state:
                raise Conflict(f"instance {uuid} moved on from {task_state.value}")
            return finish(instance, self._clock())

        while True:
            try:
                await self.db.write(store.change, uuid, complete, request_id=None, method="finish")
            except (Conflict, NotFoundRemote):
                return  # another task took over, or the record is gone
            except DatabaseError as exc:  # locked or full: try again, nothing was written
                logs.event(log, logging.WARNING, "compute.finish_retry", uuid=uuid, error=exc)
                await asyncio.sleep(_RETRY_S)
                continue
            self.finished += 1
            self._changed()
            return

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
