"""Instances, the outbox and the parent's index: a cell's instance state.

One table holds both a compute cell's own full records and the API cell's
index of the instances of every cell. The module is longer than most because
its callers use it as one store; the owner side, the outbox and the parent
side share the row mapping, the outbox and the request log.

Rules kept here:

* Every call that writes is one transaction; a call that raises wrote nothing.
* A change to an instance and its outbox row are written in the same
  transaction. The outbox seq is taken from the ``outbox`` counter moved in
  that transaction, so sequence numbers are gap-free, committed in seq order
  and never reused after a trim, on SQLite and PostgreSQL alike.
* A request id answers its first result again: the result is stored in the
  request log by the transaction that did the work. On PostgreSQL the
  transactions of one request id (and the batches of one child) are serialised
  by an advisory lock, as SQLite's ``BEGIN IMMEDIATE`` serialises every writer.
* Resources are claimed by a conditional UPDATE of the host, so two placements
  never overcommit it; a delete frees them, never below zero; `sync_hosts`
  recomputes usage from the instances, which heals a crash in between.
* A parent takes an update only if its version is newer than what it holds and
  it holds the instance under no cell or the same cell; another cell is a
  conflict, reported and not applied. A child speaks only for its own subtree:
  one update naming a cell outside it rejects the whole batch.
* The latest fault is kept on the instance row, so a page of instances is one
  query; instance_faults keeps each new fault once per (instance, version).
* Times are epoch seconds (floats) outside and UTC timestamps inside, kept to
  the microsecond. What is written is rounded first, so what a call returns
  equals what a later read returns.
* Callers get `zcells.instances.Instance` and `zcells.records.Host`, never rows.
* On SQLite the index upsert, which runs once for every change in the tree,
  hands the driver rows it built itself (`_sqlite_row`) instead of going
  through SQLAlchemy's bind processing; tests keep both ways byte-identical.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]
from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Connection,
    Insert,
    Row,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    insert,
    literal_column,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from zcells.db.engine import Database, dialect_insert
from zcells.db.hosts import claim, release
from zcells.db.models import (
    Base,
    BuildHintsRow,
    ChildProgressRow,
    CounterRow,
    HostRow,
    InstanceFaultRow,
    InstanceRow,
    OutboxRow,
    RequestLogRow,
    utcnow,
)

from zcells.errors import (
    Conflict,
    DecodeError,
    InvalidRequest,
    NotFoundRemote,
    SchemaError,
    SenderMismatch,
    ZcellsError,
)
from zcells.instances import (
    STATUSES,
    Fault,
    Instance,
    InstanceFields,
    PowerState,
    TaskState,
    VmState,
    fields_from_wire,
)
from zcells.names import PATH_SEPARATOR

INSTANCE_KIND: Final = "instance"
REQUEUE_BATCH: Final = 1000

_OUTBOX_COUNTER: Final = "outbox"
_REQUEST_ID_LENGTH: Final = 64
_IN_LIMIT: Final = 500  # uuids in one IN (...) list
_UNFINISHED: Final = (
    TaskState.SPAWNING,
    TaskState.POWERING_OFF,
    TaskState.POWERING_ON,
    TaskState.REBOOTING,
    TaskState.DELETING,
)

_instances: Final = Base.metadata.tables[InstanceRow.__tablename__]
_faults: Final = Base.metadata.tables[InstanceFaultRow.__tablename__]
_hosts: Final = Base.metadata.tables[HostRow.__tablename__]
_outbox: Final = Base.metadata.tables[OutboxRow.__tablename__]
_counters: Final = Base.metadata.tables[CounterRow.__tablename__]
_progress: Final = Base.metadata.tables[ChildProgressRow.__tablename__]
_requests: Final = Base.metadata.tables[RequestLogRow.__tablename__]
_hints: Final = Base.metadata.tables[BuildHintsRow.__tablename__]

_i = _instances.c
# Set when an instance is created and never changed: an update leaves them (and their
# indexes) alone.
_IMMUTABLE: Final = frozenset({"uuid", "project_id", "user_id", "created_at"})
# The status a user filters on, as SQL: the same derivation as `Instance.status`.
_STATUS_WHERE: Final[dict[str, ColumnElement[bool]]] = {
    "BUILD": _i.vm_state == VmState.BUILDING.value,
    "ACTIVE": and_(
        _i.vm_state == VmState.ACTIVE.value,
        or_(_i.task_state.is_(None), _i.task_state != TaskState.REBOOTING.value),
    ),
    "SHUTOFF": _i.vm_state == VmState.STOPPED.value,
    "REBOOT": and_(_i.vm_state == VmState.ACTIVE.value, _i.task_state == TaskState.REBOOTING.value),
    "ERROR": _i.vm_state == VmState.ERROR.value,
    "DELETED": _i.vm_state == VmState.DELETED.value,
}

# The statements of every build and finish, built once: building them anew (and their
# cache keys) took longer than SQLite took to run them.
_GET: Final = select(_instances).where(_i.uuid == bindparam("key"))
_GET_FOR_UPDATE: Final = _GET.with_for_update()
_GET_EACH_FOR_UPDATE: Final = (
    select(_instances).where(_i.uuid.in_(bindparam("keys", expanding=True))).with_for_update()
)
_INSERT: Final = insert(_instances)
_UPDATE: Final = update(_instances).where(_i.uuid == bindparam("key"))
_TAKEN_ONE: Final = select(_i.uuid).where(_i.uuid == bindparam("key"))
_TAKEN: Final = select(_i.uuid).where(_i.uuid.in_(bindparam("uuids", expanding=True))).limit(1)
_LOGGED: Final = select(_requests.c.method, _requests.c.result).where(
    _requests.c.request_id == bindparam("rid")
)
_LOG: Final = insert(_requests)
_ADD_OUTBOX: Final = insert(_outbox)

# What the index takes: an instance, or the checked fields of one a child sent.
_Record = Instance | InstanceFields


@dataclass(frozen=True)
class Applied:
    """What one batch of a child's outbox did here."""

    applied_seq: int  # the child's highest seq applied here, after this batch
    applied: int  # rows that changed something (or were stored to forward)
    skipped: int  # seq applied before, version not newer, or a kind not known here
    conflicts: tuple[tuple[str, str], ...]  # (uuid, cell) held here under another cell
    gap: bool  # some seq was never seen: the child's outbox lost rows we lack


