"""`zcells sim`: a whole tree in one process, in virtual time, under faults, from one seed.

Standard output carries the report and, last, one JSON line; progress goes
to standard error. The exit status is 0 when no invariant was violated, 1
when one was (the report names it and prints the command that replays the
run), 2 for bad options.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from zcells.cli.common import stderr

from zcells.errors import InvalidRequest
from zcells.sim.faults import KINDS, parse_faults

if TYPE_CHECKING:
    from zcells.sim.run import Report

HASH_SEED = "0"


def sim(
    cells: Annotated[int, typer.Option("--cells", min=1, help="Cells in the tree.")] = 1000,
    fanout: Annotated[int, typer.Option("--fanout", min=1, help="Children per cell.")] = 10,
    hosts: Annotated[
        int, typer.Option("--hosts", min=1, help="Fake hosts in each cell without children.")
    ] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Everything random follows from it.")] = 1,
    duration: Annotated[
        float, typer.Option("--duration", min=1.0, help="Virtual seconds of work and faults.")
    ] = 600.0,
    clients: Annotated[
        int, typer.Option("--clients", min=0, help="Clients working at the API cell.")
    ] = 4,
    faults: Annotated[
        str,
        typer.Option(
            "--faults",
            help=f"all, none, or kinds with optional rates a minute (partition:4,crash): "
            f"{', '.join(KINDS)}.",
        ),
    ] = "all",
    db_dir: Annotated[
        Path | None,
        typer.Option("--db-dir", help="Where the cells' SQLite files go (default: a temp dir)."),
    ] = None,
) -> None:
    """Run a simulated tree on the real cell code, check its invariants, print a report."""
    # The whole cell code, database included: loaded for this command only.
    from zcells.sim.run import SimOptions, hash_seed_fixed, run  # noqa: PLC0415

    try:
        parse_faults(faults, cells)
    except InvalidRequest as exc:
        stderr.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(2) from None
    if not hash_seed_fixed():  # a replay needs the same string hashing: run again with it fixed
        os.environ["PYTHONHASHSEED"] = HASH_SEED
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606 (this very command)
    options = SimOptions(
        cells=cells,
        fanout=fanout,
        hosts=hosts,
        seed=seed,
        duration_s=duration,
        clients=clients,
        faults=faults,
        db_dir=db_dir,
    )
    report = run(options, log=lambda line: stderr.print(line, highlight=False))
    print_report(report)
    if report.violations:
        raise typer.Exit(1)


def print_report(report: Report) -> None:
    options = report.options
    out = sys.stdout
    out.write(f"seed {options.seed}: {options.cells} cells, fanout {options.fanout}, ")
    out.write(f"{options.duration_s:g} virtual seconds, faults {options.faults}\n")
    faults = ", ".join(f"{kind} {n}" for kind, n in sorted(report.faults.items())) or "none"
    out.write(f"faults: {faults}\n")
    out.write(
        f"servers told: {report.counts['servers_told']}, "
        f"deletes accepted: {report.counts['servers_deleted']}, "
        f"messages: {report.messages}\n"
    )
    for name, found in report.checks.items():
        verdict = "ok" if not found else f"VIOLATED ({len(found)})"
        out.write(f"invariant {name}: {verdict}\n")
        for line in found[:10]:
            out.write(f"  {line}\n")
    out.write(
        f"virtual {report.virtual_s:.0f}s in {report.wall_s:.1f}s of wall time; "
        f"trace {report.trace_hash}\n"
    )
    if report.violations:
        out.write(f"replay: {options.replay_command()}\n")
    out.write(json.dumps(report.summary()) + "\n")
    out.flush()
