"""Build routing: where an instance goes, one cell level at a time (DESIGN.md §5).

Rules kept here:

* At each level the cell scheduler orders the candidates: this cell's
  enabled, reachable children, and the cell itself when it has hosts. The
  first candidate that takes the build wins; every other failure is noted
  and the next candidate is tried.
* A candidate takes the build only once it has persisted the instance and
  claimed a host for it: `build` is a targeted call acknowledged after that
  transaction, never before.
* Taking the build here means the host scheduler orders the hosts and the
  claim, the instance row and its outbox row are one transaction. The hosts
  it orders are a view kept in memory (`HostView`), read again from the
  database at least every `HOST_VIEW_S` and before any build is refused:
  the database's conditional claim stays the only judge of room.
* The top cell retries rounds of candidates `scheduler_retries` times,
  `scheduler_retry_delay` apart; lower cells try each candidate once and
  let the failure go back up so the level above can try elsewhere.
* When every try failed, the error says why for each cell tried:
  `NoValidHost` when every cell lacked a host, else `NoCellsAvailable`. A
  cell with no hosts of its own and no cells below it has no host to offer:
  `NoValidHost`, not "no cell available".
* A child's acknowledgement is checked: the same instance, placed in that
  child's subtree.
* A call made on behalf of a request gets the time that request has left,
  less a margin, so the caller answers with what it learnt instead of
  timing out itself (`time_left_s`).
* Only an instance still waiting to be scheduled is built. One the top has
  marked deleted while its build was in flight may be placed all the same;
  the copy in the cell that took it is noted as an orphan, and
  `zcells.orphans` deletes it there until that cell acknowledges.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from zcells import logs
from zcells.cellfilters import BuildSpec, Decision
from zcells.cellsched import HERE, MAX_RETRIES, MAX_SUMMARY_LENGTH, BuildAttempts, retry_plan
from zcells.compute import FakeDriver
from zcells.db import hosts as hosts_store
from zcells.db import instances as store
from zcells.db import orphans as orphans_store
from zcells.db.engine import Database
from zcells.dbrunner import DbRunner
from zcells.errors import (
    CallTimeout,
    InvalidRequest,
    NoCellsAvailable,
    NoValidHost,
    SchemaError,
    SenderMismatch,
    ValidationError,
    WireError,
)
from zcells.hostsched import choose_hosts, no_valid_host
from zcells.instances import Fault, Instance, TaskState, VmState, failed, placed
from zcells.names import check_cell_path, child_path
from zcells.port import CellPort
from zcells.records import Flavor, Host, Resources
from zcells.routing import forward_budget_ms, is_below
from zcells.scheduling import CellScheduling
from zcells.supervisor import Supervisor

log = logs.get_logger("builds")

# target_cell: a cell path; different_cell and same_cell: cell paths, joined by commas.
HINTS = frozenset({"target_cell", "different_cell", "same_cell"})
MAX_HINT_PATHS = 16
HOST_VIEW_S = 1.0
ASKS = 2  # tries of a build at one child that times out, before another child is tried
# The cells' wall clocks are trusted to agree within this (as NTP keeps them): a
# parent waits this long past a build's lease before it builds elsewhere.
FENCE_MARGIN_S = 2.0


def time_left_s(node: CellPort, deadline: float | None) -> float | None:
    """The time a call made before `deadline` (node clock) may take; None: no deadline.

    A margin is kept, as each hop of a forwarded request keeps one, so the
    call's own timeout comes back before the request it serves runs out.
    """
    if deadline is None:
        return None
    left_ms = max(0, int((deadline - node.clock.now()) * 1000))
    return forward_budget_ms(left_ms) / 1000.0


def orphan_request_id(uuid: str) -> str:
    """The request id of the delete that removes a copy of `uuid` the index does not hold."""
    return f"orphan-{uuid}"


def waiting_to_be_scheduled(instance: Instance) -> bool:
    return instance.vm_state is VmState.BUILDING and instance.task_state is TaskState.SCHEDULING


def check_hints(hints: Mapping[str, Any]) -> dict[str, str]:
    """Scheduler hints a build accepts, each checked: `target_cell` (one full cell path),
    `different_cell` and `same_cell` (full cell paths joined by commas)."""
    unknown = sorted(str(k)[:40] for k in hints if k not in HINTS)
    if unknown:
        raise InvalidRequest(f"unknown scheduler hints {unknown}; known: {sorted(HINTS)}")
    for key, value in hints.items():
        if type(value) is not str or not value:
            raise InvalidRequest(f"hint {key!r} must be a non-empty string")
        paths = [value] if key == "target_cell" else value.split(",")
        if len(paths) > MAX_HINT_PATHS:
            raise InvalidRequest(f"hint {key!r} names more than {MAX_HINT_PATHS} cells")
        for path in paths:
            try:
                check_cell_path(path)
            except ValidationError as exc:
                raise InvalidRequest(f"hint {key!r}: {exc}") from None
    return dict(hints)


def build_spec(
    instance: Instance, hints: Mapping[str, str], image_properties: Mapping[str, str]
) -> BuildSpec:
    """What the cell scheduler weighs a build of `instance` by."""
    flavor = Flavor(instance.flavor, instance.memory_mb, instance.disk_gb, instance.vcpus)
    return spec_of(flavor, hints, image_properties)


def spec_of(
    flavor: Flavor, hints: Mapping[str, str], image_properties: Mapping[str, str]
) -> BuildSpec:
    """What the cell scheduler weighs a build by: its sizes, its image, its (checked) hints."""
    return BuildSpec(
        flavor=flavor,
        image_properties=dict(image_properties),
        target_cell=hints.get("target_cell"),
        different_cell=_paths(hints.get("different_cell")),
        same_cell=_paths(hints.get("same_cell")),
    )


def _paths(value: str | None) -> frozenset[str]:
    return frozenset(p for p in (value or "").split(",") if p)


class Placer:
    """Places instances from this cell: here on a host, or through one of its children."""

    def __init__(
        self,
        node: CellPort,
        db: DbRunner,
        scheduling: CellScheduling,
        driver: FakeDriver | None,
        changed: Callable[[], None],
        call_timeout_s: float = 60.0,
    ) -> None:
        self.node = node
        self.db = db
        self.call_timeout_s = call_timeout_s  # a call to a child with no deadline of its own
        self.scheduling = scheduling
        self.driver = driver  # None: this cell has no hosts of its own
        self._changed = changed
        self.clock = node.clock
        self.hosts = HostView(clock=node.clock.now)

    def decide(self, spec: BuildSpec, here: str) -> Decision:
        """The cell scheduler's decision for `spec` at this cell, as it stands now."""
        return self.scheduling.decide(spec, here, self.driver is not None)

    async def place(
        self,
        instance: Instance,
        hints: Mapping[str, str],
        request_id: str,
        here: str,
        plan: Sequence[float],
        wanted: Callable[[], Awaitable[bool]] | None = None,
        deadline: float | None = None,
        valid_until: float | None = None,
        image_properties: Mapping[str, str] | None = None,
    ) -> Instance:
        """The instance as placed in this cell's subtree; `NoValidHost`/`NoCellsAvailable` if not.

        `plan` holds the pause before each round of tries; `wanted`, if given,
        is asked before each round but the first whether the build should go
        on at all (the caller has just seen the instance waiting, and asking
        again would cost a read per build; a delete that comes in between is
        met after the placement, as any delete during one is);
        `deadline` (node clock), if given, bounds each call to a child;
        `valid_until` (wall clock), the lease of the build this cell was sent,
        if given: nothing is placed after it, here or below.

        Each round asks the cell scheduler afresh. When its filters leave no
        candidate the build fails at once, with what each filter removed: no
        cell is asked, and no later round is waited for. Candidates that were
        expected to fit and did not are tried again round after round.
        """
        properties = dict(image_properties or {})
        spec = build_spec(instance, hints, properties)
        attempts = BuildAttempts()
        decision: Decision | None = None
        for round_, delay in enumerate(plan):
            if delay > 0:
                await self.clock.sleep(delay)
            if round_ > 0 and wanted is not None and not await wanted():
                raise InvalidRequest(f"instance {instance.uuid} was deleted while scheduling")
            decision = self.decide(spec, here)
            if not decision:
                break
            for name in decision:  # drawn one at a time: the next only if this one failed
                try:
                    if name == HERE:
                        return await self._place_here(instance, request_id, here, valid_until)
                    taken = await self._place_below_once(
                        instance, hints, request_id, here, name, deadline, valid_until, properties
                    )
                    # Off the view until the child speaks again; a try that failed takes
                    # nothing off (a refused build of a huge flavor would zero a child).
                    self.scheduling.placed(name, spec.flavor)
                    return taken
                except WireError as exc:
                    attempts.tried(name, exc.code, exc.message)
                    logs.event(
                        log,
                        logging.INFO,
                        "build.refused",
                        uuid=instance.uuid,
                        candidate=name,
                        code=exc.code,
                        error=exc.message,
                    )
        raise _nowhere(here, spec, attempts, decision)

    async def _place_here(
        self, instance: Instance, request_id: str, here: str, valid_until: float | None
    ) -> Instance:
        assert self.driver is not None
        need = Resources(instance.memory_mb, instance.disk_gb, instance.vcpus)
        now = self.clock.wall()
        hosts, taken = await self.db.write(
            _choose_and_place,
            self.hosts,
            need,
            lambda host: placed(instance, here, host, now),
            request_id,
            (valid_until, self.clock.wall),
        )
        if taken is None:
            raise no_valid_host(hosts, need, here)
        self.scheduling.placed(HERE, build_spec(instance, {}, {}).flavor)
        self._changed()
        self.driver.schedule(taken)
        return taken

    async def _place_below_once(
        self,
        instance: Instance,
        hints: Mapping[str, str],
        request_id: str,
        here: str,
        child: str,
        deadline: float | None,
        valid_until: float | None,
        image_properties: Mapping[str, str],
    ) -> Instance:
        """Build through `child`, and know it did not when this returns an error.

        A child that timed out may have placed the instance all the same. The
        same request id is one placement there (`ComputeHandlers.build`), so
        it is asked again, which learns where the first try went. If that
        times out too, the build is fenced: every ask carried a lease
        (`valid_until`, wall clock) past which no cell places it, and this
        waits until the last lease sent has run out, with `FENCE_MARGIN_S`
        for the cells' clocks, before the caller tries another cell.
        """
        leases: list[float] = []
        for asked in range(ASKS):
            timeout_s = time_left_s(self.node, deadline)
            if timeout_s is None:
                timeout_s = self.call_timeout_s
            lease = self.clock.wall() + timeout_s
            if valid_until is not None:
                lease = min(lease, valid_until)
            leases.append(lease)
            try:
                return await self._place_below(
                    instance, hints, request_id, here, child, timeout_s, lease, image_properties
                )
            except CallTimeout:
                if asked + 1 < ASKS:
                    logs.event(
                        log, logging.INFO, "build.ask_again", uuid=instance.uuid, candidate=child
                    )
                    continue
                fenced_in = max(leases) + FENCE_MARGIN_S - self.clock.wall()
                logs.event(
                    log,
                    logging.WARNING,
                    "build.fenced",
                    uuid=instance.uuid,
                    candidate=child,
                    wait_s=round(max(0.0, fenced_in), 1),
                )
                if fenced_in > 0:
                    await self.clock.sleep(fenced_in)
                raise
        raise AssertionError("unreachable: the last ask returns or raises")

    async def _place_below(
        self,
        instance: Instance,
        hints: Mapping[str, str],
        request_id: str,
        here: str,
        child: str,
        timeout_s: float | None = None,
        lease: float | None = None,
        image_properties: Mapping[str, str] | None = None,
    ) -> Instance:
        target = child_path(here, child)
        body: dict[str, Any] = {
            "instance": instance.to_wire(),
            "hints": dict(hints),
            "request_id": request_id,
        }
        if lease is not None:
            body["valid_until"] = lease
        if image_properties:
            body["image_properties"] = dict(image_properties)
        answer = (await self.node.call("build", body, target=target, timeout_s=timeout_s)).unwrap()
        try:
            taken = Instance.from_wire(answer.get("instance") if isinstance(answer, dict) else None)
        except SchemaError as exc:
            raise SchemaError(f"{target} acknowledged a build badly: {exc.message}") from None
        if taken.uuid != instance.uuid or taken.cell is None or not is_below(taken.cell, target):
            raise SenderMismatch(f"{target} acknowledged a build it does not hold", here)
        return taken


