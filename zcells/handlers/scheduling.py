"""The cell scheduler on the wire: children's announcements, and `--explain`.

Rules kept here (DESIGN.md §6):

* `announce` is spoken by a child for itself over its own link: the sender's
  name is the child whose view it replaces, whatever the body says.
* `schedule_explain` (a client, at the API cell) places nothing. It weighs a
  build as the cell scheduler would now, then asks the first cell of the
  order to do the same for its level (`schedule_level`, parent to child over
  their own link), down to a cell that would place it on its own hosts. It
  deducts nothing and claims nothing.
* An explanation is bounded: at most `MAX_SHOWN` candidates per level, and no
  deeper than the tree's hop limit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from zcells.builds import Placer, check_hints, spec_of, time_left_s
from zcells.cellfilters import CANDIDATE_FIELDS, BuildSpec, Decision
from zcells.cellsched import HERE
from zcells.dbrunner import DbRunner
from zcells.errors import Forbidden, InvalidRequest, NotFoundRemote, SchemaError, WireError
from zcells.handlers.catalog import flavor_named
from zcells.messages import Kind
from zcells.methods import Call, Method, Param
from zcells.names import child_path
from zcells.peer import Role
from zcells.port import CellPort
from zcells.records import Flavor
from zcells.scheduling import Announcer, check_image_properties

MAX_SHOWN: Final = 500
_FLAVOR_KEYS: Final = frozenset({"name", "memory_mb", "disk_gb", "vcpus"})

ImageProperties = Callable[[str], Awaitable[Mapping[str, str] | None]]


def level(cell: str, decision: Decision, weighers: Sequence[str]) -> dict[str, Any]:
    """One level of an explanation, as it goes on the wire and to `--explain`.

    Each candidate is one flat row (answers nest at most five deep):
    `CANDIDATE_FIELDS`, then each weigher's raw and normalised value in the
    order `weighers` names them; a candidate a filter removed has no values.
    """
    shown = decision.weighed[:MAX_SHOWN]
    rows = []
    for w in shown:
        row: list[Any] = [w.name, w.removed_by, w.reason]
        if w.removed_by is None:
            row += [round(w.total, 4), round(w.tier, 4), round(w.chance, 4)]
            for name in weighers:
                row += [w.raw.get(name, 0.0), round(w.normal.get(name, 0.0), 4)]
        rows.append(row)
    return {
        "cell": cell,
        "weighers": list(weighers),
        "fields": list(CANDIDATE_FIELDS),
        "candidates": rows,
        "more": len(decision.weighed) - len(shown),
        "order": list(decision.order[:MAX_SHOWN]),
    }


def spec_to_wire(spec: BuildSpec) -> dict[str, Any]:
    flavor = spec.flavor
    hints = {}
    if spec.target_cell is not None:
        hints["target_cell"] = spec.target_cell
    for key, paths in (("different_cell", spec.different_cell), ("same_cell", spec.same_cell)):
        if paths:
            hints[key] = ",".join(sorted(paths))
    return {
        "flavor": flavor.as_dict(),
        "image_properties": dict(spec.image_properties),
        "hints": hints,
    }


def spec_from_wire(raw: Any) -> BuildSpec:
    if type(raw) is not dict or set(raw) != {"flavor", "image_properties", "hints"}:
        raise SchemaError("spec: expected flavor, image_properties and hints")
    flavor = raw["flavor"]
    if type(flavor) is not dict or set(flavor) != _FLAVOR_KEYS:
        raise SchemaError(f"spec: flavor must have the keys {sorted(_FLAVOR_KEYS)}")
    sizes = [flavor["memory_mb"], flavor["disk_gb"], flavor["vcpus"]]
    if type(flavor["name"]) is not str or any(
        type(v) is not int or not 0 <= v < 2**31 for v in sizes
    ):
        raise SchemaError("spec: a flavor is a name and three sizes, whole numbers >= 0")
    if type(raw["hints"]) is not dict:
        raise SchemaError("spec: hints must be a map")
    return spec_of(
        Flavor(flavor["name"][:64], *sizes),
        check_hints(raw["hints"]),
        check_image_properties(raw["image_properties"]),
    )


class SchedulingHandlers:
    """`announce` from children; `schedule_explain` from clients and `schedule_level` below."""

    def __init__(
        self,
        node: CellPort,
        db: DbRunner,
        announcer: Announcer,
        placer: Placer,
        image_properties: ImageProperties | None = None,
    ) -> None:
        self.node = node
        self.db = db
        self.announcer = announcer
        self.placer = placer
        self._image_properties = image_properties

    def announce(self, call: Call) -> dict[str, Any]:
        """A child's announcement of its subtree."""
        if call.sender.role is not Role.CHILD:
            raise Forbidden("only a child announces to its parent", call.cell)
        return {"taken": self.announcer.heard(call.sender.name, call.args["announcement"])}

    async def schedule_explain(self, call: Call) -> dict[str, Any]:
        """How the cell scheduler would weigh a build of `flavor` (and `image`) now."""
        if self.node.cell_type != "api" or self.node.view.parents:
            raise InvalidRequest("ask the API cell to explain a build", call.cell)
        args = call.args
        hints = check_hints(args["hints"] or {})
        if hints and call.caller != "admin":
            raise Forbidden("only an admin may pass scheduler hints", call.cell)
        flavor = await flavor_named(self.db, args["flavor"], call.cell)
        properties: Mapping[str, str] = {}
        if args["image"] is not None:
            found = (
                await self._image_properties(args["image"])
                if self._image_properties is not None
                else None
            )
            if found is None:
                raise NotFoundRemote(f"no image {args['image'][:64]!r}", call.cell)
            properties = found
        spec = spec_of(flavor, hints, properties)
        return {"spec": spec_to_wire(spec), "levels": await self._levels(spec, call)}

    async def schedule_level(self, call: Call) -> dict[str, Any]:
        """This cell's level of an explanation, and the levels below its first choice."""
        spec = spec_from_wire(call.args["spec"])
        return {"levels": await self._levels(spec, call)}

    async def _levels(self, spec: BuildSpec, call: Call) -> list[dict[str, Any]]:
        decision = self.placer.decide(spec, call.cell)
        levels = [level(call.cell, decision, tuple(self.placer.scheduling.settings.weighers))]
        if decision.first is None or decision.first == HERE:
            return levels
        first = child_path(call.cell, decision.first)
        try:
            result = await self.node.call(
                "schedule_level",
                {"spec": spec_to_wire(spec)},
                target=first,
                timeout_s=time_left_s(self.node, call.deadline),
            )
        except WireError as exc:  # no link to it now: the explanation says so, and stops
            levels.append({"cell": first, "error": exc.code})
            return levels
        below = result.value.get("levels") if isinstance(result.value, dict) else None
        if result.error is not None or type(below) is not list:
            code = result.error.code if result.error is not None else SchemaError.code
            levels.append({"cell": first, "error": code})
            return levels
        return levels + [item for item in below if isinstance(item, dict)][:64]

    def methods(self) -> list[Method]:
        targeted = frozenset({Kind.TARGETED})
        optional_str = Param(str, required=False)
        return [
            Method(
                "announce",
                self.announce,
                kinds=targeted,
                allowed=frozenset({"child"}),
                params={"announcement": Param(dict)},
                own_link=True,
            ),
            Method(
                "schedule_explain",
                self.schedule_explain,
                kinds=targeted,
                allowed=frozenset({"admin", "member", "reader"}),
                params={
                    "flavor": Param(str),
                    "image": optional_str,
                    "hints": Param(dict, required=False),
                },
            ),
            Method(
                "schedule_level",
                self.schedule_level,
                kinds=targeted,
                allowed=frozenset({"parent"}),
                params={"spec": Param(dict)},
                own_link=True,
            ),
        ]
