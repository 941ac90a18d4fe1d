"""Global data in a cell's database: flavors, images, and the log that sends them down.

Rules kept here (DESIGN.md §5; `zcells.downstream` streams the log):

* At the API cell every change of a flavor or an image writes the row and
  its log row in one transaction, under the next seq of the ``global``
  counter, so a change and its log row are never one without the other.
* Below it, `apply` takes a parent's rows in one transaction: each row past
  the cell's ``global`` counter changes the flavor or image, takes the log
  row of its (kind, name) under the same seq, and moves the counter; a row at
  or below the counter was applied before and changes nothing.
* One log row per (kind, name): a change replaces the row before it, and a
  delete stays as a tombstone. The log holds no more rows than there are
  names, and a child that missed a change gets the one that replaced it.
* Values are checked by `zcells.globaldata` before anything is written;
  callers get `zcells.records` dataclasses back, never rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]
from sqlalchemy import Connection, case, delete, func, select, update
from zcells.db.engine import Database, dialect_insert
from zcells.db.models import Base, CounterRow, FlavorRow, GlobalLogRow, ImageRow, now_of

from zcells.errors import AlreadyExists, DecodeError, NotFound
from zcells.globaldata import (
    FLAVOR,
    IMAGE,
    Change,
    check_flavor,
    check_image,
    check_properties,
    record_from_wire,
)
from zcells.records import DEFAULT_FLAVORS, DEFAULT_IMAGES, Flavor, Image

GLOBAL_COUNTER: Final = "global"

_flavors: Final = Base.metadata.tables[FlavorRow.__tablename__]
_images: Final = Base.metadata.tables[ImageRow.__tablename__]
_log: Final = Base.metadata.tables[GlobalLogRow.__tablename__]
_counters: Final = Base.metadata.tables[CounterRow.__tablename__]


# -- flavors ------------------------------------------------------------------------------


def list_flavors(db: Database) -> list[Flavor]:
    f = _flavors.c
    with db.read() as session:
        rows = session.connection().execute(
            select(f.name, f.memory_mb, f.disk_gb, f.vcpus).order_by(f.memory_mb, f.name)
        )
        return [Flavor(r.name, r.memory_mb, r.disk_gb, r.vcpus) for r in rows]


def get_flavor(db: Database, name: str) -> Flavor | None:
    with db.read() as session:
        return _flavor_in(session.connection(), name)


def create_flavor(db: Database, flavor: Flavor) -> Flavor:
    """Add a flavor at the API cell, logged to flow down; `AlreadyExists` if the name is taken."""
    check_flavor(flavor)
    with db.write() as session:
        conn = session.connection()
        if conn.scalar(select(_flavors.c.id).where(_flavors.c.name == flavor.name)) is not None:
            raise AlreadyExists("flavor", "name", flavor.name)
        _put(conn, flavor)
        _log_changes(conn, [(FLAVOR, flavor.name, flavor)])
    return flavor


def delete_flavor(db: Database, name: str) -> Flavor:
    """Remove a flavor at the API cell, logged to flow down; servers built from it keep theirs."""
    with db.write() as session:
        conn = session.connection()
        found = _flavor_in(conn, name)
        if found is None:
            raise NotFound("flavor", name)
        _remove(conn, FLAVOR, name)
        _log_changes(conn, [(FLAVOR, name, None)])
    return found


def seed_default_flavors(db: Database) -> int:
    """Create the classic m1.* flavors unless any flavor exists; return how many were made."""
    with db.write() as session:
        conn = session.connection()
        if conn.scalar(select(func.count()).select_from(_flavors)):
            return 0
        for flavor in DEFAULT_FLAVORS:
            _put(conn, flavor)
        _log_changes(conn, [(FLAVOR, flavor.name, flavor) for flavor in DEFAULT_FLAVORS])
        return len(DEFAULT_FLAVORS)


# -- images -------------------------------------------------------------------------------


def list_images(db: Database) -> list[Image]:
    i = _images.c
    with db.read() as session:
        rows = session.connection().execute(select(i.name, i.properties).order_by(i.name))
        return [Image(r.name, dict(r.properties)) for r in rows]


def get_image(db: Database, name: str) -> Image | None:
    with db.read() as session:
        return _image_in(session.connection(), name)


def create_image(db: Database, image: Image) -> Image:
    """Add an image at the API cell, logged to flow down; `AlreadyExists` if the name is taken."""
    image = check_image(image)
    with db.write() as session:
        conn = session.connection()
        if conn.scalar(select(_images.c.id).where(_images.c.name == image.name)) is not None:
            raise AlreadyExists("image", "name", image.name)
        _put(conn, image)
        _log_changes(conn, [(IMAGE, image.name, image)])
    return image


def set_image_properties(
    db: Database, name: str, properties: Mapping[str, str], unset: Iterable[str] = ()
) -> Image:
    """Set and remove properties of an image at the API cell, logged to flow down."""
    check_properties(properties)
    removed = set(unset)
    with db.write() as session:
        conn = session.connection()
        held = _image_in(conn, name)
        if held is None:
            raise NotFound("image", name)
        kept = {k: v for k, v in held.properties.items() if k not in removed}
        changed = check_image(Image(name, {**kept, **properties}))
        if changed != held:
            _put(conn, changed)
            _log_changes(conn, [(IMAGE, name, changed)])
    return changed


def delete_image(db: Database, name: str) -> Image:
    """Remove an image at the API cell, logged to flow down; servers booted from it stay."""
    with db.write() as session:
        conn = session.connection()
        found = _image_in(conn, name)
        if found is None:
            raise NotFound("image", name)
        _remove(conn, IMAGE, name)
        _log_changes(conn, [(IMAGE, name, None)])
    return found


def seed_default_images(db: Database) -> int:
    """Create the default images unless any image exists; return how many were made."""
    with db.write() as session:
        conn = session.connection()
        if conn.scalar(select(func.count()).select_from(_images)):
            return 0
        for image in DEFAULT_IMAGES:
            _put(conn, image)
        _log_changes(conn, [(IMAGE, image.name, image) for image in DEFAULT_IMAGES])
        return len(DEFAULT_IMAGES)


# -- the global log -------------------------------------------------------------------------


def last_seq(db: Database) -> int:
    """The cell's ``global`` counter: the highest seq it logged (0 before the first)."""
    with db.read() as session:
        return _counter(session.connection())


