"""`zcells server ...` and `zcells flavor ...`: the front door of the API cell, from a shell.

Rules kept here:

* Each invocation that changes something sends one request id, made here, so
  the same call sent again (a retry after a timeout) is recognised and done once.
* `--wait` polls what the cell says until each server has settled; the wait is
  bounded by `--wait-timeout`, and a server that ends in ERROR makes the exit
  status 1, its fault on stderr.
* Output for scripts is on stdout (`--json`, or one plain line per server when
  piped); remarks and faults go to stderr.
"""

from __future__ import annotations

import asyncio
import math
import sys
import uuid as uuid_module
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from zcells.cli.common import note, parse_pairs, print_json, print_table, stdout
from zcells.cli.connect import (
    ClientKey,
    Endpoint,
    ServerKey,
    Target,
    Timeout,
    ask,
    resolve,
    with_client,
)
from zcells.cli.schedule import explain, explanation_body, print_explanation

from zcells.client import CellClient
from zcells.errors import Busy, CallTimeout, CellUnreachable, ValidationError
from zcells.names import check_cell_path

server_app = typer.Typer(help="Create, list, show and act on servers.", no_args_is_help=True)
flavor_app = typer.Typer(help="Create, list and delete flavors.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print as JSON.")]
UuidArgument = Annotated[str, typer.Argument(help="The server's uuid.")]
WaitOption = Annotated[
    bool, typer.Option("--wait", help="Wait until the task has finished; exit 1 on ERROR.")
]
WaitTimeout = Annotated[
    float, typer.Option("--wait-timeout", help="Give up waiting after this many seconds.")
]

PAGE = 1000  # the most the API cell answers in one page
MAX_PAGES = 10_000  # a listing that never ends is the cell's bug, not a reason to loop forever
POLL_S = 0.2
SHOW_AT_ONCE = 16  # concurrent server_show calls while waiting
LIST_ABOVE = 8  # more pending servers than this: poll with listings rather than one by one
ATTEMPTS = 3  # tries of a request carrying a request id
COLUMNS = ("UUID", "NAME", "STATUS", "TASK", "POWER", "CELL", "HOST", "FLAVOR")
View = dict[str, Any]
T = TypeVar("T")


# -- servers ------------------------------------------------------------------------------


