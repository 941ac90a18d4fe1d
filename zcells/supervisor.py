"""The owner of a cell's background tasks.

Rules kept here:

* Every task a running cell starts outside a request's own scope (builds,
  the fake driver's work, the upward streams, moves, coroutine handlers)
  is spawned through the `Supervisor` handed to it at start, and belongs to
  the supervisor's `asyncio.TaskGroup`; none is left running when the cell
  stops.
* A task that fails with an exception is a bug: it is logged with its
  traceback and counted, and the cell goes on; one bad build never stops
  the cell. Cancellation always goes through (it is never caught here).
* Leaving the `async with` block cancels what is still running and waits
  for it. A supervisor never opened (a part tested on its own) still owns
  its tasks: `close()` cancels them and waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Self

from zcells import logs

log = logs.get_logger("supervisor")


class SupervisorClosed(RuntimeError):
    """A task was spawned on a supervisor that is not open."""


class Supervisor:
    def __init__(self) -> None:
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.failed = 0

    async def __aenter__(self) -> Self:
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._group = group
        return self

    async def __aexit__(self, *exc: Any) -> None:
        group, self._group = self._group, None
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        assert group is not None
        await group.__aexit__(*exc)

    @property
    def open(self) -> bool:
        return self._group is not None

    def spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> asyncio.Task[None]:
        """Run `coro` as a task of this supervisor."""
        if self._closed:
            coro.close()
            raise SupervisorClosed("the cell has stopped: no task may start")
        if self._group is not None:
            task = self._group.create_task(self._guarded(coro), name=name)
        else:
            task = asyncio.get_running_loop().create_task(self._guarded(coro), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: coro.close())  # cancelled before it began: no warning
        return task

    async def close(self) -> None:
        """Cancel every task still running and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except Exception:
            self.failed += 1
            log.exception("task.failed")

    def __len__(self) -> int:
        return len(self._tasks)
