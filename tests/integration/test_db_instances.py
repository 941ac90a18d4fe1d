"""Instances, hosts, the outbox and the parent's index on a real SQLite file and PostgreSQL."""

from __future__ import annotations

import random
import threading
import time
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import msgpack
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from zcells.db import hosts, instance_rows, migrate, orphans
from zcells.db import instances as store
from zcells.db import outbox as outbox_store
from zcells.db.engine import Database
from zcells.db.models import HostRow, InstanceFaultRow, InstanceRow, RequestLogRow, UTCDateTime

from zcells.errors import (
    Conflict,
    InvalidRequest,
    NotFoundRemote,
    SchemaError,
    ValidationError,
)
from zcells.instances import (
    Action,
    Fault,
    Instance,
    TaskState,
    VmState,
    begin,
    failed,
    finish,
    new_instance,
    placed,
)
from zcells.records import Host

T0 = 1_764_000_000.25
CELL = "api!eu!eu-1"


def uid(n: int) -> str:
    return str(uuid_module.UUID(int=n))


def server(
    n: int,
    *,
    project: str = "p1",
    name: str | None = None,
    now: float = T0,
    memory_mb: int = 2048,
    disk_gb: int = 20,
    vcpus: int = 1,
) -> Instance:
    """A server as the API cell records it first: building, no cell, version 0."""
    return new_instance(
        uuid=uid(n),
        name=name or f"vm-{n}",
        project=project,
        user="u1",
        flavor="m1.small",
        memory_mb=memory_mb,
        disk_gb=disk_gb,
        vcpus=vcpus,
        image="cirros",
        metadata={"role": "web"},
        now=now,
    )


def on_host(base: Instance, cell: str = CELL, now: float = T0 + 1) -> Callable[[str], Instance]:
    return lambda host: placed(base, cell, host, now)


def act(db: Database, uuid: str, fn: Callable[[Instance], Instance]) -> Instance:
    """A change outside any request (a task finishing, a periodic job)."""
    return store.change(db, uuid, fn, request_id=None, method="task")


def row(seq: int, instance: Instance) -> tuple[int, str, bytes]:
    return (seq, "instance", msgpack.packb(instance.to_wire(), use_bin_type=True))


def decoded(payload: bytes) -> Instance:
    return Instance.from_wire(msgpack.unpackb(payload, raw=False))


def usage(db: Database) -> dict[str, tuple[int, int, int]]:
    return {h.name: (h.memory_mb_used, h.disk_gb_used, h.vcpus_used) for h in hosts.list_hosts(db)}


def fault_rows(db: Database) -> list[tuple[object, ...]]:
    """The fault history: (instance uuid, version, code, cell) in version order."""
    with db.read() as session:
        rows = session.execute(
            sa.select(
                InstanceFaultRow.instance_uuid,
                InstanceFaultRow.version,
                InstanceFaultRow.code,
                InstanceFaultRow.cell_name,
            ).order_by(InstanceFaultRow.instance_uuid, InstanceFaultRow.version)
        )
        return [tuple(r) for r in rows]


@pytest.fixture
def cell(synced: Database) -> Database:
    """A compute cell with two hosts: h1 fits one m1.small, h2 fits four."""
    hosts.sync_hosts(synced, [Host("h1", True, 2048, 20, 1), Host("h2", True, 8192, 80, 4)])
    return synced


# -- placement ------------------------------------------------------------------------------


def test_place_claims_the_first_host_with_room_and_queues_the_record(cell: Database) -> None:
    first = store.place(cell, ["h1", "h2"], on_host(server(1)), "req-1")
    assert first is not None and first.host == "h1" and first.cell == CELL
    assert first.task_state is TaskState.SPAWNING and first.version == 1
    # h1 is full now: the claim moves on to h2
    second = store.place(cell, ["h1", "h2"], on_host(server(2)), "req-2")
    assert second is not None and second.host == "h2"
    assert usage(cell) == {"h1": (2048, 20, 1), "h2": (2048, 20, 1)}
    assert store.get(cell, first.uuid) == first
    assert store.get(cell, second.uuid) == second
    outbox = outbox_store.read_outbox(cell, 0, 10)
    assert [(seq, kind) for seq, kind, _ in outbox] == [(1, "instance"), (2, "instance")]
    assert [decoded(payload) for _, _, payload in outbox] == [first, second]
    assert outbox_store.last_seq(cell) == 2


def test_place_skips_disabled_and_unknown_hosts(cell: Database) -> None:
    hosts.sync_hosts(cell, [Host("h1", False, 2048, 20, 1), Host("h2", True, 8192, 80, 4)])
    placed_on = store.place(cell, ["nope", "h1", "h2"], on_host(server(1)), "req-1")
    assert placed_on is not None and placed_on.host == "h2"


def test_place_claims_every_resource(cell: Database) -> None:
    # RAM fits h1, disk does not; vCPUs fit h1, RAM does not
    assert store.place(cell, ["h1"], on_host(server(1, disk_gb=21)), "r1") is None
    assert store.place(cell, ["h1"], on_host(server(2, memory_mb=2049)), "r2") is None
    assert store.place(cell, ["h1"], on_host(server(3, vcpus=2)), "r3") is None
    assert store.place(cell, ["h1"], on_host(server(4)), "r4") is not None


