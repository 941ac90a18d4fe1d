"""The life of one cell process: start, serve until told to stop, stop cleanly.

The daemon is one asyncio loop. The threads it has are forced by libraries:
pyzmq's ZAP authenticator (so handshakes are answered even when the loop is
busy) and the worker threads that run blocking database calls.

Start-up refuses to run, with the message an operator needs, when the
libraries are too old, the cell's key pair is missing or unsafe, the schema is
not current, or another process holds the cell's pid file. With no
configuration file (the embedded default) the cell makes what it lacks: its
key pair and its schema. SIGTERM and SIGINT stop the cell; shutdown releases
the pid file and closes the database.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from zcells import logs
from zcells.builds import Placer, TopBuilds
from zcells.clock import SYSTEM_CLOCK, Clock
from zcells.compute import FakeDriver, fake_hosts
from zcells.config import CellsConfig, Config
from zcells.db import catalog, migrate, registry
from zcells.db import hosts as hosts_store
from zcells.db import instances as instances_store
from zcells.db.engine import Database
from zcells.dbrunner import DbRunner
from zcells.downstream import BATCH_BYTES as GLOBAL_BATCH_BYTES
from zcells.downstream import Downstream
from zcells.errors import DatabaseError
from zcells.handlers import build_methods
from zcells.handlers.catalog import CatalogHandlers
from zcells.handlers.compute import ComputeHandlers
from zcells.handlers.diag import DiagHandlers
from zcells.handlers.scheduling import SchedulingHandlers
from zcells.handlers.servers import PAGE_BYTES, ServerHandlers
from zcells.handlers.state import StateHandlers, resync_children
from zcells.handlers.status import MessageRate, StatusHandlers, messages_seen
from zcells.housekeeping import Housekeeping, HousekeepingSettings
from zcells.methods import MethodTable
from zcells.node import Node, NodeSettings
from zcells.orphans import Orphans
from zcells.pidfile import PidFile
from zcells.records import Client, Neighbour
from zcells.scheduling import Announcer, CellScheduling, SchedulerSettings
from zcells.sockets.keys import KeyPair, check_environment, generate_keypair, load_keypair
from zcells.sockets.transport import ZmqTransport
from zcells.supervisor import Supervisor
from zcells.transport import Identity, Transport
from zcells.upstream import BATCH_BYTES, Upstream

log = logs.get_logger("service")


@dataclass
class Cell:
    """What a running cell holds: its config, key pair and database."""

    config: Config
    keys: KeyPair
    db: Database


def _load_keys(config: Config) -> KeyPair:
    keys_dir, name = config.transport.keys_dir, config.cells.name
    if config.embedded and not (keys_dir / f"{name}.key_secret").exists():
        pair = generate_keypair(keys_dir, name)
        logs.event(
            log,
            logging.INFO,
            "key.generated",
            cell=name,
            path=pair.secret_path,
            public_key=pair.public,
        )
    return load_keypair(keys_dir, name)


def _open_database(config: Config) -> Database:
    db = Database(
        config.database.connection,
        busy_timeout_s=config.database.busy_timeout_s,
        create=config.embedded,  # otherwise `zcells db sync` makes it
    )
    try:
        if config.embedded:
            result = migrate.sync(db)
            if config.cells.cell_type == "api":
                registry.seed_default_flavors(db)
                catalog.seed_default_images(db)
            if result.changed:
                logs.event(log, logging.INFO, "db.synced", before=result.before, after=result.after)
        else:
            migrate.check_current(db)
    except BaseException:
        db.close()
        raise
    return db


@contextmanager
def open_cell(config: Config) -> Iterator[Cell]:
    """Check the environment, take the pid file, load keys, open the database."""
    check_environment()
    keys = _load_keys(config)
    pid_file = PidFile(config.pid_file)
    pid_file.acquire()
    try:
        db = _open_database(config)
        try:
            yield Cell(config=config, keys=keys, db=db)
        finally:
            db.close()
    finally:
        pid_file.release()


def node_settings(config: Config) -> NodeSettings:
    cells = config.cells
    return NodeSettings(
        name=cells.name,
        cell_type=cells.cell_type,
        call_timeout_s=cells.call_timeout_s,
        max_hop_count=cells.max_hop_count,
        heartbeat_interval_s=cells.heartbeat_interval_s,
        mute_after_s=cells.mute_child_interval_s,
        max_in_flight_per_peer=config.transport.max_in_flight,
        max_clock_skew_s=cells.max_clock_skew_s,
    )


def make_transport(config: Config, keys: KeyPair) -> ZmqTransport:
    transport = config.transport
    heartbeat_ms = int(config.cells.heartbeat_interval_s * 1000)
    identity = Identity(
        name=config.cells.name,
        public_key=keys.public,
        secret_key=keys.secret,
        cells_endpoint=transport.cells_endpoint,
        api_endpoint=transport.api_endpoint,
    )
    return ZmqTransport(
        identity,
        max_frame_bytes=transport.max_message_bytes,
        heartbeat_ivl_ms=heartbeat_ms,
        heartbeat_timeout_ms=3 * heartbeat_ms,
        handshake_ivl_ms=int(transport.handshake_timeout_s * 1000),
    )


class RegistryWatch:
    """Re-reads the cells and clients tables and hands changes to the node.

    Runs every `db_check_interval` and at once when `poke()` is called (SIGHUP).
    A database that cannot be read keeps the last good registry in force.
    """

    def __init__(self, db: DbRunner, node: Node, interval_s: float) -> None:
        self.db = db
        self.node = node
        self.interval_s = interval_s
        self._poked = asyncio.Event()
        self._last: tuple[list[Neighbour], list[Client]] | None = None

    def poke(self) -> None:
        self._poked.set()

    async def load(self) -> bool:
        """Apply the registry if it changed; True when it did."""
        try:
            current = await self.db.read(registry.snapshot)
        except DatabaseError as exc:
            logs.event(log, logging.WARNING, "registry.unreadable", error=exc)
            return False
        if current == self._last:
            return False
        self._last = current
        neighbours, clients = current
        self.node.apply_registry(neighbours, clients)
        logs.event(
            log,
            logging.INFO,
            "registry.loaded",
            parents=",".join(n.name for n in neighbours if n.kind == "parent") or "-",
            children=",".join(n.name for n in neighbours if n.kind == "child") or "-",
            clients=len(clients),
        )
        return True

    async def run(self) -> None:
        while True:
            try:
                async with self.node.clock.timeout(self.interval_s):
                    await self._poked.wait()
            except TimeoutError:
                pass
            self._poked.clear()
            await self.load()


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run one cell until `stop` is set or SIGTERM/SIGINT arrives; SIGHUP re-reads the registry."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request_stop, stop, signum)
    try:
        with open_cell(config) as cell:
            await _serve_cell(cell, stop)
        logs.event(log, logging.INFO, "cell.stopped", cell=config.cells.name)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


@dataclass
class Services:
    """The parts of a running cell beyond its message loop, wired to one another."""

    runner: DbRunner
    upstream: Upstream
    driver: FakeDriver | None
    builds: TopBuilds | None
    methods: MethodTable
    housekeeping: Housekeeping
    rate: MessageRate
    orphans: Orphans | None
    announcer: Announcer
    downstream: Downstream


def build_services(
    config: Config, runner: DbRunner, node: Node, diag: DiagHandlers, tasks: Supervisor
) -> Services:
    """Handlers, the fake driver and the upward stream of one cell, sharing one DB runner.

    Their background tasks belong to `tasks`.
    """
    top = config.cells.cell_type == "api"
    upstream: Upstream | None = None

    def changed() -> None:  # new outbox rows: instances, and so capacity, changed
        if upstream is not None:
            upstream.wake()
        announcer.changed()

    has_hosts = not top and config.compute.fake_hosts > 0
    driver = (
        FakeDriver(runner, config.compute.fake_build_s, changed, node.clock, tasks)
        if has_hosts
        else None
    )
    scheduling = CellScheduling(node, scheduler_settings(config.cells))
    announcer = Announcer(
        node,
        runner,
        scheduling,
        call_timeout_s=min(10.0, config.cells.call_timeout_s),
    )
    placer = Placer(
        node, runner, scheduling, driver, changed, call_timeout_s=config.cells.call_timeout_s
    )
    orphans = Orphans(node, runner) if top else None
    orphan_found = orphans.wake if orphans is not None else _nothing
    state = StateHandlers(node, runner, applies=top, changed=changed, orphan_found=orphan_found)
    upstream = Upstream(
        node,
        runner,
        resync_children=lambda: resync_children(node),
        batch_bytes=min(BATCH_BYTES, config.transport.max_message_bytes // 2),
        tasks=tasks,
    )

    async def image_properties(name: str) -> Mapping[str, str] | None:
        image = await runner.read(catalog.get_image, name)
        return None if image is None else image.properties

    builds = TopBuilds(
        placer,
        runner,
        retries=config.cells.scheduler_retries,
        retry_delay_s=config.cells.scheduler_retry_delay_s,
        orphan_found=orphan_found,
        tasks=tasks,
        image_properties=image_properties,
    )
    servers = ServerHandlers(
        node,
        runner,
        builds,
        top=top,
        quota=config.quota,
        page_bytes=min(PAGE_BYTES, config.transport.max_message_bytes // 2),
    )
    compute = ComputeHandlers(runner, placer, driver, changed)
    rate = MessageRate(lambda: messages_seen(node), clock=node.clock)
    status = StatusHandlers(node, runner, upstream, rate, top=top, scheduling=scheduling)
    downstream = Downstream(
        node,
        runner,
        top=top,
        batch_bytes=min(GLOBAL_BATCH_BYTES, config.transport.max_message_bytes // 2),
        tasks=tasks,
    )

    def catalog_changed() -> None:  # new global rows: for the children, and for capacity
        downstream.wake()
        announcer.changed()

    catalog_handlers = CatalogHandlers(runner, top=top, changed=catalog_changed)
    explain = SchedulingHandlers(node, runner, announcer, placer, image_properties)
    methods = build_methods(diag, state, compute, servers, status, catalog_handlers, explain)
    cells = config.cells
    housekeeping = Housekeeping(
        runner,
        HousekeepingSettings(
            heal_interval_s=cells.instance_update_interval_s,
            heal_window_s=cells.instance_updated_at_threshold_s,
            heal_count=cells.instance_update_num_instances,
            request_id_keep_s=cells.request_id_keep_s,
        ),
        has_parents=lambda: bool(node.view.parents),
        changed=changed,
        clock=node.clock,
    )
    node.on_link_up = announcer.link_up
    if not top:

        def placed(path: str) -> None:
            announcer.changed()  # the parent's path is known now: it can be told
            tasks.spawn(_relocate(runner, path, node.clock.wall(), changed), name="relocate")

        node.on_placed = placed
    return Services(
        runner,
        upstream,
        driver,
        builds if top else None,
        methods,
        housekeeping,
        rate,
        orphans,
        announcer,
        downstream,
    )


def scheduler_settings(cells: CellsConfig) -> SchedulerSettings:
    """The cell scheduler's settings from `[cells]`."""
    multipliers = {
        "ram_by_instance_type": cells.ram_weight_multiplier,
        "weight_offset": cells.offset_weight_multiplier,
        "mute_child": cells.mute_weight_multiplier,
    }
    return SchedulerSettings(
        filters=cells.scheduler_filters,
        weighers={name: multipliers[name] for name in cells.scheduler_weighers},
        reserve_percent=cells.reserve_percent,
        capabilities={k: frozenset(v) for k, v in cells.capabilities.items()},
        enabled=cells.enable,
        interval_s=cells.capability_interval_s,
    )


