"""One clock per cell: monotonic now, wall time, sleeping and timers.

Everything in a cell that reads the time or waits asks the `Clock` it was
given: the cell core's deadlines, the message loop's timers and heartbeats,
the upward stream, the fake driver, housekeeping and the timestamps written
to the database. Nothing else reads `time` or sleeps on the event loop.

Three clocks keep the same contract:

* `SystemClock`, the daemon's: the event loop's monotonic time, the system's
  wall time.
* `LoopClock`, the simulation's: the (virtual) time of the loop it is given,
  with a wall time that starts at a chosen instant and can be skewed per
  cell.
* `FakeClock`, the tests': time stands still until the test moves it with
  `advance`, which runs every timer that falls due, in order, at its exact
  time.

`now()` and `call_at()` speak the same monotonic seconds, so a deadline
computed from `now()` can be handed to `call_at()` as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol


class Timer(Protocol):
    """A callback scheduled with `Clock.call_at`; `cancel()` keeps it from running."""

    def cancel(self) -> None: ...


class Clock(ABC):
    @abstractmethod
    def now(self) -> float:
        """Monotonic seconds: for deadlines, intervals and timers."""

    @abstractmethod
    def wall(self) -> float:
        """Seconds since the epoch: for timestamps that cross the wire or reach the database."""

    @abstractmethod
    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` once `now()` reaches `when` (at once if it has)."""

    @abstractmethod
    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""

    @abstractmethod
    def timeout(self, seconds: float | None) -> asyncio.Timeout:
        """A scope that cancels its body after `seconds` of this clock's time (None: never)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self.now() + max(0.0, delay), callback)


class SystemClock(Clock):
    """The daemon's clock: the running loop's monotonic time and the system's wall time."""

    def now(self) -> float:
        return time.monotonic()  # what asyncio's loop.time() returns

    def wall(self) -> float:
        return time.time()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_at(when, callback)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float | None) -> asyncio.Timeout:
        return asyncio.timeout(seconds)


SYSTEM_CLOCK: Final = SystemClock()


class LoopClock(Clock):
    """The time of one event loop (virtual in a simulation), with its own wall-clock skew."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wall_at_zero: float) -> None:
        self.loop = loop
        self.wall_at_zero = wall_at_zero
        self.skew_s = 0.0  # how far this cell's wall clock is off

    def now(self) -> float:
        return self.loop.time()

    def wall(self) -> float:
        return self.wall_at_zero + self.loop.time() + self.skew_s

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return self.loop.call_at(when, callback)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float | None) -> asyncio.Timeout:
        return asyncio.timeout(seconds)


@dataclass(order=True)
class _FakeTimer:
    when: float
    order: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock(Clock):
    """Time that moves only when a test says so; timers run at their exact times."""

    def __init__(self, start: float = 1000.0, wall_at_zero: float = 1_700_000_000.0) -> None:
        self._now = start
        self.wall_at_zero = wall_at_zero
        self.skew_s = 0.0
        self._timers: list[_FakeTimer] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self.wall_at_zero + self._now + self.skew_s

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = _FakeTimer(when, next(self._order), callback)
        heapq.heappush(self._timers, timer)
        return timer

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        self.call_later(seconds, wake)
        await future

    def timeout(self, seconds: float | None) -> asyncio.Timeout:
        scope = asyncio.timeout(None)
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self.call_later(seconds, lambda: _expire(scope, loop))
        return scope

    def advance(self, seconds: float) -> None:
        """Move time on by `seconds`, running each timer due on the way at its own time."""
        until = self._now + seconds
        while self._timers and self._timers[0].when <= until:
            timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, timer.when)
            timer.callback()
        self._now = until

    async def run_for(self, seconds: float, step_s: float = 0.01) -> None:
        """Advance in steps of `step_s`, letting the loop run what is ready before each step
        and what the last step woke."""
        steps = max(1, round(seconds / step_s))
        for step in range(steps + 1):
            for _ in range(5):  # a woken task may wake another in turn
                await asyncio.sleep(0)
            if step < steps:
                self.advance(step_s)

    @property
    def pending(self) -> int:
        """Timers still to run."""
        return sum(1 for t in self._timers if not t.cancelled)


def _expire(scope: asyncio.Timeout, loop: asyncio.AbstractEventLoop) -> None:
    if scope.when() is None and not scope.expired():
        with contextlib.suppress(RuntimeError):  # the scope was left already
            scope.reschedule(loop.time())
