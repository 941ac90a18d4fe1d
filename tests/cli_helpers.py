"""Running the zcells command line in tests: in-process for speed, or as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from zcells.cli.app import main

ZCELLS = [sys.executable, "-m", "zcells.cli.app"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """Run `zcells ARGV` in this process, as `main` would from the console script."""
    capsys.readouterr()
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def run_process(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> Result:
    """Run `zcells ARGV` as a real process."""
    proc = subprocess.run(
        [*ZCELLS, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def write_config(
    directory: Path, name: str, cell_type: str = "api", **sections: dict[str, Any]
) -> Path:
    """A cell config whose state (DB, keys, pid file) lives under `directory`."""
    lines = [
        "[cells]",
        f"name = {name}",
        f"cell_type = {cell_type}",
        "[service]",
        f"state_dir = {directory / name}",
    ]
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {v}" for k, v in values.items())
    path = directory / f"{name}.conf"
    path.write_text("\n".join(lines) + "\n")
    return path