async def _relocate(runner: DbRunner, path: str, wall: float, changed: Callable[[], None]) -> None:
    """Put this cell's records under the path a parent just gave it, off the message loop."""
    try:
        moved = await runner.write(instances_store.relocate_own, path, wall)
    except DatabaseError as exc:
        logs.event(log, logging.ERROR, "cell.relocate_failed", error=exc.__class__.__name__)
        return
    if moved:
        logs.event(log, logging.WARNING, "cell.moved", path=path, instances=moved)
        changed()


def _nothing() -> None:
    pass


async def _prepare(config: Config, services: Services) -> None:
    """Hosts from the config, then pick up whatever a previous run left unfinished."""
    compute = config.compute
    if services.driver is not None:
        hosts = fake_hosts(
            compute.fake_hosts,
            compute.fake_host_ram_mb,
            compute.fake_host_disk_gb,
            compute.fake_host_vcpus,
        )
        await services.runner.write(hosts_store.sync_hosts, hosts)
        await services.driver.resume()
    if services.builds is not None:
        resumed = await services.builds.resume()
        if resumed:
            logs.event(log, logging.INFO, "builds.resumed", count=resumed)


async def _serve_cell(cell: Cell, stop: asyncio.Event) -> None:
    config = cell.config

    def started(watch: RegistryWatch, _services: Services) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _on_sighup, watch)
        logs.event(
            log,
            logging.INFO,
            "cell.started",
            cell=config.cells.name,
            type=config.cells.cell_type,
            config=config.source,
            cells_endpoint=config.transport.cells_endpoint,
            api_endpoint=config.transport.api_endpoint,
            database=cell.db.describe(),
            public_key=cell.keys.public,
            pid_file=config.pid_file,
        )
        for warning in config.warnings:
            logs.event(log, logging.WARNING, "config.warning", detail=warning)

    transport = make_transport(config, cell.keys)
    await run_cell(config, cell.db, transport, SYSTEM_CLOCK, DbRunner(cell.db), stop, started)


