"""A compute cell's hosts: their sizes, and the resources instances claim on them.

Rules kept here:

* Resources are claimed by a conditional UPDATE of the host, so two placements
  never overcommit it; a release never goes below zero.
* `sync_hosts` makes the table what the driver reports and recomputes usage
  from the instances that are not deleted, which heals a crash between a
  claim and its instance's end.
* Hosts are disabled, never deleted: instances name them.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from datetime import datetime
from typing import Final

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Connection,
    Update,
    bindparam,
    case,
    false,
    func,
    select,
    true,
    update,
)
from zcells.db.engine import Database, dialect_insert
from zcells.db.models import Base, HostRow, InstanceRow, now_of

from zcells.errors import ValidationError
from zcells.instances import Instance
from zcells.records import Host

_hosts: Final = Base.metadata.tables[HostRow.__tablename__]
_i = Base.metadata.tables[InstanceRow.__tablename__].c


def sync_hosts(db: Database, hosts: list[Host]) -> None:
    """Make the hosts table what the driver reports, then recount what is used.

    Listed hosts are created or get the listed size and enabled flag; hosts not
    listed are disabled, never deleted (instances name them). Usage is summed
    again from the instances that are not deleted.
    """
    for host in hosts:
        _check_host(host)
    now = db.now()
    with db.write() as session:
        conn = session.connection()
        if hosts:
            upsert = dialect_insert(conn, _hosts)
            conn.execute(
                upsert.on_conflict_do_update(
                    index_elements=[_hosts.c.name],
                    set_={
                        column: upsert.excluded[column]
                        for column in ("enabled", "memory_mb", "disk_gb", "vcpus", "updated_at")
                    },
                ),
                [asdict(host) | {"updated_at": now} for host in hosts],
            )
        conn.execute(
            update(_hosts)
            .where(_hosts.c.name.not_in([host.name for host in hosts]))
            .values(enabled=False, updated_at=now)
        )
        _recount(conn, now)


def list_hosts(db: Database) -> list[Host]:
    columns = [_hosts.c[field.name] for field in fields(Host)]  # same names, same order
    with db.read() as session:
        rows = session.connection().execute(select(*columns).order_by(_hosts.c.name))
        return [Host(*row) for row in rows]


def _check_host(host: Host) -> None:
    if not isinstance(host.name, str) or not 0 < len(host.name) <= 255:
        raise ValidationError("host name", host.name, "1-255 characters")
    for field, value in (
        ("RAM (MB)", host.memory_mb),
        ("disk (GB)", host.disk_gb),
        ("vCPUs", host.vcpus),
    ):
        if type(value) is not int or value < 0:
            raise ValidationError(f"host {host.name} {field}", value, "a whole number >= 0")


def claim(conn: Connection, host: str, need: Instance) -> bool:
    """Take `need`'s resources on `host` if it is enabled and has room for all of them."""
    claimed = conn.execute(
        _CLAIM,
        {
            "host_name": host,
            "need_ram": need.memory_mb,
            "need_disk": need.disk_gb,
            "need_cpu": need.vcpus,
            "now": now_of(conn),
        },
    )
    return claimed.rowcount == 1


def _claim_statement() -> Update:
    h = _hosts.c
    ram: BindParameter[int] = bindparam("need_ram")
    disk: BindParameter[int] = bindparam("need_disk")
    cpu: BindParameter[int] = bindparam("need_cpu")
    return (
        update(_hosts)
        .where(
            h.name == bindparam("host_name"),
            h.enabled == true(),
            h.memory_mb_used + ram <= h.memory_mb,
            h.disk_gb_used + disk <= h.disk_gb,
            h.vcpus_used + cpu <= h.vcpus,
        )
        .values(
            memory_mb_used=h.memory_mb_used + ram,
            disk_gb_used=h.disk_gb_used + disk,
            vcpus_used=h.vcpus_used + cpu,
            updated_at=bindparam("now"),
        )
    )


# Built once: every build claims, and building the statement anew took longer than running it.
_CLAIM: Final = _claim_statement()


def release(conn: Connection, host: str, held: Instance) -> None:
    """Give back `held`'s resources on `host`, never below zero."""
    h = _hosts.c
    conn.execute(
        update(_hosts)
        .where(h.name == host)
        .values(
            memory_mb_used=_minus(h.memory_mb_used, held.memory_mb),
            disk_gb_used=_minus(h.disk_gb_used, held.disk_gb),
            vcpus_used=_minus(h.vcpus_used, held.vcpus),
            updated_at=now_of(conn),
        )
    )


def _minus(column: ColumnElement[int], amount: int) -> ColumnElement[int]:
    return case((column > amount, column - amount), else_=0)


def _recount(conn: Connection, now: datetime) -> None:
    """Set every host's usage to the sum of its instances that are not deleted."""
    used = {
        row.host: row
        for row in conn.execute(
            select(
                _i.host,
                func.sum(_i.memory_mb).label("memory_mb"),
                func.sum(_i.disk_gb).label("disk_gb"),
                func.sum(_i.vcpus).label("vcpus"),
            )
            .where(_i.deleted == false(), _i.host.is_not(None))
            .group_by(_i.host)
        )
    }
    names = conn.scalars(select(_hosts.c.name)).all()
    if not names:
        return
    conn.execute(
        update(_hosts)
        .where(_hosts.c.name == bindparam("host_name"))
        .values(
            memory_mb_used=bindparam("ram_used"),
            disk_gb_used=bindparam("disk_used"),
            vcpus_used=bindparam("cpu_used"),
            updated_at=now,
        ),
        [
            {
                "host_name": name,
                "ram_used": int(used[name].memory_mb) if name in used else 0,
                "disk_used": int(used[name].disk_gb) if name in used else 0,
                "cpu_used": int(used[name].vcpus) if name in used else 0,
            }
            for name in names
        ],
    )
