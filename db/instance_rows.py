"""Instance records as rows of the instances table, and the merge of records into the index.

The mapping between `zcells.instances.Instance` and a row serves a compute
cell's own records, the outbox and the API cell's index alike; `merge` is the
one way records enter the index. Rules kept here:

* The index takes a record only if its version is newer than what it holds
  and it holds the instance under no cell or the same cell. Another cell is a
  conflict, reported and not applied, and so is a record of a live instance
  the top has recorded deleted under no cell.
* The latest fault is kept on the instance row, so a page of instances is one
  query; instance_faults keeps each new fault once per (instance, version).
* Times are epoch seconds (floats) outside and UTC timestamps inside, kept to
  the microsecond. What is written is rounded first, so what a call returns
  equals what a later read returns.
* On SQLite the index upsert, which runs once for every change in the tree,
  hands the driver rows it built itself (`_sqlite_row`) instead of going
  through SQLAlchemy's bind processing; tests keep both ways byte-identical.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
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
    literal_column,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from zcells.db.engine import dialect_insert
from zcells.db.models import Base, InstanceFaultRow, InstanceRow

from zcells.errors import DecodeError, SchemaError
from zcells.instances import Fault, Instance, InstanceFields, PowerState, TaskState, VmState
from zcells.names import PATH_SEPARATOR

INSTANCES: Final = Base.metadata.tables[InstanceRow.__tablename__]
_faults: Final = Base.metadata.tables[InstanceFaultRow.__tablename__]
_i = INSTANCES.c
# Set when an instance is created and never changed: an update leaves them (and their
# indexes) alone.
IMMUTABLE: Final = frozenset({"uuid", "project_id", "user_id", "created_at"})
IN_LIMIT: Final = 500  # uuids in one IN (...) list

# What the index takes: an instance, or the checked fields of one a child sent.
Record = Instance | InstanceFields


def when(seconds: float) -> datetime:
    """Epoch seconds as the UTC timestamp a column holds; `SchemaError` if out of range."""
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise SchemaError(f"instance: time {seconds!r} is out of range") from None


def exact(instance: Instance) -> Instance:
    """`instance` with its times rounded to the microsecond, as the database keeps them."""
    deleted_at = instance.deleted_at
    return replace(
        instance,
        created_at=when(instance.created_at).timestamp(),
        updated_at=when(instance.updated_at).timestamp(),
        deleted_at=None if deleted_at is None else when(deleted_at).timestamp(),
    )


def row_values(instance: Record) -> dict[str, Any]:
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
        "created_at": when(instance.created_at),
        "updated_at": when(instance.updated_at),
        "deleted_at": None if deleted_at is None else when(deleted_at),
        "fault_code": None if fault is None else fault.code,
        "fault_message": None if fault is None else fault.message,
        "fault_cell": None if fault is None else fault.cell,
    }


def mutable_values(instance: Instance) -> dict[str, Any]:
    """`row_values` without the columns an update leaves alone."""
    values = row_values(instance)
    for name in IMMUTABLE:
        del values[name]
    return values


def from_row(row: Row[Any]) -> Instance:
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


def record_faults(conn: Connection, instances: Sequence[Record]) -> None:
    """Add the fault each instance carries to its history, once per instance version."""
    rows = [
        {
            "instance_uuid": instance.uuid,
            "version": instance.version,
            "code": instance.fault.code,
            "message": instance.fault.message,
            "cell_name": instance.fault.cell,
            "created_at": when(instance.updated_at),
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


def merge(conn: Connection, updates: Sequence[Record]) -> tuple[int, int, list[Record]]:
    """Write the updates the index should take, in order; (applied, stale, conflicting).

    Decided in memory against what is held, as if applied one by one, then
    written once per instance. The upsert repeats the rule as its condition,
    so a concurrent writer on PostgreSQL cannot make it overwrite a newer row.
    """
    held = _held(conn, {update.uuid for update in updates})
    latest: dict[str, Record] = {}
    faulted: list[Record] = []
    conflicts: list[Record] = []
    applied = stale = 0
    moved: dict[str, Record] = {}
    for record in updates:
        version, cell, fault, gone = held.get(record.uuid, (-1, None, None, False))
        if _moved(cell, record, version):
            # The same cell under a new parent: its newer record, under its new path, is
            # the record. Written apart: the upsert keeps a row to its cell.
            held[record.uuid] = (record.version, record.cell, record.fault, record.deleted)
            moved[record.uuid] = record
            latest.pop(record.uuid, None)
            applied += 1
            continue
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
    for record in moved.values():  # first: a later record in the batch is under the new path
        conn.execute(
            update(INSTANCES)
            .where(_i.uuid == record.uuid, _i.version < record.version)
            .values(**{k: v for k, v in row_values(record).items() if k not in IMMUTABLE})
        )
    if latest:
        _upsert(conn, latest.values())
    record_faults(conn, faulted)
    return applied, stale, conflicts


def _moved(held_cell: str | None, record: Record, held_version: int) -> bool:
    """Whether `record` is the held instance's own cell, moved under another parent.

    The same cell name at the end of a different path, with a newer version:
    a cell that moved rewrites its records under its new path (and a copy in
    another cell that shares the name would only ever replace the record with
    one of its own, never leave two).
    """
    return (
        held_cell is not None
        and record.cell is not None
        and held_cell != record.cell
        and record.version > held_version
        and held_cell.rpartition(PATH_SEPARATOR)[2] == record.cell.rpartition(PATH_SEPARATOR)[2]
    )


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
            for column in INSTANCES.c
            if column.name not in IMMUTABLE
        },
        where=newer,
    )


@functools.lru_cache(maxsize=8)
def _compiled_upsert(dialect: Dialect) -> str:
    """The SQLite upsert of `_upsert_statement` for this engine's dialect, binding `_sqlite_row`."""
    compiled = _upsert_statement(sqlite.insert(INSTANCES)).compile(dialect=dialect)
    names = tuple(compiled.positiontup or ())
    if names != tuple(INSTANCES.c.keys()):
        raise AssertionError(f"the index upsert binds {names}, not each column in table order")
    return compiled.string