def read_log(db: Database, after: int, limit: int) -> list[Change]:
    """Up to `limit` log rows with seq > `after`, in seq order."""
    g = _log.c
    with db.read() as session:
        rows = session.connection().execute(
            select(g.seq, g.kind, g.name, g.deleted, g.payload)
            .where(g.seq > after)
            .order_by(g.seq)
            .limit(limit)
        )
        return [
            Change(row.seq, row.kind, row.name, None if row.deleted else _record(row))
            for row in rows
        ]


def apply(db: Database, changes: Sequence[Change]) -> int:
    """Apply a parent's checked rows in one transaction; the ``global`` counter after.

    Rows at or below the counter were applied before: they change nothing.
    """
    with db.write() as session:
        conn = session.connection()
        applied = _counter(conn)
        fresh = [change for change in changes if change.seq > applied]
        for change in fresh:
            if change.record is None:
                _remove(conn, change.kind, change.name)
            else:
                _put(conn, change.record)
            _replace_log_row(conn, change)
        if fresh:
            applied = fresh[-1].seq
            _set_counter(conn, applied)
        return applied


def renumber(db: Database, past: int) -> int:
    """Move the counter past `past` and log every row again after it; how many rows.

    For an API cell whose database is older than what a child has applied
    (restored from a backup): its rows would sit at or below the child's
    counter and be taken as seen. Given new seqs, in their old order, they
    flow down again; a child applies each as a plain change.
    """
    g = _log.c
    with db.write() as session:
        conn = session.connection()
        start = max(_counter(conn), past)
        seqs = list(conn.scalars(select(g.seq).order_by(g.seq)))
        # Every new seq is past every old one (start >= the counter >= any seq): no clash.
        for offset, seq in enumerate(seqs, start=1):
            conn.execute(update(_log).where(g.seq == seq).values(seq=start + offset))
        _set_counter(conn, start + len(seqs))
        return len(seqs)


