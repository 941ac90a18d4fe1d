"""`zcells dev` as a user runs it: a real tree started, used, refused twice, and stopped clean."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.cli_helpers import ZCELLS, run_process
from zcells.devtree import wait_until

START_S = 90


def exported(text: str) -> dict[str, str]:
    """The variables of `export NAME=VALUE` lines, unquoted as the shell would."""
    found = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export":
            name, _, value = words[1].partition("=")
            found[name] = value
    return found


def recorded(directory: Path) -> dict[str, dict[str, object]]:
    cells: dict[str, dict[str, object]] = json.loads((directory / "dev.json").read_text())["cells"]
    return cells


def ports(directory: Path) -> list[int]:
    """Every port the tree's configs bind."""
    found = []
    for config in directory.glob("*/cell.conf"):
        found += [int(p) for p in re.findall(r"tcp://127\.0\.0\.1:(\d+)", config.read_text())]
    return found


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def test_detach_use_refuse_and_stop(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    started = run_process(
        "dev", "--dir", str(home), "--children", "2", "--grandchildren", "1", "--hosts", "2",
        "--detach", timeout=START_S,
    )  # fmt: skip
    assert started.code == 0, started.err
    try:
        env = exported(started.out)
        assert set(env) == {"ZCELLS_ENDPOINT", "ZCELLS_SERVER_KEY", "ZCELLS_KEY"}
        assert exported((home / "env").read_text()) == env
        assert "4 cells healthy: api, api!c1, api!c1!g1, api!c2" in started.err
        cells = recorded(home)
        assert sorted(cells) == ["api", "c1", "c2", "g1"]

        pings = run_process("cell", "ping", "--all", "--json", env=env)
        assert pings.code == 0, pings.err
        assert sorted(r["cell"] for r in json.loads(pings.out)) == [
            "api", "api!c1", "api!c1!g1", "api!c2",
        ]  # fmt: skip
        made = run_process(
            "server", "create", "web", "--flavor", "m1.tiny", "--image", "cirros",
            "--count", "3", "--wait", "--json", env=env, timeout=60,
        )  # fmt: skip
        assert made.code == 0, made.err
        assert [s["status"] for s in json.loads(made.out)] == ["ACTIVE"] * 3
        hosts = run_process("host", "list", "--json", env=env)
        assert len(json.loads(hosts.out)["hosts"]) == 2 * 3  # every compute cell has 2

        again = run_process("dev", "--dir", str(home), "--detach", timeout=START_S)
        assert again.code != 0
        assert "already running" in again.err and "zcells dev stop" in again.err
        assert "Traceback" not in again.err
        assert recorded(home) == cells  # the running tree was left alone
    finally:
        stopped = run_process("dev", "stop", "--dir", str(home))
    assert stopped.code == 0, stopped.err
    assert "stopped 4 cells" in stopped.err
    for name, entry in cells.items():
        pid = entry["pid"]
        assert isinstance(pid, int)
        wait_until(lambda pid=pid: gone(pid), 10, f"{name} (pid {pid}) to exit")
    bound = ports(home)
    assert len(bound) == 8
    assert [p for p in bound if listening(p)] == []
    assert not (home / "dev.json").exists()
    again = run_process("dev", "stop", "--dir", str(home))
    assert again.code == 0 and "no dev tree is running" in again.err


def test_a_directory_of_other_files_is_never_emptied(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = run_process("dev", "--dir", str(tmp_path), "--detach")
    assert result.code == 2
    assert "--dir" in result.err and "holds other files" in result.err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("option", "value", "low", "high"),
    [("--children", "0", 1, 20), ("--grandchildren", "-1", 0, 50), ("--hosts", "0", 1, 100)],
)
def test_a_bad_size_is_one_clear_line(
    tmp_path: Path, option: str, value: str, low: int, high: int
) -> None:
    result = run_process("dev", "--dir", str(tmp_path / "d"), option, value, "--detach")
    assert result.code == 2
    expected = f"a whole number from {low} to {high}"
    assert result.err == f"zcells: error: invalid {option} {value!r}: expected {expected}\n"
    assert not (tmp_path / "d").exists()


def test_foreground_shows_status_and_ctrl_c_stops_every_cell(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    proc = subprocess.Popen(
        [*ZCELLS, "dev", "--dir", str(home), "--children", "1", "--grandchildren", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        wait_until(lambda: (home / "dev.json").exists() or proc.poll() is not None, START_S, "dev")
        assert proc.poll() is None, proc.communicate()[1].decode()
        cells = recorded(home)
        second = run_process("dev", "--dir", str(home), "--detach")
        assert second.code != 0 and "already running" in second.err
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        run_process("dev", "stop", "--dir", str(home))  # whatever a failure above left running
    assert proc.returncode == 0, err.decode()
    shown = out.decode()
    assert "export ZCELLS_ENDPOINT=" in shown
    assert "c1" in shown and "healthy" in shown, shown  # the status view's last frame
    assert "stopped" in err.decode()
    for entry in cells.values():
        pid = entry["pid"]
        assert isinstance(pid, int)
        wait_until(lambda pid=pid: gone(pid), 10, f"pid {pid} to exit")
    assert [p for p in ports(home) if listening(p)] == []
