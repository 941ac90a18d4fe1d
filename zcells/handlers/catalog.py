"""Flavors and images: what clients ask of them, and how a parent sends them down.

Rules kept here (DESIGN.md §5):

* The API cell owns flavors and images: only there may an `admin` create,
  change or delete them; every cell answers the reads (`flavor_list`,
  `image_list`, `image_show`) from its own tables, so an operator sees what
  reached it.
* `global_progress` and `global_updates` are spoken by a cell's parent for
  itself (`own_link`) and by no one else: a child, a client or a cell
  further up is refused before the handler runs.
* A batch from the parent is checked whole before anything is written
  (`zcells.globaldata.check_rows`) and applied in one transaction with the
  seq it reaches, so a repeat or a crash changes nothing twice.
* A change here rings this cell's downward stream, so the children hear of
  it at once, not at the next idle read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from zcells import logs
from zcells.db import catalog
from zcells.dbrunner import DbRunner
from zcells.errors import (
    AlreadyExists,
    Conflict,
    InvalidRequest,
    NotFound,
    NotFoundRemote,
    UsageError,
)
from zcells.globaldata import check_rows
from zcells.messages import Kind
from zcells.methods import Call, Method, Param
from zcells.records import Flavor, Image

log = logs.get_logger("catalog")

READERS = frozenset({"admin", "member", "reader"})
ADMIN = frozenset({"admin"})
MAX_UNSET = 32


async def flavor_named(db: DbRunner, name: str, cell: str | None = None) -> Flavor:
    """The flavor called `name` in this cell's catalog; `NotFoundRemote` if there is none."""
    flavor = await db.read(catalog.get_flavor, name)
    if flavor is None:
        raise NotFoundRemote(f"no flavor {name[:64]!r}", cell)
    return flavor


class CatalogHandlers:
    """Flavors and images for clients; global data from the parent."""

    def __init__(
        self, db: DbRunner, *, top: bool, changed: Callable[[], None] = lambda: None
    ) -> None:
        self.db = db
        self.top = top
        self._changed = changed  # new global log rows: wake the downward stream

    def _require_top(self, call: Call) -> None:
        if not self.top:
            raise InvalidRequest(
                f"{call.cell} is a compute cell: flavors and images are made at the API cell",
                call.cell,
            )

    async def _change(self, call: Call, write: Callable[..., Any], *args: Any) -> Any:
        """Run a change of global data at the API cell, its errors as wire errors."""
        self._require_top(call)
        try:
            done = await self.db.write(write, *args)
        except AlreadyExists as exc:
            raise Conflict(str(exc), call.cell) from None
        except NotFound as exc:
            raise NotFoundRemote(str(exc), call.cell) from None
        except UsageError as exc:
            raise InvalidRequest(str(exc), call.cell) from None
        self._changed()
        return done

    # -- flavors ----------------------------------------------------------------------------

    async def flavor_list(self, call: Call) -> dict[str, Any]:
        return {"flavors": [f.as_dict() for f in await self.db.read(catalog.list_flavors)]}

    async def flavor_create(self, call: Call) -> dict[str, Any]:
        args = call.args
        flavor = Flavor(args["name"], args["ram"], args["disk"], args["vcpus"])
        made: Flavor = await self._change(call, catalog.create_flavor, flavor)
        return made.as_dict()

    async def flavor_delete(self, call: Call) -> dict[str, Any]:
        gone: Flavor = await self._change(call, catalog.delete_flavor, call.args["name"])
        return gone.as_dict()

    # -- images -----------------------------------------------------------------------------

    async def image_list(self, call: Call) -> dict[str, Any]:
        return {"images": [i.as_dict() for i in await self.db.read(catalog.list_images)]}

    async def image_show(self, call: Call) -> dict[str, Any]:
        name = call.args["name"]
        image = await self.db.read(catalog.get_image, name)
        if image is None:
            raise NotFoundRemote(f"no image {name[:64]!r}", call.cell)
        return image.as_dict()

    async def image_create(self, call: Call) -> dict[str, Any]:
        image = Image(call.args["name"], call.args["properties"] or {})
        made: Image = await self._change(call, catalog.create_image, image)
        return made.as_dict()

    async def image_set(self, call: Call) -> dict[str, Any]:
        """Set properties of an image and remove others (`unset`: their keys)."""
        unset = call.args["unset"] or []
        if len(unset) > MAX_UNSET or not all(type(key) is str for key in unset):
            raise InvalidRequest(f"unset: a list of at most {MAX_UNSET} property keys", call.cell)
        properties = call.args["properties"] or {}
        changed: Image = await self._change(
            call, catalog.set_image_properties, call.args["name"], properties, unset
        )
        return changed.as_dict()

    async def image_delete(self, call: Call) -> dict[str, Any]:
        gone: Image = await self._change(call, catalog.delete_image, call.args["name"])
        return gone.as_dict()

    # -- from the parent --------------------------------------------------------------------

    async def global_progress(self, call: Call) -> dict[str, Any]:
        """The highest seq of the global log applied here."""
        return {"applied": await self.db.read(catalog.last_seq)}

    async def global_updates(self, call: Call) -> dict[str, Any]:
        """Apply a batch of the parent's global log; the seq applied here after it."""
        changes = check_rows(call.args["rows"])
        before = await self.db.read(catalog.last_seq)
        applied = await self.db.write(catalog.apply, changes)
        if applied > before:
            logs.event(
                log,
                logging.INFO,
                "global.applied",
                rows=sum(1 for c in changes if c.seq > before),
                applied=applied,
            )
            self._changed()
        return {"applied": applied}

    def methods(self) -> list[Method]:
        targeted = frozenset({Kind.TARGETED})
        name = {"name": Param(str)}
        return [
            Method("flavor_list", self.flavor_list, kinds=targeted, allowed=READERS),
            Method(
                "flavor_create",
                self.flavor_create,
                kinds=targeted,
                allowed=ADMIN,
                params={
                    "name": Param(str),
                    "ram": Param(int),
                    "disk": Param(int),
                    "vcpus": Param(int),
                },
            ),
            Method("flavor_delete", self.flavor_delete, kinds=targeted, allowed=ADMIN, params=name),
            Method("image_list", self.image_list, kinds=targeted, allowed=READERS),
            Method("image_show", self.image_show, kinds=targeted, allowed=READERS, params=name),
            Method(
                "image_create",
                self.image_create,
                kinds=targeted,
                allowed=ADMIN,
                params={"name": Param(str), "properties": Param(dict, required=False)},
            ),
            Method(
                "image_set",
                self.image_set,
                kinds=targeted,
                allowed=ADMIN,
                params={
                    "name": Param(str),
                    "properties": Param(dict, required=False),
                    "unset": Param(list, required=False),
                },
            ),
            Method("image_delete", self.image_delete, kinds=targeted, allowed=ADMIN, params=name),
            Method(
                "global_progress",
                self.global_progress,
                kinds=targeted,
                allowed=frozenset({"parent"}),
                own_link=True,
            ),
            Method(
                "global_updates",
                self.global_updates,
                kinds=targeted,
                allowed=frozenset({"parent"}),
                params={"rows": Param(list)},
                own_link=True,
            ),
        ]