@server_app.command("create")
def server_create(
    name: Annotated[
        str, typer.Argument(help="The server's name (NAME-1, NAME-2... with --count).")
    ],
    flavor: Annotated[str, typer.Option("--flavor", help="Flavor name, e.g. m1.small.")],
    image: Annotated[str, typer.Option("--image", help="Image to boot.")],
    count: Annotated[int, typer.Option("--count", help="How many servers.")] = 1,
    hint: Annotated[
        list[str] | None,
        typer.Option("--hint", help="Scheduler hint KEY=VALUE (admin), e.g. target_cell=api!c1."),
    ] = None,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="Metadata KEY=VALUE.")] = None,
    explain_first: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="First show how the cell scheduler weighs this build, level by level.",
        ),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until each is ACTIVE or ERROR; exit 1 on ERROR.")
    ] = False,
    wait_timeout: WaitTimeout = 300.0,
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Create servers; answers with their uuids at once, or when built with --wait."""
    if count < 1:
        raise ValidationError("--count", str(count), "a whole number >= 1")
    _check_wait_timeout(wait_timeout)
    hints = parse_pairs("--hint", hint or [], empty_values=False)
    body = {
        "name": name,
        "flavor": flavor,
        "image": image,
        "count": count,
        "hints": hints,
        "metadata": parse_pairs("--meta", meta or [], empty_values=True),
        "request_id": str(uuid_module.uuid4()),
    }
    target = resolve(endpoint, server_key, key)

    async def work(client: CellClient) -> tuple[list[str], list[View]]:
        if explain_first:
            weighed = await explain(client, explanation_body(flavor, image, hints))
            if json_output:
                print_json({"explanation": weighed})
            else:
                print_explanation(weighed)
        answer = await _with_retries(lambda: client.request("server_create", body))
        uuids = [str(u) for u in answer["servers"]]
        if not wait:
            return uuids, []
        with _Watch(len(uuids), json_output) as watch:
            views = await settle(
                client, uuids, _built, wait_timeout, on_settled=watch.settled, name=name
            )
        return uuids, views

    uuids, views = asyncio.run(with_client(target, timeout, work))
    if not wait:
        if json_output:
            print_json({"servers": uuids})
        else:
            for uuid in uuids:
                print(uuid)
        return
    if json_output:
        print_json(views)
    elif _terminal() and len(views) > 1:
        _print_servers(views)
    _exit_on_errors(views)


@server_app.command("list")
def server_list(
    status: Annotated[str | None, typer.Option("--status", help="Only this status.")] = None,
    cell: Annotated[
        str | None, typer.Option("--cell", help="Only servers of this cell and below it.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Names containing this (any case).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help=f"One page of at most this many (1-{PAGE}).")
    ] = None,
    marker: Annotated[
        str | None, typer.Option("--marker", help="Start after this server's uuid.")
    ] = None,
    all_projects: Annotated[
        bool, typer.Option("--all-projects", help="Every project's servers (admin).")
    ] = False,
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """List servers: every page, or one page with --limit (and --marker)."""
    if cell is not None:
        check_cell_path(cell)
    if limit is not None and not 0 < limit <= PAGE:
        raise ValidationError("--limit", str(limit), f"a whole number from 1 to {PAGE}")
    filters = {
        "status": status,
        "cell": cell,
        "name": name,
        "marker": None if marker is None else check_uuid(marker, "--marker"),
    }
    # The cell takes an absent filter, not a null one.
    body: dict[str, Any] = {k: v for k, v in filters.items() if v is not None}
    body.update(limit=limit or PAGE, all_projects=all_projects)
    target = resolve(endpoint, server_key, key)

    async def work(client: CellClient) -> tuple[list[View], str | None]:
        if limit is not None:
            page = await client.request("server_list", body)
            return list(page["servers"]), page["next_marker"]
        return await list_all(client, body), None

    views, next_marker = asyncio.run(with_client(target, timeout, work))
    if json_output:
        print_json(views)
        return
    _print_servers(views)
    if next_marker is not None:
        note(f"more servers follow: --marker {next_marker}")


@server_app.command("show")
def server_show(
    uuid: UuidArgument,
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Show one server, with its fault if it is in ERROR."""
    body = {"uuid": check_uuid(uuid)}
    target = resolve(endpoint, server_key, key)
    view: View = ask(target, timeout, "server_show", body)
    if json_output:
        print_json(view)
        return
    print_table("server", ("FIELD", "VALUE"), _fields(view), whole=())


def _action_command(action: str, summary: str) -> None:
    def command(
        uuid: UuidArgument,
        wait: WaitOption = False,
        wait_timeout: WaitTimeout = 300.0,
        json_output: JsonOption = False,
        endpoint: Endpoint = None,
        server_key: ServerKey = None,
        key: ClientKey = None,
        timeout: Timeout = 30.0,
    ) -> None:
        target = resolve(endpoint, server_key, key)
        run_action(
            target,
            timeout,
            action,
            uuid,
            wait=wait,
            wait_timeout=wait_timeout,
            json_output=json_output,
        )

    command.__doc__ = summary
    server_app.command(action)(command)


def run_action(
    target: Target,
    timeout: float,
    action: str,
    uuid: str,
    *,
    wait: bool,
    wait_timeout: float,
    json_output: bool,
) -> None:
    """Ask for `action` on one server and, with `wait`, watch it finish."""
    _check_wait_timeout(wait_timeout)
    body = {"uuid": check_uuid(uuid), "action": action, "request_id": str(uuid_module.uuid4())}

    async def work(client: CellClient) -> View:
        answer: View = await _with_retries(lambda: client.request("server_action", body))
        if not wait:
            return answer
        version = int(answer["version"])

        def finished(view: View) -> bool:
            if view["version"] < version or view["task_state"] is not None:
                return False
            return action != "delete" or view["status"] in ("DELETED", "ERROR")

        (view,) = await settle(client, [body["uuid"]], finished, wait_timeout)
        return view

    view = asyncio.run(with_client(target, timeout, work))
    if json_output:
        print_json(view)
    elif wait:
        print(f"{view['uuid']}: {view['status']}")
    else:
        task = view["task_state"] or "none"
        print(f"{view['uuid']}: {action} accepted ({view['status']}, task {task})")
    if wait:
        _exit_on_errors([view])