# -- owner side ---------------------------------------------------------------------------


def place(
    db: Database, candidates: list[str], make: Callable[[str], Instance], request_id: str
) -> Instance | None:
    """Claim the first candidate host with room and record `make(host)` on it.

    A repeat of `request_id` answers the instance placed the first time. None if
    no candidate has room (nothing is written); `Conflict` if the uuid exists.
    """
    _check_request_id(request_id)
    with db.write() as session:
        conn = session.connection()
        logged = _logged(conn, request_id, "build")
        if logged is not None:
            return _decode_instance(logged)
        for host in candidates:
            instance = _exact(make(host))
            _ensure_new(conn, instance.uuid)
            if not claim(conn, host, instance):
                continue
            conn.execute(_INSERT, _values(instance))
            _record_faults(conn, [instance])
            payload = _pack(instance.to_wire())
            _append_outbox(conn, [(INSTANCE_KIND, payload)])
            _log(conn, request_id, "build", payload)
            return instance
        return None


def change(
    db: Database,
    uuid: str,
    fn: Callable[[Instance], Instance],
    *,
    request_id: str | None,
    method: str,
) -> Instance:
    """Replace an instance with `fn(instance)` and queue the new record upward.

    `fn` may raise (`Conflict` when the state forbids the action): nothing is
    written. A delete frees the host's resources. A repeat of `request_id`
    answers the record stored the first time.
    """
    if request_id is not None:
        _check_request_id(request_id)
    with db.write() as session:
        conn = session.connection()
        if request_id is not None:
            logged = _logged(conn, request_id, method)
            if logged is not None:
                return _decode_instance(logged)
        row = conn.execute(_GET_FOR_UPDATE, {"key": uuid}).first()
        if row is None:
            raise NotFoundRemote(f"no instance {uuid}")
        old = _instance(row)
        new = _exact(fn(old))
        conn.execute(_UPDATE, {"key": uuid, **_mutable_values(new)})
        if new.deleted and not old.deleted and old.host is not None:
            release(conn, old.host, old)
        if new.fault is not None and new.fault != old.fault:
            _record_faults(conn, [new])
        payload = _pack(new.to_wire())
        _append_outbox(conn, [(INSTANCE_KIND, payload)])
        if request_id is not None:
            _log(conn, request_id, method, payload)
        return new


def change_each(
    db: Database, changes: Sequence[tuple[str, Callable[[Instance], Instance]]]
) -> list[Instance | ZcellsError]:
    """`change` of many instances in one transaction, without request ids; each its own outcome.

    Each `fn(instance)` is applied to the record as held (or as an earlier
    change in the list left it). One that raises a zcells error (`Conflict`;
    `NotFoundRemote` for an instance not held) has that error as its outcome
    and writes nothing; the others are written, each with its own outbox
    row, in the order of the list. The driver finishes tasks this way: one
    statement for many rows costs far less than a transaction each.
    """
    with db.write() as session:
        conn = session.connection()
        held: dict[str, Instance] = {}
        for chunk in _chunks(list(dict.fromkeys(uuid for uuid, _ in changes)), _IN_LIMIT):
            rows = conn.execute(_GET_EACH_FOR_UPDATE, {"keys": chunk})
            held.update((row.uuid, _instance(row)) for row in rows)
        outcomes: list[Instance | ZcellsError] = []
        newest: dict[str, Instance] = {}
        payloads: list[tuple[str, bytes]] = []
        faulted: list[Instance] = []
        for uuid, fn in changes:
            old = held.get(uuid)
            if old is None:
                outcomes.append(NotFoundRemote(f"no instance {uuid}"))
                continue
            try:
                new = _exact(fn(old))
            except ZcellsError as exc:
                outcomes.append(exc)
                continue
            if new.deleted and not old.deleted and old.host is not None:
                release(conn, old.host, old)
            if new.fault is not None and new.fault != old.fault:
                faulted.append(new)
            held[uuid] = newest[uuid] = new
            payloads.append((INSTANCE_KIND, _pack(new.to_wire())))
            outcomes.append(new)
        if newest:
            conn.execute(
                _UPDATE, [{"key": uuid, **_mutable_values(new)} for uuid, new in newest.items()]
            )
        _record_faults(conn, faulted)
        _append_outbox(conn, payloads)
        return outcomes


