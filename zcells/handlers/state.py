"""The receiving end of upward state: `progress`, `updates`, and `resync` of a subtree.

Rules kept here (DESIGN.md §4):

* A child may speak only for its own subtree: every instance it sends must
  name a cell at or below it (`SenderMismatch` otherwise, nothing applied).
* The API cell applies a child's batch to its index; any other cell stores
  the batch in its own outbox (store and forward). Either way the child's
  applied sequence moves in the same transaction, and only then is the
  batch acknowledged.
* An instance reported by a cell other than the one the index holds it
  under, or reported alive after the top recorded its delete itself, is an
  orphan: noted in the transaction that applies the batch, and deleted in
  that cell by `zcells.orphans` until the cell acknowledges it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from zcells import logs
from zcells.builds import time_left_s
from zcells.db import instances as store
from zcells.db import outbox as outbox_store
from zcells.dbrunner import DbRunner
from zcells.errors import InvalidRequest, SchemaError, WireError
from zcells.messages import Kind
from zcells.methods import Call, Method, Param
from zcells.names import child_path
from zcells.port import CellPort
from zcells.routing import is_below

log = logs.get_logger("state")

# A resync's answer: {"cells": {path: requeued}, "errors": {path: {"code", "message"}}}.
Resynced = dict[str, Any]

MAX_ROWS = 2000


def check_rows(raw: Any) -> list[tuple[int, str, bytes]]:
    """Outbox rows from the wire: a list of [seq, kind, payload] in rising order."""
    if type(raw) is not list or not 0 < len(raw) <= MAX_ROWS:
        raise SchemaError(f"updates: rows must be a list of 1 to {MAX_ROWS} rows")
    rows: list[tuple[int, str, bytes]] = []
    previous = 0
    for row in raw:
        if (
            type(row) is not list
            or len(row) != 3
            or type(row[0]) is not int
            or type(row[1]) is not str
            or type(row[2]) is not bytes
        ):
            raise SchemaError("updates: each row is [seq, kind, payload]")
        if row[0] <= previous:
            raise SchemaError("updates: sequence numbers must rise")
        if row[0] > outbox_store.MAX_SEQ:
            raise SchemaError(f"updates: sequence numbers must not pass {outbox_store.MAX_SEQ}")
        previous = row[0]
        rows.append((row[0], row[1], row[2]))
    return rows


class StateHandlers:
    """Takes children's outbox batches; resyncs a subtree on request."""

    def __init__(
        self,
        node: CellPort,
        db: DbRunner,
        *,
        applies: bool,
        changed: Callable[[], None],
        orphan_found: Callable[[], None] = lambda: None,
    ) -> None:
        self.node = node
        self.db = db
        self.applies = applies  # the API cell applies; other cells store and forward
        self._changed = changed
        self._orphan_found = orphan_found

    async def progress(self, call: Call) -> dict[str, Any]:
        """The highest sequence of the calling child applied (or stored) here."""
        return {"applied": await self.db.read(store.applied_seq, call.sender.name)}

    async def updates(self, call: Call) -> dict[str, Any]:
        """Apply or store one batch of a child's outbox; the child's new applied sequence."""
        rows = check_rows(call.args["rows"])
        child = call.sender.name
        result = await self.db.write(
            store.apply_updates,
            child,
            child_path(call.cell, child),
            rows,
            store_forward=not self.applies,
        )
        if not self.applies:
            self._changed()
        if result.gap:
            logs.event(log, logging.WARNING, "state.gap", child=child, applied=result.applied_seq)
        if result.conflicts:  # noted with the batch; deleted by the orphan sweeper
            logs.event(
                log, logging.WARNING, "state.orphans", child=child, count=len(result.conflicts)
            )
            self._orphan_found()
        answer: dict[str, Any] = {"applied": result.applied_seq}
        if result.refused:  # the child holds these aside; the rest of its stream flows
            logs.limited(
                log, logging.WARNING, "state.refused", child, child=child, rows=len(result.refused)
            )
            answer["refused"] = [list(refused) for refused in result.refused]
        if result.gap:  # rows this cell never saw: the child must send every instance again
            answer["gap"] = True
        return answer

    async def resync(self, call: Call) -> dict[str, Any]:
        """Queue every instance of this cell and of its subtree for the parents again.

        The answer is flat, one entry per cell of the subtree, so a deep tree
        never nests it past the body depth limit.
        """
        if not self.node.view.parents:
            raise InvalidRequest("a cell with no parent has nowhere to resync to", call.cell)
        count = await self.db.write(outbox_store.requeue, None)
        self._changed()
        below = await resync_children(self.node, call.cell, time_left_s(self.node, call.deadline))
        return {"cells": {call.cell: count, **below["cells"]}, "errors": below["errors"]}

    def methods(self) -> list[Method]:
        targeted = frozenset({Kind.TARGETED})
        return [
            Method(
                "progress",
                self.progress,
                kinds=targeted,
                allowed=frozenset({"child"}),
                own_link=True,
            ),
            Method(
                "updates",
                self.updates,
                kinds=targeted,
                allowed=frozenset({"child"}),
                params={"rows": Param(list)},
                own_link=True,
            ),
            Method("resync", self.resync, kinds=targeted, allowed=frozenset({"parent", "admin"})),
        ]


async def resync_subtree(node: CellPort, path: str, timeout_s: float | None) -> Resynced:
    """Ask the cell at `path` to resync its subtree: what each cell of it requeued, or its error.

    One entry per cell, flat, whatever the depth; a cell speaks for its own
    subtree only, and anything else in its answer is dropped.
    """
    try:
        said = (await node.call("resync", {}, target=path, timeout_s=timeout_s)).unwrap()
        said = said if isinstance(said, dict) else {}
        cells, errors = said.get("cells"), said.get("errors")
        if not isinstance(cells, dict) or not isinstance(errors, dict):
            raise SchemaError(f"{path} answered a resync without cells and errors")
    except WireError as exc:
        return {"cells": {}, "errors": {path: {"code": exc.code, "message": exc.message}}}
    return {
        "cells": {
            cell: count
            for cell, count in cells.items()
            if isinstance(cell, str) and is_below(cell, path) and type(count) is int
        },
        "errors": {
            cell: {"code": str(error.get("code")), "message": str(error.get("message"))}
            for cell, error in errors.items()
            if isinstance(cell, str) and is_below(cell, path) and isinstance(error, dict)
        },
    }


async def resync_children(
    node: CellPort, here: str | None = None, timeout_s: float | None = None
) -> Resynced:
    """Ask each child to resync its subtree; each call bounded by `timeout_s`.

    One silent child costs its own answer, not the whole request's.
    """
    here = here or node.view.home_path()
    answers = await asyncio.gather(
        *(resync_subtree(node, child_path(here, name), timeout_s) for name in node.view.children)
    )
    cells: dict[str, int] = {}
    errors: dict[str, dict[str, str]] = {}
    for answer in answers:
        cells.update(answer["cells"])
        errors.update(answer["errors"])
    return {"cells": dict(sorted(cells.items())), "errors": dict(sorted(errors.items()))}
