"""`zcells image ...`: the images servers boot from, made at the API cell and sent down.

Rules kept here:

* Changes (`create`, `set`, `delete`) go to the API cell and need an admin
  key; `list` and `show` work at any cell and show what reached it.
* `--property KEY=VALUE` may repeat; the cell checks keys and values (the
  scheduler's own, `hypervisor_type`, `architecture` and
  `hypervisor_version_requires`, must be well formed).
* Output for scripts is on stdout (`--json`, or the table when piped);
  remarks go to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from zcells.cli.common import note, parse_pairs, print_json, print_table, stdout
from zcells.cli.connect import ClientKey, Endpoint, ServerKey, Timeout, ask, resolve

from zcells.cellfilters import IMAGE_PROPERTIES

image_app = typer.Typer(help="Create, list, show, change and delete images.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print as JSON.")]
NameArgument = Annotated[str, typer.Argument(help="The image's name, e.g. cirros.")]
PropertyOption = Annotated[
    list[str] | None,
    typer.Option(
        "--property",
        help="A property KEY=VALUE (repeat for more), e.g. hypervisor_type=kvm.",
    ),
]
View = dict[str, Any]


def _ask(
    method: str,
    body: View,
    endpoint: str | None,
    server_key: str | None,
    key: Path | None,
    timeout: float,
) -> View:
    answer: View = ask(resolve(endpoint, server_key, key), timeout, method, body)
    return answer


def _shown(properties: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in properties.items()) or "-"


@image_app.command("create")
def image_create(
    name: NameArgument,
    prop: PropertyOption = None,
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Create an image (admin, at the API cell); it reaches every cell below."""
    properties = parse_pairs("--property", prop or [], empty_values=True)
    body = {"name": name, "properties": properties}
    image = _ask("image_create", body, endpoint, server_key, key, timeout)
    if json_output:
        print_json(image)
    else:
        note(f"created image {image['name']}: {_shown(image['properties'])}")


@image_app.command("set")
def image_set(
    name: NameArgument,
    prop: PropertyOption = None,
    unset: Annotated[
        list[str] | None,
        typer.Option("--unset", help="Remove the property of this KEY (repeat for more)."),
    ] = None,
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Set or remove properties of an image (admin, at the API cell)."""
    body = {
        "name": name,
        "properties": parse_pairs("--property", prop or [], empty_values=True),
        "unset": list(unset or []),
    }
    image = _ask("image_set", body, endpoint, server_key, key, timeout)
    if json_output:
        print_json(image)
    else:
        note(f"image {image['name']}: {_shown(image['properties'])}")


@image_app.command("delete")
def image_delete(
    name: NameArgument,
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Delete an image (admin, at the API cell); servers booted from it stay."""
    image = _ask("image_delete", {"name": name}, endpoint, server_key, key, timeout)
    if json_output:
        print_json(image)
    else:
        note(f"deleted image {image['name']}")


@image_app.command("list")
def image_list(
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """List the images servers can boot from (at a compute cell: what reached it)."""
    images = list(_ask("image_list", {}, endpoint, server_key, key, timeout)["images"])
    if json_output:
        print_json(images)
        return
    print_table(
        "images", ("NAME", "PROPERTIES"), [(i["name"], _shown(i["properties"])) for i in images]
    )


@image_app.command("show")
def image_show(
    name: NameArgument,
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Show one image and its properties; those the cell scheduler reads are marked."""
    image = _ask("image_show", {"name": name}, endpoint, server_key, key, timeout)
    if json_output:
        print_json(image)
        return
    stdout.print(f"name: {image['name']}", markup=False, highlight=False)
    print_table(
        "properties",
        ("PROPERTY", "VALUE", "SCHEDULER"),
        [
            (k, v, "yes" if k in IMAGE_PROPERTIES else "")
            for k, v in sorted(image["properties"].items())
        ],
    )