def get(db: Database, uuid: str) -> Instance | None:
    with db.read() as session:
        row = session.connection().execute(_GET, {"key": uuid}).first()
        return None if row is None else _instance(row)


def list_instances(
    db: Database,
    *,
    project: str | None = None,
    statuses: Collection[str] | None = None,
    cell: str | None = None,
    name: str | None = None,
    limit: int = 1000,
    marker: str | None = None,
    include_deleted: bool = False,
) -> list[Instance]:
    """One page of instances in (created_at, uuid) order, after `marker` if given.

    `cell` takes that cell and every cell below it; `name` is a case-insensitive
    substring (ASCII only on SQLite); filtering on DELETED includes deleted ones.
    """
    if type(limit) is not int or limit < 0:
        raise InvalidRequest(f"limit must be a whole number >= 0, not {limit!r}")
    where: list[ColumnElement[bool]] = []
    if project is not None:
        where.append(_i.project_id == project)
    if statuses is not None:
        unknown = sorted(set(statuses) - _STATUS_WHERE.keys())
        if unknown:
            raise InvalidRequest(f"unknown status {unknown[0]!r}: one of {', '.join(STATUSES)}")
        where.append(or_(false(), *(_STATUS_WHERE[status] for status in sorted(set(statuses)))))
        include_deleted = include_deleted or "DELETED" in statuses
    if not include_deleted:
        where.append(_i.deleted == false())
    if cell is not None:
        below = cell + PATH_SEPARATOR
        where.append(or_(_i.cell_name == cell, func.substr(_i.cell_name, 1, len(below)) == below))
    if name is not None:
        where.append(_i.name.icontains(name, autoescape=True))
    with db.read() as session:
        conn = session.connection()
        if marker is not None:
            where.append(_after(conn, marker, project))
        rows = conn.execute(
            select(_instances).where(*where).order_by(_i.created_at, _i.uuid).limit(limit)
        )
        return [_instance(row) for row in rows]


def unfinished(db: Database) -> list[Instance]:
    """Instances a task was running on, to resume after a restart."""
    tasks = [task.value for task in _UNFINISHED]
    with db.read() as session:
        rows = session.connection().execute(
            select(_instances).where(_i.task_state.in_(tasks)).order_by(_i.created_at, _i.uuid)
        )
        return [_instance(row) for row in rows]


def counts(db: Database) -> dict[str, int]:
    """Instances that are not deleted, by status (every such status, zero included)."""
    shown = [status for status in STATUSES if status != "DELETED"]
    each = [func.count().filter(_STATUS_WHERE[status]) for status in shown]
    with db.read() as session:
        row = session.connection().execute(select(*each).where(_i.deleted == false())).one()
    return {status: int(count) for status, count in zip(shown, row, strict=True)}


# -- outbox -------------------------------------------------------------------------------


def read_outbox(db: Database, after: int, limit: int) -> list[tuple[int, str, bytes]]:
    """Up to `limit` outbox rows with seq > `after`, in seq order."""
    o = _outbox.c
    with db.read() as session:
        rows = session.connection().execute(
            select(o.seq, o.kind, o.payload).where(o.seq > after).order_by(o.seq).limit(limit)
        )
        return [(row.seq, row.kind, bytes(row.payload)) for row in rows]


def trim_outbox(db: Database, upto: int) -> int:
    """Forget outbox rows with seq <= `upto` (every parent has them); how many went."""
    with db.write() as session:
        return session.connection().execute(delete(_outbox).where(_outbox.c.seq <= upto)).rowcount


def outbox_backlog(db: Database) -> tuple[int, float | None]:
    """How many outbox rows wait, and when the oldest was written."""
    o = _outbox.c
    with db.read() as session:
        waiting, oldest = (
            session.connection().execute(select(func.count(), func.min(o.created_at))).one()
        )
    return waiting, None if oldest is None else oldest.timestamp()


def requeue(db: Database, uuids: Collection[str] | None) -> int:
    """Queue the current record of these instances (all when None) again; how many.

    For the periodic heal and a forced resync. One transaction per batch of
    `REQUEUE_BATCH`, so other writers wait for a batch, never for all of it.
    """
    queued = 0
    if uuids is None:
        after = ""
        while True:
            count, last = _requeue_batch(db, _i.uuid > after, REQUEUE_BATCH)
            queued += count
            if last is None:
                return queued
            after = last
    for chunk in _chunks(sorted(set(uuids)), REQUEUE_BATCH):
        queued += _requeue_batch(db, _i.uuid.in_(chunk), len(chunk))[0]
    return queued


