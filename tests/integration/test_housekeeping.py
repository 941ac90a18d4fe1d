"""The periodic heal and the request-log trim, on a real database and a fake clock."""

from __future__ import annotations

import asyncio
import uuid as uuid_module
from collections.abc import Iterator
from datetime import UTC, datetime

import msgpack
import pytest
import sqlalchemy as sa
from zcells.db import instances as store
from zcells.db import outbox as outbox_store
from zcells.db.engine import Database
from zcells.db.models import RequestLogRow

from tests.fakes import run
from zcells.clock import FakeClock
from zcells.dbrunner import DbRunner
from zcells.errors import DatabaseError
from zcells.housekeeping import Housekeeping, HousekeepingSettings
from zcells.instances import Instance, new_instance, placed

T0 = 1_764_000_000.0


def uid(n: int) -> str:
    return str(uuid_module.UUID(int=n))


def server(n: int, now: float) -> Instance:
    return new_instance(
        uuid=uid(n),
        name=f"vm-{n}",
        project="p1",
        user="u1",
        flavor="m1.tiny",
        memory_mb=512,
        disk_gb=1,
        vcpus=1,
        image="cirros",
        metadata={},
        now=now,
    )


def owned(db: Database, n: int, changed_at: float) -> None:
    """An instance this cell owns, last changed at `changed_at`, placed without a host claim."""
    assert store.index_put(db, placed(server(n, changed_at), "api!c1", "h1", changed_at))


def queued(db: Database, after: int = 0) -> list[str]:
    rows = outbox_store.read_outbox(db, after, 1000)
    return [Instance.from_wire(msgpack.unpackb(p, raw=False)).uuid for _, _, p in rows]


def Clock() -> FakeClock:
    """Monotonic 100 s, wall time T0: the housekeeping's clock in these tests."""
    return FakeClock(start=100.0, wall_at_zero=T0 - 100.0)


@pytest.fixture
def runner(synced: Database) -> Iterator[DbRunner]:
    db_runner = DbRunner(synced)
    yield db_runner
    db_runner.close()


def keeper(
    runner: DbRunner,
    clock: Clock,
    *,
    count: int = 2,
    parents: bool = True,
    wakes: list[int] | None = None,
) -> Housekeeping:
    return Housekeeping(
        runner,
        HousekeepingSettings(
            heal_interval_s=60, heal_window_s=3600, heal_count=count, request_id_keep_s=86400
        ),
        has_parents=lambda: parents,
        changed=lambda: wakes.append(1) if wakes is not None else None,
        clock=clock,
    )


def test_heal_walks_the_recent_instances_in_slices_and_starts_over(runner: DbRunner) -> None:
    db = runner.db
    for n in (1, 2, 3):
        owned(db, n, T0 - 60)
    owned(db, 4, T0 - 7200)  # changed before the window: not the heal's business
    clock = Clock()
    wakes: list[int] = []
    heal = keeper(runner, clock, wakes=wakes)

    async def main() -> list[int]:
        return [await heal.heal_once() for _ in range(4)]

    assert run(main()) == [2, 1, 2, 1]
    assert queued(db) == [uid(1), uid(2), uid(3), uid(1), uid(2), uid(3)]
    assert heal.healed == 6 and len(wakes) == 4


def test_step_heals_on_its_interval_only_with_a_parent(runner: DbRunner) -> None:
    db = runner.db
    owned(db, 1, T0 - 10)
    clock = Clock()
    orphaned = keeper(runner, clock, parents=False)
    heal = keeper(runner, clock)

    async def main() -> None:
        await orphaned.step()
        assert queued(db) == []
        await heal.step()  # due at once when stepped by hand
        assert queued(db) == [uid(1)]
        clock.advance(30)
        await heal.step()  # half an interval later: nothing
        assert queued(db) == [uid(1)]
        clock.advance(31)
        await heal.step()
        assert queued(db) == [uid(1), uid(1)]

    run(main())


def test_trim_forgets_request_ids_past_the_keep_window(runner: DbRunner) -> None:
    db = runner.db
    for n, name in ((10, "old"), (11, "new")):
        base = server(n, T0)
        store.index_create(db, [base], f"req-{name}")
    with db.write() as session:
        session.execute(
            sa.update(RequestLogRow)
            .where(RequestLogRow.request_id == "req-old")
            .values(created_at=datetime.fromtimestamp(T0 - 2 * 86400, UTC))
        )
    clock = Clock()
    heal = keeper(runner, clock)

    async def main() -> None:
        assert await heal.trim_once() == 1
        assert await heal.trim_once() == 0

    run(main())  # the fake wall clock stands at T0; "new" was logged at the real time, later
    with db.read() as session:
        left = set(session.scalars(sa.select(RequestLogRow.request_id)))
    assert "req-old" not in left and "req-new" in left


def test_a_failing_step_is_logged_and_the_next_one_runs(
    runner: DbRunner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    owned(runner.db, 1, T0 - 10)
    clock = Clock()
    heal = keeper(runner, clock)
    calls = 0

    def broken(*args: object) -> tuple[int, str | None]:
        nonlocal calls
        calls += 1
        raise DatabaseError("disk I/O error")

    monkeypatch.setattr(outbox_store, "heal", broken)

    async def main() -> None:
        await heal.step()
        clock.advance(61)
        await heal.step()

    with caplog.at_level("WARNING"):
        run(main())
    assert calls == 2
    assert "housekeeping.failed" in caplog.text and "disk I/O error" in caplog.text


class Ticking(FakeClock):
    """A clock whose every sleep is noted and passes at once; the third one cancels."""

    def __init__(self) -> None:
        super().__init__(start=100.0, wall_at_zero=T0 - 100.0)
        self.ticks: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.ticks.append(seconds)
        self.advance(seconds)
        if len(self.ticks) == 3:
            raise asyncio.CancelledError


def test_run_sleeps_one_tick_between_steps(runner: DbRunner) -> None:
    clock = Ticking()
    ticks = clock.ticks
    owned(runner.db, 1, T0 - 10)
    heal = keeper(runner, clock)

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await heal.run()

    run(main())
    assert ticks == [60.0, 60.0, 60.0]
    assert queued(runner.db) == [uid(1), uid(1)]  # not at once: after one and two intervals
