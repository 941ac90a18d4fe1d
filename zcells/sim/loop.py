"""An asyncio event loop whose clock is virtual.

The loop's selector never waits: asked to wait up to `timeout` seconds for
I/O that a simulation never does, it moves the clock on by `timeout`
instead, which is exactly the time until the next timer. Every timer,
`asyncio.sleep` and `asyncio.timeout` in the simulated cells therefore runs
at its exact virtual time, as soon as the loop has nothing else to do.

No threads may run beside it (a database runner in a thread would wake the
loop through its self-pipe, in real time): simulated cells use
`InlineDbRunner`.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Mapping
from typing import Any


class Deadlock(RuntimeError):
    """Nothing is ready and nothing is scheduled: the simulation can never go on."""


class _VirtualSelector(selectors.BaseSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._keys: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Deadlock("nothing is ready and no timer is set")
        self._loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose `time()` moves only when it would otherwise wait."""

    def __init__(self, start: float = 0.0) -> None:
        self._virtual_now = start
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self._virtual_now += seconds
