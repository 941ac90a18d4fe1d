"""The cell database on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from zcells.db import migrate, registry
from zcells.db.engine import Database
from zcells.db.models import Base, FlavorRow

from zcells.errors import (
    AlreadyExists,
    DatabaseBusy,
    DatabaseFull,
    NotFound,
    SchemaOutOfDate,
    ValidationError,
)
from zcells.records import DEFAULT_FLAVORS, Flavor
from zcells.sockets.keys import generate_keypair

pytestmark = []


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    directory = tmp_path_factory.mktemp("keys")
    return [generate_keypair(directory / "k", f"k{i}").public for i in range(4)]


def test_sync_creates_every_table_and_is_idempotent(database: Database) -> None:
    assert migrate.current_revision(database) is None
    with pytest.raises(SchemaOutOfDate, match="run `zcells db sync`"):
        migrate.check_current(database)
    first = migrate.sync(database)
    assert first.before is None and first.after == migrate.head_revision() and first.changed
    second = migrate.sync(database)
    assert not second.changed
    migrate.check_current(database)
    tables = set(sa.inspect(database.engine).get_table_names())
    assert {
        "cells",
        "clients",
        "instances",
        "instance_faults",
        "flavors",
        "hosts",
        "outbox",
        "child_progress",
        "request_log",
    } <= tables


def test_migrations_match_the_models(synced: Database) -> None:
    with synced.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == []


def test_upgrade_from_first_revision_keeps_data(database: Database, keys: list[str]) -> None:
    migrate.upgrade(database, "0001")
    assert migrate.current_revision(database) == "0001"
    assert "instances" not in sa.inspect(database.engine).get_table_names()
    registry.add_cell(
        database, "eu", kind="child", endpoint="tcp://127.0.0.1:7750", public_key=keys[0]
    )
    result = migrate.sync(database)
    assert result.before == "0001" and result.after == migrate.head_revision()
    assert [c.name for c in registry.list_cells(database)] == ["eu"]
    assert "instances" in sa.inspect(database.engine).get_table_names()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    with Database(f"sqlite:///{tmp_path / 'w.db'}") as db:
        migrate.sync(db)
        with db.connection() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert (tmp_path / "w.db").exists()


def test_sqlite_creates_missing_state_directory(tmp_path: Path) -> None:
    with Database(f"sqlite:///{tmp_path / 'new' / 'dir' / 'c.db'}") as db:
        migrate.sync(db)
    assert (tmp_path / "new" / "dir" / "c.db").exists()
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


def test_neighbour_registry_round_trip(synced: Database, keys: list[str]) -> None:
    parent = registry.add_cell(
        synced, "api", kind="parent", endpoint="tcp://127.0.0.1:7750", public_key=keys[0]
    )
    child = registry.add_cell(
        synced,
        "eu-1",
        kind="child",
        endpoint="tcp://[::1]:7760",
        public_key=keys[1],
        weight_offset=-2.5,
        weight_scale=0.5,
        disabled=True,
    )
    assert parent.created_at is not None and parent.created_at.tzinfo is not None
    listed = registry.list_cells(synced)
    assert [(c.name, c.kind) for c in listed] == [("api", "parent"), ("eu-1", "child")]
    assert listed[1].weight_offset == -2.5 and listed[1].disabled
    updated = registry.update_cell(
        synced,
        "eu-1",
        endpoint="tcp://127.0.0.1:7761",
        public_key=keys[2],
        disabled=False,
        weight_scale=2.0,
    )
    assert (updated.endpoint, updated.public_key, updated.disabled, updated.weight_scale) == (
        "tcp://127.0.0.1:7761",
        keys[2],
        False,
        2.0,
    )
    assert updated.weight_offset == -2.5
    assert registry.get_cell(synced, "eu-1") == updated
    registry.remove_cell(synced, "eu-1")
    assert [c.name for c in registry.list_cells(synced)] == ["api"]
    assert child.name == "eu-1"


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("cell name", {"name": "a!b"}),
        ("cell name", {"name": ""}),
        ("cell name", {"name": "x" * 65}),
        ("kind", {"kind": "sibling"}),
        ("endpoint", {"endpoint": "127.0.0.1:80"}),
        ("public key", {"public_key": "short"}),
        ("public key", {"public_key": "~" * 40}),
        ("weight offset", {"weight_offset": float("nan")}),
        ("weight scale", {"weight_scale": float("inf")}),
    ],
)
def test_invalid_neighbours_are_rejected_and_nothing_written(
    synced: Database, keys: list[str], field: str, kwargs: dict[str, object]
) -> None:
    args: dict[str, object] = {
        "name": "eu",
        "kind": "child",
        "endpoint": "tcp://127.0.0.1:1",
        "public_key": keys[0],
    }
    args.update(kwargs)
    name = args.pop("name")
    with pytest.raises(ValidationError) as info:
        registry.add_cell(synced, name, **args)  # type: ignore[arg-type]
    assert info.value.field == field
    assert registry.list_cells(synced) == []


def test_duplicate_names_and_keys_are_rejected(synced: Database, keys: list[str]) -> None:
    registry.add_cell(synced, "eu", kind="child", endpoint="tcp://127.0.0.1:1", public_key=keys[0])
    with pytest.raises(AlreadyExists, match="name 'eu'"):
        registry.add_cell(
            synced, "eu", kind="child", endpoint="tcp://127.0.0.1:1", public_key=keys[1]
        )
    with pytest.raises(AlreadyExists, match="public key"):
        registry.add_cell(
            synced, "us", kind="child", endpoint="tcp://127.0.0.1:1", public_key=keys[0]
        )
    # a key is one identity across cells and clients
    with pytest.raises(AlreadyExists, match="cell with public key"):
        registry.add_client(synced, "ops", public_key=keys[0], role="admin")
    registry.add_client(synced, "ops", public_key=keys[1], role="admin")
    with pytest.raises(AlreadyExists, match="client with public key"):
        registry.add_cell(
            synced, "us", kind="child", endpoint="tcp://127.0.0.1:1", public_key=keys[1]
        )
    with pytest.raises(AlreadyExists):
        registry.update_cell(synced, "eu", public_key=keys[1])
    assert [c.name for c in registry.list_cells(synced)] == ["eu"]
    assert registry.get_cell(synced, "eu").public_key == keys[0]


def test_missing_rows_are_not_found(synced: Database) -> None:
    with pytest.raises(NotFound, match="no cell named 'nope'"):
        registry.update_cell(synced, "nope", disabled=True)
    with pytest.raises(NotFound):
        registry.remove_cell(synced, "nope")
    with pytest.raises(NotFound, match="no client named 'nope'"):
        registry.remove_client(synced, "nope")


def test_client_registry(synced: Database, keys: list[str]) -> None:
    registry.add_client(synced, "ops", public_key=keys[0], role="admin")
    registry.add_client(synced, "alice", public_key=keys[1], role="member", project="p1")
    registry.add_client(synced, "audit", public_key=keys[2], role="reader")
    assert [(c.name, c.role, c.project) for c in registry.list_clients(synced)] == [
        ("alice", "member", "p1"),
        ("audit", "reader", None),
        ("ops", "admin", None),
    ]
    with pytest.raises(ValidationError, match="project"):
        registry.add_client(synced, "bob", public_key=keys[3], role="member")
    with pytest.raises(ValidationError, match="role"):
        registry.add_client(synced, "bob", public_key=keys[3], role="root")
    with pytest.raises(ValidationError, match="client name"):
        registry.add_client(synced, "b!ob", public_key=keys[3], role="reader")
    with pytest.raises(AlreadyExists):
        registry.add_client(synced, "ops", public_key=keys[3], role="admin")
    registry.remove_client(synced, "ops")
    assert len(registry.list_clients(synced)) == 2


def test_default_flavors_seeded_once(synced: Database) -> None:
    assert registry.seed_default_flavors(synced) == 5
    assert registry.seed_default_flavors(synced) == 0
    flavors = registry.list_flavors(synced)
    assert flavors == list(DEFAULT_FLAVORS)
    assert flavors[0] == Flavor("m1.tiny", 512, 1, 1)
    assert flavors[-1] == Flavor("m1.xlarge", 16384, 160, 8)


def test_flavors_not_seeded_over_existing(synced: Database) -> None:
    registry.create_flavor(synced, Flavor("custom", 1024, 10, 2))
    assert registry.seed_default_flavors(synced) == 0
    assert [f.name for f in registry.list_flavors(synced)] == ["custom"]
    with pytest.raises(AlreadyExists):
        registry.create_flavor(synced, Flavor("custom", 1, 1, 1))
    with pytest.raises(ValidationError):
        registry.create_flavor(synced, Flavor("neg", -1, 1, 1))


def test_failed_transaction_is_rolled_back(synced: Database, keys: list[str]) -> None:
    from zcells.db.models import CellRow

    with pytest.raises(RuntimeError), synced.write() as session:
        session.add(
            CellRow(name="ghost", kind="child", endpoint="tcp://127.0.0.1:1", public_key=keys[0])
        )
        session.flush()
        raise RuntimeError("boom")
    assert registry.list_cells(synced) == []


def test_sqlite_locked_past_busy_timeout_is_database_busy(tmp_path: Path, keys: list[str]) -> None:
    path = tmp_path / "busy.db"
    with Database(f"sqlite:///{path}", busy_timeout_s=0.2) as db:
        migrate.sync(db)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(DatabaseBusy, match="locked"):
                registry.add_cell(
                    db, "eu", kind="child", endpoint="tcp://127.0.0.1:1", public_key=keys[0]
                )
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        # once the lock is gone the same write goes through
        registry.add_cell(db, "eu", kind="child", endpoint="tcp://127.0.0.1:1", public_key=keys[0])
        assert len(registry.list_cells(db)) == 1


def test_writers_queue_instead_of_failing(tmp_path: Path, keys: list[str]) -> None:
    """BEGIN IMMEDIATE: concurrent writers wait on the busy timeout, none fails."""
    with Database(f"sqlite:///{tmp_path / 'q.db'}", busy_timeout_s=10) as db:
        migrate.sync(db)
        errors: list[BaseException] = []

        def add(i: int) -> None:
            try:
                registry.create_flavor(db, Flavor(f"f{i}", 512, 1, 1))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert errors == []
        assert len(registry.list_flavors(db)) == 8


def test_sqlite_disk_full_is_database_full(tmp_path: Path, keys: list[str]) -> None:
    path = tmp_path / "full.db"
    with Database(f"sqlite:///{path}") as db:
        migrate.sync(db)
        with db.connection() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
        big = "x" * 4000

        def fill() -> None:
            with db.write() as session:
                session.execute(sa.text(f"PRAGMA max_page_count = {pages + 2}"))
                for i in range(50):
                    session.add(FlavorRow(name=f"f{i}"[:64], memory_mb=1, disk_gb=1, vcpus=1))
                    session.execute(
                        sa.text(
                            "INSERT INTO request_log (request_id, method, "
                            "result, created_at) VALUES (:i, 'm', :r, "
                            "'2026-01-01 00:00:00')"
                        ),
                        {"i": str(i), "r": big.encode()},
                    )

        with pytest.raises(DatabaseFull, match="full"):
            fill()
        assert registry.list_flavors(db) == []


def test_a_second_parent_is_refused_at_cell_add(synced: Database, keys: list[str]) -> None:
    """Finding 10: one parent per cell, refused with a clear error rather than wedged later."""
    registry.add_cell(
        synced, "api", kind="parent", endpoint="tcp://127.0.0.1:7750", public_key=keys[0]
    )
    with pytest.raises(ValidationError, match="one parent per cell: api is this cell's parent"):
        registry.add_cell(
            synced, "api2", kind="parent", endpoint="tcp://127.0.0.1:7751", public_key=keys[1]
        )
    assert [c.name for c in registry.list_cells(synced)] == ["api"]
    registry.remove_cell(synced, "api")  # moving: remove the old parent, then add the new
    registry.add_cell(
        synced, "api2", kind="parent", endpoint="tcp://127.0.0.1:7751", public_key=keys[1]
    )
