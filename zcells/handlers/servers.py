"""The front door: what clients ask of servers, flavors, hosts and the tree.

Rules kept here (DESIGN.md §5, §8):

* Who asks decides what they see: a `member` or `reader` sees its own
  project's servers only, and another project's server answers exactly like
  a missing one; an `admin` sees every project with `all_projects`, and
  alone may pass scheduler hints, manage flavors, list hosts and resync.
* `server_create` answers at once: the instances are written to the index
  (one transaction, idempotent by request id) and built in the background.
* A client's request id is its own: the top logs it, and sends it down,
  scoped to the client (and, for an action, to the server), so one client
  can neither replay another's answer nor have a cell answer it about
  another server.
* Actions go to the cell recorded for the server. A delete of a server whose
  cell is not known yet goes down as a broadcast ("delete everywhere"); only
  when every cell answered and none holds it does the top record the delete
  itself. If a cell did not answer, nothing is recorded and the client is
  told to try again: that cell may hold the server. Deleting a server the
  top deleted itself answers its record again; there is nothing left to do.
* A handler that asks other cells gives them the time its request has left,
  less a margin, so a silent cell becomes a partial result, not a timeout of
  the whole request.
* A compute cell answers `server_list` and `server_show` from its own full
  records, so an operator can compare a cell with the top; it creates and
  acts on nothing for clients.
* What one caller can make a cell hold or send is bounded: a create is
  checked against the project's quotas in the transaction that writes it
  (`zcells.quotas`), metadata against ``[quota]``'s item and byte limits, and
  a listing page against `page_bytes` as well as its count, so every answer
  fits a frame.
"""

from __future__ import annotations

import hashlib
from typing import Any, TypeGuard

from zcells import entropy
from zcells.builds import TopBuilds, check_hints, time_left_s
from zcells.codec import packb
from zcells.config import QuotaConfig, section_defaults
from zcells.db import catalog
from zcells.db import hosts as hosts_store
from zcells.db import instances as store
from zcells.db import quotas as quotas_store
from zcells.dbrunner import DbRunner
from zcells.errors import (
    CallTimeout,
    CellUnreachable,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFoundRemote,
    QuotaExceeded,
    SchemaError,
    UsageError,
    WireError,
)
from zcells.handlers.catalog import flavor_named
from zcells.handlers.compute import check_action, check_request_id
from zcells.handlers.state import resync_subtree
from zcells.instances import (
    STATUSES,
    Action,
    Instance,
    VmState,
    begin,
    check_metadata,
    finish,
    new_instance,
)
from zcells.messages import Kind, Outcome
from zcells.methods import Call, Method, Param
from zcells.names import check_name
from zcells.port import CellPort
from zcells.quotas import Quota
from zcells.routing import is_below