def test_place_without_room_writes_nothing(cell: Database) -> None:
    big = server(1, memory_mb=100_000)
    assert store.place(cell, ["h1", "h2"], on_host(big), "req-1") is None
    assert store.place(cell, [], on_host(big), "req-2") is None
    assert store.get(cell, big.uuid) is None
    assert outbox_store.read_outbox(cell, 0, 10) == [] and outbox_store.last_seq(cell) == 0
    assert usage(cell) == {"h1": (0, 0, 0), "h2": (0, 0, 0)}
    # the request id was not used up: once a host has room the same request places it
    hosts.sync_hosts(cell, [Host("h1", True, 2048, 20, 1), Host("h2", True, 200_000, 80, 4)])
    again = store.place(cell, ["h1", "h2"], on_host(big), "req-1")
    assert again is not None and again.host == "h2"


def test_place_repeated_by_request_id_answers_the_first_result(cell: Database) -> None:
    first = store.place(cell, ["h2"], on_host(server(1)), "req-1")
    calls: list[str] = []

    def other(host: str) -> Instance:
        calls.append(host)
        return placed(server(9), CELL, host, T0 + 5)

    assert store.place(cell, ["h1", "h2"], other, "req-1") == first
    assert calls == []
    assert len(outbox_store.read_outbox(cell, 0, 10)) == 1
    assert usage(cell)["h2"] == (2048, 20, 1) and usage(cell)["h1"] == (0, 0, 0)
    with pytest.raises(InvalidRequest, match="was a build"):
        store.change(cell, uid(1), lambda i: i, request_id="req-1", method="stop")


def test_place_of_an_existing_uuid_is_a_conflict(cell: Database) -> None:
    store.place(cell, ["h2"], on_host(server(1)), "req-1")
    with pytest.raises(Conflict, match="exists"):
        store.place(cell, ["h2"], on_host(server(1)), "req-2")
    assert usage(cell)["h2"] == (2048, 20, 1)
    assert len(outbox_store.read_outbox(cell, 0, 10)) == 1


def test_concurrent_placements_never_overcommit(cell: Database) -> None:
    placed_hosts: list[str | None] = []
    errors: list[BaseException] = []

    def build(n: int) -> None:
        try:
            result = store.place(cell, ["h2"], on_host(server(n)), f"req-{n}")
            placed_hosts.append(None if result is None else result.host)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(n,)) for n in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert placed_hosts.count("h2") == 4 and placed_hosts.count(None) == 4
    assert usage(cell)["h2"] == (8192, 80, 4)
    assert [seq for seq, _, _ in outbox_store.read_outbox(cell, 0, 10)] == [1, 2, 3, 4]


def test_request_ids_are_checked(cell: Database) -> None:
    with pytest.raises(InvalidRequest, match="request id"):
        store.place(cell, ["h2"], on_host(server(1)), "x" * 65)
    with pytest.raises(InvalidRequest, match="request id"):
        store.place(cell, ["h2"], on_host(server(1)), "")


def test_times_round_trip_to_the_microsecond(cell: Database) -> None:
    base = server(1, now=1_764_000_000.123456789)
    made = store.place(cell, ["h2"], on_host(base, now=1_764_000_001.9999999), "req-1")
    assert made is not None
    assert made.created_at == 1_764_000_000.123457
    assert made.updated_at == 1_764_000_002.0
    assert store.get(cell, made.uuid) == made
    assert decoded(outbox_store.read_outbox(cell, 0, 1)[0][2]) == made
    stopped = act(cell, made.uuid, lambda i: finish(i, 1_764_000_003.0000004))
    assert stopped.updated_at == 1_764_000_003.0 and store.get(cell, made.uuid) == stopped


# -- changes --------------------------------------------------------------------------------


def test_change_writes_the_record_and_queues_it(cell: Database) -> None:
    made = store.place(cell, ["h2"], on_host(server(1)), "req-1")
    assert made is not None
    active = act(cell, made.uuid, lambda i: finish(i, T0 + 2))
    assert (active.vm_state, active.task_state, active.version) == (VmState.ACTIVE, None, 2)
    stopping = store.change(
        cell, made.uuid, lambda i: begin(i, Action.STOP, T0 + 3), request_id="r-stop", method="stop"
    )
    assert store.get(cell, made.uuid) == stopping
    # a repeat of the request answers the first result without calling fn
    again = store.change(
        cell, made.uuid, lambda i: pytest.fail("called"), request_id="r-stop", method="stop"
    )
    assert again == stopping
    assert [decoded(p) for _, _, p in outbox_store.read_outbox(cell, 0, 10)] == [
        made,
        active,
        stopping,
    ]


def test_change_refused_by_fn_writes_nothing(cell: Database) -> None:
    made = store.place(cell, ["h2"], on_host(server(1)), "req-1")
    assert made is not None

    def start(instance: Instance) -> Instance:
        return begin(instance, Action.START, T0 + 9)

    with pytest.raises(Conflict, match="cannot start"):
        store.change(cell, made.uuid, start, request_id="r-start", method="start")
    assert store.get(cell, made.uuid) == made
    assert outbox_store.last_seq(cell) == 1
    # the refusal did not use the request id up: once stopped, the same request starts it
    act(cell, made.uuid, lambda i: finish(i, T0 + 2))
    act(cell, made.uuid, lambda i: finish(begin(i, Action.STOP, T0 + 3), T0 + 4))
    after = store.change(cell, made.uuid, start, request_id="r-start", method="start")
    assert after.task_state is TaskState.POWERING_ON and after.version == 5