_action_command("delete", "Delete a server; --wait until it is DELETED.")
_action_command("reboot", "Reboot a server; --wait until it is ACTIVE again.")
_action_command("stop", "Power a server off; --wait until it is SHUTOFF.")
_action_command("start", "Power a server on; --wait until it is ACTIVE.")


# -- flavors ------------------------------------------------------------------------------


@flavor_app.command("create")
def flavor_create(
    name: Annotated[str, typer.Argument(help="The flavor's name, e.g. m1.large.")],
    ram: Annotated[int, typer.Option("--ram", help="Memory in MB.")],
    disk: Annotated[int, typer.Option("--disk", help="Disk in GB.")],
    vcpus: Annotated[int, typer.Option("--vcpus", help="Virtual CPUs.")],
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Create a flavor (admin)."""
    body = {"name": name, "ram": ram, "disk": disk, "vcpus": vcpus}
    target = resolve(endpoint, server_key, key)
    flavor: View = ask(target, timeout, "flavor_create", body)
    if json_output:
        print_json(flavor)
    else:
        note(
            f"created flavor {flavor['name']}: {flavor['memory_mb']} MB RAM, "
            f"{flavor['disk_gb']} GB disk, {flavor['vcpus']} vCPUs"
        )


@flavor_app.command("delete")
def flavor_delete(
    name: Annotated[str, typer.Argument(help="The flavor's name.")],
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Delete a flavor (admin, at the API cell); servers built from it keep their size."""
    target = resolve(endpoint, server_key, key)
    flavor: View = ask(target, timeout, "flavor_delete", {"name": name})
    if json_output:
        print_json(flavor)
    else:
        note(f"deleted flavor {flavor['name']}")


@flavor_app.command("list")
def flavor_list(
    json_output: JsonOption = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """List the flavors servers can be built from."""
    target = resolve(endpoint, server_key, key)
    answer: View = ask(target, timeout, "flavor_list")
    flavors = list(answer["flavors"])
    if json_output:
        print_json(flavors)
        return
    print_table(
        "flavors",
        ("NAME", "RAM MB", "DISK GB", "VCPUS"),
        [(f["name"], f["memory_mb"], f["disk_gb"], f["vcpus"]) for f in flavors],
    )


# -- arguments ------------------------------------------------------------------------------


def check_uuid(value: str, field: str = "server uuid") -> str:
    """A uuid in the canonical lower-case form the cells keep."""
    try:
        return str(uuid_module.UUID(value.strip()))
    except ValueError:
        raise ValidationError(field, value, "a uuid such as 8c1f...-...") from None


def _check_wait_timeout(seconds: float) -> None:
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValidationError("--wait-timeout", str(seconds), "a number of seconds > 0")


# -- talking to the cell ----------------------------------------------------------------------


async def _with_retries(send: Callable[[], Awaitable[T]]) -> T:
    """Send a request that carries a request id again when no answer came; the cell does it once."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await send()
        except (CallTimeout, CellUnreachable, Busy):
            if attempt == ATTEMPTS:
                raise
            await asyncio.sleep(0.5 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


async def list_all(client: CellClient, body: dict[str, Any]) -> list[View]:
    """Every page of a listing, following `next_marker`."""
    found: list[View] = []
    query = dict(body)
    for _ in range(MAX_PAGES):
        page = await client.request("server_list", query)
        found += page["servers"]
        if page["next_marker"] is None:
            return found
        query["marker"] = page["next_marker"]
    raise CallTimeout(f"the server listing did not end after {MAX_PAGES} pages")


async def settle(
    client: CellClient,
    uuids: Sequence[str],
    settled: Callable[[View], bool],
    wait_timeout_s: float,
    *,
    on_settled: Callable[[View], None] = lambda view: None,
    name: str | None = None,
) -> list[View]:
    """Poll until `settled` holds for every server; their views in the order of `uuids`.

    `name` (what the servers were created as) lets many servers be polled
    with a few listings rather than one `server_show` each.
    """
    done: dict[str, View] = {}
    try:
        async with asyncio.timeout(wait_timeout_s):
            while True:
                pending = [u for u in uuids if u not in done]
                for view in await _current(client, pending, name):
                    if settled(view):
                        done[view["uuid"]] = view
                        on_settled(view)
                if len(done) == len(uuids):
                    return [done[u] for u in uuids]
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        left = [u for u in uuids if u not in done]
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        raise CallTimeout(
            f"gave up waiting after {wait_timeout_s:g}s: {len(left)} of {len(uuids)} "
            f"server(s) not done yet ({shown})"
        ) from None


async def _current(client: CellClient, uuids: Sequence[str], name: str | None) -> list[View]:
    """What the cell holds now for each of `uuids`."""
    views: list[View] = []
    if name is not None and len(uuids) > LIST_ABOVE:
        wanted = set(uuids)
        listed = await list_all(client, {"name": name, "limit": PAGE})
        views = [v for v in listed if v["uuid"] in wanted]
    seen = {v["uuid"] for v in views}
    gate = asyncio.Semaphore(SHOW_AT_ONCE)

    async def show(uuid: str) -> View:
        async with gate:
            view: View = await client.request("server_show", {"uuid": uuid})
            return view

    missing = [u for u in uuids if u not in seen]
    return views + list(await asyncio.gather(*map(show, missing)))


def _built(view: View) -> bool:
    return view["status"] in ("ACTIVE", "ERROR") and view["task_state"] is None


# -- output ---------------------------------------------------------------------------------


def _terminal() -> bool:
    return stdout.is_terminal


class _Watch:
    """How settling servers are shown: a progress bar on a terminal, else a line each."""

    def __init__(self, total: int, json_output: bool) -> None:
        self.bar = _terminal() and total > 1
        self.lines = not json_output and not self.bar
        self.counts = {"ACTIVE": 0, "ERROR": 0}
        self.progress = Progress(
            TextColumn("servers"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[active]} active, {task.fields[error]} error"),
            TimeElapsedColumn(),
            console=stdout,
            transient=True,
        )
        self.task = self.progress.add_task("servers", total=total, active=0, error=0)

    def __enter__(self) -> _Watch:
        if self.bar:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.progress.stop()

    def settled(self, view: View) -> None:
        if view["status"] in self.counts:
            self.counts[view["status"]] += 1
        if self.bar:
            self.progress.update(
                self.task, advance=1, active=self.counts["ACTIVE"], error=self.counts["ERROR"]
            )
        elif self.lines:
            print(_line(view), flush=True)


def _line(view: View) -> str:
    if view["status"] == "ERROR":
        return f"{view['uuid']} {view['name']} ERROR {_fault(view)}"
    return f"{view['uuid']} {view['name']} {view['status']} {view['cell']} {view['host']}"


def _fault(view: View) -> str:
    fault = view.get("fault")
    if not isinstance(fault, dict):
        return "no fault recorded"
    where = f" (in cell {fault['cell']})" if fault.get("cell") else ""
    return f"{fault.get('code')}: {fault.get('message')}{where}"


def _exit_on_errors(views: Sequence[View]) -> None:
    failed = [v for v in views if v["status"] == "ERROR"]
    for view in failed:
        note(f"zcells: error: server {view['uuid']} ({view['name']}) is in ERROR: {_fault(view)}")
    if failed:
        sys.exit(1)


def _print_servers(views: Sequence[View]) -> None:
    print_table(
        "servers",
        COLUMNS,
        [
            (
                v["uuid"],
                v["name"],
                v["status"],
                v["task_state"] or "-",
                v["power_state"],
                v["cell"] or "-",
                v["host"] or "-",
                v["flavor"],
            )
            for v in views
        ],
        whole=("UUID",),
    )


def _fields(view: View) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for field, value in view.items():
        if field == "metadata":
            shown = ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
        elif field == "fault":
            shown = _fault(view)
        elif field.endswith("_at") and isinstance(value, int | float):
            shown = datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")
        else:
            shown = "-" if value is None else str(value)
        rows.append((field, shown))
    return rows
