"""Every foundation command, as an operator types it, with its errors."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

from tests.cli_helpers import ZCELLS, Result, run, run_process, write_config
from zcells.devtree import free_ports, wait_until

Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


@pytest.fixture
def cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """An API cell config with a synced database."""
    config = write_config(tmp_path, "api")
    assert run(capsys, "--config", str(config), "db", "sync").code == 0
    return config


def key(capsys: pytest.CaptureFixture[str], directory: Path, name: str) -> str:
    result = run(capsys, "keys", "gen", name, "--dir", str(directory))
    assert result.code == 0, result.err
    return result.out.strip()


# -- keys ---------------------------------------------------------------------------


def test_keys_gen_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "keys"
    result = run(capsys, "keys", "gen", "eu", "--dir", str(directory))
    assert result.code == 0
    public = result.out.strip()
    assert Z85_KEY.match(public)
    assert (directory / "eu.key_secret").stat().st_mode & 0o777 == 0o600
    assert directory.stat().st_mode & 0o777 == 0o700
    assert zmq.curve_public(zmq.auth.load_certificate(directory / "eu.key_secret")[1]) == (
        public.encode()
    )
    assert run(capsys, "keys", "show", "eu", "--dir", str(directory)).out.strip() == public


def test_keys_gen_refuses_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = key(capsys, tmp_path / "k", "eu")
    again = run(capsys, "keys", "gen", "eu", "--dir", str(tmp_path / "k"))
    assert again.code == 2 and "--force" in again.err and "Traceback" not in again.err
    assert run(capsys, "keys", "show", "eu", "--dir", str(tmp_path / "k")).out.strip() == first
    forced = run(capsys, "keys", "gen", "eu", "--dir", str(tmp_path / "k"), "--force")
    assert forced.code == 0 and forced.out.strip() != first


def test_keys_default_to_config_keys_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "api", transport={"keys_dir": "mykeys"})
    public = run(capsys, "--config", str(config), "keys", "gen", "api").out.strip()
    assert (tmp_path / "mykeys" / "api.key").exists()
    shown = run(capsys, "--config", str(config), "keys", "show", "api")
    assert shown.out.strip() == public


def test_keys_show_missing_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run(capsys, "keys", "show", "nope", "--dir", str(tmp_path))
    assert result.code == 2
    assert str(tmp_path / "nope.key") in result.err and "zcells keys gen" in result.err


def test_keys_gen_rejects_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "keys", "gen", "a!b", "--dir", str(tmp_path))
    assert result.code == 2 and "key name" in result.err
    assert list(tmp_path.iterdir()) == []


# -- db sync --------------------------------------------------------------------------


def test_db_sync_is_idempotent_and_seeds_flavors_on_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "api")
    first = run(capsys, "--config", str(config), "db", "sync", "--json").json()
    assert first["before"] is None and first["flavors_seeded"] == 5
    second = run(capsys, "--config", str(config), "db", "sync", "--json").json()
    assert second["before"] == second["after"] == first["after"]
    assert second["flavors_seeded"] == 0
    text = run(capsys, "--config", str(config), "db", "sync")
    assert "already at revision" in text.out


def test_db_sync_on_compute_cell_seeds_no_flavors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "eu", "compute")
    assert (
        run(capsys, "--config", str(config), "db", "sync", "--json").json()["flavors_seeded"] == 0
    )


def test_commands_refuse_unsynced_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "api")
    before = sorted(tmp_path.rglob("*"))
    result = run(capsys, "--config", str(config), "cell", "list")
    assert result.code == 1 and "no database there yet" in result.err
    assert "zcells db sync" in result.err
    assert sorted(tmp_path.rglob("*")) == before  # a read never makes the database file


# -- cell registry --------------------------------------------------------------------


def test_cell_add_list_update_remove(
    cell: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eu, us, eu2 = (key(capsys, tmp_path / "k", n) for n in ("eu", "us", "eu2"))
    c = ("--config", str(cell))
    assert (
        run(
            capsys,
            *c,
            "cell",
            "add",
            "eu",
            "--kind",
            "child",
            "--endpoint",
            "tcp://127.0.0.1:7760",
            "--public-key",
            eu,
        ).code
        == 0
    )
    assert (
        run(
            capsys,
            *c,
            "cell",
            "add",
            "us",
            "--kind",
            "child",
            "--endpoint",
            "tcp://[::1]:7770",
            "--public-key",
            us,
            "--weight-offset",
            "-1.5",
            "--weight-scale",
            "2",
            "--disabled",
        ).code
        == 0
    )
    rows = run(capsys, *c, "cell", "list", "--json").json()
    assert [(r["name"], r["kind"], r["disabled"]) for r in rows] == [
        ("eu", "child", False),
        ("us", "child", True),
    ]
    assert rows[1]["weight_offset"] == -1.5 and rows[1]["weight_scale"] == 2.0
    table = run(capsys, *c, "cell", "list").out
    assert eu in table and us in table and "disabled" in table  # keys printed whole
    assert (
        run(
            capsys,
            *c,
            "cell",
            "update",
            "us",
            "--enable",
            "--endpoint",
            "tcp://127.0.0.1:7771",
            "--public-key",
            eu2,
            "--weight-offset",
            "0",
        ).code
        == 0
    )
    us_row = run(capsys, *c, "cell", "list", "--json").json()[1]
    assert (
        us_row["disabled"],
        us_row["endpoint"],
        us_row["public_key"],
        us_row["weight_offset"],
    ) == (False, "tcp://127.0.0.1:7771", eu2, 0.0)
    assert run(capsys, *c, "cell", "update", "us", "--disable").code == 0
    assert run(capsys, *c, "cell", "list", "--json").json()[1]["disabled"] is True
    assert run(capsys, *c, "cell", "remove", "eu").code == 0
    assert [r["name"] for r in run(capsys, *c, "cell", "list", "--json").json()] == ["us"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["", "--kind", "child"], "invalid cell name ''"),
        (["a!b", "--kind", "child"], "invalid cell name 'a!b'"),
        (["x" * 65, "--kind", "child"], "invalid cell name"),
        (["eu", "--kind", "sibling"], "invalid kind 'sibling'"),
        (["eu", "--kind", "child", "--endpoint", "localhost"], "invalid endpoint"),
        (["eu", "--kind", "child", "--endpoint", "tcp://127.0.0.1:0"], "invalid endpoint"),
        (["eu", "--kind", "child", "--public-key", "abc"], "invalid public key"),
        (["eu", "--kind", "child", "--public-key", "~" * 40], "invalid public key"),
        (["eu", "--kind", "child", "--weight-offset", "nan"], "invalid weight offset"),
    ],
)
def test_cell_add_rejects_invalid_input(
    cell: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    good = {"--endpoint": "tcp://127.0.0.1:7760", "--public-key": key(capsys, tmp_path / "k", "x")}
    for option, value in good.items():
        if option not in args:
            args = [*args, option, value]
    result = run(capsys, "--config", str(cell), "cell", "add", *args)
    assert result.code == 2, result
    assert message in result.err and "Traceback" not in result.err
    assert run(capsys, "--config", str(cell), "cell", "list", "--json").json() == []


def test_cell_duplicates_and_missing(
    cell: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    k1, k2 = key(capsys, tmp_path / "k", "a"), key(capsys, tmp_path / "k", "b")
    c = ("--config", str(cell))
    base = ["--kind", "parent", "--endpoint", "tcp://127.0.0.1:7750"]
    assert run(capsys, *c, "cell", "add", "top", *base, "--public-key", k1).code == 0
    dup_name = run(capsys, *c, "cell", "add", "top", *base, "--public-key", k2)
    assert dup_name.code == 2 and "name 'top' already exists" in dup_name.err
    dup_key = run(capsys, *c, "cell", "add", "other", *base, "--public-key", k1)
    assert dup_key.code == 2 and "public key" in dup_key.err
    missing = run(capsys, *c, "cell", "update", "ghost", "--disable")
    assert missing.code == 2 and "no cell named 'ghost'" in missing.err
    assert run(capsys, *c, "cell", "remove", "ghost").code == 2
    assert len(run(capsys, *c, "cell", "list", "--json").json()) == 1


def test_cell_add_requires_its_options(cell: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "--config", str(cell), "cell", "add", "eu")
    assert result.code == 2 and "Missing option" in result.err


# -- client registry ------------------------------------------------------------------


def test_client_add_list_remove(
    cell: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ops, alice, audit = (key(capsys, tmp_path / "k", n) for n in ("ops", "alice", "audit"))
    c = ("--config", str(cell))
    assert run(capsys, *c, "client", "add", "ops", "--public-key", ops, "--role", "admin").code == 0
    assert (
        run(
            capsys,
            *c,
            "client",
            "add",
            "alice",
            "--public-key",
            alice,
            "--role",
            "member",
            "--project",
            "p1",
        ).code
        == 0
    )
    assert (
        run(capsys, *c, "client", "add", "audit", "--public-key", audit, "--role", "reader").code
        == 0
    )
    rows = run(capsys, *c, "client", "list", "--json").json()
    assert [(r["name"], r["role"], r["project"]) for r in rows] == [
        ("alice", "member", "p1"),
        ("audit", "reader", None),
        ("ops", "admin", None),
    ]
    assert alice in run(capsys, *c, "client", "list").out
    assert run(capsys, *c, "client", "remove", "ops").code == 0
    assert len(run(capsys, *c, "client", "list", "--json").json()) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bob", "--role", "member"], "a project name for a member client"),
        (["bob", "--role", "root"], "invalid role 'root'"),
        (["b!ob", "--role", "admin"], "invalid client name"),
        (["bob", "--role", "admin", "--public-key", "short"], "invalid public key"),
        (["bob", "--role", "member", "--project", "p!1"], "invalid project"),
    ],
)
def test_client_add_rejects_invalid_input(
    cell: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    if "--public-key" not in args:
        args = [*args, "--public-key", key(capsys, tmp_path / "k", "bob")]
    result = run(capsys, "--config", str(cell), "client", "add", *args)
    assert result.code == 2 and message in result.err, result
    assert run(capsys, "--config", str(cell), "client", "list", "--json").json() == []


def test_listings_print_keys_exactly_even_with_markup_characters(
    cell: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Z85 uses '[', ']' and more: a table must never read them as rich markup
    tricky = "[b]" + "0" * 33 + "[/b]"
    c = ("--config", str(cell))
    assert (
        run(
            capsys,
            *c,
            "cell",
            "add",
            "eu",
            "--kind",
            "child",
            "--endpoint",
            "tcp://127.0.0.1:1",
            "--public-key",
            tricky,
        ).code
        == 0
    )
    assert (
        run(
            capsys,
            *c,
            "client",
            "add",
            "ops",
            "--role",
            "admin",
            "--public-key",
            "[red]" + "1" * 29 + "[/red]",
        ).code
        == 0
    )
    assert tricky in run(capsys, *c, "cell", "list").out
    assert "[red]" + "1" * 29 + "[/red]" in run(capsys, *c, "client", "list").out


def test_client_key_cannot_reuse_a_cell_key(
    cell: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = key(capsys, tmp_path / "k", "shared")
    c = ("--config", str(cell))
    run(
        capsys,
        *c,
        "cell",
        "add",
        "eu",
        "--kind",
        "child",
        "--endpoint",
        "tcp://127.0.0.1:1",
        "--public-key",
        shared,
    )
    result = run(capsys, *c, "client", "add", "ops", "--public-key", shared, "--role", "admin")
    assert result.code == 2 and "already exists" in result.err


# -- configuration errors and help ------------------------------------------------------


def test_bad_config_value_exits_2_naming_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.conf"
    config.write_text("[cells]\ncall_timeout = soon\n")
    result = run(capsys, "--config", str(config), "cell", "list")
    assert result.code == 2
    assert result.err.strip() == (
        f"zcells: error: {config}: [cells] call_timeout = 'soon': expected a number of seconds"
    )


def test_config_from_environment_variable(tmp_path: Path) -> None:
    config = write_config(tmp_path, "envcell", "compute")
    result = run_process("db", "sync", "--json", env={"ZCELLS_CONFIG": str(config)})
    assert result.code == 0, result.err
    assert "envcell.db" in result.json()["database"]


def test_debug_shows_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.conf"
    config.write_text("[cells]\nname = a!b\n")
    plain = run_process("--config", str(config), "cell", "list")
    assert plain.code == 2 and "Traceback" not in plain.err
    debug = run_process("--debug", "--config", str(config), "cell", "list")
    assert debug.code != 0 and "Traceback" in debug.err and "ConfigError" in debug.err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["keys"],
        ["keys", "gen"],
        ["keys", "show"],
        ["db"],
        ["db", "sync"],
        ["cell"],
        ["cell", "add"],
        ["cell", "list"],
        ["cell", "update"],
        ["cell", "remove"],
        ["client"],
        ["client", "add"],
        ["client", "list"],
        ["client", "remove"],
        ["serve"],
    ],
    ids=lambda a: " ".join(a) or "root",
)
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    result = run(capsys, *argv, "--help")
    assert result.code == 0 and "Usage: zcells" in result.out


# -- serve ---------------------------------------------------------------------------


class Served:
    """A `zcells serve` process whose log goes to a file the test can poll."""

    def __init__(self, log: Path, env: dict[str, str], *argv: str) -> None:
        self.log = log
        self._log_handle = log.open("w")
        self.proc = subprocess.Popen(
            [*ZCELLS, *argv, "serve"],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=self._log_handle,
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_started(self) -> None:
        wait_until(
            lambda: "cell.started" in self.text() or self.proc.poll() is not None,
            30,
            "cell.started in the log",
        )
        assert self.proc.poll() is None, self.text()

    def stop(self, signum: int = signal.SIGTERM) -> int:
        try:
            self.proc.send_signal(signum)
            return self.proc.wait(timeout=30)  # a safety net, not an expectation
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log_handle.close()


@pytest.fixture
def default_ports() -> Iterator[None]:
    """The embedded default binds the fixed default ports: one such test at a time."""
    with open(Path(tempfile.gettempdir()) / "zcells-default-ports.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.mark.usefixtures("default_ports")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_embedded_default_starts_and_stops_cleanly(tmp_path: Path, signum: int) -> None:
    state_dir = tmp_path / "state"
    served = Served(tmp_path / "serve.log", {"ZCELLS_STATE_DIR": str(state_dir)})
    pid_file = state_dir / "api.pid"
    try:
        served.wait_started()
        assert pid_file.read_text().strip() == str(served.proc.pid)
        # the embedded default made its own key pair and schema
        assert (state_dir / "keys" / "api.key_secret").stat().st_mode & 0o777 == 0o600
        assert (state_dir / "api.db").exists()
        # a second daemon for the same cell is refused while the first runs
        second = run_process("serve", env={"ZCELLS_STATE_DIR": str(state_dir)})
        assert second.code == 1 and "already running" in second.err
    finally:
        code = served.stop(signum)
    err = served.text()
    assert code == 0, err
    assert "cell.started cell=api type=api" in err
    assert "cell.stopped cell=api" in err
    assert "Traceback" not in err
    assert not pid_file.exists()


def test_serve_replaces_a_stale_pid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cells_port, api_port = free_ports(2)
    config = write_config(
        tmp_path,
        "api",
        transport={
            "keys_dir": "keys",
            "cells_endpoint": f"tcp://127.0.0.1:{cells_port}",
            "api_endpoint": f"tcp://127.0.0.1:{api_port}",
        },
    )
    key(capsys, tmp_path / "keys", "api")
    assert run(capsys, "--config", str(config), "db", "sync").code == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file = tmp_path / "api" / "api.pid"
    pid_file.write_text(f"{dead.pid}\n")
    served = Served(tmp_path / "serve.log", {}, "--config", str(config))
    try:
        served.wait_started()
        assert pid_file.read_text().strip() == str(served.proc.pid)
    finally:
        code = served.stop()
    assert code == 0


def test_serve_refuses_loose_secret_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "api", transport={"keys_dir": "keys"})
    key(capsys, tmp_path / "keys", "api")
    assert run(capsys, "--config", str(config), "db", "sync").code == 0
    secret = tmp_path / "keys" / "api.key_secret"
    secret.chmod(0o644)
    result = run_process("--config", str(config), "serve")
    assert result.code == 2
    assert str(secret) in result.err and "chmod 600" in result.err
    assert "Traceback" not in result.err


def test_serve_with_config_requires_synced_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "api", transport={"keys_dir": "keys"})
    key(capsys, tmp_path / "keys", "api")
    result = run_process("--config", str(config), "serve")
    assert result.code == 1 and "zcells db sync" in result.err
    assert not (tmp_path / "api" / "api.pid").exists()


def test_serve_with_config_requires_its_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, "api", transport={"keys_dir": "keys"})
    result: Result = run_process("--config", str(config), "serve")
    assert result.code == 2 and "zcells keys gen" in result.err


def test_serve_refuses_a_typo_in_a_config_key(tmp_path: Path) -> None:
    """Finding 12: a typo'd key stops the cell instead of leaving it on a default endpoint."""
    config = write_config(tmp_path, "api", transport={"cels_endpoint": "tcp://127.0.0.1:7750"})
    result = run_process("--config", str(config), "serve", timeout=60)
    assert result.code == 2, result
    assert str(config) in result.err and "[transport] cels_endpoint" in result.err
    assert "did you mean 'cells_endpoint'?" in result.err
    assert len(result.err.strip().splitlines()) == 1
