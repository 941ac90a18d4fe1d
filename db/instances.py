"""A cell's instances: its own records as their owner, and the index as a parent.

One table holds both a compute cell's own full records and the API cell's
index of the instances of every cell. The row mapping and the merge into the
index live in `zcells.db.instance_rows`, the outbox in `zcells.db.outbox`.

Rules kept here:

* Every call that writes is one transaction; a call that raises wrote nothing.
* A change to an instance and its outbox row are written in the same
  transaction (`outbox.append` on the same connection).
* A request id answers its first result again: the result is stored in the
  request log by the transaction that did the work. On PostgreSQL the
  transactions of one request id (and the batches of one child) are serialised
  by an advisory lock, as SQLite's ``BEGIN IMMEDIATE`` serialises every writer.
* Resources are claimed by a conditional UPDATE of the host, so two placements
  never overcommit it; a delete frees them, never below zero; `sync_hosts`
  recomputes usage from the instances, which heals a crash in between.
* A child speaks only for its own subtree: one update naming a cell outside
  it rejects the whole batch.
* Callers get `zcells.instances.Instance` and `zcells.records.Host`, never rows.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    bindparam,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    update,
)
from zcells.db import orphans, outbox, quotas
from zcells.db.engine import Database, dialect_insert
from zcells.db.hosts import claim, release
from zcells.db.instance_rows import (
    IN_LIMIT,
    INSTANCES,
    Record,
    chunks,
    exact,
    from_row,
    merge,
    mutable_values,
    pack,
    record_faults,
    row_values,
    unpack,
    when,
)
from zcells.db.models import (
    Base,
    BuildHintsRow,
    ChildProgressRow,
    HostRow,
    RequestLogRow,
    now_of,
)

from zcells.errors import (
    CallTimeout,
    Conflict,
    InvalidRequest,
    NotFoundRemote,
    SchemaError,
    SenderMismatch,
    WireError,
    ZcellsError,
)
from zcells.instances import (
    STATUSES,
    Instance,
    InstanceFields,
    TaskState,
    VmState,
    fields_from_wire,
    relocated,
)
from zcells.names import PATH_SEPARATOR
from zcells.quotas import Quota, Usage, enforce

_REQUEST_ID_LENGTH: Final = 64
_UNFINISHED: Final = (
    TaskState.SPAWNING,
    TaskState.POWERING_OFF,
    TaskState.POWERING_ON,
    TaskState.REBOOTING,
    TaskState.DELETING,
)

_hosts: Final = Base.metadata.tables[HostRow.__tablename__]
_progress: Final = Base.metadata.tables[ChildProgressRow.__tablename__]
_requests: Final = Base.metadata.tables[RequestLogRow.__tablename__]
_hints: Final = Base.metadata.tables[BuildHintsRow.__tablename__]

_i = INSTANCES.c
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
_GET: Final = select(INSTANCES).where(_i.uuid == bindparam("key"))
_GET_FOR_UPDATE: Final = _GET.with_for_update()
_GET_EACH_FOR_UPDATE: Final = (
    select(INSTANCES).where(_i.uuid.in_(bindparam("keys", expanding=True))).with_for_update()
)
_INSERT: Final = insert(INSTANCES)
_UPDATE: Final = update(INSTANCES).where(_i.uuid == bindparam("key"))
_TAKEN_ONE: Final = select(_i.uuid).where(_i.uuid == bindparam("key"))
_TAKEN: Final = select(_i.uuid).where(_i.uuid.in_(bindparam("uuids", expanding=True))).limit(1)
_LOGGED: Final = select(_requests.c.method, _requests.c.result).where(
    _requests.c.request_id == bindparam("rid")
)
_LOG: Final = insert(_requests)


@dataclass(frozen=True)
class Applied:
    """What one batch of a child's outbox did here."""

    applied_seq: int  # the child's highest seq applied here, after this batch
    applied: int  # rows that changed something (or were stored to forward)
    skipped: int  # seq applied before, version not newer, or a kind not known here
    conflicts: tuple[tuple[str, str], ...]  # (uuid, cell) held here under another cell
    gap: bool  # some seq was never seen: the child's outbox lost rows we lack
    refused: tuple[tuple[int, str, str], ...] = ()  # (seq, code, why) of rows not taken


# -- owner side ---------------------------------------------------------------------------