def heal(db: Database, since: float, after: str, limit: int) -> tuple[int, str | None]:
    """Queue again up to `limit` instances changed since `since`, in uuid order after `after`.

    One step of the periodic heal; (how many, the last uuid queued, or None
    when none were left after `after`, so the next step starts over).
    """
    return _requeue_batch(db, and_(_i.updated_at >= _when(since), _i.uuid > after), limit)


def last_seq(db: Database) -> int:
    """The highest outbox seq ever used, trimmed or not (0 before the first)."""
    with db.read() as session:
        value = session.connection().scalar(
            select(_counters.c.value).where(_counters.c.name == _OUTBOX_COUNTER)
        )
    return 0 if value is None else int(value)


def skip_seq(db: Database, past: int) -> int:
    """Move the outbox counter past `past` if it is behind; the counter's value after.

    For a cell whose database is older than what a parent has applied (restored
    from a backup, or made anew): its next rows must not reuse sequence numbers
    the parent has taken already, or the parent would skip them as seen.
    """
    with db.write() as session:
        conn = session.connection()
        upsert = dialect_insert(conn, _counters).values(name=_OUTBOX_COUNTER, value=past)
        return int(
            conn.execute(
                upsert.on_conflict_do_update(
                    index_elements=[_counters.c.name],
                    set_={"value": case((_counters.c.value < past, past), else_=_counters.c.value)},
                ).returning(_counters.c.value)
            ).scalar_one()
        )


# -- parent side --------------------------------------------------------------------------


def applied_seq(db: Database, child: str) -> int:
    """The highest seq of `child`'s outbox applied here (0 for a child never heard)."""
    with db.read() as session:
        return _applied_seq(session.connection(), child)


def apply_updates(
    db: Database,
    child: str,
    child_path: str,
    rows: list[tuple[int, str, bytes]],
    *,
    store_forward: bool,
) -> Applied:
    """Take one batch of `child`'s outbox rows (seq, kind, payload) in one transaction.

    Rows at or below the child's applied seq are skipped. A middle cell
    (`store_forward`) appends the rest unchanged to its own outbox; the API cell
    applies instance records to its index. Either way every instance record
    must name `child_path` or a cell below it (`SenderMismatch`, nothing
    written), and the child's applied seq moves in the same transaction.
    """
    with db.write() as session:
        conn = session.connection()
        _serialise(conn, f"child:{child}")
        start = _applied_seq(conn, child)
        fresh, skipped, gap = _fresh(rows, start)
        if not fresh:
            return Applied(start, 0, skipped, (), False)
        records = [_from_child(child_path, kind, payload) for _, kind, payload in fresh]
        conflicts: list[_Record] = []
        if store_forward:
            _append_outbox(conn, [(kind, payload) for _, kind, payload in fresh])
            applied = len(fresh)
        else:
            updates = [record for record in records if record is not None]
            applied, stale, conflicts = _merge(conn, updates)
            skipped += stale + len(records) - len(updates)
        end = fresh[-1][0]
        _set_applied_seq(conn, child, end)
        return Applied(
            applied_seq=end,
            applied=applied,
            skipped=skipped,
            conflicts=tuple(dict.fromkeys((u.uuid, u.cell or child_path) for u in conflicts)),
            gap=gap,
        )


def index_create(
    db: Database,
    instances: list[Instance],
    request_id: str,
    hints: Mapping[str, str] | None = None,
) -> list[Instance]:
    """Record new instances in the API cell's index; a repeat answers their records now.

    Scheduler `hints`, if any, are kept with each instance until `forget_hints`.
    """
    _check_request_id(request_id)
    created = [_exact(instance) for instance in instances]
    uuids = [instance.uuid for instance in created]
    with db.write() as session:
        conn = session.connection()
        logged = _logged(conn, request_id, "server_create")
        if logged is not None:
            return _current(conn, _decode_uuids(logged))
        if len(set(uuids)) != len(uuids):
            twice = next(uuid for uuid in uuids if uuids.count(uuid) > 1)
            raise Conflict(f"instance {twice} is named twice")
        if uuids:
            for chunk in _chunks(uuids, _IN_LIMIT):
                _ensure_new(conn, *chunk)
            conn.execute(insert(_instances), [_values(instance) for instance in created])
            _record_faults(conn, created)
            if hints:
                conn.execute(
                    insert(_hints),
                    [{"instance_uuid": uuid, "hints": dict(hints)} for uuid in uuids],
                )
        _log(conn, request_id, "server_create", _pack(uuids))
        return created


