"""The cell's pid file: one live daemon per cell and state directory.

A pid file whose process is gone (a crash, kill -9) is stale and replaced; one
whose process is alive refuses the second daemon with `AlreadyRunning`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from zcells.errors import AlreadyRunning


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


class PidFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for _ in range(2):  # at most one stale file to clear
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = read_pid(self.path)
                if pid is not None and pid != os.getpid() and _alive(pid):
                    raise AlreadyRunning(
                        f"{self.path}: process {pid} is already running this cell; stop it first"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(f"{os.getpid()}\n")
            self._held = True
            return
        raise AlreadyRunning(f"{self.path}: could not take the pid file; another cell raced us")

    def release(self) -> None:
        if self._held and read_pid(self.path) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._held = False