def test_change_each_gives_each_change_its_outcome_and_outbox_row(cell: Database) -> None:
    first = store.place(cell, ["h2"], on_host(server(1)), "req-1")
    second = store.place(cell, ["h2"], on_host(server(2)), "req-2")
    assert first is not None and second is not None

    def start(instance: Instance) -> Instance:
        return begin(instance, Action.START, T0 + 9)

    outcomes = store.change_each(
        cell,
        [
            (first.uuid, lambda i: finish(i, T0 + 2)),
            (second.uuid, start),  # refused: it is still spawning
            (uid(7), lambda i: i),  # not held here
            (second.uuid, lambda i: finish(i, T0 + 3)),
            (first.uuid, lambda i: begin(i, Action.STOP, T0 + 4)),  # after its finish above
        ],
    )
    done, refused, missing, second_done, stopping = outcomes
    assert isinstance(refused, Conflict) and isinstance(missing, NotFoundRemote)
    assert isinstance(done, Instance) and done.vm_state is VmState.ACTIVE
    assert isinstance(stopping, Instance) and stopping.version == done.version + 1
    assert isinstance(second_done, Instance) and second_done.vm_state is VmState.ACTIVE
    assert store.get(cell, first.uuid) == stopping
    assert store.get(cell, second.uuid) == second_done
    queued = [decoded(p) for _, _, p in outbox_store.read_outbox(cell, 0, 10)]
    assert queued == [first, second, done, second_done, stopping]


def test_change_of_an_unknown_instance_is_not_found(cell: Database) -> None:
    with pytest.raises(NotFoundRemote, match=f"no instance {uid(7)}"):
        store.change(cell, uid(7), lambda i: i, request_id=None, method="stop")


def test_delete_frees_the_claim_once_and_never_below_zero(cell: Database) -> None:
    one = store.place(cell, ["h2"], on_host(server(1)), "r1")
    two = store.place(cell, ["h2"], on_host(server(2)), "r2")
    assert one is not None and two is not None
    act(cell, one.uuid, lambda i: begin(i, Action.DELETE, T0 + 2))
    assert usage(cell)["h2"] == (4096, 40, 2)  # deleting still holds the claim
    gone = act(cell, one.uuid, lambda i: finish(i, T0 + 3))
    assert gone.deleted and gone.deleted_at == T0 + 3
    assert usage(cell)["h2"] == (2048, 20, 1)
    # usage lower than the claim (an operator edit, a crash): it stops at zero
    with cell.write() as session:
        session.execute(sa.update(HostRow).values(memory_mb_used=100, disk_gb_used=0, vcpus_used=0))
    act(cell, two.uuid, lambda i: begin(i, Action.DELETE, T0 + 4))
    act(cell, two.uuid, lambda i: finish(i, T0 + 5))
    assert usage(cell)["h2"] == (0, 0, 0)


def test_faults_come_back_with_the_instance_and_are_kept_once_per_version(cell: Database) -> None:
    made = store.place(cell, ["h2"], on_host(server(1)), "r1")
    assert made is not None
    fault = Fault("E_NO_VALID_HOST", "spawn failed on h2", CELL)
    broken = act(cell, made.uuid, lambda i: failed(i, fault, T0 + 2))
    assert broken.fault == fault and store.get(cell, made.uuid) == broken
    assert store.list_instances(cell)[0].fault == fault
    # deleting carries the same fault along: no second history row
    act(cell, made.uuid, lambda i: begin(i, Action.DELETE, T0 + 3))
    assert fault_rows(cell) == [(made.uuid, 2, "E_NO_VALID_HOST", CELL)]


# -- listing --------------------------------------------------------------------------------


