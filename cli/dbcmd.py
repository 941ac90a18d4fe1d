"""`zcells db sync`: create or upgrade the cell's database schema."""

from __future__ import annotations

import typer
from zcells.cli.common import open_database, print_json, state

app = typer.Typer(help="Manage the cell's database.", no_args_is_help=True)


@app.command("sync")
def sync(
    ctx: typer.Context,
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Create or upgrade the schema to the newest revision (safe to repeat)."""
    from zcells.db import catalog, migrate, registry  # noqa: PLC0415 - a client command must not load the database libraries

    config = state(ctx).config
    with open_database(ctx, require_current=False) as db:
        result = migrate.sync(db)
        top = config.cells.cell_type == "api"
        seeded = registry.seed_default_flavors(db) if top else 0
        images = catalog.seed_default_images(db) if top else 0
        where = db.describe()
    if json_output:
        print_json(
            {
                "database": where,
                "before": result.before,
                "after": result.after,
                "flavors_seeded": seeded,
                "images_seeded": images,
            }
        )
        return
    was = "empty" if result.before is None else f"revision {result.before}"
    if result.changed:
        print(f"{where}: upgraded from {was} to revision {result.after}")
    else:
        print(f"{where}: already at revision {result.after}")
    if seeded:
        print(f"created {seeded} default flavors")
    if images:
        print(f"created {images} default image{'s' if images > 1 else ''}")
