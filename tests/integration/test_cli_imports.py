"""Client commands start at once: they never load the database or migration libraries.

Each command runs in a fresh interpreter against a real tree; at exit the
interpreter names the modules it loaded, and none may be SQLAlchemy's,
Alembic's or psycopg's. `zcells --help` loads every command module, so it
is checked too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from zcells.devtree import CellTree, running_tree

# Runs a command as the console script does; at exit, names the database libraries it loaded.
PROBE = """
import atexit, sys
HEAVY = ("sqlalchemy", "alembic", "psycopg")
atexit.register(lambda: print("loaded:" + ",".join(sorted(
    {m.split(".")[0] for m in sys.modules if m.split(".")[0] in HEAVY})), file=sys.stderr))
from zcells.cli.app import main
main(sys.argv[1:])
"""

CLIENT_COMMANDS = [
    ("--help",),
    ("server", "list"),
    ("server", "create", "probe", "--flavor", "m1.tiny", "--image", "cirros"),
    ("cell", "ping", "--all"),
    ("status",),
    ("host", "list"),
    ("flavor", "list"),
    ("image", "list"),
    ("schedule", "explain", "--flavor", "m1.tiny"),
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellTree]:
    with running_tree({"api": {"c1": {}}}, tmp_path_factory.mktemp("imports")) as cells:
        yield cells


@pytest.mark.parametrize("argv", CLIENT_COMMANDS, ids=" ".join)
def test_a_client_command_loads_no_database_library(tree: CellTree, argv: tuple[str, ...]) -> None:
    env = {
        **os.environ,
        "ZCELLS_ENDPOINT": tree.top.api_endpoint,
        "ZCELLS_SERVER_KEY": tree.top.keys.public,
        "ZCELLS_KEY": str(tree.client_keys.secret_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    [loaded] = [line for line in done.stderr.splitlines() if line.startswith("loaded:")]
    assert loaded == "loaded:", f"{' '.join(argv)} {loaded}"


def test_the_probe_sees_a_database_library_when_one_is_loaded(tree: CellTree) -> None:
    """The check can fail: a command that opens a database is seen loading SQLAlchemy."""
    config = tree.top.config
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "--config", str(config), "cell", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "loaded:alembic,sqlalchemy" in done.stderr
