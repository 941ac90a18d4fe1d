"""The supervisor: it owns every background task, survives a failing one, stops them all."""

from __future__ import annotations

import asyncio

import pytest

from tests.fakes import run
from zcells.supervisor import Supervisor, SupervisorClosed


def test_a_failing_task_is_counted_and_the_others_go_on() -> None:
    async def main() -> tuple[int, list[str]]:
        done: list[str] = []

        async def fails() -> None:
            raise ValueError("a bug")

        async def works() -> None:
            await asyncio.sleep(0)
            done.append("worked")

        async with Supervisor() as tasks:
            tasks.spawn(fails())
            tasks.spawn(works())
            for _ in range(10):
                await asyncio.sleep(0)
            return tasks.failed, done

    assert run(main()) == (1, ["worked"])


def test_leaving_cancels_what_still_runs_and_nothing_may_start_after() -> None:
    async def main() -> None:
        cancelled: list[bool] = []

        async def forever() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        async with Supervisor() as tasks:
            tasks.spawn(forever())
            await asyncio.sleep(0)  # the first one is waiting now
            tasks.spawn(forever())  # cancelled before it ever runs (and no warning for it)
            assert len(tasks) == 2
        assert len(tasks) == 0
        assert cancelled == [True]
        with pytest.raises(SupervisorClosed):
            tasks.spawn(forever())

    run(main())


def test_a_supervisor_never_opened_still_owns_its_tasks() -> None:
    async def main() -> int:
        tasks = Supervisor()
        tasks.spawn(asyncio.Event().wait())
        await asyncio.sleep(0)
        owned = len(tasks)
        await tasks.close()
        return owned + len(tasks)

    assert run(main()) == 1