def unplaced_builds(db: Database) -> list[tuple[Instance, dict[str, str]]]:
    """The instances the index holds building and in no cell, with their scheduler hints.

    What a restarted API cell builds again, oldest first. The hints of builds
    that ended without `forget_hints` (a crash in between) are dropped here.
    """
    waiting = and_(_i.cell_name.is_(None), _i.deleted == false(), _STATUS_WHERE["BUILD"])
    with db.write() as session:
        conn = session.connection()
        conn.execute(
            delete(_hints).where(
                _hints.c.instance_uuid.not_in(select(_i.uuid).where(waiting).scalar_subquery())
            )
        )
        rows = conn.execute(
            select(_instances, _hints.c.hints)
            .outerjoin(_hints, _hints.c.instance_uuid == _i.uuid)
            .where(waiting)
            .order_by(_i.created_at, _i.uuid)
        )
        return [(_instance(row), dict(row.hints or {})) for row in rows]


def forget_hints(db: Database, uuid: str) -> None:
    """Drop the scheduler hints of an instance whose build has ended."""
    with db.write() as session:
        session.connection().execute(delete(_hints).where(_hints.c.instance_uuid == uuid))


def index_put(db: Database, instance: Instance) -> bool:
    """Take one record into the index if it is newer and held under no or the same cell."""
    with db.write() as session:
        applied, _, _ = _merge(session.connection(), [instance])
        return applied == 1


def trim_request_log(db: Database, older_than: float) -> int:
    """Forget request results recorded before `older_than`; how many went."""
    before = _when(older_than)
    with db.write() as session:
        return (
            session.connection()
            .execute(delete(_requests).where(_requests.c.created_at < before))
            .rowcount
        )


# -- rows and records ---------------------------------------------------------------------


def _when(seconds: float) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise SchemaError(f"instance: time {seconds!r} is out of range") from None


def _exact(instance: Instance) -> Instance:
    """`instance` with its times rounded to the microsecond, as the database keeps them."""
    deleted_at = instance.deleted_at
    return replace(
        instance,
        created_at=_when(instance.created_at).timestamp(),
        updated_at=_when(instance.updated_at).timestamp(),
        deleted_at=None if deleted_at is None else _when(deleted_at).timestamp(),
    )


def _values(instance: _Record) -> dict[str, Any]:
    fault = instance.fault
    deleted_at = instance.deleted_at
    return {
        "uuid": instance.uuid,
        "name": instance.name,
        "project_id": instance.project,
        "user_id": instance.user,
        "flavor_name": instance.flavor,
        "memory_mb": instance.memory_mb,
        "disk_gb": instance.disk_gb,
        "vcpus": instance.vcpus,
        "image": instance.image,
        "vm_state": instance.vm_state.value,
        "task_state": None if instance.task_state is None else instance.task_state.value,
        "power_state": instance.power_state.value,
        "cell_name": instance.cell,
        "host": instance.host,
        "version": instance.version,
        "deleted": instance.deleted,
        "metadata": dict(instance.metadata),
        "created_at": _when(instance.created_at),
        "updated_at": _when(instance.updated_at),
        "deleted_at": None if deleted_at is None else _when(deleted_at),
        "fault_code": None if fault is None else fault.code,
        "fault_message": None if fault is None else fault.message,
        "fault_cell": None if fault is None else fault.cell,
    }


def _mutable_values(instance: Instance) -> dict[str, Any]:
    """`_values` without the columns an update leaves alone."""
    values = _values(instance)
    for name in _IMMUTABLE:
        del values[name]
    return values


def _instance(row: Row[Any]) -> Instance:
    return Instance(
        uuid=row.uuid,
        name=row.name,
        project=row.project_id,
        user=row.user_id,
        flavor=row.flavor_name,
        memory_mb=row.memory_mb,
        disk_gb=row.disk_gb,
        vcpus=row.vcpus,
        image=row.image,
        vm_state=VmState(row.vm_state),
        task_state=None if row.task_state is None else TaskState(row.task_state),
        power_state=PowerState(row.power_state),
        cell=row.cell_name,
        host=row.host,
        version=row.version,
        created_at=row.created_at.timestamp(),
        updated_at=row.updated_at.timestamp(),
        deleted_at=None if row.deleted_at is None else row.deleted_at.timestamp(),
        metadata=row.metadata,
        fault=_fault(row.fault_code, row.fault_message, row.fault_cell),
    )


def _fault(code: str | None, message: str | None, cell: str | None) -> Fault | None:
    return None if code is None else Fault(code, message or "", cell)


def _current(conn: Connection, uuids: Sequence[str]) -> list[Instance]:
    """The records of `uuids` as held now, in that order."""
    found: dict[str, Instance] = {}
    for chunk in _chunks(uuids, _IN_LIMIT):
        rows = conn.execute(select(_instances).where(_i.uuid.in_(chunk)))
        found.update((row.uuid, _instance(row)) for row in rows)
    return [found[uuid] for uuid in uuids if uuid in found]


def _ensure_new(conn: Connection, *uuids: str) -> None:
    # One uuid (a build) needs no list: expanding one costs more than the query.
    if len(uuids) == 1:
        taken = conn.scalar(_TAKEN_ONE, {"key": uuids[0]})
    else:
        taken = conn.scalar(_TAKEN, {"uuids": uuids})
    if taken is not None:
        raise Conflict(f"instance {taken} exists already")


