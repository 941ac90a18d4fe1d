"""Creating and upgrading a cell's schema with the Alembic migrations in this package.

`sync` is what `zcells db sync` runs: it brings any database, empty or at an
older revision, to the newest revision, and does nothing to one already there.
`check_current` is what the daemon runs at start: it refuses a schema that is
not at the newest revision rather than guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError
from zcells.db.engine import Database, map_error

from zcells.errors import SchemaOutOfDate

SCRIPT_LOCATION = "zcells.db:migrations"


@dataclass(frozen=True)
class SyncResult:
    before: str | None
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise SchemaOutOfDate("no schema revisions are installed")
    return head


def current_revision(db: Database) -> str | None:
    with db.connection() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database, revision: str = "head") -> None:
    """Upgrade the schema to `revision` in one transaction."""
    config = _config()
    try:
        with db.engine.execution_options(zcells_write=True).connect() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            conn.commit()
    except SQLAlchemyError as exc:
        raise map_error(exc) from exc


def sync(db: Database) -> SyncResult:
    before = current_revision(db)
    upgrade(db, "head")
    return SyncResult(before=before, after=head_revision())


def check_current(db: Database) -> None:
    """Raise `SchemaOutOfDate` unless the schema is at the newest revision."""
    current, head = current_revision(db), head_revision()
    if current != head:
        found = "an empty database" if current is None else f"revision {current}"
        raise SchemaOutOfDate(
            f"{db.describe()}: schema is at {found}, this zcells needs revision {head}; "
            "run `zcells db sync`"
        )
