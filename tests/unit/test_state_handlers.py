"""`resync` against a scripted subtree, and `updates` from a child that skipped rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from zcells.db import instances as store
from zcells.db import outbox as outbox_store
from zcells.db.engine import Database

from tests.fakes import run
from tests.unit.scripted_node import ScriptedNode, instance, parent_call, runner, uuids
from zcells.codec import MAX_BODY_DEPTH
from zcells.dbrunner import DbRunner
from zcells.errors import CallTimeout, InvalidRequest
from zcells.handlers.state import StateHandlers
from zcells.instances import placed
from zcells.messages import CellResult, Outcome
from zcells.methods import Call
from zcells.peer import Peer, Role


@pytest.fixture
def db(synced: Database) -> Iterator[DbRunner]:
    db_runner = runner(synced)
    yield db_runner
    db_runner.close()


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def handlers(db: DbRunner, node: ScriptedNode) -> StateHandlers:
    return StateHandlers(node.as_node(), db, applies=False, changed=lambda: None)


def test_resync_answers_one_flat_entry_per_cell_of_a_deep_subtree(db: DbRunner) -> None:
    for uuid in uuids(3):
        store.index_put(db.db, placed(instance(uuid), "api!c1", "h1", 2.0))
    node = ScriptedNode(here="api!c1", children=("g1", "g2"), parents={"api": "api"})
    deep = {f"api!c1!g1{'!x' * n}": n for n in range(6)}  # six levels below c1
    node.calls[("resync", "api!c1!g1")] = CellResult(
        "api!c1!g1",
        Outcome.OK,
        value={
            "cells": {**deep, "api!c2": 99},  # c2 is not g1's to speak for
            "errors": {"api!c1!g1!x!x": {"code": "E_TIMEOUT", "message": "slow"}},
        },
    )
    node.calls[("resync", "api!c1!g2")] = CellResult(
        "api!c1!g2", Outcome.ERROR, error=CallTimeout("no answer", "api!c1")
    )

    said = run(handlers(db, node).resync(parent_call("resync", {})))

    assert said["cells"] == {"api!c1": 3, **deep}
    assert said["errors"] == {
        "api!c1!g1!x!x": {"code": "E_TIMEOUT", "message": "slow"},
        "api!c1!g2": {"code": "E_TIMEOUT", "message": "no answer"},
    }
    assert depth(said) <= 3 < MAX_BODY_DEPTH
    assert len(outbox_store.read_outbox(db.db, 0, 10)) == 3
    assert all(sent.timeout_s is not None for sent in node.sent)  # bounded by the request


def test_resync_at_a_cell_with_no_parent_is_refused(db: DbRunner) -> None:
    node = ScriptedNode(here="api")
    with pytest.raises(InvalidRequest):
        run(handlers(db, node).resync(parent_call("resync", {}, cell="api")))
    assert outbox_store.read_outbox(db.db, 0, 10) == []


def test_a_batch_past_what_was_applied_is_taken_and_answered_as_a_gap(db: DbRunner) -> None:
    """The child then sends everything again; a batch that follows on is no gap."""
    node = ScriptedNode(here="api!c1", children=("g1",), parents={"api": "api"})
    made = [placed(instance(uuid), "api!c1!g1", "h1", 2.0) for uuid in uuids(3)]
    rows = [[n, "instance", msgpack.packb(r.to_wire())] for n, r in enumerate(made, start=1)]

    def from_g1(batch: list[list[Any]]) -> Any:
        call = Call(
            method="updates",
            args={"rows": batch},
            sender=Peer(Role.CHILD, "g1"),
            caller="child",
            context=None,
            cell="api!c1",
            deadline=1010.0,
        )
        return run(handlers(db, node).updates(call))

    assert from_g1(rows[:1]) == {"applied": 1}
    assert from_g1(rows[2:]) == {"applied": 3, "gap": True}  # row 2 never came
    assert (
        len(outbox_store.read_outbox(db.db, 0, 10)) == 2
    )  # stored for this cell's parent all the same
