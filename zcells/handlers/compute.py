"""What a parent asks of the cells below it: builds, instance actions, host listings.

Rules kept here:

* Every request that changes something carries a request id, and the cell
  that does the work stores the first result under it in the same
  transaction: a repeat answers that result and does nothing.
* A build is acknowledged only once it is persisted with its host claimed
  (`zcells.builds`); an action only once its task is recorded. The fake
  driver finishes both later, each finish with its own outbox row.
* Actions reach the cell that owns the instance by its full path; the
  broadcast `instance_delete` is for an instance whose cell the top does not
  know yet ("delete everywhere"), and a cell without it says so. A cell
  that deleted it already says where it is, with its record.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from zcells.builds import Placer, check_hints
from zcells.compute import FakeDriver
from zcells.db import hosts as hosts_store
from zcells.db import instances as store
from zcells.dbrunner import DbRunner
from zcells.errors import Conflict, InvalidRequest, NoValidHost, SchemaError
from zcells.instances import Action, Instance, TaskState, VmState, begin
from zcells.messages import Kind
from zcells.methods import Call, Method, Param
from zcells.scheduling import check_image_properties

_ACTIONS = {action.value: action for action in Action}
PLACED_KEPT = 10_000  # placements remembered for a parent that asks the same build again


def check_action(value: str) -> Action:
    action = _ACTIONS.get(value)
    if action is None:
        raise InvalidRequest(f"unknown action {value[:40]!r}; known: {sorted(_ACTIONS)}")
    return action


def check_request_id(value: str) -> str:
    if not 0 < len(value) <= 64 or not value.isprintable():
        raise InvalidRequest("a request id is 1-64 printable characters")
    return value


class ComputeHandlers:
    """A cell's part in builds and actions sent down from its parents."""

    def __init__(
        self,
        db: DbRunner,
        placer: Placer,
        driver: FakeDriver | None,
        changed: Callable[[], None],
    ) -> None:
        self.db = db
        self.placer = placer
        self.driver = driver
        self._changed = changed
        self.clock = placer.clock
        self._placing: dict[str, asyncio.Future[Instance]] = {}  # request id -> placement
        self._placed: OrderedDict[str, Instance] = OrderedDict()  # its outcome, for repeats

    async def build(self, call: Call) -> dict[str, Any]:
        """Place a new instance in this cell's subtree; acknowledged once persisted.

        One placement per request id: a repeat while the first runs waits for
        its outcome, and a repeat after it answers the same placement, so a
        parent that asks again after a timeout learns where the first attempt
        went instead of making a second copy.
        """
        instance = Instance.from_wire(call.args["instance"])
        if instance.vm_state is not VmState.BUILDING or instance.task_state is not (
            TaskState.SCHEDULING
        ):
            raise SchemaError("build: the instance must be building and waiting to be scheduled")
        request_id = check_request_id(call.args["request_id"])
        hints = check_hints(call.args["hints"] or {})
        image_properties = check_image_properties(call.args.get("image_properties"))
        if not self.placer.scheduling.settings.enabled:
            raise NoValidHost(
                f"{call.cell} takes no new builds ([cells] enable = False)", call.cell
            )
        valid_until = call.args["valid_until"]
        placed_before = self._placed.get(request_id)
        if placed_before is not None:
            return {"instance": placed_before.to_wire()}
        running = self._placing.get(request_id)
        if running is None:
            running = asyncio.ensure_future(
                self.placer.place(
                    instance,
                    hints,
                    request_id,
                    call.cell,
                    plan=[0.0],
                    deadline=call.deadline,
                    valid_until=valid_until,
                    image_properties=image_properties,
                )
            )
            self._placing[request_id] = running
            running.add_done_callback(lambda done: self._settled(request_id, done))
        taken = await asyncio.shield(running)
        return {"instance": taken.to_wire()}

    def _settled(self, request_id: str, done: asyncio.Future[Instance]) -> None:
        self._placing.pop(request_id, None)
        if not done.cancelled() and done.exception() is None:
            self._placed[request_id] = done.result()
            while len(self._placed) > PLACED_KEPT:
                self._placed.popitem(last=False)

    async def instance_action(self, call: Call) -> dict[str, Any]:
        """Start stop, start, reboot or delete of an instance this cell holds."""
        action = check_action(call.args["action"])
        request_id = check_request_id(call.args["request_id"])
        changed = await self._begin(call.args["uuid"], action, request_id)
        return {"instance": changed.to_wire()}

    async def instance_delete(self, call: Call) -> dict[str, Any]:
        """Delete everywhere: start the delete here if this cell holds the instance.

        An instance this cell has deleted already is found, with its record:
        the top, which holds it in no cell, learns where it went.
        """
        request_id = check_request_id(call.args["request_id"])
        held = await self.db.read(store.get, call.args["uuid"])
        if held is None:
            return {"found": False, "instance": None}
        try:
            changed = await self._begin(held.uuid, Action.DELETE, request_id)
        except Conflict:
            now_held = await self.db.read(store.get, held.uuid)
            if now_held is None or not now_held.deleted:
                raise
            changed = now_held
        return {"found": True, "instance": changed.to_wire()}

    async def _begin(self, uuid: str, action: Action, request_id: str) -> Instance:
        now = self.clock.wall()
        changed = await self.db.write(
            store.change,
            uuid,
            lambda held: begin(held, action, now),
            request_id=request_id,
            method="instance_action",
        )
        self._changed()
        if self.driver is not None:
            self.driver.schedule(changed)
        return changed

    async def hosts(self, call: Call) -> dict[str, Any]:
        """This cell's hosts with their used and total resources."""
        return {"hosts": [host.as_dict() for host in await self.db.read(hosts_store.list_hosts)]}

    def methods(self) -> list[Method]:
        targeted = frozenset({Kind.TARGETED})
        from_parent = frozenset({"parent"})
        action_params = {"uuid": Param(str), "action": Param(str), "request_id": Param(str)}
        return [
            Method(
                "build",
                self.build,
                kinds=targeted,
                allowed=from_parent,
                params={
                    "instance": Param(dict),
                    "hints": Param(dict, required=False),
                    "valid_until": Param(float, required=False),
                    "request_id": Param(str),
                    "image_properties": Param(dict, required=False),
                },
            ),
            Method(
                "instance_action",
                self.instance_action,
                kinds=targeted,
                allowed=from_parent,
                params=action_params,
            ),
            Method(
                "instance_delete",
                self.instance_delete,
                kinds=frozenset({Kind.BROADCAST}),
                allowed=from_parent,
                params={"uuid": Param(str), "request_id": Param(str)},
            ),
            Method(
                "hosts",
                self.hosts,
                kinds=frozenset({Kind.TARGETED, Kind.BROADCAST}),
                allowed=frozenset({"parent", "admin"}),
            ),
        ]
