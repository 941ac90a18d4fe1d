"""The orphan copies the API cell has still to delete, kept until each delete is acknowledged.

An orphan is a copy of an instance in a cell the index does not hold it
under: a build that landed in two cells, or a copy a cell reports after the
top recorded the instance's delete itself. It is noted in the transaction
that found it (`note`), so an acknowledged batch of updates never loses one,
and `zcells.orphans` sends the delete until the cell acknowledges it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, delete, func, select, update
from zcells.db.engine import Database, dialect_insert
from zcells.db.models import Base, OrphanRow, now_of

_orphans = Base.metadata.tables[OrphanRow.__tablename__]
_o = _orphans.c


def note(conn: Connection, found: Iterable[tuple[str, str]]) -> int:
    """Keep (uuid, cell) pairs to delete, due at once; pairs already kept stay as they are."""
    now = now_of(conn)
    rows = [
        {"instance_uuid": u, "cell_name": c, "attempts": 0, "next_at": now, "created_at": now}
        for u, c in dict.fromkeys(found)
    ]
    if not rows:
        return 0
    conn.execute(
        dialect_insert(conn, _orphans).on_conflict_do_nothing(
            index_elements=[_o.instance_uuid, _o.cell_name]
        ),
        rows,
    )
    return len(rows)


def note_now(db: Database, found: Iterable[tuple[str, str]]) -> int:
    with db.write() as session:
        return note(session.connection(), found)


def due(db: Database, now: float, limit: int) -> list[tuple[str, str, int]]:
    """Up to `limit` (uuid, cell, attempts) whose next try is due, oldest first."""
    at = datetime.fromtimestamp(now, UTC)
    with db.read() as session:
        rows = session.connection().execute(
            select(_o.instance_uuid, _o.cell_name, _o.attempts)
            .where(_o.next_at <= at)
            .order_by(_o.next_at)
            .limit(limit)
        )
        return [(r.instance_uuid, r.cell_name, int(r.attempts)) for r in rows]


def done(db: Database, uuid: str, cell: str) -> None:
    with db.write() as session:
        session.connection().execute(
            delete(_orphans).where(_o.instance_uuid == uuid, _o.cell_name == cell)
        )


def retry(db: Database, uuid: str, cell: str, after_s: float, error: str) -> None:
    """Try again in `after_s`, counting the failed attempt."""
    with db.write() as session:
        session.connection().execute(
            update(_orphans)
            .where(_o.instance_uuid == uuid, _o.cell_name == cell)
            .values(
                attempts=_o.attempts + 1,
                next_at=db.now() + timedelta(seconds=after_s),
                last_error=error[:64],
            )
        )


def count(db: Database) -> int:
    with db.read() as session:
        return int(session.connection().scalar(select(func.count()).select_from(_orphans)) or 0)
