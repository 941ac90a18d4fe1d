"""`zcells quota ...`: a project's limits at the API cell, shown to its members, set by an admin."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from zcells.cli.common import print_json, print_table
from zcells.cli.connect import ClientKey, Endpoint, ServerKey, Timeout, ask, resolve

quota_app = typer.Typer(help="Show and set a project's quotas.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print as JSON.")]
Limit = Annotated[
    int | None,
    typer.Option(min=-1, help="The project's own limit; -1 for none."),
]


def _show(answer: dict[str, Any], json_output: bool) -> None:
    if json_output:
        print_json(answer)
        return
    quota, in_use, own = answer["quota"], answer["in_use"], answer["own"]
    rows = [
        (
            resource,
            "unlimited" if quota[resource] == -1 else quota[resource],
            in_use[resource],
            "project" if resource in own else "default",
        )
        for resource in quota
    ]
    print_table(f"quota of {answer['project']}", ("RESOURCE", "LIMIT", "IN USE", "SET BY"), rows)


@quota_app.command("show")
def quota_show(
    project: Annotated[
        str | None, typer.Argument(help="The project; default: the caller's own.")
    ] = None,
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Show a project's limits and what it holds (a member: its own project only)."""
    target = resolve(endpoint, server_key, key)
    body = {} if project is None else {"project": project}
    answer = ask(target, timeout, "quota_show", body)
    _show(answer, json_output)


@quota_app.command("set")
def quota_set(
    project: Annotated[str, typer.Argument(help="The project whose limits change.")],
    servers: Limit = None,
    vcpus: Limit = None,
    ram_mb: Limit = None,
    default: Annotated[
        bool,
        typer.Option("--default", help="Put the limits not given back to the configured defaults."),
    ] = False,
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Set a project's own limits (admin); the rest keep theirs unless --default."""
    given = {"servers": servers, "vcpus": vcpus, "ram_mb": ram_mb}
    limits = given if default else {k: v for k, v in given.items() if v is not None}
    if not limits:
        raise typer.BadParameter("give at least one of --servers, --vcpus, --ram-mb, --default")
    target = resolve(endpoint, server_key, key)
    body = {"project": project, "limits": limits}
    answer = ask(target, timeout, "quota_set", body)
    _show(answer, json_output)