def _nowhere(
    here: str, spec: BuildSpec, attempts: BuildAttempts, decision: Decision | None
) -> WireError:
    """Why a build could not be placed from `here`: each try, then what the filters removed.

    `NoValidHost` when every cell tried had no host, or a filter found no
    room or no matching hypervisor; `NoCellsAvailable` when no cell could be
    tried at all (disabled, or not where the hints allow).
    """
    removed = decision.removed if decision is not None else ()
    if not attempts.attempts and not removed and not decision:
        return NoValidHost(f"no valid host in {here}: it has no hosts and no cells below it", here)
    parts = [attempts.summary()] if attempts.attempts else []
    if removed:
        shown = "; ".join(
            f"{'this cell' if name == HERE else name}: {by} ({reason})"
            for name, by, reason in removed
        )
        parts.append(f"at {here} the filters removed {shown}")
    # After tries, their summary leads (it says what each cell answered); else the filters.
    lead = "" if attempts.attempts else f"no cell could take {spec.flavor.name}: "
    reason = _shortened(lead + "; ".join(parts))
    no_room = any(by in _NO_ROOM for _, by, _ in removed)
    if attempts.all_no_valid_host() or (not attempts.attempts and no_room):
        return NoValidHost(reason, here)
    return NoCellsAvailable(reason, here)


