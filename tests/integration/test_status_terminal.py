"""`zcells status --watch` in a real terminal (tmux) against a dev tree, read off the screen."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from tests.cli_helpers import run_process
from tests.tools.terminal import Terminal

CELLS = ("api", "c1", "g1", "c2")


def test_the_live_view_shows_every_cell_and_ctrl_c_ends_it(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    started = run_process("dev", "--dir", str(home), "--hosts", "2", "--detach", timeout=90)
    assert started.code == 0, started.err
    bin_dir = Path(sys.executable).parent
    terminal = Terminal(
        tmp_path,
        f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"\n'
        f"source {shlex.quote(str(home / 'env'))}\n"
        "zcells status --watch\n"
        'echo "watch ended with $?"\n'
        "sleep 60\n",
    )
    try:
        screen = terminal.until("c2", 30)
        for name in CELLS:
            assert name in screen, screen
        assert "healthy" in screen and "unreachable" not in screen
        assert os.path.exists(home / "dev.json")
        terminal.keys("C-c")
        screen = terminal.until("watch ended with", 15)
        assert "watch ended with 0" in screen and "Traceback" not in screen
    finally:
        terminal.close()
        stopped = run_process("dev", "stop", "--dir", str(home))
    assert stopped.code == 0 and "stopped 4 cells" in stopped.err
