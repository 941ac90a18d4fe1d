"""`zcells keys gen|show`: CURVE key pairs for cells and clients."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from zcells.cli.common import note, state

from zcells.sockets.keys import generate_keypair, read_public_key

app = typer.Typer(help="Create and show CURVE key pairs.", no_args_is_help=True)

DirOption = Annotated[
    Path | None,
    typer.Option("--dir", help="Key directory (mode 0700). Default: [transport] keys_dir."),
]


def _keys_dir(ctx: typer.Context, directory: Path | None) -> Path:
    return directory if directory is not None else state(ctx).config.transport.keys_dir


@app.command("gen")
def gen(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Cell or client name the key belongs to.")],
    directory: DirOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing pair.")] = False,
) -> None:
    """Write NAME.key (public) and NAME.key_secret (0600) and print the public key."""
    pair = generate_keypair(_keys_dir(ctx, directory), name, force=force)
    note(f"wrote {pair.secret_path.with_suffix('.key')} and {pair.secret_path}")
    print(pair.public)


@app.command("show")
def show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Cell or client name.")],
    directory: DirOption = None,
) -> None:
    """Print the public key of NAME."""
    print(read_public_key(_keys_dir(ctx, directory), name))
