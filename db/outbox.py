"""The outbox: what a cell has still to send up to its parents, in sequence order.

Rules kept here (DESIGN.md §4; `zcells.upstream` sends and trims it):

* A row is appended in the transaction that made the change it carries, by
  whoever made it: `append` takes a connection, never a transaction of its own.
* Its seq is taken from the ``outbox`` counter moved in that transaction, so
  sequence numbers are gap-free, committed in seq order and never reused
  after a trim, on SQLite and PostgreSQL alike.
* A requeue (the periodic heal, a forced resync) appends the current record
  of each instance again, one transaction per `REQUEUE_BATCH`, so other
  writers wait for a batch, never for all of it.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from typing import Final

from sqlalchemy import (
    ColumnElement,
    Connection,
    Insert,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from zcells.db.engine import Database, dialect_insert
from zcells.db.instance_rows import INSTANCES, chunks, from_row, pack, when
from zcells.db.models import Base, CounterRow, HeldRow, OutboxRow, now_of

INSTANCE_KIND: Final = "instance"
# The highest sequence number a stream may reach: a signed 64-bit column with room
# to spare, so no peer can push a counter (a child's, or one kept for it) to overflow.
MAX_SEQ: Final = (1 << 62) - 1
REQUEUE_BATCH: Final = 1000

_OUTBOX_COUNTER: Final = "outbox"
_outbox: Final = Base.metadata.tables[OutboxRow.__tablename__]
_counters: Final = Base.metadata.tables[CounterRow.__tablename__]
_held: Final = Base.metadata.tables[HeldRow.__tablename__]
_i = INSTANCES.c
_ADD: Final = insert(_outbox)


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
    for chunk in chunks(sorted(set(uuids)), REQUEUE_BATCH):
        queued += _requeue_batch(db, _i.uuid.in_(chunk), len(chunk))[0]
    return queued


def heal(db: Database, since: float, after: str, limit: int) -> tuple[int, str | None]:
    """Queue again up to `limit` instances changed since `since`, in uuid order after `after`.

    One step of the periodic heal; (how many, the last uuid queued, or None
    when none were left after `after`, so the next step starts over).
    """
    return _requeue_batch(db, and_(_i.updated_at >= when(since), _i.uuid > after), limit)


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


def hold(db: Database, parent: str, rows: Sequence[tuple[int, str, bytes, str, str]]) -> int:
    """Keep rows `parent` refused, with (code, reason), aside from the stream; how many."""
    if not rows:
        return 0
    now = db.now()
    with db.write() as session:
        conn = session.connection()
        conn.execute(
            dialect_insert(conn, _held).on_conflict_do_nothing(
                index_elements=[_held.c.parent_name, _held.c.seq]
            ),
            [
                {
                    "parent_name": parent,
                    "seq": seq,
                    "kind": kind[:32],
                    "payload": payload,
                    "code": code[:64],
                    "reason": reason[:255],
                    "held_at": now,
                }
                for seq, kind, payload, code, reason in rows
            ],
        )
    return len(rows)


def held(db: Database) -> dict[str, int]:
    """How many rows each parent refused, held here."""
    h = _held.c
    with db.read() as session:
        rows = session.connection().execute(
            select(h.parent_name, func.count()).group_by(h.parent_name)
        )
        return {row[0]: int(row[1]) for row in rows}


def append(conn: Connection, entries: Sequence[tuple[str, bytes]]) -> None:
    """Append (kind, payload) rows under the next seqs, taken from the counter."""
    if not entries:
        return
    last = conn.execute(
        _count_statement(conn.dialect.name), {"name": _OUTBOX_COUNTER, "n": len(entries)}
    ).scalar_one()
    first = last - len(entries) + 1
    now = now_of(conn)
    conn.execute(
        _ADD,
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
        rows = conn.execute(select(INSTANCES).where(where).order_by(_i.uuid).limit(limit)).all()
        append(conn, [(INSTANCE_KIND, pack(from_row(row).to_wire())) for row in rows])
    return len(rows), rows[-1].uuid if rows else None