def place(
    db: Database,
    candidates: list[str],
    make: Callable[[str], Instance],
    request_id: str,
    valid_until: float | None = None,
    wall: Callable[[], float] = time.time,
) -> Instance | None:
    """Claim the first candidate host with room and record `make(host)` on it.

    A repeat of `request_id` answers the instance placed the first time. None if
    no candidate has room (nothing is written); `Conflict` if the uuid exists;
    `CallTimeout` if the build's lease ran out (`valid_until`, wall clock): the
    parent may be building it elsewhere by now.
    """
    _check_request_id(request_id)
    with db.write() as session:
        conn = session.connection()
        logged = _logged(conn, request_id, "build")
        if logged is not None:
            return _decode_instance(logged)
        if valid_until is not None and wall() > valid_until:
            raise CallTimeout(f"the build's lease ran out before {request_id} was placed")
        for host in candidates:
            instance = exact(make(host))
            _ensure_new(conn, instance.uuid)
            if not claim(conn, host, instance):
                continue
            conn.execute(_INSERT, row_values(instance))
            record_faults(conn, [instance])
            payload = pack(instance.to_wire())
            outbox.append(conn, [(outbox.INSTANCE_KIND, payload)])
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
        old = from_row(row)
        new = exact(fn(old))
        conn.execute(_UPDATE, {"key": uuid, **mutable_values(new)})
        if new.deleted and not old.deleted and old.host is not None:
            release(conn, old.host, old)
        if new.fault is not None and new.fault != old.fault:
            record_faults(conn, [new])
        payload = pack(new.to_wire())
        outbox.append(conn, [(outbox.INSTANCE_KIND, payload)])
        if request_id is not None:
            _log(conn, request_id, method, payload)
        return new


def relocate_own(db: Database, path: str, now: float) -> int:
    """Put this cell's own instances under its full path `path`, if they were under another.

    A cell moved to a new parent has a new path; each of its records changes
    with a new version and an outbox row, so the new parent takes them and the
    top moves them to the new path. How many changed.
    """
    with db.read() as session:
        uuids = list(
            session.connection().scalars(
                select(INSTANCES.c.uuid).where(
                    INSTANCES.c.cell_name.is_not(None), INSTANCES.c.cell_name != path
                )
            )
        )
    moved = 0
    for chunk in chunks(uuids, outbox.REQUEUE_BATCH):
        outcomes = change_each(db, [(uuid, lambda i: relocated(i, path, now)) for uuid in chunk])
        moved += sum(isinstance(outcome, Instance) for outcome in outcomes)
    return moved


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
        for chunk in chunks(list(dict.fromkeys(uuid for uuid, _ in changes)), IN_LIMIT):
            rows = conn.execute(_GET_EACH_FOR_UPDATE, {"keys": chunk})
            held.update((row.uuid, from_row(row)) for row in rows)
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
                new = exact(fn(old))
            except ZcellsError as exc:
                outcomes.append(exc)
                continue
            if new.deleted and not old.deleted and old.host is not None:
                release(conn, old.host, old)
            if new.fault is not None and new.fault != old.fault:
                faulted.append(new)
            held[uuid] = newest[uuid] = new
            payloads.append((outbox.INSTANCE_KIND, pack(new.to_wire())))
            outcomes.append(new)
        if newest:
            conn.execute(
                _UPDATE, [{"key": uuid, **mutable_values(new)} for uuid, new in newest.items()]
            )
        record_faults(conn, faulted)
        outbox.append(conn, payloads)
        return outcomes


def get(db: Database, uuid: str) -> Instance | None:
    with db.read() as session:
        row = session.connection().execute(_GET, {"key": uuid}).first()
        return None if row is None else from_row(row)


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
            select(INSTANCES).where(*where).order_by(_i.created_at, _i.uuid).limit(limit)
        )
        return [from_row(row) for row in rows]


def unfinished(db: Database) -> list[Instance]:
    """Instances a task was running on, to resume after a restart."""
    tasks = [task.value for task in _UNFINISHED]
    with db.read() as session:
        rows = session.connection().execute(
            select(INSTANCES).where(_i.task_state.in_(tasks)).order_by(_i.created_at, _i.uuid)
        )
        return [from_row(row) for row in rows]


def counts(db: Database) -> dict[str, int]:
    """Instances that are not deleted, by status (every such status, zero included)."""
    shown = [status for status in STATUSES if status != "DELETED"]
    each = [func.count().filter(_STATUS_WHERE[status]) for status in shown]
    with db.read() as session:
        row = session.connection().execute(select(*each).where(_i.deleted == false())).one()
    return {status: int(count) for status, count in zip(shown, row, strict=True)}


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
        refused: list[tuple[int, str, str]] = []
        records: list[InstanceFields | None] = []
        taken: list[tuple[int, str, bytes]] = []
        for row in fresh:  # one bad row is refused alone; the rest of the stream flows
            try:
                records.append(_from_child(child_path, row[1], row[2]))
            except WireError as exc:
                refused.append((row[0], exc.code, exc.message[:200]))
                continue
            taken.append(row)
        conflicts: list[Record] = []
        if store_forward:
            outbox.append(conn, [(kind, payload) for _, kind, payload in taken])
            applied = len(taken)
        else:
            updates = [record for record in records if record is not None]
            applied, stale, conflicts = merge(conn, updates)
            skipped += stale + len(records) - len(updates)
        end = fresh[-1][0]
        _set_applied_seq(conn, child, end)
        found = tuple(dict.fromkeys((u.uuid, u.cell or child_path) for u in conflicts))
        orphans.note(conn, found)  # with the batch: an acknowledged batch loses none
        return Applied(
            applied_seq=end,
            applied=applied,
            skipped=skipped,
            conflicts=found,
            gap=gap,
            refused=tuple(refused),
        )