def _after(conn: Connection, marker: str, project: str | None) -> ColumnElement[bool]:
    """Rows after the marker instance in listing order; it must be one the caller may see."""
    where = [_i.uuid == marker]
    if project is not None:
        where.append(_i.project_id == project)
    created_at = conn.scalar(select(_i.created_at).where(*where))
    if created_at is None:
        raise InvalidRequest(f"marker {marker} is not a known instance")
    return or_(_i.created_at > created_at, and_(_i.created_at == created_at, _i.uuid > marker))


def _record_faults(conn: Connection, instances: Sequence[_Record]) -> None:
    """Add the fault each instance carries to its history, once per instance version."""
    rows = [
        {
            "instance_uuid": instance.uuid,
            "version": instance.version,
            "code": instance.fault.code,
            "message": instance.fault.message,
            "cell_name": instance.fault.cell,
            "created_at": _when(instance.updated_at),
        }
        for instance in instances
        if instance.fault is not None
    ]
    if rows:
        add = dialect_insert(conn, _faults).on_conflict_do_nothing(
            index_elements=[_faults.c.instance_uuid, _faults.c.version]
        )
        conn.execute(add, rows)


# -- merging into the index ---------------------------------------------------------------


def _merge(conn: Connection, updates: Sequence[_Record]) -> tuple[int, int, list[_Record]]:
    """Write the updates the index should take, in order; (applied, stale, conflicting).

    Decided in memory against what is held, as if applied one by one, then
    written once per instance. The upsert repeats the rule as its condition,
    so a concurrent writer on PostgreSQL cannot make it overwrite a newer row.
    """
    held = _held(conn, {update.uuid for update in updates})
    latest: dict[str, _Record] = {}
    faulted: list[_Record] = []
    conflicts: list[_Record] = []
    applied = stale = 0
    for record in updates:
        version, cell, fault, gone = held.get(record.uuid, (-1, None, None, False))
        if (cell is not None and cell != record.cell) or (
            gone and cell is None and not record.deleted
        ):
            # Held under another cell, or deleted by the top before any cell was
            # known to hold it: the copy that cell reports alive is an orphan.
            conflicts.append(record)
        elif record.version <= version:
            stale += 1
        else:
            held[record.uuid] = (record.version, record.cell, record.fault, record.deleted)
            latest[record.uuid] = record
            if record.fault is not None and record.fault != fault:
                faulted.append(record)
            applied += 1
    if latest:
        _upsert(conn, latest.values())
    _record_faults(conn, faulted)
    return applied, stale, conflicts


def _upsert_statement(upsert: sqlite.Insert | postgresql.Insert) -> Insert:
    """Insert records, or replace what is held if older and of the same or no cell."""
    # A constant in the SQL, not a parameter: the compiled form binds one value per column.
    deleted: ColumnElement[str] = literal_column(f"'{VmState.DELETED.value}'")
    top_deleted = and_(_i.cell_name.is_(None), _i.vm_state == deleted)
    newer = and_(
        _i.version < upsert.excluded.version,
        or_(_i.cell_name.is_(None), _i.cell_name == upsert.excluded.cell_name),
        or_(not_(top_deleted), upsert.excluded.vm_state == deleted),
    )
    return upsert.on_conflict_do_update(
        index_elements=[_i.uuid],
        set_={
            column.name: upsert.excluded[column.name]
            for column in _instances.c
            if column.name not in _IMMUTABLE
        },
        where=newer,
    )


@functools.lru_cache(maxsize=8)
def _compiled_upsert(dialect: Dialect) -> str:
    """The SQLite upsert of `_upsert_statement` for this engine's dialect, binding `_sqlite_row`."""
    compiled = _upsert_statement(sqlite.insert(_instances)).compile(dialect=dialect)
    names = tuple(compiled.positiontup or ())
    if names != tuple(_instances.c.keys()):
        raise AssertionError(f"the index upsert binds {names}, not each column in table order")
    return compiled.string


