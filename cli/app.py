"""The `zcells` command: the root app, global options, and how errors reach the user.

An error the user caused prints one line, ``zcells: error: ...``, and exits
with status 2; a failure of the world (database, environment) exits with 1.
Tracebacks appear only with ``--debug``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from zcells.cli import (
    dbcmd,
    dev,
    hosts,
    images,
    keys,
    quota,
    registry,
    schedule,
    servers,
    sim,
    status,
)
from zcells.cli.common import State, state, stderr

from zcells import logs
from zcells.config import CONFIG_ENV
from zcells.errors import ZcellsError

app = typer.Typer(
    name="zcells",
    help="A brokerless tree of compute cells over ZeroMQ.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(keys.app, name="keys")
app.add_typer(dbcmd.app, name="db")
app.add_typer(registry.cell_app, name="cell")
app.add_typer(registry.client_app, name="client")
app.add_typer(servers.server_app, name="server")
app.add_typer(servers.flavor_app, name="flavor")
app.add_typer(images.image_app, name="image")
app.add_typer(quota.quota_app, name="quota")
app.add_typer(hosts.host_app, name="host")
app.add_typer(dev.dev_app, name="dev")
app.add_typer(schedule.schedule_app, name="schedule")
app.command("status")(status.status)
app.command("sim")(sim.sim)


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar=CONFIG_ENV,
            help="Cell configuration file (INI).",
            show_envvar=True,
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    ctx.obj = State(config_path=config, debug=debug)


@app.command()
def serve(ctx: typer.Context) -> None:
    """Run this cell in the foreground until SIGTERM or Ctrl-C."""
    from zcells import service  # noqa: PLC0415 - a client command must not load the database libraries

    config = state(ctx).config
    logs.configure(config.service.log_level)
    asyncio.run(service.serve(config))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        app(args=args, prog_name="zcells")
    except ZcellsError as exc:
        if "--debug" in args:
            raise
        stderr.print(f"zcells: error: {exc}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
