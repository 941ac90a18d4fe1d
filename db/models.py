"""SQLAlchemy models of a cell's own database.

Every cell has its own database; nothing here is shared between cells.
Times are stored in UTC and come back timezone-aware on every backend.
Public keys only: secret keys never enter a database.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAME_LENGTH = 64
KEY_LENGTH = 40
UUID_LENGTH = 36

# Stable constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# The execution option through which a connection reaches its database's clock.
WALL_OPTION = "zcells_wall"


def now_of(conn: Connection) -> datetime:
    """The time now by the clock of the database `conn` belongs to (the cell's clock)."""
    wall = conn.get_execution_options().get(WALL_OPTION)
    return datetime.fromtimestamp(wall() if wall is not None else time.time(), UTC)


def stamp(context: Any) -> datetime:
    """A column default: the time of the insert or update, by the cell's clock."""
    return now_of(context.connection)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always returned timezone-aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class CellRow(Base):
    """A neighbour: a parent this cell dials, or a child that dials this cell."""

    __tablename__ = "cells"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    kind: Mapped[str] = mapped_column(String(8))
    endpoint: Mapped[str] = mapped_column(String(255))
    public_key: Mapped[str] = mapped_column(String(KEY_LENGTH), unique=True)
    weight_offset: Mapped[float] = mapped_column(Float, default=0.0)
    weight_scale: Mapped[float] = mapped_column(Float, default=1.0)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp, onupdate=stamp)


class ClientRow(Base):
    """A client key allowed on the api endpoint, with its role."""

    __tablename__ = "clients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    public_key: Mapped[str] = mapped_column(String(KEY_LENGTH), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    project: Mapped[str | None] = mapped_column(String(NAME_LENGTH), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)


class FlavorRow(Base):
    __tablename__ = "flavors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    vcpus: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)


class ImageRow(Base):
    """An image servers boot from: global data, owned by the API cell and sent down."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    properties: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp, onupdate=stamp)


class GlobalLogRow(Base):
    """The newest change of each flavor and image, under the API cell's sequence number.

    Every cell keeps the same seqs: the API cell takes them from its ``global``
    counter, a cell below copies them from its parent's rows and moves its own
    ``global`` counter to the highest it applied. One row per (kind, name): a
    change replaces the row of the one before it, and a delete stays as a
    tombstone, so the log is as small as the data and a child that missed a
    change gets the one after it.
    """

    __tablename__ = "global_log"
    __table_args__ = (UniqueConstraint("kind", "name"),)

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)


class QuotaRow(Base):
    """A limit an admin set for one project and resource, in place of `[quota]`'s default."""

    __tablename__ = "quotas"

    project: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    resource: Mapped[str] = mapped_column(String(16), primary_key=True)
    hard_limit: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)


class HeldRow(Base):
    """An outbox row a parent refused, held aside with its reason instead of blocking the stream."""

    __tablename__ = "held_rows"

    parent_name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    code: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(255))
    held_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)


class OrphanRow(Base):
    """A copy of an instance in a cell the index does not hold it under: to be deleted there.

    Kept until that cell acknowledges the delete, across restarts of the API cell.
    """

    __tablename__ = "orphans"

    instance_uuid: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    cell_name: Mapped[str] = mapped_column(String(1024), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)
    last_error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)


class InstanceRow(Base):
    """An instance: the full record in its owning cell, the indexed subset at the top."""

    __tablename__ = "instances"
    __table_args__ = (
        Index("ix_instances_project_id_created_at", "project_id", "created_at"),
        Index("ix_instances_created_at_uuid", "created_at", "uuid"),
        Index("ix_instances_cell_name", "cell_name"),
        Index("ix_instances_updated_at", "updated_at"),
    )

    uuid: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    project_id: Mapped[str] = mapped_column(String(NAME_LENGTH))
    user_id: Mapped[str] = mapped_column(String(NAME_LENGTH))
    flavor_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    vcpus: Mapped[int] = mapped_column(Integer)
    image: Mapped[str] = mapped_column(String(255))
    vm_state: Mapped[str] = mapped_column(String(16))
    task_state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    power_state: Mapped[str] = mapped_column(String(16))
    cell_name: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The latest fault, kept on the row so that a page of instances is one query.
    fault_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    fault_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    fault_cell: Mapped[str | None] = mapped_column(String(1024), nullable=True)


class InstanceFaultRow(Base):
    """Every fault an instance went through, once per instance version."""

    __tablename__ = "instance_faults"
    __table_args__ = (UniqueConstraint("instance_uuid", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_uuid: Mapped[str] = mapped_column(
        String(UUID_LENGTH), ForeignKey("instances.uuid", ondelete="CASCADE"), index=True
    )
    version: Mapped[int] = mapped_column(BigInteger)
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    cell_name: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)


class BuildHintsRow(Base):
    """The scheduler hints of an instance the API cell has not placed yet.

    Kept so that a build resumed after a restart still goes where it was
    asked to; removed once the build ends, whatever its outcome.
    """

    __tablename__ = "build_hints"

    instance_uuid: Mapped[str] = mapped_column(
        String(UUID_LENGTH), ForeignKey("instances.uuid", ondelete="CASCADE"), primary_key=True
    )
    hints: Mapped[dict[str, str]] = mapped_column(JSON)


class HostRow(Base):
    """A compute host in this cell and the resources claimed on it."""

    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb_used: Mapped[int] = mapped_column(Integer, default=0)
    disk_gb_used: Mapped[int] = mapped_column(Integer, default=0)
    vcpus_used: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp, onupdate=stamp)


class OutboxRow(Base):
    """An upward update not yet known to be applied by every parent, in sequence order.

    `seq` is not a database sequence: it is taken from the ``outbox`` counter in
    the writing transaction, so sequence numbers are gap-free, committed in
    order and never reused after a trim, on every backend.
    """

    __tablename__ = "outbox"

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp)


class CounterRow(Base):
    """A named counter moved inside the transaction that uses it (``outbox``: last seq)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class ChildProgressRow(Base):
    """The highest outbox sequence of a child applied here, moved in the apply transaction."""

    __tablename__ = "child_progress"

    child_name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    applied_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp, onupdate=stamp)


class RequestLogRow(Base):
    """The first result of each downward request id, so a repeat answers it again."""

    __tablename__ = "request_log"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    method: Mapped[str] = mapped_column(String(64))
    result: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=stamp, index=True)