# -- inside a transaction -------------------------------------------------------------------


def _counter(conn: Connection) -> int:
    value = conn.scalar(select(_counters.c.value).where(_counters.c.name == GLOBAL_COUNTER))
    return 0 if value is None else int(value)


def _set_counter(conn: Connection, value: int) -> None:
    upsert = dialect_insert(conn, _counters).values(name=GLOBAL_COUNTER, value=value)
    conn.execute(
        upsert.on_conflict_do_update(
            index_elements=[_counters.c.name],
            set_={"value": case((_counters.c.value < value, value), else_=_counters.c.value)},
        )
    )


def _log_changes(
    conn: Connection, entries: Sequence[tuple[str, str, Flavor | Image | None]]
) -> None:
    """Log the API cell's own changes under the next seqs of the counter.

    The counter moves first, in one statement that holds its row until the
    commit, so two writers never take the same seq on any backend.
    """
    upsert = dialect_insert(conn, _counters).values(name=GLOBAL_COUNTER, value=len(entries))
    last = conn.execute(
        upsert.on_conflict_do_update(
            index_elements=[_counters.c.name],
            set_={"value": _counters.c.value + len(entries)},
        ).returning(_counters.c.value)
    ).scalar_one()
    first = int(last) - len(entries) + 1
    for offset, (kind, name, record) in enumerate(entries):
        _replace_log_row(conn, Change(first + offset, kind, name, record))


def _replace_log_row(conn: Connection, change: Change) -> None:
    """The log row of the change's (kind, name), in place of the one before it."""
    g = _log.c
    conn.execute(delete(_log).where(g.kind == change.kind, g.name == change.name))
    conn.execute(
        _log.insert().values(
            seq=change.seq,
            kind=change.kind,
            name=change.name,
            deleted=change.record is None,
            payload=b"" if change.record is None else _pack(change.record),
            created_at=now_of(conn),
        )
    )


def _put(conn: Connection, record: Flavor | Image) -> None:
    """Create the flavor or image of that name, or replace what it holds."""
    now = now_of(conn)
    values: dict[str, Any]
    if isinstance(record, Flavor):
        table = _flavors
        values = {"memory_mb": record.memory_mb, "disk_gb": record.disk_gb, "vcpus": record.vcpus}
    else:
        table, values = _images, {"properties": dict(record.properties), "updated_at": now}
    upsert = dialect_insert(conn, table).values(name=record.name, created_at=now, **values)
    conn.execute(upsert.on_conflict_do_update(index_elements=[table.c.name], set_=values))


def _remove(conn: Connection, kind: str, name: str) -> None:
    table = _flavors if kind == FLAVOR else _images
    conn.execute(delete(table).where(table.c.name == name))


def _flavor_in(conn: Connection, name: str) -> Flavor | None:
    f = _flavors.c
    sizes = select(f.name, f.memory_mb, f.disk_gb, f.vcpus)
    row = conn.execute(sizes.where(f.name == name)).first()
    return None if row is None else Flavor(row.name, row.memory_mb, row.disk_gb, row.vcpus)


def _image_in(conn: Connection, name: str) -> Image | None:
    i = _images.c
    row = conn.execute(select(i.name, i.properties).where(i.name == name)).first()
    return None if row is None else Image(row.name, dict(row.properties))


def _pack(record: Flavor | Image) -> bytes:
    return msgpack.packb(record.as_dict(), use_bin_type=True)  # type: ignore[no-any-return]


def _record(row: Any) -> Flavor | Image:
    """The record of a log row, as written by `_pack` (checked again: it will be sent)."""
    try:
        raw = msgpack.unpackb(bytes(row.payload), raw=False)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"global log row {row.seq} is not valid msgpack") from exc
    return record_from_wire(row.kind, raw)