_NO_ROOM = frozenset({"capacity", "image_properties"})


def _shortened(text: str) -> str:
    if len(text) <= MAX_SUMMARY_LENGTH:
        return text
    return text[: MAX_SUMMARY_LENGTH - 3] + "..."


class TopBuilds:
    """The API cell's builds: each runs in the background until placed, failed or deleted."""

    def __init__(
        self,
        placer: Placer,
        db: DbRunner,
        *,
        retries: int,
        retry_delay_s: float,
        orphan_found: Callable[[], None] = lambda: None,
        tasks: Supervisor | None = None,
        image_properties: Callable[[str], Awaitable[Mapping[str, str] | None]] | None = None,
    ) -> None:
        self.tasks = tasks or Supervisor()
        self._image_properties = image_properties
        self.placer = placer
        self.db = db
        self._orphan_found = orphan_found
        self.plan = retry_plan(min(retries, MAX_RETRIES), retry_delay_s)
        self.clock = placer.clock
        self._running: dict[str, asyncio.Task[None]] = {}

    def start(self, instance: Instance, hints: Mapping[str, str] | None = None) -> None:
        """Build `instance` if it waits to be scheduled and its build is not running already.

        A placed, failed or deleted instance is left as it is: a repeated
        `server_create` must not build again what went to error.
        """
        if (
            instance.cell is not None
            or not waiting_to_be_scheduled(instance)
            or instance.uuid in self._running
        ):
            return
        task = self.tasks.spawn(self._build(instance, dict(hints or {})), name="build")
        self._running[instance.uuid] = task
        task.add_done_callback(lambda _: self._running.pop(instance.uuid, None))

    async def resume(self) -> int:
        """After a restart: build again, with its hints, every instance the index holds unplaced."""
        waiting = await self.db.write(store.unplaced_builds)
        for instance, hints in waiting:
            self.start(instance, hints)
        return len(waiting)

    async def _build(self, instance: Instance, hints: dict[str, str]) -> None:
        await self._place(instance, hints)
        if hints:  # not when cancelled: a build cut short by a stop resumes with them
            await self.db.write(store.forget_hints, instance.uuid)

    async def _place(self, instance: Instance, hints: dict[str, str]) -> None:
        here = self.placer.node.view.home_path()

        async def wanted() -> bool:
            held = await self.db.read(store.get, instance.uuid)
            return held is not None and not held.deleted and held.cell is None

        properties: Mapping[str, str] = {}
        if self._image_properties is not None:  # an image deleted since the create: none
            properties = await self._image_properties(instance.image) or {}
        try:
            taken = await self.placer.place(
                instance,
                hints,
                f"build-{instance.uuid}",
                here,
                self.plan,
                wanted,
                image_properties=properties,
            )
        except (NoValidHost, NoCellsAvailable) as exc:
            held = await self.db.read(store.get, instance.uuid)
            if held is not None and held.cell is None and not held.deleted:
                fault = Fault(exc.code, exc.message, exc.cell or here)
                await self.db.write(store.index_put, failed(held, fault, self.clock.wall()))
                logs.event(log, logging.WARNING, "build.failed", uuid=instance.uuid, code=exc.code)
            return
        except InvalidRequest:
            return  # deleted while it waited for a cell
        if await self.db.write(store.index_put, taken):
            return
        held = await self.db.read(store.get, instance.uuid)
        if held is not None and held.cell == taken.cell:
            return  # the cell's own newer record came up first
        # Deleted (or placed elsewhere) while this placement was in flight: the
        # index keeps what it holds, and the copy in taken.cell must go, durably.
        assert taken.cell is not None
        logs.event(log, logging.WARNING, "build.orphaned", uuid=taken.uuid, cell=taken.cell)
        await self.db.write(orphans_store.note_now, [(taken.uuid, taken.cell)])
        self._orphan_found()

    def statistics(self) -> dict[str, int]:
        """Builds running in the background now."""
        return {"running": len(self._running)}

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)


