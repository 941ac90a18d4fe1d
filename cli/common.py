"""What every command shares: the loaded config, the database, and how results print.

Rules kept here:

* The client commands (`server`, `cell ping`, `status`, `host`, `flavor`,
  `image`, `schedule`) never import the database or migration libraries:
  `zcells` starts at once. What needs a database imports it where it opens
  one (`open_database`); a test fails when a client command pulls them in.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from zcells.config import Config, load_config
from zcells.errors import ValidationError

if TYPE_CHECKING:
    from zcells.db.engine import Database

stdout = Console(soft_wrap=True)
# Piped output is for scripts and logs: never wrap it to an imagined 80 columns.
WIDE = 400
stderr = Console(stderr=True, soft_wrap=True)


@dataclass
class State:
    """Options given before the command: `zcells --config FILE cell list`."""

    config_path: Path | None = None
    debug: bool = False
    _config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
            for warning in self._config.warnings:
                stderr.print(f"zcells: warning: {warning}", markup=False, highlight=False)
        return self._config


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    if not isinstance(obj, State):
        obj = State()
        ctx.find_root().obj = obj
    return obj


@contextmanager
def open_database(ctx: typer.Context, *, require_current: bool = True) -> Iterator[Database]:
    """The cell's database from its config; refuses a schema that `db sync` has not brought up."""
    from zcells.db import migrate  # noqa: PLC0415 - only the commands that open one pay for it
    from zcells.db.engine import Database  # noqa: PLC0415

    config = state(ctx).config
    with Database(
        config.database.connection,
        busy_timeout_s=config.database.busy_timeout_s,
        create=not require_current,  # only `db sync` makes a database file
    ) as db:
        if require_current:
            migrate.check_current(db)
        yield db


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    whole: Sequence[str] = ("PUBLIC KEY",),
) -> None:
    """Print rows as a table; columns named in `whole` (keys) are never cut or wrapped."""
    if not rows:
        stderr.print(f"no {title}", highlight=False)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        if column in whole:
            table.add_column(column, no_wrap=True, min_width=40)
        else:
            table.add_column(column, overflow="fold")
    for row in rows:  # plain text: Z85 keys hold '[' and ']', which are rich markup
        table.add_row(*(Text("" if v is None else str(v)) for v in row))
    out = stdout if stdout.is_terminal else Console(width=WIDE, file=sys.stdout)
    out.print(table)


def note(message: str) -> None:
    """A human remark on stderr, so stdout stays clean for scripts."""
    stderr.print(message, markup=False, highlight=False)


def parse_pairs(option: str, raw: Iterable[str], *, empty_values: bool) -> dict[str, str]:
    """`KEY=VALUE` options as a map; `ValidationError` naming the option otherwise."""
    pairs: dict[str, str] = {}
    expected = "KEY=VALUE" if empty_values else "KEY=VALUE with a non-empty value"
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or (not value and not empty_values):
            raise ValidationError(option, item, expected)
        if key in pairs:
            raise ValidationError(option, item, f"each key once ({key!r} is given twice)")
        pairs[key] = value
    return pairs
