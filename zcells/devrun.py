"""`zcells dev`: one directory holding a throwaway tree, found again later and stopped.

A directory `zcells dev` made holds:

* ``.zcells-dev``, the marker: only a directory carrying it is ever emptied;
* one folder per cell (keys, config, database, ``serve.log``) and the admin
  client's keys under ``client-keys/``, all written by `CellTree`;
* ``env``, the three ``export ZCELLS_...`` lines for the client commands;
* ``dev.json``, each cell's pid and config, so `zcells dev stop` and a second
  `zcells dev` know what runs;
* ``.lock``, held (flock) while a run is being set up and for the whole of a
  foreground run.

A pid from ``dev.json`` counts as one of ours only while that process's
command line still names the cell's config file, so a pid reused by another
program after a reboot is never signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from zcells.devtree import CellTree, Tree
from zcells.errors import AlreadyRunning, ValidationError

MARKER: Final = ".zcells-dev"
STATE: Final = "dev.json"
ENV: Final = "env"
LOCK: Final = ".lock"

# The live view's own admin key, so that the cells' logs tell its refreshes apart
# from the user's commands (as "ops").
VIEW_CLIENT: Final = "view"

MAX_CHILDREN: Final = 20
MAX_GRANDCHILDREN: Final = 50
MAX_HOSTS: Final = 100

# A demo tree reacts at human speed: a killed cell is late after a few
# seconds and mute soon after, not after nova's five minutes.
DEV_CELLS_OPTIONS: Final[dict[str, Any]] = {
    "heartbeat_interval": 1,
    "mute_child_interval": 8,
    "call_timeout": 15,
    "db_check_interval": 2,
}


def layout(children: int, grandchildren: int) -> dict[str, Any]:
    """The tree ``api`` → ``c1..cN``, with ``g1..gM`` dealt to the children in turn."""
    _check_count("--children", children, 1, MAX_CHILDREN)
    _check_count("--grandchildren", grandchildren, 0, MAX_GRANDCHILDREN)
    below: dict[str, dict[str, Any]] = {f"c{n}": {} for n in range(1, children + 1)}
    names = list(below)
    for n in range(grandchildren):
        below[names[n % children]][f"g{n + 1}"] = {}
    return {"api": below}


def check_hosts(hosts: int) -> int:
    return _check_count("--hosts", hosts, 1, MAX_HOSTS)


def _check_count(option: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValidationError(option, str(value), f"a whole number from {low} to {high}")
    return value


@dataclass(frozen=True)
class Running:
    """A cell process of a dev tree that is still alive."""

    name: str
    pid: int


class DevDir:
    """The directory of one dev tree."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser().resolve()

    @property
    def env_file(self) -> Path:
        return self.path / ENV

    # -- finding what runs ------------------------------------------------------------

    def running(self) -> list[Running]:
        """The cells recorded in ``dev.json`` whose process is still ours and alive."""
        try:
            recorded = json.loads((self.path / STATE).read_text())
            cells = recorded["cells"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        alive = []
        for name, entry in cells.items():
            pid, config = entry.get("pid"), entry.get("config")
            if isinstance(pid, int) and isinstance(config, str) and _is_cell(pid, config):
                alive.append(Running(name, pid))
        return alive

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's lock; refuses while another `zcells dev` holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / LOCK).open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AlreadyRunning(
                    f"a `zcells dev` is already running in {self.path}; stop it with Ctrl-C "
                    f"where it runs, or `zcells dev stop --dir {self.path}`"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- starting -----------------------------------------------------------------------

    def prepare(self) -> None:
        """Make the directory empty and ours; refuses while a tree from it still runs.

        Call with the lock held.
        """
        alive = self.running()
        if alive:
            pids = ", ".join(f"{r.name} pid {r.pid}" for r in alive)
            raise AlreadyRunning(
                f"a dev tree is already running in {self.path} ({pids}); "
                f"stop it with `zcells dev stop --dir {self.path}`"
            )
        entries = [p for p in self.path.iterdir() if p.name != LOCK]
        if entries and not (self.path / MARKER).exists():
            raise ValidationError(
                "--dir",
                str(self.path),
                "an empty directory or one made by `zcells dev` (this one holds other files)",
            )
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (self.path / MARKER).write_text("made by zcells dev; emptied by the next zcells dev\n")

    def build(self, tree: Tree, hosts: int, *, log_level: str = "info") -> CellTree:
        """Keys, configs and databases of every cell; nothing started yet."""
        return CellTree(
            tree,
            self.path,
            log_level=log_level,
            new_session=True,
            extra_clients=(VIEW_CLIENT,),
            compute={"fake_hosts": hosts, "fake_build_seconds": 1.0},
            **DEV_CELLS_OPTIONS,
        )

    def record(self, tree: CellTree) -> None:
        """Write ``dev.json`` with the pid of each started cell, and the ``env`` file."""
        cells = {
            c.name: {"pid": c.proc.pid, "config": str(c.config), "path": c.path}
            for c in tree.cells.values()
            if c.proc is not None
        }
        _write(self.path / STATE, json.dumps({"cells": cells}, indent=2) + "\n")
        _write(self.env_file, "".join(f"{line}\n" for line in exports(tree)))

    # -- stopping -----------------------------------------------------------------------

    def stop(self, timeout_s: float = 10.0) -> list[Running]:
        """SIGTERM every live cell of the tree, SIGKILL any still alive after `timeout_s`."""
        alive = self.running()
        for cell in alive:
            _signal(cell.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            _signal(cell.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        left = alive
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [c for c in left if _alive(c.pid)]
        for cell in left:
            _signal(cell.pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            (self.path / STATE).unlink()
        return alive


def exports(tree: CellTree) -> list[str]:
    """The shell lines that point the client commands at the top cell as its admin."""
    return [f"export {name}={shlex.quote(value)}" for name, value in tree.client_env().items()]


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _is_cell(pid: int, config: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return config.encode() in cmdline and _alive(pid)


def _alive(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)