def listing(db: Database) -> None:
    """Seven instances of three cells and two projects, in every status."""
    rows = [
        (1, "p1", "web-1", "api!eu", []),
        (2, "p1", "WEB-2", "api!eu!eu-1", ["active"]),
        (3, "p1", "db_1", "api!eu!eu-1", ["active", "reboot"]),
        (4, "p2", "web%x", "api!eu-2", ["active", "stop"]),
        (5, "p2", "cache", "api!eu-2", ["error"]),
        (6, "p1", "old", "api!eu", ["delete"]),
        (7, "p1", "new", None, None),
    ]
    bases = [server(n, project=p, name=name, now=T0 + n // 2) for n, p, name, _, _ in rows]
    store.index_create(db, bases, "create-all")  # pairs share a creation time
    for base, (_, _, _, cell, steps) in zip(bases, rows, strict=True):
        record = base
        if cell is not None and steps is not None:
            record = placed(record, cell, "h1", T0 + 10)
            for step in steps:
                if step == "active":
                    record = finish(record, T0 + 11)
                elif step == "reboot":
                    record = begin(record, Action.REBOOT, T0 + 12)
                elif step == "stop":
                    record = finish(begin(record, Action.STOP, T0 + 12), T0 + 13)
                elif step == "error":
                    record = failed(record, Fault("E_INTERNAL", "boom", cell), T0 + 12)
                elif step == "delete":
                    record = finish(begin(record, Action.DELETE, T0 + 12), T0 + 13)
        store.index_put(db, record)


def uuids(instances: list[Instance]) -> list[int]:
    return [uuid_module.UUID(i.uuid).int for i in instances]


def test_list_filters(synced: Database) -> None:
    listing(synced)
    assert uuids(store.list_instances(synced)) == [1, 2, 3, 4, 5, 7]
    assert uuids(store.list_instances(synced, include_deleted=True)) == [1, 2, 3, 4, 5, 6, 7]
    assert uuids(store.list_instances(synced, project="p2")) == [4, 5]
    statuses = {
        "BUILD": [1, 7],
        "ACTIVE": [2],
        "REBOOT": [3],
        "SHUTOFF": [4],
        "ERROR": [5],
        "DELETED": [6],
    }
    for status, expected in statuses.items():
        assert uuids(store.list_instances(synced, statuses=[status])) == expected, status
    assert uuids(store.list_instances(synced, statuses={"ACTIVE", "REBOOT", "DELETED"})) == [
        2,
        3,
        6,
    ]
    assert store.list_instances(synced, statuses=[]) == []
    with pytest.raises(InvalidRequest, match="unknown status 'RUNNING'"):
        store.list_instances(synced, statuses=["RUNNING"])
    # a cell and every cell below it, and nothing that only starts with its name
    assert uuids(store.list_instances(synced, cell="api!eu")) == [1, 2, 3]
    assert uuids(store.list_instances(synced, cell="api!eu!eu-1")) == [2, 3]
    assert uuids(store.list_instances(synced, cell="api")) == [1, 2, 3, 4, 5]
    # names: case-insensitive substrings, LIKE wildcards taken literally
    assert uuids(store.list_instances(synced, name="web")) == [1, 2, 4]
    assert uuids(store.list_instances(synced, name="B_1")) == [3]
    assert uuids(store.list_instances(synced, name="%")) == [4]
    assert uuids(store.list_instances(synced, project="p1", name="WEB", cell="api!eu")) == [1, 2]
    assert store.list_instances(synced, limit=0) == []
    with pytest.raises(InvalidRequest, match="limit"):
        store.list_instances(synced, limit=-1)
    shown = store.list_instances(synced, statuses=["ERROR"])[0]
    assert shown.fault == Fault("E_INTERNAL", "boom", "api!eu-2") and shown.status == "ERROR"


def test_list_pages_with_a_marker(synced: Database) -> None:
    listing(synced)
    everything = store.list_instances(synced, include_deleted=True)
    pages: list[Instance] = []
    marker = None
    while True:
        page = store.list_instances(synced, limit=2, marker=marker, include_deleted=True)
        if not page:
            break
        pages.extend(page)
        marker = page[-1].uuid
    assert pages == everything
    assert [i.created_at for i in everything] == sorted(i.created_at for i in everything)
    # a deleted marker still marks its place when deleted ones are hidden
    assert uuids(store.list_instances(synced, marker=uid(6))) == [7]
    assert uuids(store.list_instances(synced, project="p1", marker=uid(2), limit=1)) == [3]
    with pytest.raises(InvalidRequest, match="marker"):
        store.list_instances(synced, marker=uid(99))
    with pytest.raises(InvalidRequest, match="marker"):
        store.list_instances(synced, project="p1", marker=uid(4))  # p2's instance


def test_unfinished_and_counts(cell: Database) -> None:
    spawning = store.place(cell, ["h2"], on_host(server(1)), "r1")
    active = store.place(cell, ["h2"], on_host(server(2)), "r2")
    rebooting = store.place(cell, ["h2"], on_host(server(3)), "r3")
    assert spawning and active and rebooting
    act(cell, active.uuid, lambda i: finish(i, T0 + 2))
    act(cell, rebooting.uuid, lambda i: finish(i, T0 + 2))
    act(cell, rebooting.uuid, lambda i: begin(i, Action.REBOOT, T0 + 3))
    assert uuids(store.unfinished(cell)) == [1, 3]
    assert store.counts(cell) == {"BUILD": 1, "ACTIVE": 1, "SHUTOFF": 0, "REBOOT": 1, "ERROR": 0}
    act(cell, active.uuid, lambda i: begin(i, Action.DELETE, T0 + 4))
    assert uuids(store.unfinished(cell)) == [1, 2, 3]
    act(cell, active.uuid, lambda i: finish(i, T0 + 5))
    assert uuids(store.unfinished(cell)) == [1, 3]
    assert store.counts(cell) == {"BUILD": 1, "ACTIVE": 0, "SHUTOFF": 0, "REBOOT": 1, "ERROR": 0}


# -- hosts ----------------------------------------------------------------------------------


def test_sync_hosts_creates_resizes_disables_and_recounts(cell: Database) -> None:
    one = store.place(cell, ["h2"], on_host(server(1)), "r1")
    two = store.place(cell, ["h2"], on_host(server(2)), "r2")
    assert one and two
    act(cell, two.uuid, lambda i: begin(i, Action.DELETE, T0 + 2))
    act(cell, two.uuid, lambda i: finish(i, T0 + 3))
    # usage drifted (a crash between steps, an operator edit): the sync recounts it
    with cell.write() as session:
        session.execute(sa.update(HostRow).values(memory_mb_used=999, vcpus_used=9))
    hosts.sync_hosts(cell, [Host("h2", True, 16384, 160, 8), Host("h3", True, 1024, 10, 1)])
    assert hosts.list_hosts(cell) == [
        Host("h1", False, 2048, 20, 1, 0, 0, 0),
        Host("h2", True, 16384, 160, 8, 2048, 20, 1),
        Host("h3", True, 1024, 10, 1, 0, 0, 0),
    ]
    # a host that comes back is enabled again; an empty list disables every host
    hosts.sync_hosts(cell, [Host("h1", True, 2048, 20, 1)])
    assert [(h.name, h.enabled) for h in hosts.list_hosts(cell)] == [
        ("h1", True),
        ("h2", False),
        ("h3", False),
    ]
    hosts.sync_hosts(cell, [])
    assert not any(h.enabled for h in hosts.list_hosts(cell))
    assert usage(cell)["h2"] == (2048, 20, 1)
    with pytest.raises(ValidationError, match="RAM"):
        hosts.sync_hosts(cell, [Host("h9", True, -1, 1, 1)])


# -- outbox ---------------------------------------------------------------------------------


def test_outbox_read_trim_backlog_and_seqs_never_reused(cell: Database) -> None:
    assert outbox_store.outbox_backlog(cell) == (0, None)
    assert outbox_store.last_seq(cell) == 0
    for n in range(1, 4):
        store.place(cell, ["h2"], on_host(server(n)), f"r{n}")
    assert [seq for seq, _, _ in outbox_store.read_outbox(cell, 1, 10)] == [2, 3]
    assert [seq for seq, _, _ in outbox_store.read_outbox(cell, 0, 2)] == [1, 2]
    waiting, oldest = outbox_store.outbox_backlog(cell)
    assert waiting == 3 and oldest is not None and abs(oldest - time.time()) < 60
    assert outbox_store.trim_outbox(cell, 2) == 2
    assert outbox_store.trim_outbox(cell, 2) == 0
    assert [seq for seq, _, _ in outbox_store.read_outbox(cell, 0, 10)] == [3]
    assert outbox_store.trim_outbox(cell, 3) == 1
    assert outbox_store.outbox_backlog(cell) == (0, None) and outbox_store.last_seq(cell) == 3
    # an empty outbox goes on from the last seq, never back to 1
    store.place(cell, ["h2"], on_host(server(4)), "r4")
    assert [seq for seq, _, _ in outbox_store.read_outbox(cell, 0, 10)] == [4]
    assert outbox_store.last_seq(cell) == 4


def test_requeue_queues_current_records_in_batches(
    synced: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_store, "REQUEUE_BATCH", 3)
    created = store.index_create(synced, [server(n) for n in range(1, 8)], "create")
    assert outbox_store.last_seq(synced) == 0  # the API cell's own records do not flow up
    assert outbox_store.requeue(synced, None) == 7
    queued = outbox_store.read_outbox(synced, 0, 100)
    assert [seq for seq, _, _ in queued] == list(range(1, 8))
    assert sorted(decoded(p).uuid for _, _, p in queued) == sorted(i.uuid for i in created)
    assert outbox_store.requeue(synced, [uid(2), uid(5), uid(99), uid(2)]) == 2
    assert [decoded(p).uuid for _, _, p in outbox_store.read_outbox(synced, 7, 100)] == [
        uid(2),
        uid(5),
    ]
    assert outbox_store.requeue(synced, []) == 0


# -- the parent's index ---------------------------------------------------------------------


def history(n: int, cell: str = CELL) -> list[Instance]:
    """Versions 1-4 of one instance in `cell`: placed, active, deleting, deleted."""
    v1 = placed(server(n), cell, "h1", T0 + 1)
    v2 = finish(v1, T0 + 2)
    v3 = begin(v2, Action.DELETE, T0 + 3)
    return [v1, v2, v3, finish(v3, T0 + 4)]


def test_apply_takes_newer_versions_once_and_skips_applied_seqs(synced: Database) -> None:
    v1, v2, v3, v4 = history(1)
    store.index_create(synced, [server(1)], "create")
    result = store.apply_updates(
        synced, "eu", "api!eu", [row(1, v1), row(2, v2), row(3, v2)], store_forward=False
    )
    assert result == store.Applied(3, 2, 1, (), False)
    assert store.get(synced, v1.uuid) == v2
    assert store.applied_seq(synced, "eu") == 3
    # seqs 2 and 3 again (a resend after a lost ack), then an older version arriving late
    result = store.apply_updates(
        synced,
        "eu",
        "api!eu",
        [row(2, v2), row(3, v2), row(4, v1), row(5, v4)],
        store_forward=False,
    )
    assert result == store.Applied(5, 1, 3, (), False)
    # a tombstone holds: an older version never brings the instance back
    result = store.apply_updates(synced, "eu", "api!eu", [row(6, v3)], store_forward=False)
    assert result == store.Applied(6, 0, 1, (), False)
    assert store.get(synced, v1.uuid) == v4 and store.list_instances(synced) == []
    assert store.list_instances(synced, include_deleted=True) == [v4]
    assert store.apply_updates(synced, "eu", "api!eu", [], store_forward=False) == (
        store.Applied(6, 0, 0, (), False)
    )


def test_apply_reports_a_gap_and_takes_unknown_instances(synced: Database) -> None:
    v1, v2, _, _ = history(1)
    assert store.apply_updates(synced, "eu", "api!eu", [row(1, v1)], store_forward=False).applied
    result = store.apply_updates(synced, "eu", "api!eu", [row(5, v2)], store_forward=False)
    assert result.gap and result.applied_seq == 5 and result.applied == 1
    result = store.apply_updates(
        synced, "eu", "api!eu", [row(6, v2), row(8, v2)], store_forward=False
    )
    assert result.gap and result.skipped == 2
    assert store.get(synced, v1.uuid) == v2  # never created here first: taken as it came


def test_apply_skips_unknown_kinds_but_moves_the_sequence(synced: Database) -> None:
    v1, _, _, _ = history(1)
    result = store.apply_updates(
        synced, "eu", "api!eu", [(1, "capacity", b"\x80"), row(2, v1)], store_forward=False
    )
    assert result == store.Applied(2, 1, 1, (), False)
    assert store.applied_seq(synced, "eu") == 2


def test_apply_reports_an_instance_held_under_another_cell(synced: Database) -> None:
    store.index_create(synced, [server(1)], "create")
    ours = placed(server(1), "api!eu", "h1", T0 + 1)
    theirs = replace(placed(server(1), "api!us!us-1", "h7", T0 + 1), version=5)
    assert store.apply_updates(synced, "eu", "api!eu", [row(1, ours)], store_forward=False).applied
    result = store.apply_updates(
        synced, "us", "api!us", [row(1, theirs), row(2, theirs)], store_forward=False
    )
    assert result == store.Applied(2, 0, 0, ((ours.uuid, "api!us!us-1"),), False)
    assert store.get(synced, ours.uuid) == ours
    assert store.applied_seq(synced, "us") == 2


def test_a_live_copy_of_a_server_the_top_deleted_itself_is_an_orphan(synced: Database) -> None:
    [base] = store.index_create(synced, [server(1)], "create")
    gone = finish(begin(base, Action.DELETE, T0 + 1), T0 + 1)  # deleted before any cell held it
    assert store.index_put(synced, gone) and gone.cell is None and gone.version == 2
    # The build had landed after all; the cell reports it, at any version.
    alive = replace(placed(base, "api!eu", "h1", T0 + 2), version=7)
    result = store.apply_updates(synced, "eu", "api!eu", [row(1, alive)], store_forward=False)
    assert result.conflicts == ((base.uuid, "api!eu"),) and result.applied == 0
    assert store.get(synced, base.uuid) == gone
    # Noted with the batch, to be deleted there until the cell acknowledges it.
    assert orphans.due(synced, T0 + 10**9, 10) == [(base.uuid, "api!eu", 0)]
    # Once that cell deletes its copy, its tombstone is the record.
    deleted = finish(begin(alive, Action.DELETE, T0 + 3), T0 + 3)
    result = store.apply_updates(synced, "eu", "api!eu", [row(2, deleted)], store_forward=False)
    assert result.applied == 1 and result.conflicts == ()
    assert store.get(synced, base.uuid) == deleted


def test_a_record_of_another_subtree_is_refused_alone(synced: Database) -> None:
    """Finding 10: one refused row is held back by the child; the rest of the stream flows."""
    v1, _, _, _ = history(1)
    other = placed(server(2), "api!us", "h1", T0 + 1)
    lookalike = placed(server(3), "api!eu-2", "h1", T0 + 1)
    seq = 0
    for bad in (other, lookalike, server(4)):
        for store_forward in (False, True):
            seq += 2
            result = store.apply_updates(
                synced,
                "eu",
                "api!eu",
                [row(seq - 1, v1), row(seq, bad)],
                store_forward=store_forward,
            )
            [(refused_seq, code, why)] = result.refused
            assert (refused_seq, code) == (seq, "E_SENDER_MISMATCH") and bad.uuid in why
            assert store.applied_seq(synced, "eu") == seq
            assert store.get(synced, bad.uuid) is None
    assert store.get(synced, v1.uuid) == v1  # the good row went through


def test_bad_payloads_are_refused_alone(synced: Database) -> None:
    v1, _, _, _ = history(1)
    wire = v1.to_wire() | {"vcpus": -1}
    far = v1.to_wire() | {"updated_at": 1e18}
    rows = [
        (1, "instance", b"\xc1"),
        (2, "instance", msgpack.packb(wire)),
        (3, "instance", msgpack.packb(far)),
        row(4, v1),
    ]
    result = store.apply_updates(synced, "eu", "api!eu", rows, store_forward=False)
    assert [(seq, code) for seq, code, _ in result.refused] == [
        (1, "E_DECODE"),
        (2, "E_SCHEMA"),
        (3, "E_SCHEMA"),
    ]
    assert "vcpus" in result.refused[1][2] and "out of range" in result.refused[2][2]
    assert store.get(synced, v1.uuid) == v1 and store.applied_seq(synced, "eu") == 4


def test_store_and_forward_appends_to_our_outbox_with_the_progress(synced: Database) -> None:
    v1, v2, _, _ = history(1, cell="api!eu!eu-1!rack-3")
    rows = [row(1, v1), (2, "capacity", b"\x81\xa1a\x01"), row(3, v2)]
    result = store.apply_updates(synced, "eu-1", "api!eu!eu-1", rows, store_forward=True)
    assert result == store.Applied(3, 3, 0, (), False)
    assert outbox_store.read_outbox(synced, 0, 10) == [
        (1, *rows[0][1:]),
        (2, *rows[1][1:]),
        (3, *rows[2][1:]),
    ]
    assert store.get(synced, v1.uuid) is None  # a middle cell only forwards
    assert store.applied_seq(synced, "eu-1") == 3
    # a resend is not forwarded twice
    result = store.apply_updates(synced, "eu-1", "api!eu!eu-1", rows, store_forward=True)
    assert result == store.Applied(3, 0, 3, (), False)
    assert outbox_store.last_seq(synced) == 3


def test_faults_in_updates_are_kept_once_per_version(synced: Database) -> None:
    v1, _, _, _ = history(1)
    fault = Fault("E_NO_VALID_HOST", "no host had room", CELL)
    broken = failed(v1, fault, T0 + 2)
    deleting = begin(broken, Action.DELETE, T0 + 3)
    worse = failed(deleting, Fault("E_INTERNAL", "delete failed", None), T0 + 4)
    store.apply_updates(
        synced, "eu", "api!eu", [row(1, v1), row(2, broken), row(3, broken)], store_forward=False
    )
    store.apply_updates(
        synced,
        "eu",
        "api!eu",
        [row(4, broken), row(5, deleting), row(6, worse)],
        store_forward=False,
    )
    assert store.get(synced, v1.uuid) == worse
    assert fault_rows(synced) == [
        (v1.uuid, 2, "E_NO_VALID_HOST", CELL),
        (v1.uuid, 4, "E_INTERNAL", None),
    ]


def test_the_index_stores_applied_rows_as_sqlalchemy_stores_them(tmp_path: Path) -> None:
    """On SQLite the apply binds rows itself; what it writes equals what SQLAlchemy writes."""
    fault = Fault("E_NO_VALID_HOST", 'no host had room: "h1" \u00e9\u4e16', CELL)
    odd = replace(
        placed(server(2, now=1_764_000_000.123456789), CELL, "h2", 1_764_000_001.9999995),
        metadata={
            'quote"d\\': "caf\u00e9 \u4e16\u754c \U0001f600",
            "empty": "",
            "ctl": "a\n\x00\u2028\t/",
        },
    )
    records = [
        *(history(7 + n)[n] for n in range(4)),  # placed, active, deleting, deleted
        odd,
        failed(placed(server(3), CELL, "h1", T0 + 1), fault, T0 + 2),
        failed(placed(server(4), CELL, "h1", T0), Fault("E_INTERNAL", "", None), 0.0000005),
        replace(placed(server(5, now=0.0), CELL, "h1", 1), metadata={}, deleted_at=2**33 + 0.5),
    ]
    # The records into two indexes: through SQLAlchemy's types, and through the apply.
    with (
        Database(f"sqlite:///{tmp_path / 'typed.db'}") as typed,
        Database(f"sqlite:///{tmp_path / 'applied.db'}") as applied,
    ):
        migrate.sync(typed)
        migrate.sync(applied)
        store.index_create(typed, records, "create")
        rows = [row(seq, record) for seq, record in enumerate(records, 1)]
        result = store.apply_updates(applied, "eu", "api!eu", rows, store_forward=False)
        assert result.applied == len(records)
        assert raw_rows(applied) == raw_rows(typed)
        everything = {"include_deleted": True}
        assert store.list_instances(applied, **everything) == store.list_instances(
            typed, **everything
        )
        # A record of no cell, as a verdict at the top is, goes the same way.
        verdict = failed(server(99), fault, T0 + 5)
        assert store.index_put(applied, verdict)
        store.index_create(typed, [verdict], "verdict")
        assert raw_rows(applied) == raw_rows(typed)
        assert store.get(applied, verdict.uuid) == verdict


def test_times_are_bound_as_the_sqlite_datetime_type_binds_them() -> None:
    """Rounded to the microsecond as `datetime.fromtimestamp` rounds, in the type's format."""
    bind = UTCDateTime().dialect_impl(sqlite_dialect()).bind_processor(sqlite_dialect())
    assert bind is not None
    rng = random.Random(7)
    edges = [0.0, 5e-7, 1.5e-6, 2.5e-6, 0.9999995, 1.9999995, -1.5, T0, T0 + 0.9999996]
    last = 253_402_300_799.0  # the last second of year 9999
    edges += [last, last + 0.25, last - 1e-7, 2**31 + 0.5]
    spread = [rng.uniform(0, 4e9) for _ in range(20_000)]
    halves = [T0 + n / 1e6 + 5e-7 for n in range(2_000)]  # a half microsecond: to even
    for seconds in [*edges, *spread, *halves]:
        assert instance_rows.sqlite_time(seconds) == bind(datetime.fromtimestamp(seconds, UTC)), (
            seconds
        )
    for far in (last + 1, 1e18, float("inf"), float("nan")):
        with pytest.raises(SchemaError):
            instance_rows.sqlite_time(far)


def raw_rows(db: Database) -> list[tuple[object, ...]]:
    """Every instance row as SQLite holds it: each value with its storage class."""
    columns = [column.name for column in InstanceRow.__table__.columns]
    typed = ", ".join(f"{name}, typeof({name})" for name in columns)
    with db.read() as session:
        result = session.connection().exec_driver_sql(
            f"SELECT {typed} FROM instances ORDER BY uuid"
        )
        return [tuple(r) for r in result]


def test_index_create_is_idempotent_by_request_id(synced: Database) -> None:
    created = store.index_create(synced, [server(1), server(2)], "create-1")
    assert created == [server(1), server(2)]
    assert store.list_instances(synced) == created
    v1 = placed(server(1), CELL, "h1", T0 + 1)
    store.apply_updates(synced, "eu", "api!eu", [row(1, v1)], store_forward=False)
    # a repeat answers the records as they are now, and creates nothing
    assert store.index_create(synced, [server(3)], "create-1") == [v1, server(2)]
    assert store.get(synced, uid(3)) is None
    with pytest.raises(Conflict, match=f"instance {uid(2)} exists"):
        store.index_create(synced, [server(3), server(2)], "create-2")
    with pytest.raises(Conflict, match="named twice"):
        store.index_create(synced, [server(4), server(4)], "create-3")
    assert store.get(synced, uid(3)) is None and store.get(synced, uid(4)) is None
    # the refused request ids were not used up
    assert store.index_create(synced, [server(3)], "create-2") == [server(3)]


def test_index_put_takes_only_newer_records_of_the_same_or_no_cell(synced: Database) -> None:
    base = server(1)
    store.index_create(synced, [base], "create")
    verdict = failed(base, Fault("E_NO_VALID_HOST", "every cell refused", None), T0 + 1)
    assert store.index_put(synced, verdict)
    assert not store.index_put(synced, verdict)  # same version
    assert store.get(synced, base.uuid) == verdict
    took = replace(placed(base, "api!eu", "h1", T0 + 2), version=2)
    assert store.index_put(synced, took)
    assert not store.index_put(synced, replace(took, cell="api!us", version=3))
    assert store.index_put(synced, replace(took, version=3))
    assert store.get(synced, base.uuid) == replace(took, version=3)
    assert store.index_put(synced, placed(server(2), "api!us", "h1", T0))  # unknown: taken


def test_trim_request_log(cell: Database) -> None:
    store.place(cell, ["h2"], on_host(server(1)), "old")
    with cell.write() as session:
        session.execute(
            sa.update(RequestLogRow).values(created_at=datetime.fromtimestamp(T0 - 3600, UTC))
        )
    store.place(cell, ["h2"], on_host(server(2)), "new")
    assert store.trim_request_log(cell, T0) == 1
    assert store.trim_request_log(cell, T0) == 0
    # a forgotten request id is work again: here the uuid it made exists now
    with pytest.raises(Conflict):
        store.place(cell, ["h2"], on_host(server(1)), "old")
    assert store.place(cell, ["h2"], on_host(server(9)), "new") == store.get(cell, uid(2))


# -- schema ---------------------------------------------------------------------------------


def test_upgrade_keeps_outbox_seqs_and_downgrade_round_trips(database: Database) -> None:
    migrate.upgrade(database, "0002")
    with database.write() as session:
        for seq in (1, 2, 3):
            session.execute(
                sa.text(
                    "INSERT INTO outbox (seq, kind, payload, created_at) "
                    "VALUES (:seq, 'instance', :payload, :at)"
                ),
                {"seq": seq, "payload": b"x", "at": "2026-01-01 00:00:00"},
            )
    migrate.sync(database)
    assert outbox_store.last_seq(database) == 3
    store.index_create(database, [server(1)], "c")
    assert outbox_store.requeue(database, None) == 1
    assert [seq for seq, _, _ in outbox_store.read_outbox(database, 0, 10)] == [1, 2, 3, 4]
    store.index_put(database, failed(server(1), Fault("E_INTERNAL", "boom", None), T0 + 1))

    # back to 0002: the outbox numbers its own rows again and goes on from 4
    config = Config()
    config.set_main_option("script_location", migrate.SCRIPT_LOCATION)
    with database.engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0002")
        conn.commit()
    assert migrate.current_revision(database) == "0002"
    with database.write() as session:
        session.execute(
            sa.text("INSERT INTO outbox (kind, payload, created_at) VALUES ('instance', :p, :at)"),
            {"p": b"y", "at": "2026-01-01 00:00:00"},
        )
        assert session.scalar(sa.text("SELECT MAX(seq) FROM outbox")) == 5
    migrate.sync(database)
    assert outbox_store.last_seq(database) == 5
    assert store.get(database, uid(1)) is not None


def test_a_cell_moved_to_a_new_parent_moves_its_records_at_the_top(synced: Database) -> None:
    """Finding 10: the same cell under a new path, newer: a move, not an orphan."""
    [base] = store.index_create(synced, [server(1)], "create")
    at_c1 = placed(base, "api!c1!g1", "h1", T0 + 1)
    assert store.index_put(synced, at_c1)
    moved = replace(at_c1, cell="api!c2!g1", version=at_c1.version + 1)
    later = replace(moved, version=moved.version + 1, updated_at=T0 + 5)
    result = store.apply_updates(
        synced, "c2", "api!c2", [row(1, moved), row(2, later)], store_forward=False
    )
    assert result.conflicts == () and result.applied == 2
    assert store.get(synced, base.uuid) == later
    # Another cell's copy, with another name, is still an orphan, whatever its version.
    elsewhere = replace(at_c1, cell="api!c2!g2", version=99)
    result = store.apply_updates(synced, "c2", "api!c2", [row(3, elsewhere)], store_forward=False)
    assert result.conflicts == ((base.uuid, "api!c2!g2"),)
    assert store.get(synced, base.uuid) == later


def test_a_cell_puts_its_own_records_under_its_new_path(synced: Database) -> None:
    [base] = store.index_create(synced, [server(1)], "create")
    assert store.index_put(synced, placed(base, "api!c1!g1", "h1", T0 + 1))
    assert store.relocate_own(synced, "api!c2!g1", T0 + 2) == 1
    held = store.get(synced, base.uuid)
    assert held is not None and held.cell == "api!c2!g1" and held.version == 2
    assert store.relocate_own(synced, "api!c2!g1", T0 + 3) == 0
