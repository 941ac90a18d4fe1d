"""The front door: what clients ask of servers, flavors, hosts and the tree.

Rules kept here (DESIGN.md §5, §8):

* Who asks decides what they see: a `member` or `reader` sees its own
  project's servers only, and another project's server answers exactly like
  a missing one; an `admin` sees every project with `all_projects`, and
  alone may pass scheduler hints, manage flavors, list hosts and resync.
* `server_create` answers at once: the instances are written to the index
  (one transaction, idempotent by request id) and built in the background.
* Actions go to the cell recorded for the server. A delete of a server whose
  cell is not known yet goes down as a broadcast ("delete everywhere"); if
  no cell holds it, the top records the delete itself.
* A compute cell answers `server_list` and `server_show` from its own full
  records, so an operator can compare a cell with the top; it creates and
  acts on nothing for clients.
"""

from __future__ import annotations

import time
import uuid as uuid_module
from collections.abc import Callable
from typing import Any

from zcells.builds import TopBuilds, check_hints
from zcells.db import hosts as hosts_store
from zcells.db import instances as store
from zcells.db import registry
from zcells.dbrunner import DbRunner
from zcells.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFoundRemote,
    UsageError,
    WireError,
)
from zcells.handlers.compute import check_action, check_request_id
from zcells.instances import (
    STATUSES,
    Action,
    Instance,
    begin,
    finish,
    new_instance,
)
from zcells.messages import Kind, Outcome
from zcells.methods import Call, Method, Param
from zcells.node import Node
from zcells.records import Flavor
from zcells.routing import is_below

MAX_COUNT = 1000
MAX_PAGE = 1000
READERS = frozenset({"admin", "member", "reader"})
WRITERS = frozenset({"admin", "member"})
ADMIN = frozenset({"admin"})


def not_found(uuid: str) -> NotFoundRemote:
    """The one answer for a server that is missing or that the caller may not see."""
    return NotFoundRemote(f"no server {uuid[:64]}")


def _role(call: Call) -> str:
    return call.context.roles[0] if call.context is not None and call.context.roles else ""


def _client(call: Call) -> str:
    ctx = call.context
    if ctx is None or ctx.client is None:
        raise Forbidden("servers are for clients", call.cell)
    return ctx.client


def _project(call: Call) -> str:
    """The caller's project: the client's project, or its own name when it has none."""
    ctx = call.context
    if ctx is None or ctx.client is None:
        raise Forbidden("servers are for clients", call.cell)
    return ctx.project or ctx.client


def _visible(call: Call, instance: Instance | None, uuid: str) -> Instance:
    if instance is None or (_role(call) != "admin" and instance.project != _project(call)):
        raise not_found(uuid)
    return instance