def _upsert(conn: Connection, records: Iterable[_Record]) -> None:
    """Write records into the index under `_upsert_statement`'s condition, in one executemany.

    On SQLite the statement is compiled once and each row goes to the driver
    as the tuple `_sqlite_row` makes: SQLAlchemy's per-row parameter handling
    and the column types' bind processors took more time than SQLite's own
    work on a child's batch. Other backends take the statement through
    SQLAlchemy, which batches the rows itself.
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(
            _compiled_upsert(conn.dialect), [_sqlite_row(record) for record in records]
        )
    else:
        conn.execute(
            _upsert_statement(dialect_insert(conn, _instances)),
            [_values(record) for record in records],
        )


def _sqlite_row(record: _Record) -> tuple[Any, ...]:
    """`_values(record)` as SQLAlchemy binds it on SQLite, one value per column in table order.

    The same values the column types' bind processors make, so a row reads
    back the same whichever path wrote it: booleans as 0 or 1, metadata as
    `_sqlite_json` text, times as `_sqlite_time` text.
    """
    fault = record.fault
    task_state = record.task_state
    deleted_at = record.deleted_at
    vm_state = record.vm_state
    return (
        record.uuid,
        record.name,
        record.project,
        record.user,
        record.flavor,
        record.memory_mb,
        record.disk_gb,
        record.vcpus,
        record.image,
        vm_state.value,
        None if task_state is None else task_state.value,
        record.power_state.value,
        record.cell,
        record.host,
        record.version,
        1 if vm_state is VmState.DELETED else 0,
        _sqlite_json(record.metadata),
        _sqlite_time(record.created_at),
        _sqlite_time(record.updated_at),
        None if deleted_at is None else _sqlite_time(deleted_at),
        None if fault is None else fault.code,
        None if fault is None else fault.message,
        None if fault is None else fault.cell,
    )


def _sqlite_json(metadata: Mapping[str, str]) -> str:
    """`json.dumps(metadata)`, as the JSON type binds it, for a map of strings to strings.

    Each string is escaped by the function `json.dumps` escapes it with, and
    put together with its separators; `json.dumps` builds an encoder on
    every call, which took more than twice as long.
    """
    items = [
        f"{encode_basestring_ascii(k)}: {encode_basestring_ascii(v)}" for k, v in metadata.items()
    ]
    return "{" + ", ".join(items) + "}"


def _sqlite_time(seconds: float) -> str:
    """`_when(seconds)` as SQLAlchemy's SQLite DATETIME stores it: naive UTC, to the microsecond.

    Its format is ``YYYY-MM-DD HH:MM:SS.ffffff``. The microseconds are rounded
    as `datetime.fromtimestamp` rounds them (the fraction times a million, half
    to even, a million carried into the second) and the whole second is
    formatted once: the times of the changes that flow up at once fall in few
    seconds, and formatting each in full took about a tenth of an apply.
    """
    if not 0.0 <= seconds < _LAST_SECOND:  # negative, past year 9999, or not a number
        return _when(seconds).isoformat(" ", "microseconds")[:-6]
    fraction, whole = math.modf(seconds)
    micro = round(fraction * 1e6)
    if micro == 1_000_000:
        whole, micro = whole + 1.0, 0
    return f"{_sqlite_second(whole)}.{micro:06d}"


_LAST_SECOND: Final = 253_402_300_799.0  # 9999-12-31 23:59:59 UTC


@functools.lru_cache(maxsize=4096)
def _sqlite_second(whole: float) -> str:
    return _when(whole).isoformat(" ", "seconds")[:-6]


_HELD_COLUMNS: Final = (
    _i.uuid,
    _i.version,
    _i.cell_name,
    _i.fault_code,
    _i.fault_message,
    _i.fault_cell,
    _i.vm_state,
)
_HELD: Final = (
    select(*_HELD_COLUMNS).where(_i.uuid.in_(bindparam("uuids", expanding=True))).with_for_update()
)


@functools.lru_cache(maxsize=32)
def _held_sqlite(dialect: Dialect, count: int) -> str:
    """`_HELD` for exactly `count` uuids, compiled once for this SQLite dialect."""
    names: list[BindParameter[str]] = [bindparam(f"uuid_{n}") for n in range(count)]
    return str(select(*_HELD_COLUMNS).where(_i.uuid.in_(names)).compile(dialect=dialect))


_Held = tuple[int, str | None, Fault | None, bool]


def _held(conn: Connection, uuids: Collection[str]) -> dict[str, _Held]:
    """Version, cell, latest fault and deletedness of the instances held here.

    The rows are locked on PostgreSQL. On SQLite the query is compiled once per
    size of list, each list padded to a power of two or to `_IN_LIMIT`
    (repeats change nothing in an IN list): expanding the list for every
    query took about a third of the time of this function on a child's batch.
    """
    held: dict[str, _Held] = {}
    deleted = VmState.DELETED.value
    sqlite = conn.dialect.name == "sqlite"
    for chunk in _chunks(sorted(uuids), _IN_LIMIT):
        if sqlite:
            size = min(1 << (len(chunk) - 1).bit_length(), _IN_LIMIT)
            padded = (*chunk, *(chunk[-1],) * (size - len(chunk)))
            rows = conn.exec_driver_sql(_held_sqlite(conn.dialect, size), padded).all()
        else:
            rows = conn.execute(_HELD, {"uuids": chunk}).all()
        held.update(
            (
                uuid,
                (
                    version,
                    cell,
                    None if code is None else Fault(code, message or "", at),
                    vm_state == deleted,
                ),
            )
            for uuid, version, cell, code, message, at, vm_state in rows
        )
    return held


def _fresh(
    rows: Iterable[tuple[int, str, bytes]], start: int
) -> tuple[list[tuple[int, str, bytes]], int, bool]:
    """The rows not applied yet in seq order, how many were, and whether a seq is missing."""
    fresh: list[tuple[int, str, bytes]] = []
    skipped = 0
    gap = False
    last = start
    for row in sorted(rows, key=lambda row: row[0]):
        if row[0] <= last:
            skipped += 1
            continue
        gap = gap or row[0] != last + 1
        fresh.append(row)
        last = row[0]
    return fresh, skipped, gap


def _from_child(child_path: str, kind: str, payload: bytes) -> InstanceFields | None:
    """The instance record a child sent, checked to be of its subtree (None: another kind)."""
    if kind != INSTANCE_KIND:
        return None
    record = fields_from_wire(_unpack(payload))
    cell = record.cell
    if cell is None or (cell != child_path and not cell.startswith(child_path + PATH_SEPARATOR)):
        raise SenderMismatch(
            f"cell {child_path} sent instance {record.uuid} of "
            f"{'no cell' if cell is None else 'cell ' + cell}"
        )
    return record


def _applied_seq(conn: Connection, child: str) -> int:
    value = conn.scalar(select(_progress.c.applied_seq).where(_progress.c.child_name == child))
    return 0 if value is None else int(value)


def _set_applied_seq(conn: Connection, child: str, seq: int) -> None:
    now = utcnow()
    upsert = dialect_insert(conn, _progress).values(
        child_name=child, applied_seq=seq, updated_at=now
    )
    conn.execute(
        upsert.on_conflict_do_update(
            index_elements=[_progress.c.child_name],
            set_={"applied_seq": seq, "updated_at": now},
        )
    )


# -- outbox, request log, plumbing --------------------------------------------------------


def _append_outbox(conn: Connection, entries: Sequence[tuple[str, bytes]]) -> None:
    """Append (kind, payload) rows under the next seqs, taken from the counter."""
    if not entries:
        return
    last = conn.execute(
        _count_statement(conn.dialect.name), {"name": _OUTBOX_COUNTER, "n": len(entries)}
    ).scalar_one()
    first = last - len(entries) + 1
    now = utcnow()
    conn.execute(
        _ADD_OUTBOX,
        [
            {"seq": first + offset, "kind": kind, "payload": payload, "created_at": now}
            for offset, (kind, payload) in enumerate(entries)
        ],
    )


@functools.cache
def _count_statement(dialect_name: str) -> Insert:
    """Move a counter by :n (made at :n if new), returning its new value."""
    add = (postgresql if dialect_name == "postgresql" else sqlite).insert(_counters)
    counted = add.values(name=bindparam("name"), value=bindparam("n"))
    statement: Insert = counted.on_conflict_do_update(
        index_elements=[_counters.c.name],
        set_={"value": _counters.c.value + bindparam("n")},
    ).returning(_counters.c.value)
    return statement


def _requeue_batch(db: Database, where: ColumnElement[bool], limit: int) -> tuple[int, str | None]:
    """Queue up to `limit` current records matching `where`; (how many, last uuid)."""
    with db.write() as session:
        conn = session.connection()
        rows = conn.execute(select(_instances).where(where).order_by(_i.uuid).limit(limit)).all()
        _append_outbox(conn, [(INSTANCE_KIND, _pack(_instance(row).to_wire())) for row in rows])
    return len(rows), rows[-1].uuid if rows else None


def _check_request_id(request_id: str) -> None:
    if not isinstance(request_id, str) or not 0 < len(request_id) <= _REQUEST_ID_LENGTH:
        raise InvalidRequest(f"a request id is 1-{_REQUEST_ID_LENGTH} characters")


def _logged(conn: Connection, request_id: str, method: str) -> bytes | None:
    """The stored result of `request_id`, or None the first time it is seen."""
    _serialise(conn, f"request:{request_id}")
    row = conn.execute(_LOGGED, {"rid": request_id}).first()
    if row is None:
        return None
    if row.method != method:
        raise InvalidRequest(f"request {request_id} was a {row.method}, not a {method}")
    return bytes(row.result)


def _log(conn: Connection, request_id: str, method: str, result: bytes) -> None:
    conn.execute(
        _LOG,
        {"request_id": request_id, "method": method, "result": result, "created_at": utcnow()},
    )


def _serialise(conn: Connection, key: str) -> None:
    """PostgreSQL: hold `key` until commit; SQLite's BEGIN IMMEDIATE holds everything."""
    if conn.dialect.name != "postgresql":
        return
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    conn.execute(select(func.pg_advisory_xact_lock(int.from_bytes(digest, "big", signed=True))))


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError) as exc:  # every msgpack decode error is a ValueError
        raise DecodeError(f"payload is not valid msgpack ({type(exc).__name__})") from None
    except RecursionError:
        raise DecodeError("payload nests too deeply") from None


def _decode_instance(payload: bytes) -> Instance:
    return Instance.from_wire(_unpack(payload))


def _decode_uuids(payload: bytes) -> list[str]:
    uuids = _unpack(payload)
    if type(uuids) is not list or not all(type(uuid) is str for uuid in uuids):
        raise SchemaError("request log: expected a list of instance uuids")
    return uuids
