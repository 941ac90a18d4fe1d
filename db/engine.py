"""Opening a cell's database and running transactions on it.

Rules kept here:

* SQLite runs in WAL mode with a busy timeout and foreign keys on. Python's
  sqlite3 module is told to stay out of transaction handling, and we issue the
  ``BEGIN`` ourselves: ``BEGIN IMMEDIATE`` for a write, so two writers queue on
  the busy timeout instead of failing when a read lock cannot be upgraded.
* Any other SQLAlchemy URL (PostgreSQL through psycopg) is used as given.
* Driver errors leave this module as zcells errors: locked past the timeout is
  `DatabaseBusy`, disk full is `DatabaseFull`, anything else `DatabaseError`.
  A failed transaction is rolled back whole.
* Writes may be grouped: `group()` runs many writes of one thread in one
  transaction, each under a savepoint of its own, so a write that raises
  undoes only what it wrote, and all of them become durable at one commit.
  A write's caller must not learn its result before the group commits
  (`zcells.dbrunner` keeps to that).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import ConnectionPoolEntry
from zcells.db.models import WALL_OPTION

from zcells.errors import (
    DatabaseBusy,
    DatabaseError,
    DatabaseFull,
    SchemaOutOfDate,
    ValidationError,
)

_WRITE = "zcells_write"
T = TypeVar("T")

# PostgreSQL SQLSTATEs that mean "try again later" and "out of space".
_PG_BUSY = {"55P03", "40001", "40P01", "57014"}
_PG_FULL = {"53100", "53200", "54000"}


def check_url(url: str) -> URL:
    """Accept an SQLAlchemy database URL, or raise `ValidationError`."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValidationError(
            "database connection", url, "an SQLAlchemy URL such as sqlite:////var/lib/zcells/api.db"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValidationError("database connection", url, "a sqlite:// or postgresql:// URL")
    return parsed


def _missing_file(url: URL) -> bool:
    database = url.database
    if not database or database == ":memory:":
        return False
    return not Path(database).expanduser().exists()


class Database:
    """A cell's database: an engine plus transaction scopes that map errors."""

    def __init__(
        self,
        url: str,
        *,
        busy_timeout_s: float = 5.0,
        create: bool = True,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """With `create` False, a SQLite file that does not exist yet is refused, not made.

        `wall` is the clock every timestamp written is read from (the cell's).
        """
        self.wall = wall
        parsed = check_url(url)
        self.url = parsed
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite and not create and _missing_file(parsed):
            raise SchemaOutOfDate(
                f"{parsed.database}: no database there yet; create it with `zcells db sync`"
            )
        if self.is_sqlite:
            self._prepare_sqlite_path(parsed)
        try:
            self.engine = _make_engine(parsed, busy_timeout_s)
        except NoSuchModuleError as exc:
            raise ValidationError("database connection", url, f"a known driver ({exc})") from None
        clocked = self.engine.execution_options(**{WALL_OPTION: self._wall_now})
        self._reader = clocked
        self._writer = clocked.execution_options(**{_WRITE: True})
        self._grouped = threading.local()  # .session: the open group of this thread

    @staticmethod
    def _prepare_sqlite_path(url: URL) -> None:
        database = url.database
        if not database or database == ":memory:":
            return
        # Every directory we create for a cell's state is private (0700), not only the last.
        missing = []
        parent = Path(database).expanduser().absolute().parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            directory.mkdir(mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)

    def _wall_now(self) -> float:
        return self.wall()

    def now(self) -> datetime:
        """The time now by this database's clock, as stored."""
        return datetime.fromtimestamp(self.wall(), UTC)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A read-write transaction: committed on success, rolled back on any error.

        Inside a `group()`, the group's transaction, under the savepoint of
        the write the group is running.
        """
        grouped = getattr(self._grouped, "session", None)
        if grouped is not None:
            yield grouped
            return
        with self._scope(self._writer) as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (SQLite: a deferred ``BEGIN``).

        Inside a `group()`, the group's transaction: it sees what the writes
        before it in the group wrote.
        """
        grouped = getattr(self._grouped, "session", None)
        if grouped is not None:
            yield grouped
            return
        with self._scope(self._reader) as session:
            yield session

    @contextmanager
    def group(self) -> Iterator[Callable[[Callable[[], T]], T]]:
        """One write transaction for many writes of this thread: yields `each(call)`.

        `each` runs `call` under a savepoint: if it raises, what it wrote is
        undone and the error goes on to the caller of `each`, the group
        carries on. Every `write()` and `read()` inside joins that savepoint.
        The group commits when the block ends, or is rolled back whole if
        it raises or the commit fails.
        """
        if getattr(self._grouped, "session", None) is not None:
            raise RuntimeError("database write groups do not nest")
        with self._scope(self._writer) as session:
            conn = session.connection()

            # Raw SQL: the same on SQLite and PostgreSQL, and the cheapest way, per write.
            def each(call: Callable[[], T]) -> T:
                _driver_sql(conn, "SAVEPOINT zcells_write")
                try:
                    result = call()
                except BaseException:
                    _driver_sql(conn, "ROLLBACK TO SAVEPOINT zcells_write")
                    _driver_sql(conn, "RELEASE SAVEPOINT zcells_write")
                    raise
                _driver_sql(conn, "RELEASE SAVEPOINT zcells_write")
                return result

            self._grouped.session = session
            try:
                yield each
            finally:
                self._grouped.session = None

    @contextmanager
    def _scope(self, engine: Engine) -> Iterator[Session]:
        try:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise map_error(exc) from exc

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """A raw SQLAlchemy connection for migrations."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise map_error(exc) from exc

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """The URL with any password hidden, for messages and logs."""
        return self.url.render_as_string(hide_password=True)


def _make_engine(url: URL, busy_timeout_s: float) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(
        url,
        connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            if url.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _driver_sql(conn: Connection, sql: str) -> None:
    try:
        conn.exec_driver_sql(sql)
    except SQLAlchemyError as exc:
        raise map_error(exc) from exc


def map_error(exc: SQLAlchemyError) -> DatabaseError:
    """Turn a SQLAlchemy or driver error into the zcells error an operator can act on."""
    message = " ".join(str(getattr(exc, "orig", None) or exc).split())
    if isinstance(exc, DBAPIError):
        orig = exc.orig
        if isinstance(orig, sqlite3.Error):
            name = getattr(orig, "sqlite_errorname", "")
            if name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
                return DatabaseBusy(f"database is locked: {message}")
            if name == "SQLITE_FULL":
                return DatabaseFull(f"database or disk is full: {message}")
        state = getattr(orig, "sqlstate", None)
        if state in _PG_BUSY:
            return DatabaseBusy(f"database is busy: {message}")
        if state in _PG_FULL:
            return DatabaseFull(f"database or disk is full: {message}")
    return DatabaseError(f"database error: {message}")


def dialect_insert(conn: Connection, table: Table) -> sqlite.Insert | postgresql.Insert:
    """An INSERT that can say ON CONFLICT on this backend."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
