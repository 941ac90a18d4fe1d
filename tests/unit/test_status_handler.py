"""The `status` method of one cell, and the message rate it reports, on a fake clock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import pytest
from zcells.db import hosts as hosts_store
from zcells.db import instances as store
from zcells.db import outbox as outbox_store
from zcells.db.engine import Database

from tests.fakes import run
from tests.unit.scripted_node import instance, parent_call, runner, uuids
from zcells.clock import FakeClock
from zcells.dbrunner import DbRunner
from zcells.handlers.status import MessageRate, StatusHandlers
from zcells.instances import VmState, placed
from zcells.liveness import Liveness
from zcells.peer import Peer, Role
from zcells.port import CellPort
from zcells.records import Host
from zcells.upstream import Upstream


class Counting:
    """A message count and a clock that tests move by hand."""

    def __init__(self) -> None:
        self.clock = FakeClock(start=100.0)
        self.messages = 0

    def count(self) -> int:
        return self.messages


def test_the_rate_is_over_the_samples_kept_and_the_ring_is_bounded() -> None:
    fake = Counting()
    rate = MessageRate(fake.count, window_s=3.0, interval_s=1.0, clock=fake.clock)
    assert rate.per_second() is None  # nothing sampled yet
    for _ in range(10):  # 10 messages a second for 10 seconds
        rate.sample()
        fake.clock.advance(1.0)
        fake.messages += 10
    assert rate.per_second() == pytest.approx(10.0)
    fake.messages += 40  # a burst in the last second counts, spread over the window
    assert rate.per_second() == pytest.approx((40 + 40) / 4.0)
    assert rate.statistics()["samples"] == 4  # window / interval + 1, however long it ran


def test_the_rate_is_never_negative_nor_divided_by_zero() -> None:
    fake = Counting()
    rate = MessageRate(fake.count, clock=fake.clock)
    rate.sample()
    assert rate.per_second() is None  # no time has passed
    fake.clock.advance(2.0)
    fake.messages = -5  # a counter that went back (a new transport) is no negative rate
    assert rate.per_second() == 0.0


@pytest.fixture
def db(synced: Database) -> Iterator[DbRunner]:
    db_runner = runner(synced)
    yield db_runner
    db_runner.close()


def handler(
    db: DbRunner,
    *,
    parents: dict[str, str | None],
    acked: dict[str, int],
    top: bool = False,
    liveness: dict[Peer, Liveness] | None = None,
    silence: dict[Peer, float | None] | None = None,
    problems: dict[str, str] | None = None,
    blocked: dict[str, str] | None = None,
) -> StatusHandlers:
    fake = Counting()
    node = SimpleNamespace(
        clock=FakeClock(start=0.0, wall_at_zero=time.time() + 60.0),  # a minute after the rows
        view=SimpleNamespace(parents=parents),
        cell_type="api" if top else "compute",
        liveness=lambda: liveness or {},
        silence=lambda: silence or {},
        problems=problems or {},
    )
    upstream = SimpleNamespace(acked=acked, blocked=blocked or {})
    rate = MessageRate(fake.count, clock=fake.clock)
    rate.sample()
    fake.clock.advance(2.0)
    fake.messages = 30
    return StatusHandlers(
        cast(CellPort, node),
        db,
        cast(Upstream, upstream),
        rate,
        top=top,
    )


def fill(db: Database) -> None:
    """Three hosts, one disabled; two instances on h1 (each an outbox row), one stopped."""
    hosts_store.sync_hosts(
        db,
        [
            Host("h1", True, 4096, 100, 8),
            Host("h2", True, 4096, 100, 8),
            Host("h3", False, 8192, 500, 32),
        ],
    )
    for n, uuid in enumerate(uuids(2)):
        store.place(
            db, ["h1"], lambda host, u=uuid: placed(instance(u), "api!c1", host, 2.0), f"r{n}"
        )
    store.change(
        db,
        next(iter(uuids(1))),
        lambda held: replace(held, vm_state=VmState.STOPPED, task_state=None),
        request_id=None,
        method="test",
    )


def test_a_compute_cell_answers_its_hosts_servers_backlog_children_and_rate(
    db: DbRunner,
) -> None:
    fill(db.db)
    c1, c2 = Peer(Role.CHILD, "g1"), Peer(Role.CHILD, "g2")
    status = handler(
        db,
        parents={"api": "api", "other": None},
        acked={"api": 2, "other": 1},
        liveness={c2: Liveness.MUTE, c1: Liveness.ALIVE, Peer(Role.PARENT, "api"): Liveness.ALIVE},
        silence={c1: 0.12345, c2: None},
    )

    said: dict[str, Any] = run(status.status(parent_call("status", {})))

    assert said["cell"] == "api!c1" and said["cell_type"] == "compute"
    assert said["children"] == {
        "g1": {"state": "alive", "heard_s_ago": 0.123},
        "g2": {"state": "mute", "heard_s_ago": None},
    }
    assert said["hosts"] == {
        "up": 2,
        "total": 3,
        "memory_mb": 8192,
        "memory_mb_free": 8192 - 2 * 512,
        "disk_gb": 200,
        "disk_gb_free": 198,
        "vcpus": 16,
        "vcpus_free": 14,
    }
    assert said["servers"] == {
        "source": "own",
        "counts": {"BUILD": 1, "ACTIVE": 0, "SHUTOFF": 1, "REBOOT": 0, "ERROR": 0},
    }
    # rows 1..3; "other" has applied only row 1, so rows 2 and 3 still wait
    assert [row[0] for row in outbox_store.read_outbox(db.db, 0, 10)] == [1, 2, 3]
    assert said["backlog"]["count"] == 2
    assert 60.0 <= said["backlog"]["oldest_s"] < 70.0
    assert said["msgs_per_s"] == 15.0


def test_the_backlog_counts_from_zero_for_a_parent_that_has_not_said_what_it_applied(
    db: DbRunner,
) -> None:
    fill(db.db)
    status = handler(db, parents={"api": None}, acked={})
    said = run(status.status(parent_call("status", {})))
    assert said["backlog"]["count"] == 3


def test_the_api_cell_counts_its_index_and_has_no_backlog(db: DbRunner) -> None:
    fill(db.db)
    status = handler(db, parents={}, acked={}, top=True)
    said = run(status.status(parent_call("status", {}, cell="api")))
    assert said["servers"]["source"] == "index"
    assert said["backlog"] == {"count": 0, "oldest_s": None}
    assert said["children"] == {}


def test_a_cell_with_no_hosts_answers_zeros(db: DbRunner) -> None:
    status = handler(db, parents={}, acked={}, top=True)
    said = run(status.status(parent_call("status", {}, cell="api")))
    assert said["hosts"] == dict.fromkeys(
        ("up", "total", "memory_mb", "memory_mb_free", "disk_gb", "disk_gb_free"), 0
    ) | {"vcpus": 0, "vcpus_free": 0}
    assert sum(said["servers"]["counts"].values()) == 0


def test_problems_name_refused_hellos_held_rows_and_a_stopped_stream(db: DbRunner) -> None:
    """Finding 10: `zcells status` shows what wedged a stream, instead of calling it healthy."""
    cycle = "cycle in the registry: parent path api!c1!g1 holds api already; fix the cells tables"
    outbox_store.hold(db.db, "api", [(7, "instance", b"x", "E_SENDER_MISMATCH", "no")])
    status = handler(
        db,
        parents={"api": "api"},
        acked={"api": 0},
        problems={"api": cycle},
        blocked={"api": "E_TIMEOUT"},
    )
    answer = run(status.status(parent_call("status", {})))
    assert answer["problems"] == [
        f"parent api: {cycle}",
        "1 rows refused by parent api, held aside",
        "stream to parent api stopped: E_TIMEOUT",
    ]
