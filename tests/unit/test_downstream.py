"""The downward stream of global data against a child that is real below the wire.

The child here is a real `CatalogHandlers` on a database of its own, called
as a parent's `global_progress` and `global_updates` would reach it; the
scripted node only stands in for the link, so a call can be lost or fail.
The stream must hand the child every change once, in order, in bounded
batches, and the child must end with the parent's flavors, images and log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from zcells.db import catalog, migrate
from zcells.db.engine import Database

from tests.fakes import run
from tests.unit.scripted_node import ScriptedNode, ok, parent_call, runner
from zcells.clock import SYSTEM_CLOCK
from zcells.dbrunner import DbRunner
from zcells.downstream import Downstream, within_bytes
from zcells.errors import CallTimeout
from zcells.handlers.catalog import CatalogHandlers
from zcells.records import Flavor, Image

CHILD = "api!c1"


@dataclass
class Child:
    """A child cell as far as global data goes: its handlers, and what it was sent."""

    handlers: CatalogHandlers
    db: Database
    batches: list[list[int]] = field(default_factory=list)
    lose_answers: int = 0  # apply, then lose the answer, this many times

    async def progress(self, body: dict[str, Any]) -> Any:
        return ok(CHILD, await self.handlers.global_progress(parent_call("global_progress", body)))

    async def updates(self, body: dict[str, Any]) -> Any:
        self.batches.append([row[0] for row in body["rows"]])
        answer = await self.handlers.global_updates(parent_call("global_updates", body))
        if self.lose_answers:
            self.lose_answers -= 1
            raise CallTimeout("the answer was lost")
        return ok(CHILD, answer)


@pytest.fixture
def top(synced: Database) -> Iterator[DbRunner]:
    catalog.seed_default_flavors(synced)
    catalog.seed_default_images(synced)
    runs = runner(synced)
    yield runs
    runs.close()


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Child]:
    with Database(f"sqlite:///{tmp_path / 'child.db'}") as db:
        migrate.sync(db)
        runs = runner(db)
        try:
            yield Child(CatalogHandlers(runs, top=False), db)
        finally:
            runs.close()


def stream(top: DbRunner, child: Child, *, is_top: bool = True, **options: Any) -> Downstream:
    # The real clock: database calls run on threads, in real time.
    node = ScriptedNode(here="api", children=("c1",), clock=SYSTEM_CLOCK)
    node.calls[("global_progress", CHILD)] = child.progress
    node.calls[("global_updates", CHILD)] = child.updates
    return Downstream(node.as_node(), top, top=is_top, idle_s=0.01, retry_s=0.01, **options)


async def run_until(down: Downstream, done: Callable[[], bool], what: str) -> None:
    task = asyncio.create_task(down.run())
    try:
        async with asyncio.timeout(10):
            while not done():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def same_as_top(top: DbRunner, child: Child) -> bool:
    return catalog.read_log(child.db, 0, 1000) == catalog.read_log(top.db, 0, 1000)


def agrees(top: DbRunner, child: Child) -> None:
    assert catalog.list_flavors(child.db) == catalog.list_flavors(top.db)
    assert catalog.list_images(child.db) == catalog.list_images(top.db)
    assert catalog.last_seq(child.db) == catalog.last_seq(top.db)


def test_every_change_goes_down_once_in_order_in_bounded_batches(
    top: DbRunner, child: Child
) -> None:
    down = stream(top, child, batch_rows=4)
    run(run_until(down, lambda: same_as_top(top, child), "the child to catch up"))
    assert child.batches == [[1, 2, 3, 4], [5, 6]]
    agrees(top, child)
    assert down.applied == {"c1": 6}


def test_a_batch_is_cut_to_fit_its_bytes(top: DbRunner, child: Child) -> None:
    """However large the images, a batch fits the child's frame limit; one row always goes."""
    big = {f"key{n}": "v" * 200 for n in range(20)}
    catalog.create_image(top.db, Image("big-1", big))
    catalog.create_image(top.db, Image("big-2", big))
    down = stream(top, child, batch_bytes=5000)
    run(run_until(down, lambda: same_as_top(top, child), "the child to catch up"))
    assert child.batches == [[1, 2, 3, 4, 5, 6, 7], [8]]  # each big image is some 4.5 kB
    agrees(top, child)
    assert within_bytes([[1], [2]], 1) == [[1]]  # one row goes even past the limit