class ServerHandlers:
    """Client requests about servers, at the API cell (all) or a compute cell (reads)."""

    def __init__(
        self,
        node: Node,
        db: DbRunner,
        builds: TopBuilds,
        *,
        top: bool,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.db = db
        self.builds = builds
        self.top = top
        self._clock = wall_clock

    def _require_top(self, call: Call) -> None:
        if not self.top:
            raise InvalidRequest(
                f"{call.cell} is a compute cell: ask the API cell for this", call.cell
            )

    # -- reads --------------------------------------------------------------------------

    async def server_list(self, call: Call) -> dict[str, Any]:
        args = call.args
        if args["all_projects"] and _role(call) != "admin":
            raise Forbidden("only an admin lists every project", call.cell)
        statuses = None
        if args["status"] is not None:
            status = args["status"].upper()
            if status not in STATUSES:
                raise InvalidRequest(f"unknown status {status[:20]!r}; known: {list(STATUSES)}")
            statuses = [status]
        limit = args["limit"]
        if not 0 < limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be 1 to {MAX_PAGE}")
        found = await self.db.read(
            store.list_instances,
            project=None if args["all_projects"] else _project(call),
            statuses=statuses,
            cell=args["cell"],
            name=args["name"],
            limit=limit + 1,
            marker=args["marker"],
        )
        page = found[:limit]
        return {
            "servers": [instance.view() for instance in page],
            "next_marker": page[-1].uuid if len(found) > limit else None,
        }

    async def server_show(self, call: Call) -> dict[str, Any]:
        uuid = call.args["uuid"]
        return _visible(call, await self.db.read(store.get, uuid), uuid).view()

    # -- create -------------------------------------------------------------------------

    async def server_create(self, call: Call) -> dict[str, Any]:
        self._require_top(call)
        args = call.args
        hints = check_hints(args["hints"] or {})
        if hints and _role(call) != "admin":
            raise Forbidden("only an admin may pass scheduler hints", call.cell)
        count = args["count"]
        if not 0 < count <= MAX_COUNT:
            raise InvalidRequest(f"count must be 1 to {MAX_COUNT}")
        flavor = await self._flavor(args["flavor"])
        request_id = check_request_id(args["request_id"] or _context_request_id(call))
        now = self._clock()
        try:
            wanted = [
                new_instance(
                    uuid=str(uuid_module.uuid4()),
                    name=args["name"] if count == 1 else f"{args['name']}-{i}",
                    project=_project(call),
                    user=_client(call),
                    flavor=flavor.name,
                    memory_mb=flavor.memory_mb,
                    disk_gb=flavor.disk_gb,
                    vcpus=flavor.vcpus,
                    image=args["image"],
                    metadata=args["metadata"] or {},
                    now=now,
                )
                for i in range(1, count + 1)
            ]
        except WireError as exc:
            raise InvalidRequest(exc.message, call.cell) from None
        created = await self.db.write(store.index_create, wanted, request_id)
        for instance in created:
            self.builds.start(instance, hints)
        return {"servers": [instance.uuid for instance in created]}

    async def _flavor(self, name: str) -> Flavor:
        for flavor in await self.db.read(registry.list_flavors):
            if flavor.name == name:
                return flavor
        raise NotFoundRemote(f"no flavor {name[:64]!r}")

    # -- actions ------------------------------------------------------------------------

    async def server_action(self, call: Call) -> dict[str, Any]:
        self._require_top(call)
        if _role(call) not in WRITERS:
            raise Forbidden(f"a {_role(call) or 'cell'} may not act on servers", call.cell)
        action = check_action(call.args["action"])
        uuid = call.args["uuid"]
        held = _visible(call, await self.db.read(store.get, uuid), uuid)
        request_id = check_request_id(call.args["request_id"] or _context_request_id(call))
        if held.cell is None:
            if action is not Action.DELETE:
                raise Conflict(f"server {uuid} has no cell yet: it is still being scheduled")
            return await self._delete_everywhere(held, request_id)
        body = {"uuid": uuid, "action": action.value, "request_id": request_id}
        answer = (await self.node.call("instance_action", body, target=held.cell)).unwrap()
        changed = Instance.from_wire(answer.get("instance") if isinstance(answer, dict) else None)
        if changed.uuid != uuid or changed.cell != held.cell:
            raise InvalidRequest(f"{held.cell} answered for another instance", call.cell)
        await self.db.write(store.index_put, changed)
        return changed.view()

    async def _delete_everywhere(self, held: Instance, request_id: str) -> dict[str, Any]:
        body = {"uuid": held.uuid, "request_id": request_id}
        for result in await self.node.broadcast("instance_delete", body):
            value = result.value if result.outcome is Outcome.OK else None
            if not isinstance(value, dict) or not value.get("found"):
                continue
            changed = Instance.from_wire(value.get("instance"))
            if changed.uuid == held.uuid and changed.cell and is_below(changed.cell, result.cell):
                await self.db.write(store.index_put, changed)
                return changed.view()
        # No cell holds it: the top records the delete itself.
        now = self._clock()
        gone = finish(begin(held, Action.DELETE, now), now)
        await self.db.write(store.index_put, gone)
        return gone.view()

    # -- flavors, hosts, resync -----------------------------------------------------------

    async def flavor_list(self, call: Call) -> dict[str, Any]:
        return {"flavors": [f.as_dict() for f in await self.db.read(registry.list_flavors)]}

    async def flavor_create(self, call: Call) -> dict[str, Any]:
        self._require_top(call)
        args = call.args
        flavor = Flavor(args["name"], args["ram"], args["disk"], args["vcpus"])
        try:
            await self.db.write(registry.create_flavor, flavor)
        except AlreadyExists as exc:
            raise Conflict(str(exc), call.cell) from None
        except UsageError as exc:
            raise InvalidRequest(str(exc), call.cell) from None
        return flavor.as_dict()

    async def host_list(self, call: Call) -> dict[str, Any]:
        """Every host of the tree below this cell (or of one subtree), gathered by broadcast."""
        wanted = call.args["cell"]
        hosts: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        if self.builds.placer.driver is not None:
            own = await self.db.read(hosts_store.list_hosts)
            hosts += [{"cell": call.cell, **host.as_dict()} for host in own]
        for result in await self.node.broadcast("hosts", {}):
            if result.outcome is Outcome.OK and isinstance(result.value, dict):
                hosts += [{"cell": result.cell, **h} for h in result.value.get("hosts", [])]
            else:
                code = result.error.code if result.error is not None else "E_TIMEOUT"
                errors.append({"cell": result.cell, "error": code})
        if wanted is not None:
            hosts = [h for h in hosts if is_below(h["cell"], wanted)]
            errors = [e for e in errors if is_below(e["cell"], wanted)]
        return {"hosts": sorted(hosts, key=lambda h: (h["cell"], h["name"])), "errors": errors}

    async def cell_sync(self, call: Call) -> dict[str, Any]:
        """Force a full resync of a subtree into the API cell."""
        self._require_top(call)
        target = call.args["cell"]
        if target == call.cell:
            raise InvalidRequest("name a cell below the API cell to resync", call.cell)
        answer = (await self.node.call("resync", {}, target=target)).unwrap()
        return {"cell": target, "result": answer}

    def methods(self) -> list[Method]:
        targeted = frozenset({Kind.TARGETED})
        optional_str = Param(str, required=False)
        return [
            Method(
                "server_list",
                self.server_list,
                kinds=targeted,
                allowed=READERS,
                params={
                    "status": optional_str,
                    "cell": optional_str,
                    "name": optional_str,
                    "marker": optional_str,
                    "limit": Param(int, required=False, default=MAX_PAGE),
                    "all_projects": Param(bool, required=False, default=False),
                },
            ),
            Method(
                "server_show",
                self.server_show,
                kinds=targeted,
                allowed=READERS,
                params={"uuid": Param(str)},
            ),
            Method(
                "server_create",
                self.server_create,
                kinds=targeted,
                allowed=WRITERS,
                params={
                    "name": Param(str),
                    "flavor": Param(str),
                    "image": Param(str),
                    "count": Param(int, required=False, default=1),
                    "hints": Param(dict, required=False),
                    "metadata": Param(dict, required=False),
                    "request_id": optional_str,
                },
            ),
            Method(
                "server_action",
                self.server_action,
                kinds=targeted,
                allowed=WRITERS,
                params={"uuid": Param(str), "action": Param(str), "request_id": optional_str},
            ),
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
            Method(
                "host_list",
                self.host_list,
                kinds=targeted,
                allowed=ADMIN,
                params={"cell": optional_str},
            ),
            Method(
                "cell_sync",
                self.cell_sync,
                kinds=targeted,
                allowed=ADMIN,
                params={"cell": Param(str)},
            ),
        ]


def _context_request_id(call: Call) -> str:
    return call.context.request_id if call.context is not None else str(uuid_module.uuid4())
