"""`zcells schedule explain`: how the cell scheduler would place a build, level by level.

Rules kept here:

* Explaining places nothing and claims nothing: the API cell weighs the build
  as it would now, and each cell of the first choice's path weighs its own
  level (`schedule_explain`).
* Every candidate is shown with the first filter that removed it and why, or
  with each weigher's raw and normalised value, its total, its tier and its
  chance of going first within its tier; then the order the build would try.
  Within a tier the order is drawn, so a build may go another way than the
  one shown.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from zcells.cli.common import parse_pairs, print_json, print_table, stdout
from zcells.cli.connect import ClientKey, Endpoint, ServerKey, Timeout, resolve, with_client

from zcells.cellfilters import CANDIDATE_FIELDS
from zcells.client import CellClient

schedule_app = typer.Typer(help="Ask the cell scheduler how it would place a build.")

HERE = "."
_SHORT = {"ram_by_instance_type": "RAM UNITS", "weight_offset": "OFFSET", "mute_child": "MUTE"}


def explanation_body(flavor: str, image: str | None, hints: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {"flavor": flavor, "hints": hints}
    if image is not None:
        body["image"] = image
    return body


async def explain(client: CellClient, body: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = await client.request("schedule_explain", body)
    return answer


def print_explanation(answer: dict[str, Any]) -> None:
    """Each level's candidates as a table, then the order the build would try."""
    spec = answer.get("spec", {})
    flavor = spec.get("flavor", {})
    stdout.print(
        f"build of {flavor.get('name')} ({flavor.get('memory_mb')} MB, "
        f"{flavor.get('disk_gb')} GB, {flavor.get('vcpus')} vCPUs)"
        + (f", image {spec['image_properties']}" if spec.get("image_properties") else "")
        + (f", hints {spec['hints']}" if spec.get("hints") else ""),
        markup=False,
        highlight=False,
    )
    for level in answer.get("levels", []):
        cell = level.get("cell")
        if "error" in level:
            stdout.print(f"\nat {cell}: could not ask ({level['error']})", markup=False)
            continue
        candidates = [_named(row, level) for row in level.get("candidates", [])]
        weighers = list(level.get("weighers", []))
        columns = ["CANDIDATE", "VERDICT", *(_SHORT.get(w, w.upper()) for w in weighers)]
        columns += ["TOTAL", "TIER", "CHANCE"]
        rows = [_row(c, weighers) for c in candidates]
        stdout.print(f"\nat {cell}:", markup=False, highlight=False)
        print_table("candidates", columns, rows, whole=())
        if level.get("more"):
            stdout.print(f"... and {level['more']} more candidates", markup=False)
        order = ", ".join(_shown(name) for name in level.get("order", [])) or "nothing fits"
        stdout.print(f"order: {order}", markup=False, highlight=False)


def candidates_of(level: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A level's candidates by name: verdict, totals, and each weigher's raw and normal value."""
    return {c["name"]: c for c in (_named(row, level) for row in level.get("candidates", []))}


def _named(row: list[Any], level: dict[str, Any] | None = None) -> dict[str, Any]:
    """A candidate's flat row as a map (`zcells.handlers.scheduling.level`)."""
    fields = CANDIDATE_FIELDS
    candidate = dict(zip(fields, row, strict=False))
    weighers = (level or {}).get("weighers", [])
    values = row[len(fields) :]
    candidate["raw"] = {w: values[2 * i] for i, w in enumerate(weighers) if 2 * i < len(values)}
    candidate["normal"] = {
        w: values[2 * i + 1] for i, w in enumerate(weighers) if 2 * i + 1 < len(values)
    }
    return candidate


def _row(candidate: dict[str, Any], weighers: list[str]) -> list[Any]:
    name = _shown(candidate.get("name", "?"))
    if candidate.get("removed_by"):
        verdict = f"removed by {candidate['removed_by']}: {candidate.get('reason')}"
        return [name, verdict, *([""] * len(weighers)), "", "", ""]
    raw, normal = candidate.get("raw", {}), candidate.get("normal", {})
    values = [f"{_number(raw.get(w))} ({_number(normal.get(w))})" for w in weighers]
    return [
        name,
        "passed",
        *values,
        _number(candidate.get("total")),
        _number(candidate.get("tier")),
        f"{100 * float(candidate.get('chance', 0.0)):.0f}%",
    ]


def _shown(name: str) -> str:
    return "this cell's hosts" if name == HERE else name


def _number(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.3g}"


@schedule_app.command("explain")
def schedule_explain(
    flavor: Annotated[str, typer.Option("--flavor", help="Flavor name, e.g. m1.small.")],
    image: Annotated[str | None, typer.Option("--image", help="Image to boot.")] = None,
    hint: Annotated[
        list[str] | None,
        typer.Option("--hint", help="Scheduler hint KEY=VALUE (admin), e.g. target_cell=api!c1."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    endpoint: Endpoint = None,
    server_key: ServerKey = None,
    key: ClientKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Show how a build would be placed now, level by level; places nothing."""
    body = explanation_body(flavor, image, parse_pairs("--hint", hint or [], empty_values=False))
    target = resolve(endpoint, server_key, key)
    answer = asyncio.run(with_client(target, timeout, lambda client: explain(client, body)))
    if json_output:
        print_json(answer)
    else:
        print_explanation(answer)
