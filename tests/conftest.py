"""Fixtures shared by the whole suite.

`database_url` gives each test a fresh, empty database: an SQLite file always,
and a fresh PostgreSQL database for the parameter marked ``postgres`` (run by
`make test-postgres`, which starts a throwaway server and exports its URL in
``ZCELLS_TEST_POSTGRES_URL``). Without that variable the postgres parameter
fails loudly rather than skipping, so a broken PostgreSQL run is never green.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from zcells.db.engine import Database

from tests.tools import pgserver
from zcells import logs

POSTGRES_ENV = "ZCELLS_TEST_POSTGRES_URL"

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without -m, leave the PostgreSQL runs to `make test-postgres`."""
    if config.getoption("-m"):
        return
    skip = [i for i in items if i.get_closest_marker("postgres")]
    if skip:
        config.hook.pytest_deselected(items=skip)
        items[:] = [i for i in items if not i.get_closest_marker("postgres")]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cell.db'}"
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.fail(f"{POSTGRES_ENV} is not set; run these through `make test-postgres`")
    name = f"zt_{uuid.uuid4().hex[:16]}"
    url = pgserver.create_database(base, name)
    try:
        yield url
    finally:
        pgserver.drop_database(base, name)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    with Database(database_url) as db:
        yield db


@pytest.fixture
def synced(database: Database) -> Database:
    from zcells.db import migrate

    migrate.sync(database)
    return database


@pytest.fixture(autouse=True)
def fresh_log_limits() -> None:
    """Each test starts with full log buckets, whatever the tests before it logged."""
    logs.LIMITER = logs.RateLimiter()
