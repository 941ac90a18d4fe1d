"""What must hold once the faults stop and the tree has settled.

Each check returns the violations it found, as short sentences naming the
server or cell; an empty list is a pass. They read every cell's database
directly: the run is over, nothing is in flight.

* `servers`: every server a client was told about is in the API cell's
  index; where the index names a cell, that cell holds it with the same
  status, states, host and version; no server is alive in two cells, nor
  alive in a cell the index does not name.
* `deletes`: every delete the API cell accepted left the server DELETED in
  the index and alive nowhere.
* `claims`: each host's used memory, disk and vCPUs equal the servers alive
  on it: no build claimed twice (one request id built twice would), none
  leaked.
* `outbox`: no cell's outbox sequence repeated for different contents or
  went back (`SequenceWatch` sees every batch on the wire).
* `settled`: every outbox drained, every link up and every parent knowing
  each child alive, within the settling bound.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from zcells import codec
from zcells.db import hosts as hosts_store
from zcells.db import instances as store
from zcells.db import outbox as outbox_store
from zcells.errors import WireError
from zcells.instances import Instance
from zcells.liveness import Liveness
from zcells.messages import Targeted
from zcells.names import last_name
from zcells.peer import Peer, Role
from zcells.scheduling import own_capacity
from zcells.sim.tree import TOP, SimTree
from zcells.sim.workload import Told

_COMPARED = ("status", "vm_state", "task_state", "power_state", "host", "version")


def every_instance(tree: SimTree, name: str) -> dict[str, Instance]:
    """Everything cell `name` holds, deleted ones included."""
    held: dict[str, Instance] = {}
    marker = None
    db = tree.cells[name].db
    for _ in range(10_000):
        page = store.list_instances(db, include_deleted=True, limit=1000, marker=marker)
        held.update((i.uuid, i) for i in page)
        if len(page) < 1000:
            break
        marker = page[-1].uuid
    return held


def _fields(instance: Instance) -> tuple[object, ...]:
    return tuple(getattr(instance, f) for f in _COMPARED)


def servers(tree: SimTree, told: Told) -> list[str]:
    found: list[str] = []
    top = every_instance(tree, TOP)
    own: dict[str, dict[str, Instance]] = {
        name: every_instance(tree, name) for name in tree.shape.names if name != TOP
    }
    for uuid in sorted(told.created):
        if uuid not in top:
            found.append(f"{uuid}: a client was told of it; the index does not hold it")
    found += _one_server_per_request(told)
    alive: dict[str, list[str]] = {}
    for name, held in own.items():
        for uuid, instance in held.items():
            if not instance.deleted:
                alive.setdefault(uuid, []).append(name)
    found += _alive_once(tree, alive, top)
    for uuid, indexed in sorted(top.items()):
        if indexed.cell is None:
            if not indexed.deleted and indexed.status != "ERROR":
                found.append(f"{uuid}: in no cell, yet {indexed.status} in the index")
            continue
        name = last_name(indexed.cell)
        record = own.get(name, {}).get(uuid)
        if record is None:
            found.append(f"{uuid}: the index names {indexed.cell}, which does not hold it")
        elif _fields(record) != _fields(indexed):
            found.append(f"{uuid}: index {_fields(indexed)} != {indexed.cell} {_fields(record)}")
    return found


def _one_server_per_request(told: Told) -> list[str]:
    """Every create asks for one server: a request id answered with two was built twice."""
    by_request: dict[str, list[str]] = {}
    for uuid, request_id in told.created.items():
        by_request.setdefault(request_id, []).append(uuid)
    return [
        f"request {request_id}: answered with {len(made)} servers: {sorted(made)}"
        for request_id, made in sorted(by_request.items())
        if len(made) > 1
    ]


def _alive_once(tree: SimTree, alive: dict[str, list[str]], top: dict[str, Instance]) -> list[str]:
    found = []
    for uuid, cells in sorted(alive.items()):
        if len(cells) > 1:
            found.append(f"{uuid}: alive in {len(cells)} cells: {', '.join(cells)}")
        indexed = top.get(uuid)
        where = tree.shape.path[cells[0]]
        if indexed is None or indexed.cell != where:
            under = indexed and indexed.cell
            found.append(f"{uuid}: alive in {where}; the index has it under {under}")
    return found


def deletes(tree: SimTree, told: Told) -> list[str]:
    found: list[str] = []
    top = every_instance(tree, TOP)
    for uuid in sorted(told.deleted):
        indexed = top.get(uuid)
        if indexed is None or not indexed.deleted:
            found.append(f"{uuid}: delete accepted; the index has it {indexed and indexed.status}")
    return found


def claims(tree: SimTree) -> list[str]:
    found: list[str] = []
    for name in tree.shape.leaves():
        if name == TOP:
            continue
        db = tree.cells[name].db
        expected: dict[str, tuple[int, int, int]] = {}
        for instance in every_instance(tree, name).values():
            if instance.deleted or instance.host is None:
                continue
            m, d, v = expected.get(instance.host, (0, 0, 0))
            expected[instance.host] = (
                m + instance.memory_mb,
                d + instance.disk_gb,
                v + instance.vcpus,
            )
        for host in hosts_store.list_hosts(db):
            used = (host.memory_mb_used, host.disk_gb_used, host.vcpus_used)
            if used != expected.get(host.name, (0, 0, 0)):
                want = expected.get(host.name, (0, 0, 0))
                found.append(f"{name}/{host.name}: used {used}, its servers need {want}")
    return found


@dataclass
class SequenceWatch:
    """Watches every `updates` batch on the wire: a cell's sequence never repeats or goes back."""

    seen: dict[tuple[str, int], bytes] = field(default_factory=dict)  # (cell, seq) -> digest
    highest: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    batches: int = 0

    def observe(self, sender: str, receiver: str, frames: list[bytes]) -> None:
        if b"updates" not in frames[0]:
            return
        try:
            message = codec.decode(frames)
            if not isinstance(message, Targeted) or message.method != "updates":
                return
            rows = message.body.get("rows")
        except WireError:  # malformed: the receiver refuses it, nothing is applied
            return
        if not isinstance(rows, list):
            return
        self.batches += 1
        for row in rows:
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], int)):
                continue
            seq, kind, payload = row
            digest = hashlib.blake2b(repr((kind, payload)).encode(), digest_size=8).digest()
            before = self.seen.get((sender, seq))
            if before is None:
                if seq <= self.highest.get(sender, 0):
                    self.violations.append(f"{sender}: new row at {seq}, below one sent before")
                self.seen[(sender, seq)] = digest
                self.highest[sender] = max(self.highest.get(sender, 0), seq)
            elif before != digest:
                self.violations.append(f"{sender}: sequence {seq} sent with two contents")


