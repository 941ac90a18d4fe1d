"""A real terminal for tests: tmux on a private socket, installed with apt-get if missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


def ensure_tmux() -> str:
    """The path of tmux, installing Debian's package first when running as root."""
    found = shutil.which("tmux")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "tmux"]
        for cmd in (["apt-get", "update", "-qq"], install):
            subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        found = shutil.which("tmux")
    if found is None:
        raise RuntimeError("tmux is needed for the terminal tests: apt-get install tmux")
    return found


class Terminal:
    """One detached tmux session running `script`, on a socket of its own."""

    def __init__(self, directory: Path, script: str, *, width: int = 180, height: int = 50):
        self.tmux = ensure_tmux()
        self.socket = directory / "tmux.sock"
        path = directory / "session.sh"
        path.write_text(script)
        self._run(
            "new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
            f"bash {path}",
        )  # fmt: skip

    def _run(self, *args: str) -> str:
        proc = subprocess.run(
            [self.tmux, "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return proc.stdout

    def screen(self) -> str:
        """What the terminal shows now, as plain text."""
        return self._run("capture-pane", "-p", "-t", "t")

    def keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", "t", *keys)

    def until(self, wanted: str, timeout_s: float) -> str:
        """The screen once it shows `wanted`; fails with the last screen after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        shown = self.screen()
        while wanted not in shown:
            if time.monotonic() > deadline:
                raise AssertionError(f"the terminal never showed {wanted!r}; it shows:\n{shown}")
            time.sleep(0.1)
            shown = self.screen()
        return shown

    def close(self) -> None:
        subprocess.run(
            [self.tmux, "-S", str(self.socket), "kill-server"],
            capture_output=True,
            timeout=10,
            check=False,
        )