MAX_COUNT = 1000
MAX_PAGE = 1000
# The servers of one listing page in bytes, well inside the frame limit: a page ends
# early, with a marker, rather than make an answer too large to send.
PAGE_BYTES = 512 * 1024
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
        node: CellPort,
        db: DbRunner,
        builds: TopBuilds,
        *,
        top: bool,
        quota: QuotaConfig | None = None,
        page_bytes: int = PAGE_BYTES,
    ) -> None:
        self.node = node
        self.db = db
        self.builds = builds
        self.top = top
        self.quota: QuotaConfig = quota or section_defaults("quota")
        self.default_quota = Quota(self.quota.servers, self.quota.vcpus, self.quota.ram_mb)
        self.page_bytes = page_bytes
        self.clock = node.clock

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
        views: list[dict[str, Any]] = []
        size = 0
        for instance in found[:limit]:
            view = instance.view()
            size += len(packb(view))
            if views and size > self.page_bytes:
                break
            views.append(view)
        more = len(found) > len(views)
        return {"servers": views, "next_marker": views[-1]["uuid"] if more else None}

    async def server_show(self, call: Call) -> dict[str, Any]:
        uuid = call.args["uuid"]
        return _visible(call, await self.db.read(store.get, uuid), uuid).view()

    # -- create -------------------------------------------------------------------------

    async def server_create(self, call: Call) -> dict[str, Any]:
        self._require_top(call)
        args = call.args
        if args["hints"] and _role(call) != "admin":
            raise Forbidden("only an admin may pass scheduler hints", call.cell)
        hints = check_hints(args["hints"] or {})
        count = args["count"]
        if not 0 < count <= MAX_COUNT:
            raise InvalidRequest(f"count must be 1 to {MAX_COUNT}")
        metadata = self._metadata(args["metadata"] or {}, call.cell)
        flavor = await flavor_named(self.db, args["flavor"])
        if await self.db.read(catalog.get_image, args["image"]) is None:
            raise NotFoundRemote(f"no image {args['image'][:64]!r}")
        request_id = _request_id(call, args["request_id"])
        now = self.clock.wall()
        try:
            wanted = [
                new_instance(
                    uuid=entropy.uuid4(),
                    name=args["name"] if count == 1 else f"{args['name']}-{i}",
                    project=_project(call),
                    user=_client(call),
                    flavor=flavor.name,
                    memory_mb=flavor.memory_mb,
                    disk_gb=flavor.disk_gb,
                    vcpus=flavor.vcpus,
                    image=args["image"],
                    metadata=metadata,
                    now=now,
                )
                for i in range(1, count + 1)
            ]
        except WireError as exc:
            raise InvalidRequest(exc.message, call.cell) from None
        limited = _role(call) != "admin" or self.quota.limit_admins
        created = await self.db.write(
            store.index_create,
            wanted,
            request_id,
            hints,
            quota=self.default_quota if limited else None,
        )
        for instance in created:
            self.builds.start(instance, hints)
        return {"servers": [instance.uuid for instance in created]}

    def _metadata(self, raw: dict[str, Any], cell: str) -> dict[str, str]:
        """A create's metadata, within `[quota]`'s item and byte limits."""
        try:
            metadata = check_metadata(raw)
        except WireError as exc:
            raise InvalidRequest(exc.message, cell) from None
        if len(metadata) > self.quota.metadata_items:
            raise QuotaExceeded(
                f"quota exceeded: {len(metadata)} metadata items, at most "
                f"{self.quota.metadata_items}",
                cell,
            )
        size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
        if size > self.quota.metadata_bytes:
            raise QuotaExceeded(
                f"quota exceeded: metadata of {size} bytes, at most {self.quota.metadata_bytes}",
                cell,
            )
        return metadata

    # -- quotas -----------------------------------------------------------------------------

    async def quota_show(self, call: Call) -> dict[str, Any]:
        """A project's limits and what it holds: any project for an admin, else its own."""
        self._require_top(call)
        project = call.args["project"] or _project(call)
        if _role(call) != "admin" and project != _project(call):
            raise Forbidden("a member sees its own project's quota only", call.cell)
        limits, own, held = await self.db.read(quotas_store.show, project, self.default_quota)
        return {
            "project": project,
            "quota": limits.as_dict(),
            "own": own,
            "in_use": held.as_dict(),
        }

    async def quota_set(self, call: Call) -> dict[str, Any]:
        """Set a project's own limits (-1: none); a limit given as nil goes back to the default."""
        self._require_top(call)
        project = call.args["project"]
        try:
            check_name("project", project)
            limits = call.args["limits"]
            if not limits or not all(v is None or type(v) is int for v in limits.values()):
                raise ValueError("limits: a map of quota names to integers (or nil)")
            await self.db.write(quotas_store.set_limits, project, limits)
        except (ValueError, UsageError) as exc:
            raise InvalidRequest(str(exc), call.cell) from None
        return await self.quota_show(call)

    # -- actions ------------------------------------------------------------------------

    async def server_action(self, call: Call) -> dict[str, Any]:
        self._require_top(call)
        if _role(call) not in WRITERS:
            raise Forbidden(f"a {_role(call) or 'cell'} may not act on servers", call.cell)
        action = check_action(call.args["action"])
        uuid = call.args["uuid"]
        held = _visible(call, await self.db.read(store.get, uuid), uuid)
        request_id = _request_id(call, call.args["request_id"], uuid)
        if held.cell is None:
            if action is not Action.DELETE:
                state = (
                    "still being scheduled"
                    if held.vm_state is VmState.BUILDING
                    else f"{held.vm_state.value} and in no cell"
                )
                raise Conflict(f"cannot {action.value} server {uuid}: it is {state}", call.cell)
            gone = await self._delete_everywhere(held, request_id, call.deadline)
            if gone is not None:
                return gone
            # Placed while the cells were asked: delete it where it is now.
            held = _visible(call, await self.db.read(store.get, uuid), uuid)
            if held.cell is None:
                raise Conflict(f"server {uuid} changed while it was deleted: try again", call.cell)
        body = {"uuid": uuid, "action": action.value, "request_id": request_id}
        timeout_s = time_left_s(self.node, call.deadline)
        answer = (
            await self.node.call("instance_action", body, target=held.cell, timeout_s=timeout_s)
        ).unwrap()
        changed = Instance.from_wire(answer.get("instance") if isinstance(answer, dict) else None)
        if changed.uuid != uuid or changed.cell != held.cell:
            raise InvalidRequest(f"{held.cell} answered for another instance", call.cell)
        await self.db.write(store.index_put, changed)
        return changed.view()

    async def _delete_everywhere(
        self, held: Instance, request_id: str, deadline: float
    ) -> dict[str, Any] | None:
        """Delete a server the top holds in no cell: wherever it is, or here if nowhere.

        None if the index took a cell for it meanwhile, so nothing was recorded here.
        """
        if held.deleted:  # the top deleted it itself before: nothing is left to do
            return held.view()
        body = {"uuid": held.uuid, "request_id": request_id}
        timeout_s = time_left_s(self.node, deadline)
        silent: list[str] = []
        for result in await self.node.broadcast("instance_delete", body, timeout_s=timeout_s):
            value = result.value if result.outcome is Outcome.OK else None
            if result.error is not None and result.error.code == Conflict.code:
                raise result.error  # the cell holds it and refused: say why
            if not isinstance(value, dict) or type(value.get("found")) is not bool:
                silent.append(result.cell)
                continue
            if not value["found"]:
                continue
            changed = Instance.from_wire(value.get("instance"))
            if changed.uuid == held.uuid and changed.cell and is_below(changed.cell, result.cell):
                await self.db.write(store.index_put, changed)
                return changed.view()
            silent.append(result.cell)
        if silent:
            raise CellUnreachable(
                f"server {held.uuid} is in no cell the top knows of, and "
                f"{', '.join(sorted(silent)[:10])} did not say whether it holds it: "
                "nothing was deleted; try again"
            )
        # Every cell answered and none holds it: the top records the delete itself.
        now = self.clock.wall()
        gone = finish(begin(held, Action.DELETE, now), now)
        if not await self.db.write(store.index_put, gone):
            return None
        stored = await self.db.read(store.get, held.uuid)
        return (stored or gone).view()  # as stored: a repeat answers the same

    # -- hosts, resync (flavors and images: zcells.handlers.catalog) ---------------------

    async def host_list(self, call: Call) -> dict[str, Any]:
        """Every host of the tree below this cell (or of one subtree), gathered by broadcast."""
        wanted = call.args["cell"]
        if wanted is not None and not is_below(wanted, call.cell):
            raise InvalidRequest(f"{wanted[:200]} is not {call.cell} or below it", call.cell)
        hosts: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        if self.builds.placer.driver is not None:
            own = await self.db.read(hosts_store.list_hosts)
            hosts += [{"cell": call.cell, **host.as_dict()} for host in own]
        timeout_s = time_left_s(self.node, call.deadline)
        for result in await self.node.broadcast("hosts", {}, timeout_s=timeout_s):
            rows = result.value.get("hosts") if isinstance(result.value, dict) else None
            if result.outcome is Outcome.OK and _host_rows(rows):
                # The cell that answered names the hosts' cell, whatever the rows say.
                hosts += [{**h, "cell": result.cell} for h in rows]
            elif result.outcome is Outcome.OK:
                errors.append({"cell": result.cell, "error": SchemaError.code})
            else:
                code = result.error.code if result.error is not None else CallTimeout.code
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
        resynced = await resync_subtree(self.node, target, time_left_s(self.node, call.deadline))
        return {"cell": target, **resynced}

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
            Method(
                "quota_show",
                self.quota_show,
                kinds=targeted,
                allowed=READERS,
                params={"project": optional_str},
            ),
            Method(
                "quota_set",
                self.quota_set,
                kinds=targeted,
                allowed=ADMIN,
                params={"project": Param(str), "limits": Param(dict)},
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


def _host_rows(rows: Any) -> TypeGuard[list[dict[str, Any]]]:
    """Whether a cell's `hosts` answer is a list of host rows, each named."""
    return type(rows) is list and all(
        type(row) is dict and type(row.get("name")) is str for row in rows
    )


def _context_request_id(call: Call) -> str:
    return call.context.request_id if call.context is not None else entropy.uuid4()


def _request_id(call: Call, given: str | None, *about: str) -> str:
    """The id a client's request is logged and sent down under: scoped to the client.

    The client's own id (or, without one, the id of its message) is hashed
    with the client's name and what the request is about, so that the same
    id from another client, or for another server, is another request.
    """
    raw = check_request_id(given or _context_request_id(call))
    scope = "\0".join((_client(call), *about, raw)).encode()
    return "c-" + hashlib.blake2b(scope, digest_size=16).hexdigest()