def _upsert(conn: Connection, records: Iterable[Record]) -> None:
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
            _upsert_statement(dialect_insert(conn, INSTANCES)),
            [row_values(record) for record in records],
        )


def _sqlite_row(record: Record) -> tuple[Any, ...]:
    """`row_values(record)` as SQLAlchemy binds it on SQLite, one value per column in table order.

    The same values the column types' bind processors make, so a row reads
    back the same whichever path wrote it: booleans as 0 or 1, metadata as
    `_sqlite_json` text, times as `sqlite_time` text.
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
        sqlite_time(record.created_at),
        sqlite_time(record.updated_at),
        None if deleted_at is None else sqlite_time(deleted_at),
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


def sqlite_time(seconds: float) -> str:
    """`when(seconds)` as SQLAlchemy's SQLite DATETIME stores it: naive UTC, to the microsecond.

    Its format is ``YYYY-MM-DD HH:MM:SS.ffffff``. The microseconds are rounded
    as `datetime.fromtimestamp` rounds them (the fraction times a million, half
    to even, a million carried into the second) and the whole second is
    formatted once: the times of the changes that flow up at once fall in few
    seconds, and formatting each in full took about a tenth of an apply.
    """
    if not 0.0 <= seconds < _LAST_SECOND:  # negative, past year 9999, or not a number
        return when(seconds).isoformat(" ", "microseconds")[:-6]
    fraction, whole = math.modf(seconds)
    micro = round(fraction * 1e6)
    if micro == 1_000_000:
        whole, micro = whole + 1.0, 0
    return f"{_sqlite_second(whole)}.{micro:06d}"


_LAST_SECOND: Final = 253_402_300_799.0  # 9999-12-31 23:59:59 UTC


@functools.lru_cache(maxsize=4096)
def _sqlite_second(whole: float) -> str:
    return when(whole).isoformat(" ", "seconds")[:-6]


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
    size of list, each list padded to a power of two or to `IN_LIMIT`
    (repeats change nothing in an IN list): expanding the list for every
    query took about a third of the time of this function on a child's batch.
    """
    held: dict[str, _Held] = {}
    deleted = VmState.DELETED.value
    sqlite = conn.dialect.name == "sqlite"
    for chunk in chunks(sorted(uuids), IN_LIMIT):
        if sqlite:
            size = min(1 << (len(chunk) - 1).bit_length(), IN_LIMIT)
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


# -- payloads and lists -------------------------------------------------------------------


def chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    """`items` in slices of at most `size` (uuids in one IN list, or one batch)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def pack(value: Any) -> bytes:
    """A payload of the outbox or the request log."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(payload: bytes) -> Any:
    """What `pack` made; `DecodeError` for anything else (a child's payload may be bad)."""
    try:
        return msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError) as exc:  # every msgpack decode error is a ValueError
        raise DecodeError(f"payload is not valid msgpack ({type(exc).__name__})") from None
    except RecursionError:
        raise DecodeError("payload nests too deeply") from None