def test_a_change_made_while_the_stream_runs_goes_down_too(top: DbRunner, child: Child) -> None:
    async def main() -> None:
        down = stream(top, child)
        task = asyncio.create_task(down.run())
        try:
            await run_until_synced(top, child)
            await top.write(catalog.create_image, Image("ubuntu", {"architecture": "x86_64"}))
            await top.write(catalog.delete_flavor, "m1.tiny")
            down.wake()
            await run_until_synced(top, child)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run_until_synced(top: DbRunner, child: Child) -> None:
        async with asyncio.timeout(10):
            while not same_as_top(top, child):
                await asyncio.sleep(0.01)

    run(main())
    agrees(top, child)
    assert [i.name for i in catalog.list_images(child.db)] == ["cirros", "ubuntu"]
    assert "m1.tiny" not in {f.name for f in catalog.list_flavors(child.db)}
    sent = [seq for batch in child.batches for seq in batch]
    assert sent == sorted(set(sent))  # nothing sent twice


def test_a_lost_answer_resumes_from_what_the_child_applied(top: DbRunner, child: Child) -> None:
    child.lose_answers = 1
    down = stream(top, child, batch_rows=4)
    run(run_until(down, lambda: same_as_top(top, child), "the child to catch up"))
    # the first batch was applied, its answer lost: the stream asked again and went on at 5
    assert child.batches == [[1, 2, 3, 4], [5, 6]]
    agrees(top, child)


def test_a_child_that_was_away_gets_only_the_newest_of_each(top: DbRunner, child: Child) -> None:
    down = stream(top, child)
    run(run_until(down, lambda: same_as_top(top, child), "the first catch-up"))
    for ram in (1024, 2048, 4096):  # three changes of one flavor while the child is away
        catalog.delete_flavor(top.db, "m1.tiny")
        catalog.create_flavor(top.db, Flavor("m1.tiny", ram, 1, 1))
    child.batches.clear()
    down = stream(top, child)  # the child is back: a new stream asks where it stands
    run(run_until(down, lambda: same_as_top(top, child), "the second catch-up"))
    assert child.batches == [[12]]  # six changes, one row: the last
    assert catalog.get_flavor(child.db, "m1.tiny") == Flavor("m1.tiny", 4096, 1, 1)


def test_the_api_cell_logs_everything_again_for_a_child_ahead_of_it(
    top: DbRunner, child: Child
) -> None:
    """The API cell's database was restored from a backup older than what the child applied."""
    catalog.apply(child.db, catalog.read_log(top.db, 0, 1000))
    with child.db.write() as session:
        session.connection().exec_driver_sql("UPDATE counters SET value = 40 WHERE name = 'global'")
    catalog.create_image(top.db, Image("after-restore"))  # seq 7 here: below the child's 40
    down = stream(top, child)
    run(run_until(down, lambda: same_as_top(top, child), "the child to take the new numbers"))
    assert catalog.last_seq(top.db) == 47
    assert "after-restore" in {i.name for i in catalog.list_images(child.db)}
    agrees(top, child)


def test_a_middle_cell_never_renumbers_its_parents_rows(top: DbRunner, child: Child) -> None:
    with child.db.write() as session:
        session.connection().exec_driver_sql("INSERT INTO counters VALUES ('global', 40)")
    down = stream(top, child, is_top=False)
    run(run_until(down, lambda: down.applied.get("c1") == 40, "the child's progress"))
    assert catalog.last_seq(top.db) == 6
    assert [c.seq for c in catalog.read_log(top.db, 0, 100)] == [1, 2, 3, 4, 5, 6]
    assert child.batches == []  # nothing past 40 to send
