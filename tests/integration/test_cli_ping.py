"""`zcells cell ping` as an operator runs it, against a real tree."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_helpers import run_process
from zcells.devtree import CellTree, running_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellTree]:
    with running_tree({"api": {"eu": {"eu-1": {}}}}, tmp_path_factory.mktemp("ping")) as cells:
        yield cells


def test_ping_all_json(tree: CellTree) -> None:
    result = run_process("cell", "ping", "--all", "--json", "--wait", "30", env=tree.client_env())
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    assert [r["cell"] for r in rows] == ["api", "api!eu", "api!eu!eu-1"]
    for row in rows:
        assert set(row) == {"cell", "ok", "error", "rtt_ms"}
        assert row["ok"] is True and row["error"] is None and row["rtt_ms"] > 0


def test_ping_one_cell_json_and_text(tree: CellTree) -> None:
    result = run_process(
        "cell", "ping", "api!eu!eu-1", "--json", "--wait", "30", env=tree.client_env()
    )
    assert result.code == 0, result.err
    answer = json.loads(result.out)
    assert set(answer) == {"cell", "rtt_ms"} and answer["cell"] == "api!eu!eu-1"
    text = run_process("cell", "ping", "api!eu", env=tree.client_env())
    assert re.fullmatch(r"api!eu: ok in [\d.]+ ms\n", text.out)


def test_ping_unknown_path_names_the_hop(tree: CellTree) -> None:
    result = run_process("cell", "ping", "api!eu!nope", env=tree.client_env())
    assert result.code == 1
    assert "api!eu" in result.err and "'nope'" in result.err
    assert "Traceback" not in result.err


def test_ping_options_instead_of_environment(tree: CellTree) -> None:
    e = tree.client_env()
    result = run_process(
        "cell",
        "ping",
        "api",
        "--endpoint",
        e["ZCELLS_ENDPOINT"],
        "--server-key",
        str(tree.cells["api"].directory / "keys" / "api.key"),
        "--key",
        e["ZCELLS_KEY"],
    )
    assert result.code == 0, result.err


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("ZCELLS_ENDPOINT", "--endpoint or ZCELLS_ENDPOINT"),
        ("ZCELLS_SERVER_KEY", "--server-key or ZCELLS_SERVER_KEY"),
        ("ZCELLS_KEY", "--key or ZCELLS_KEY"),
    ],
)
def test_missing_connection_settings_are_named(tree: CellTree, drop: str, message: str) -> None:
    settings = tree.client_env()
    settings[drop] = ""
    result = run_process("cell", "ping", "--all", env=settings)
    assert result.code == 2 and message in result.err


def test_wrong_server_key_or_client_key_is_a_clear_error(tree: CellTree, tmp_path: Path) -> None:
    settings = tree.client_env()
    settings["ZCELLS_SERVER_KEY"] = tree.cells["eu"].keys.public  # not api's key
    result = run_process("cell", "ping", "api", "--timeout", "2", env=settings)
    assert result.code == 1 and "Traceback" not in result.err
    assert tree.cells["api"].api_endpoint in result.err
    run_process("keys", "gen", "stranger", "--dir", str(tmp_path))
    settings = tree.client_env()
    settings["ZCELLS_KEY"] = str(tmp_path / "stranger.key_secret")
    result = run_process("cell", "ping", "api", "--timeout", "2", env=settings)
    assert result.code == 1 and "refused" in result.err


def test_ping_needs_a_path_or_all(tree: CellTree) -> None:
    assert run_process("cell", "ping", env=tree.client_env()).code == 2
    assert run_process("cell", "ping", "api", "--all", env=tree.client_env()).code == 2
    bad = run_process("cell", "ping", "api!!x", env=tree.client_env())
    assert bad.code == 2 and "cell path" in bad.err
