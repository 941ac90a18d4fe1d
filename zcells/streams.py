"""One stream per neighbour: the tasks that carry the outbox up and the global log down.

Rules kept here:

* A stream runs for each neighbour the registry names now (parents for the
  upward stream, children for the downward one), is started when the
  neighbour appears, and is cancelled when it goes; what was kept for it is
  forgotten then.
* Each stream has its bell: `wake` rings them all when there is something
  new to send, so a stream waiting for rows stops waiting.
* Leaving `follow` cancels every stream and waits for each to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from zcells.clock import Clock
from zcells.supervisor import Supervisor


class Streams:
    """The streams of one kind a cell keeps, one per neighbour, each with its bell."""

    def __init__(self, tasks: Supervisor, clock: Clock, kind: str) -> None:
        self.tasks = tasks
        self.clock = clock
        self.kind = kind  # names the tasks: "upstream-api"
        self.bells: dict[str, asyncio.Event] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    def wake(self) -> None:
        for bell in self.bells.values():
            bell.set()

    async def follow(
        self,
        wanted: Callable[[], Iterable[str]],
        stream: Callable[[str], Coroutine[Any, Any, None]],
        forget: Callable[[str], None],
        every_s: float,
    ) -> None:
        """Keep one `stream(name)` per name `wanted` gives, looked at every `every_s`."""
        try:
            while True:
                names = set(wanted())
                for name in names - self._running.keys():
                    self.bells[name] = asyncio.Event()
                    self._running[name] = self.tasks.spawn(stream(name), name=f"{self.kind}-{name}")
                for name in self._running.keys() - names:
                    self._running.pop(name).cancel()
                    self.bells.pop(name, None)
                    forget(name)
                await self.clock.sleep(every_s)
        finally:
            for task in self._running.values():
                task.cancel()
            await asyncio.gather(*self._running.values(), return_exceptions=True)
            self._running.clear()
            self.bells.clear()