def unsettled(tree: SimTree) -> list[str]:
    """Why the tree has not settled yet: outboxes not drained, links down, children unseen."""
    found: list[str] = []
    for name in tree.shape.names:
        cell = tree.cells[name]
        if not cell.up or cell.transport is None:
            found.append(f"{name}: down")
            continue
        if name != TOP:
            if not cell.transport.parents_up():
                found.append(f"{name}: link to its parent down")
            backlog, _ = outbox_store.outbox_backlog(cell.db)
            if backlog:
                found.append(f"{name}: {backlog} outbox rows not acknowledged")
    return found


def children_seen(tree: SimTree, liveness: dict[str, dict[Peer, Liveness]]) -> list[str]:
    found = []
    for name, children in tree.shape.children.items():
        seen = liveness.get(name, {})
        for child in children:
            state = seen.get(Peer(Role.CHILD, child))
            if state is not Liveness.ALIVE:
                found.append(f"{name}: sees child {child} as {state and state.value}")
    return found


def announced(tree: SimTree) -> list[str]:
    """Where a parent's view of a child differs from what the child says of its subtree.

    The child's own capacity is read afresh from its database, and its
    subtree is that plus its counted children's announcements, as it would
    announce it now: after settling, each parent must hold exactly that.
    """
    found = []
    for parent, children in tree.shape.children.items():
        held = tree.scheduling.get(parent)
        for child in children:
            own = tree.scheduling.get(child)
            if held is None or own is None:
                found.append(f"{parent} or {child}: not running")
                continue
            cell = tree.cells[child]
            if cell.transport is not None and own.own_known:
                fresh = own_capacity(cell.db, own.settings.reserve_percent)
                if fresh != own.own:
                    found.append(f"{child}: its own capacity changed and was not read again")
                    continue
            capacity, capabilities = own.subtree()
            told = held.views.latest.get(child)
            if told is None:
                found.append(f"{parent}: has heard nothing from {child}")
            elif told.capacity != capacity or dict(told.capabilities) != capabilities:
                found.append(f"{parent}: its view of {child} is not what {child} says now")
    return found


def first(found: Iterable[str], limit: int = 5) -> list[str]:
    return list(found)[:limit]