class HostView:
    """This cell's hosts as last read, with the claims made here since: what a build weighs.

    Reading every host for every build took more time than the build's own
    writes. The view is only a guide to the order in which hosts are tried:
    each claim is still a conditional UPDATE in the database, and a build
    the view finds no room for, or whose every host the database refuses, is
    weighed again on hosts read afresh before it is refused. A release
    (a delete) is not seen until the next read, at most `max_age_s` later.
    Used on the database writer thread only.
    """

    def __init__(self, max_age_s: float = HOST_VIEW_S, *, clock: Callable[[], float]) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._hosts: dict[str, Host] = {}
        self._read_at: float | None = None

    def hosts(self, db: Database, *, fresh: bool = False) -> tuple[list[Host], bool]:
        """The hosts to weigh, and whether they were read from the database just now."""
        now = self._clock()
        if fresh or self._read_at is None or now - self._read_at >= self.max_age_s:
            self._hosts = {host.name: host for host in hosts_store.list_hosts(db)}
            self._read_at = now
            return list(self._hosts.values()), True
        return list(self._hosts.values()), False

    def claimed(self, name: str, need: Resources) -> None:
        host = self._hosts.get(name)
        if host is not None:
            self._hosts[name] = replace(
                host,
                memory_mb_used=host.memory_mb_used + need.memory_mb,
                disk_gb_used=host.disk_gb_used + need.disk_gb,
                vcpus_used=host.vcpus_used + need.vcpus,
            )

    def forget(self) -> None:
        """Read the hosts again for the next build."""
        self._read_at = None


def _choose_and_place(
    db: Database,
    view: HostView,
    need: Resources,
    make: Callable[[str], Instance],
    request_id: str,
    lease: tuple[float | None, Callable[[], float]],
) -> tuple[list[Host], Instance | None]:
    """Weigh the hosts and claim the best with room, on the writer thread.

    The hosts are weighed on the thread that makes every claim, so each
    build weighs them with the claims of the builds before it: a burst of
    builds spreads over the hosts instead of all choosing the one that
    looked emptiest when they started. Nothing is placed once the build's
    lease (`valid_until`, wall clock) has run out.
    """
    valid_until, wall = lease
    hosts, fresh = view.hosts(db)
    order = choose_hosts(hosts, need)
    taken = store.place(db, order, make, request_id, valid_until, wall) if order else None
    if taken is None and not fresh:
        hosts, _ = view.hosts(db, fresh=True)
        order = choose_hosts(hosts, need)
        taken = store.place(db, order, make, request_id, valid_until, wall) if order else None
    if taken is None:
        view.forget()  # refused on what the database holds, or a claim lost: read it next time
    elif taken.host is not None:
        view.claimed(taken.host, need)
    return hosts, taken
