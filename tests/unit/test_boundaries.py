"""STYLE.md §5: zmq only in zcells/sockets, SQLAlchemy only in db, typer/rich only in cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"zcells": ROOT / "zcells", "db": ROOT / "db", "cli": ROOT / "cli"}

RULES = {
    "zmq": {"zcells/sockets"},
    "sqlalchemy": {"db"},
    "alembic": {"db"},
    "typer": {"cli"},
    "rich": {"cli"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def sources() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS.values() for p in d.rglob("*.py"))


def test_there_are_sources_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in sources()}
    assert "db/engine.py" in names and "cli/app.py" in names and "zcells/config.py" in names


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_respect_boundaries(path: Path) -> None:
    rel = path.relative_to(ROOT).as_posix()
    for root in imported_roots(path):
        allowed = RULES.get(root)
        if allowed is not None:
            assert any(rel.startswith(prefix + "/") for prefix in allowed), (
                f"{rel} imports {root}, allowed only under {sorted(allowed)}"
            )


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("import os\nfrom zmq import Context\nimport sqlalchemy.orm as orm\n")
    assert {"zmq", "sqlalchemy"} <= imported_roots(bad)
