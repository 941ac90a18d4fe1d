"""The clocks: a fake clock runs each timer at its exact time; the virtual loop jumps to it."""

from __future__ import annotations

import asyncio

import pytest

from tests.fakes import run
from zcells.clock import FakeClock, LoopClock
from zcells.sim.loop import Deadlock, VirtualTimeLoop


def test_timers_run_in_order_at_their_own_times() -> None:
    clock = FakeClock(start=10.0, wall_at_zero=1000.0)
    seen: list[tuple[str, float]] = []
    clock.call_at(12.5, lambda: seen.append(("b", clock.now())))
    clock.call_at(11.0, lambda: seen.append(("a", clock.now())))
    cancelled = clock.call_later(1.5, lambda: seen.append(("never", clock.now())))
    cancelled.cancel()
    clock.advance(1.0)
    assert seen == [("a", 11.0)]
    clock.advance(5.0)
    assert seen == [("a", 11.0), ("b", 12.5)]
    assert clock.now() == 16.0
    assert clock.wall() == 1016.0
    assert clock.pending == 0


def test_a_timer_set_by_a_timer_runs_within_the_same_advance() -> None:
    clock = FakeClock(start=0.0)
    seen: list[float] = []

    def first() -> None:
        seen.append(clock.now())
        clock.call_later(2.0, lambda: seen.append(clock.now()))

    clock.call_at(1.0, first)
    clock.advance(10.0)
    assert seen == [1.0, 3.0]


def test_sleep_and_timeout_follow_the_fake_clock() -> None:
    clock = FakeClock(start=0.0)

    async def main() -> list[str]:
        events: list[str] = []

        async def sleeper() -> None:
            await clock.sleep(5.0)
            events.append(f"woke at {clock.now():g}")

        async def bounded() -> None:
            try:
                async with clock.timeout(3.0):
                    await asyncio.Event().wait()
            except TimeoutError:
                events.append(f"timed out at {clock.now():g}")

        tasks = [asyncio.create_task(sleeper()), asyncio.create_task(bounded())]
        await clock.run_for(10.0, step_s=1.0)
        await asyncio.gather(*tasks)
        return events

    assert run(main()) == ["timed out at 3", "woke at 5"]


def test_skew_moves_wall_time_only() -> None:
    clock = FakeClock(start=5.0, wall_at_zero=100.0)
    clock.skew_s = -1.5
    assert (clock.now(), clock.wall()) == (5.0, 103.5)


def test_the_virtual_loop_jumps_to_the_next_timer() -> None:
    loop = VirtualTimeLoop()
    clock = LoopClock(loop, wall_at_zero=1_000.0)
    try:

        async def main() -> tuple[float, float, bool]:
            await asyncio.sleep(3600)  # an hour, at once
            timed_out = False
            try:
                async with asyncio.timeout(5):
                    await asyncio.sleep(60)
            except TimeoutError:
                timed_out = True
            return clock.now(), clock.wall(), timed_out

        assert loop.run_until_complete(main()) == (3605.0, 4605.0, True)
    finally:
        loop.close()


def test_a_virtual_loop_with_nothing_to_do_says_so() -> None:
    loop = VirtualTimeLoop()
    try:
        with pytest.raises(Deadlock):
            loop.run_until_complete(asyncio.Event().wait())
    finally:
        loop.close()
