"""The README's set-up command and five-minute tour, run exactly as written.

`make run` runs from the repository in a session of its own, as in a first
terminal; each line of the tour's ```sh blocks then runs in one bash shell,
as typed in a second terminal. Between lines the test only waits for what
the README says a user would see, reading `zcells status --json`. `make test`
is left out: this test is part of it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import run_process
from tests.integration.test_dev import gone, listening, ports
from zcells.devtree import wait_until

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DEV = ROOT / ".zcells" / "dev"


def blocks() -> list[list[str]]:
    """The commands of each ```sh block up to the tour's end, one per line, comments dropped."""
    text = README.read_text()
    tour = text.index("\n## A five-minute tour")
    text = text[: text.index("\n## ", tour + 1)]
    found = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [
        [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
        for block in found
    ]


class Shell:
    """One bash process fed the tour's lines, each run to its end before the next."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("ZCELLS_")},
        )

    def run(self, line: str, timeout_s: float = 120, *, check: bool = True) -> str:
        """Run `line`; its output, which must end with status 0 if `check`."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        mark = f"__done_{time.monotonic_ns()}__"
        self.proc.stdin.write(f"{line}\necho {mark} $?\n")
        self.proc.stdin.flush()
        lines: list[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.proc.stdout.readline()
            if not got:
                break
            if got.startswith(mark):
                status = got.split()[1]
                assert status == "0" or not check, f"`{line}` exited {status}:\n{''.join(lines)}"
                return "".join(lines)
            lines.append(got)
        raise AssertionError(f"`{line}` did not finish:\n{''.join(lines)}")

    def status(self) -> dict[str, dict[str, Any]]:
        """The cells of one snapshot; none if the command gave no snapshot (it timed out)."""
        out = self.run("zcells status --json 2>/dev/null", check=False)  # 1: a cell unreachable
        try:
            snapshot = json.loads(out)
        except ValueError:
            return {}
        return {cell["cell"]: cell for cell in snapshot["cells"]}

    def until(self, check: Any, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        seen: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            seen = self.status()
            if check(seen):
                return
            time.sleep(0.5)
        raise AssertionError(f"never saw {what}; last status: {seen}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)  # closes both pipes


@pytest.fixture
def make_run() -> Iterator[subprocess.Popen[str]]:
    setup = blocks()[0]
    assert setup[:2] == ["make run", "make test"], setup
    proc = subprocess.Popen(
        ["bash", "-c", setup[0]],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own terminal: Ctrl-C goes to its process group
    )
    try:
        wait_until(lambda: (DEV / "dev.json").exists() or proc.poll() is not None, 300, "make run")
        assert proc.poll() is None, proc.communicate()
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        run_process("dev", "stop", "--dir", str(DEV))  # whatever a failure above left running


def test_the_tour_runs_as_written(make_run: subprocess.Popen[str]) -> None:
    cells = json.loads((DEV / "dev.json").read_text())["cells"]
    assert sorted(c["path"] for c in cells.values()) == ["api", "api!c1", "api!c1!g1", "api!c2"]
    tour = blocks()[1:]
    assert len(tour) == 3, tour
    shell = Shell()
    try:
        outputs = [shell.run(line) for line in tour[0]]
        pings = outputs[2]
        for path in ("api", "api!c1", "api!c1!g1", "api!c2"):
            assert re.search(rf"^{re.escape(path)}\s+ok", pings, re.M), pings
        assert "at api:" in outputs[3] and "order: " in outputs[3], outputs[3]  # explain
        made = [line for line in outputs[4].splitlines() if " ACTIVE " in line]
        assert len(made) == 20, outputs[4]
        assert "h00" in outputs[6]

        freeze, create, thaw = tour[1]
        shell.run(freeze)
        shell.until(
            lambda s: (
                s.get("api!c2", {}).get("state") == "unreachable" and s["api!c2"]["link"] == "mute"
            ),
            "c2 unreachable and mute",
        )
        others = {p: s["state"] for p, s in shell.status().items() if p != "api!c2"}
        assert others == dict.fromkeys(("api", "api!c1", "api!c1!g1"), "healthy")
        landed = shell.run(create)
        assert len(re.findall(r" ACTIVE api!c1", landed)) == 4, landed  # c1 or g1, never c2
        shell.run(thaw)
        shell.until(lambda s: s.get("api!c2", {}).get("state") == "healthy", "c2 back")

        snapshot = json.loads(shell.run(tour[2][0]))
        assert {c["cell"] for c in snapshot["cells"]} == {"api", "api!c1", "api!c1!g1", "api!c2"}
        top = next(c for c in snapshot["cells"] if c["cell"] == "api")
        assert top["servers"]["counts"]["ACTIVE"] == 24
        active = json.loads(shell.run(tour[2][1]))
        assert len(active) == 24 and {s["status"] for s in active} == {"ACTIVE"}
    finally:
        shell.close()
    bound = ports(DEV)
    os.killpg(make_run.pid, signal.SIGINT)  # Ctrl-C in the first terminal
    _, err = make_run.communicate(timeout=60)
    assert "stopped" in err, err
    for entry in cells.values():
        wait_until(lambda pid=entry["pid"]: gone(pid), 10, f"{entry['path']} to exit")
    assert not [p for p in bound if listening(p)]