def index_create(
    db: Database,
    instances: list[Instance],
    request_id: str,
    hints: Mapping[str, str] | None = None,
    *,
    quota: Quota | None = None,
) -> list[Instance]:
    """Record new instances in the API cell's index; a repeat answers their records now.

    Scheduler `hints`, if any, are kept with each instance until `forget_hints`.
    With a default `quota`, the project's limits (its own where an admin set
    them) are checked against what it holds, in this same transaction
    (`QuotaExceeded`, nothing written).
    """
    _check_request_id(request_id)
    created = [exact(instance) for instance in instances]
    uuids = [instance.uuid for instance in created]
    with db.write() as session:
        conn = session.connection()
        logged = _logged(conn, request_id, "server_create")
        if logged is not None:
            return _current(conn, _decode_uuids(logged))
        if len(set(uuids)) != len(uuids):
            twice = next(uuid for uuid in uuids if uuids.count(uuid) > 1)
            raise Conflict(f"instance {twice} is named twice")
        if quota is not None and created:
            project = created[0].project
            wanted = Usage(
                len(created),
                sum(i.vcpus for i in created),
                sum(i.memory_mb for i in created),
            )
            limits = quota.merged(quotas.overrides(conn, project))
            enforce(project, limits, quotas.usage(conn, project), wanted)
        if uuids:
            for chunk in chunks(uuids, IN_LIMIT):
                _ensure_new(conn, *chunk)
            conn.execute(insert(INSTANCES), [row_values(instance) for instance in created])
            record_faults(conn, created)
            if hints:
                conn.execute(
                    insert(_hints),
                    [{"instance_uuid": uuid, "hints": dict(hints)} for uuid in uuids],
                )
        _log(conn, request_id, "server_create", pack(uuids))
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
            select(INSTANCES, _hints.c.hints)
            .outerjoin(_hints, _hints.c.instance_uuid == _i.uuid)
            .where(waiting)
            .order_by(_i.created_at, _i.uuid)
        )
        return [(from_row(row), dict(row.hints or {})) for row in rows]


def forget_hints(db: Database, uuid: str) -> None:
    """Drop the scheduler hints of an instance whose build has ended."""
    with db.write() as session:
        session.connection().execute(delete(_hints).where(_hints.c.instance_uuid == uuid))


def index_put(db: Database, instance: Instance) -> bool:
    """Take one record into the index if it is newer and held under no or the same cell."""
    with db.write() as session:
        applied, _, _ = merge(session.connection(), [instance])
        return applied == 1


def trim_request_log(db: Database, older_than: float) -> int:
    """Forget request results recorded before `older_than`; how many went."""
    before = when(older_than)
    with db.write() as session:
        return (
            session.connection()
            .execute(delete(_requests).where(_requests.c.created_at < before))
            .rowcount
        )


# -- queries both sides use ---------------------------------------------------------------


def _current(conn: Connection, uuids: Sequence[str]) -> list[Instance]:
    """The records of `uuids` as held now, in that order."""
    found: dict[str, Instance] = {}
    for chunk in chunks(uuids, IN_LIMIT):
        rows = conn.execute(select(INSTANCES).where(_i.uuid.in_(chunk)))
        found.update((row.uuid, from_row(row)) for row in rows)
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
    if kind != outbox.INSTANCE_KIND:
        return None
    record = fields_from_wire(unpack(payload))
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
    now = now_of(conn)
    upsert = dialect_insert(conn, _progress).values(
        child_name=child, applied_seq=seq, updated_at=now
    )
    conn.execute(
        upsert.on_conflict_do_update(
            index_elements=[_progress.c.child_name],
            set_={"applied_seq": seq, "updated_at": now},
        )
    )


# -- request log, plumbing ----------------------------------------------------------------


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
        {"request_id": request_id, "method": method, "result": result, "created_at": now_of(conn)},
    )


def _serialise(conn: Connection, key: str) -> None:
    """PostgreSQL: hold `key` until commit; SQLite's BEGIN IMMEDIATE holds everything."""
    if conn.dialect.name != "postgresql":
        return
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    conn.execute(select(func.pg_advisory_xact_lock(int.from_bytes(digest, "big", signed=True))))


def _decode_instance(payload: bytes) -> Instance:
    return Instance.from_wire(unpack(payload))


def _decode_uuids(payload: bytes) -> list[str]:
    uuids = unpack(payload)
    if type(uuids) is not list or not all(type(uuid) is str for uuid in uuids):
        raise SchemaError("request log: expected a list of instance uuids")
    return uuids
