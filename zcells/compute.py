"""The fake compute driver: hosts simulated inside the cell process.

Rules kept here:

* The driver finishes what a cell started: a spawn, a power change, a
  reboot, a delete. The finishes that fall due together are written in one
  transaction (`zcells.db.instances.change_each`), each with its own outbox
  row: a transaction per finish cost more than the finish.
* A finish applies only if the instance still has the task it was
  scheduled for: a delete that started meanwhile wins, and the spawn it
  interrupted is dropped.
* Nothing is kept only in memory: after a restart, `resume` finds every
  unfinished task in the database and schedules it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from zcells import logs
from zcells.clock import SYSTEM_CLOCK, Clock
from zcells.db import instances as store
from zcells.dbrunner import DbRunner
from zcells.errors import Conflict, DatabaseError
from zcells.instances import Instance, TaskState, finish
from zcells.records import Host
from zcells.supervisor import Supervisor

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
FINISH_BATCH = 500  # finishes written in one transaction at most


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
        clock: Clock = SYSTEM_CLOCK,
        tasks: Supervisor | None = None,
    ) -> None:
        self.db = db
        self.tasks = tasks or Supervisor()
        self.build_s = build_s
        self._changed = changed  # new outbox rows: wake the upward stream
        self.clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._due: list[tuple[str, TaskState]] = []  # finishes to write, oldest first
        self._writing: asyncio.Task[None] | None = None
        self.finished = 0

    def schedule(self, instance: Instance) -> None:
        """Finish `instance`'s current task after its simulated delay."""
        task_state = instance.task_state
        if task_state is None or task_state not in _TASK_SHARE:
            return
        self._spawn(self._finish(instance.uuid, task_state))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.tasks.spawn(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
            await self.clock.sleep(delay)
        self._due.append((uuid, task_state))
        if self._writing is None or self._writing.done():
            self._writing = self._spawn(self._write_due())

    async def _write_due(self) -> None:
        """Write the finishes due, a batch at a time, until none is left."""
        while self._due:
            batch, self._due = self._due[:FINISH_BATCH], self._due[FINISH_BATCH:]
            changes = [(uuid, self._completion(uuid, state)) for uuid, state in batch]
            try:
                outcomes = await self.db.write(store.change_each, changes)
            except DatabaseError as exc:  # locked or full: try again, nothing was written
                logs.event(
                    log, logging.WARNING, "compute.finish_retry", tasks=len(batch), error=exc
                )
                self._due[:0] = batch
                await self.clock.sleep(_RETRY_S)
                continue
            # Conflict (another task took over) or NotFoundRemote (gone): nothing to finish.
            done = sum(1 for outcome in outcomes if isinstance(outcome, Instance))
            if done:
                self.finished += done
                self._changed()

    def _completion(self, uuid: str, task_state: TaskState) -> Callable[[Instance], Instance]:
        def complete(instance: Instance) -> Instance:
            if instance.task_state is not task_state:
                raise Conflict(f"instance {uuid} moved on from {task_state.value}")
            return finish(instance, self.clock.wall())

        return complete

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
