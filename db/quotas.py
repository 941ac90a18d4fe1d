"""Per-project quota limits set by an admin, and what a project holds at the top.

Only the API cell keeps quotas; its index is what they count. `zcells.quotas`
says what is checked; here are the rows and the counting query.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Connection, delete, func, select
from zcells.db.engine import Database, dialect_insert
from zcells.db.instance_rows import INSTANCES
from zcells.db.models import Base, QuotaRow

from zcells.instances import VmState
from zcells.quotas import Quota, Usage, check_limit

_quotas = Base.metadata.tables[QuotaRow.__tablename__]
_i = INSTANCES.c


def overrides(conn: Connection, project: str) -> dict[str, int]:
    """The limits an admin set for `project`, by resource."""
    rows = conn.execute(
        select(_quotas.c.resource, _quotas.c.hard_limit).where(_quotas.c.project == project)
    )
    return {row.resource: int(row.hard_limit) for row in rows}


def usage(conn: Connection, project: str) -> Usage:
    """Servers, vCPUs and RAM of `project`'s servers that are not deleted, in the index."""
    servers, vcpus, ram = conn.execute(
        select(func.count(), func.sum(_i.vcpus), func.sum(_i.memory_mb)).where(
            _i.project_id == project, _i.vm_state != VmState.DELETED.value
        )
    ).one()
    return Usage(int(servers or 0), int(vcpus or 0), int(ram or 0))


def show(db: Database, project: str, defaults: Quota) -> tuple[Quota, dict[str, int], Usage]:
    """(the limits in force, those set for the project alone, what it holds)."""
    with db.read() as session:
        conn = session.connection()
        own = overrides(conn, project)
        return defaults.merged(own), own, usage(conn, project)


def set_limits(db: Database, project: str, limits: Mapping[str, int | None]) -> dict[str, int]:
    """Set (an int) or drop back to the default (None) each named limit; the project's own after."""
    for resource, value in limits.items():
        if value is not None:
            check_limit(resource, value)
        elif resource not in Quota.__dataclass_fields__:
            check_limit(resource, 0)  # names the unknown resource
    with db.write() as session:
        conn = session.connection()
        now = db.now()
        for resource, value in limits.items():
            if value is None:
                conn.execute(
                    delete(_quotas).where(
                        _quotas.c.project == project, _quotas.c.resource == resource
                    )
                )
                continue
            upsert = dialect_insert(conn, _quotas).values(
                project=project, resource=resource, hard_limit=value, updated_at=now
            )
            conn.execute(
                upsert.on_conflict_do_update(
                    index_elements=[_quotas.c.project, _quotas.c.resource],
                    set_={"hard_limit": value, "updated_at": now},
                )
            )
        return overrides(conn, project)
