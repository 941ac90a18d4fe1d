"""The life of one cell process: start, serve until told to stop, stop cleanly.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from zcells import logs
from zcells.config import Config
from zcells.db import migrate, registry
from zcells.db.engine import Database
from zcells.pidfile import PidFile
from zcells.sockets.keys import KeyPair, check_environment, generate_keypair, load_keypair

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
    db = Database(config.database.connection, busy_timeout_s=config.database.busy_timeout_s)
    try:
        if config.embedded:
            result = migrate.sync(db)
            if config.cells.cell_type == "api":
                registry.seed_default_flavors(db)
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


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run one cell until `stop` is set or SIGTERM/SIGINT arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, _request_stop, stop, signum)
    try:
        with open_cell(config) as cell:
            logs.event(
                log,
                logging.INFO,
                "cell.started",
                cell=config.cells.name,
                type=config.cells.cell_type,
                config=config.source,
                database=cell.db.describe(),
                public_key=cell.keys.public,
                pid_file=config.pid_file,
            )
            for warning in config.warnings:
                logs.event(log, logging.WARNING, "config.warning", detail=warning)
            await stop.wait()
            logs.event(log, logging.INFO, "cell.stopping", cell=config.cells.name)
        logs.event(log, logging.INFO, "cell.stopped", cell=config.cells.name)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def _request_stop(stop: asyncio.Event, signum: int) -> None:
    logs.event(log, logging.INFO, "signal.received", signal=signal.Signals(signum).name)
    stop.set()
