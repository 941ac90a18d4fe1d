"""What the status view asks of a cell's database: its hosts in sum, its servers, its backlog.

Rules kept here:

* One call, one read transaction for the host sums and the backlog, so the
  figures of one answer belong together; the server counts are those of
  `instances.counts`, the same derivation of status the server views use.
* Capacity is counted on enabled hosts only: a disabled host takes no builds,
  so its free RAM is no use to anyone.
* Times leave as epoch seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Connection, case, func, select, true
from zcells.db import instances
from zcells.db.engine import Database
from zcells.db.models import Base, HostRow, OutboxRow

_hosts: Final = Base.metadata.tables[HostRow.__tablename__]
_outbox: Final = Base.metadata.tables[OutboxRow.__tablename__]


@dataclass(frozen=True)
class HostSums:
    """A cell's hosts added up: how many are up (enabled), and their free and total capacity."""

    up: int
    total: int
    memory_mb: int
    memory_mb_free: int
    disk_gb: int
    disk_gb_free: int
    vcpus: int
    vcpus_free: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "total": self.total,
            "memory_mb": self.memory_mb,
            "memory_mb_free": self.memory_mb_free,
            "disk_gb": self.disk_gb,
            "disk_gb_free": self.disk_gb_free,
            "vcpus": self.vcpus,
            "vcpus_free": self.vcpus_free,
        }


@dataclass(frozen=True)
class Backlog:
    """Outbox rows after a sequence: how many, and when the oldest was written (epoch s)."""

    count: int
    oldest_at: float | None


@dataclass(frozen=True)
class CellFigures:
    hosts: HostSums
    servers: dict[str, int]  # status -> instances that are not deleted
    backlog: Backlog | None  # None when not asked for (a cell with no parent)


def figures(db: Database, backlog_after: int | None) -> CellFigures:
    """Host sums, server counts by status and, if `backlog_after` is given, the backlog past it."""
    with db.read() as session:
        conn = session.connection()
        hosts = _host_sums(conn)
        backlog = None if backlog_after is None else _backlog(conn, backlog_after)
    return CellFigures(hosts=hosts, servers=instances.counts(db), backlog=backlog)


def _host_sums(conn: Connection) -> HostSums:
    h = _hosts.c

    def on_enabled(value: Any) -> Any:
        return func.coalesce(func.sum(case((h.enabled == true(), value), else_=0)), 0)

    row = conn.execute(
        select(
            func.count().filter(h.enabled == true()),
            func.count(),
            on_enabled(h.memory_mb),
            on_enabled(_free(h.memory_mb, h.memory_mb_used)),
            on_enabled(h.disk_gb),
            on_enabled(_free(h.disk_gb, h.disk_gb_used)),
            on_enabled(h.vcpus),
            on_enabled(_free(h.vcpus, h.vcpus_used)),
        )
    ).one()
    return HostSums(*(int(value) for value in row))


def _free(total: Any, used: Any) -> Any:
    return case((total > used, total - used), else_=0)


def _backlog(conn: Connection, after: int) -> Backlog:
    o = _outbox.c
    count, oldest = conn.execute(
        select(func.count(), func.min(o.created_at)).where(o.seq > after)
    ).one()
    return Backlog(int(count), None if oldest is None else oldest.timestamp())
