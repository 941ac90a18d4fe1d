"""`zcells cell ...` and `zcells client ...`: the neighbour and client registries.

The registry commands import the database where they open it, not at the
top: `zcells` loads every command module at start, and a client command must
not load the database libraries (`zcells.cli.common`).
"""

from __future__ import annotations

from typing import Annotated

import typer
from zcells.cli.common import note, open_database, print_json, print_table
from zcells.cli.hosts import cell_sync
from zcells.cli.ping import ping

from zcells.names import NEIGHBOUR_KINDS, ROLES

KINDS_HELP = " or ".join(NEIGHBOUR_KINDS)

cell_app = typer.Typer(
    help="Manage this cell's neighbours (parents and children).", no_args_is_help=True
)
cell_app.command("ping")(ping)
cell_app.command("sync")(cell_sync)
client_app = typer.Typer(
    help="Manage the client keys allowed on the api endpoint.", no_args_is_help=True
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print as JSON.")]
EndpointHelp = "Where the neighbour listens: tcp://HOST:PORT (for a child: informational)."


@cell_app.command("add")
def cell_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The neighbour's own cell name.")],
    kind: Annotated[str, typer.Option("--kind", help=KINDS_HELP)],
    endpoint: Annotated[str, typer.Option("--endpoint", help=EndpointHelp)],
    public_key: Annotated[str, typer.Option("--public-key", help="Its Z85 public key.")],
    weight_offset: Annotated[float, typer.Option(help="Added to its scheduling weight.")] = 0.0,
    weight_scale: Annotated[float, typer.Option(help="Multiplies its scheduling weight.")] = 1.0,
    disabled: Annotated[bool, typer.Option("--disabled", help="Add it disabled.")] = False,
) -> None:
    """Register a parent or child cell."""
    from zcells.db import registry  # noqa: PLC0415 - see the module's docstring

    with open_database(ctx) as db:
        cell = registry.add_cell(
            db,
            name,
            kind=kind,
            endpoint=endpoint,
            public_key=public_key,
            weight_offset=weight_offset,
            weight_scale=weight_scale,
            disabled=disabled,
        )
    note(f"added {cell.kind} cell {cell.name} at {cell.endpoint}")


@cell_app.command("list")
def cell_list(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List this cell's neighbours."""
    from zcells.db import registry  # noqa: PLC0415 - see the module's docstring

    with open_database(ctx) as db:
        cells = registry.list_cells(db)
    if json_output:
        print_json([c.as_dict() for c in cells])
        return
    print_table(
        "neighbour cells",
        ("NAME", "KIND", "ENDPOINT", "PUBLIC KEY", "OFFSET", "SCALE", "STATE"),
        [
            (
                c.name,
                c.kind,
                c.endpoint,
                c.public_key,
                f"{c.weight_offset:+g}",
                f"{c.weight_scale:g}",
                "disabled" if c.disabled else "enabled",
            )
            for c in cells
        ],
    )


@cell_app.command("update")
def cell_update(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The neighbour to change.")],
    endpoint: Annotated[str | None, typer.Option("--endpoint", help=EndpointHelp)] = None,
    public_key: Annotated[str | None, typer.Option("--public-key", help="New Z85 key.")] = None,
    weight_offset: Annotated[float | None, typer.Option(help="New weight offset.")] = None,
    weight_scale: Annotated[float | None, typer.Option(help="New weight scale.")] = None,
    enable: Annotated[
        bool | None, typer.Option("--enable/--disable", help="Enable or disable it.")
    ] = None,
) -> None:
    """Change a neighbour's endpoint, key, weights or enabled state."""
    from zcells.db import registry  # noqa: PLC0415 - see the module's docstring

    with open_database(ctx) as db:
        cell = registry.update_cell(
            db,
            name,
            endpoint=endpoint,
            public_key=public_key,
            weight_offset=weight_offset,
            weight_scale=weight_scale,
            disabled=None if enable is None else not enable,
        )
    note(f"updated {cell.kind} cell {cell.name}")


@cell_app.command("remove")
def cell_remove(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="The neighbour to remove.")]
) -> None:
    """Forget a neighbour; its key is refused from then on."""
    from zcells.db import registry  # noqa: PLC0415 - see the module's docstring

    with open_database(ctx) as db:
        registry.remove_cell(db, name)
    note(f"removed cell {name}")


@client_app.command("add")
def client_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A name for the client.")],
    public_key: Annotated[str, typer.Option("--public-key", help="Its Z85 public key.")],
    role: Annotated[str, typer.Option("--role", help=" | ".join(ROLES))],
    project: Annotated[
        str | None, typer.Option("--project", help="Project (required for member).")
    ] = None,
) -> None:
    """Allow a client key on the api endpoint with a role."""
    from zcells.db import registry  # noqa: PLC0415 - see the module's docstring

    with open_database(ctx) as db:
        client = registry.add_client(db, name, public_key=public_key, role=role, project=project)
    scope = f" of project {client.project}" if client.project else ""
    note(f"added {client.role} client {client.name}{scope}")


@client_app.command("list")
def client_list(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List the clients allowed on this cell."""
    from zcells.db import registry  # noqa: PLC0415 - see the module's docstring

    with open_database(ctx) as db:
        clients = registry.list_clients(db)
    if json_output:
        print_json([c.as_dict() for c in clients])
        return
    print_table(
        "clients",
        ("NAME", "ROLE", "PROJECT", "PUBLIC KEY"),
        [(c.name, c.role, c.project or "-", c.public_key) for c in clients],
    )


@client_app.command("remove")
def client_remove(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="The client to remove.")]
) -> None:
    """Revoke a client; its key is refused from then on."""
    from zcells.db import registry  # noqa: PLC0415 - see the module's docstring

    with open_database(ctx) as db:
        registry.remove_client(db, name)
    note(f"removed client {name}")