async def run_cell(
    config: Config,
    db: Database,
    transport: Transport,
    clock: Clock,
    runner: DbRunner,
    stop: asyncio.Event,
    started: Callable[[RegistryWatch, Services], None] = lambda _watch, _services: None,
) -> None:
    """Serve one cell on `transport` until `stop` is set; everything is closed on the way out.

    The daemon runs it over ZeroMQ on the system clock; a simulation runs
    many in one process, over the in-memory transport, in virtual time.
    """
    services: Services | None = None
    try:
        # Background work (builds, the driver, streams, handlers) belongs to `tasks`;
        # the cell's own loops to `loops`, where a crash of one stops the cell.
        async with Supervisor() as tasks:
            node: Node | None = None
            diag = DiagHandlers(
                config.cells.cell_type, lambda: node.statistics() if node is not None else {}
            )
            node = Node(node_settings(config), transport, build_methods(diag), clock=clock)
            db.wall = clock.wall  # one clock: rows are stamped by the cell's wall time
            services = build_services(config, runner, node, diag, tasks)
            node.install(services.methods)
            watch = RegistryWatch(runner, node, config.cells.db_check_interval_s)
            # The keyring must be in place before the endpoints are bound: a child
            # refused during a gap would not be redialled by ZeroMQ for a while.
            await watch.load()
            await transport.start()
            started(watch, services)
            async with asyncio.TaskGroup() as loops:
                running = [
                    loops.create_task(node.run(tasks), name="node"),
                    loops.create_task(watch.run(), name="registry"),
                    loops.create_task(services.upstream.run(), name="upstream"),
                    loops.create_task(services.downstream.run(), name="downstream"),
                    loops.create_task(services.housekeeping.run(), name="housekeeping"),
                    loops.create_task(services.rate.run(), name="message-rate"),
                    loops.create_task(services.announcer.run(), name="announcer"),
                ]
                if services.orphans is not None:
                    running.append(loops.create_task(services.orphans.run(), name="orphans"))
                await _prepare(config, services)
                await stop.wait()
                logs.event(log, logging.INFO, "cell.stopping", cell=config.cells.name)
                for task in running:
                    task.cancel()
    finally:
        if services is not None and services.driver is not None:
            await services.driver.close()
        if services is not None and services.builds is not None:
            await services.builds.close()
        await transport.close()
        runner.close()


def _on_sighup(watch: RegistryWatch) -> None:
    logs.event(log, logging.INFO, "signal.received", signal="SIGHUP")
    watch.poke()


def _request_stop(stop: asyncio.Event, signum: int) -> None:
    logs.event(log, logging.INFO, "signal.received", signal=signal.Signals(signum).name)
    stop.set()
