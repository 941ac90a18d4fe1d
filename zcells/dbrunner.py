"""Blocking database calls, run off the event loop.

Rules kept here:

* The loop never waits on the database: every call runs in a worker thread.
* Writes run one at a time, in the order they were asked for, in one thread
  of their own: SQLite takes one writer anyway, and a single writer keeps
  "the outbox row after the change" true across concurrent handlers.
* Reads run in a small pool of their own, so a long write batch never holds
  up a `server list` (SQLite's WAL lets readers run beside the writer).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, ParamSpec, TypeVar

from zcells.db.engine import Database

P = ParamSpec("P")
R = TypeVar("R")


class DbRunner:
    """Runs `fn(db, ...)` off the loop: `await runner.write(fn, ...)` or `runner.read`."""

    def __init__(self, db: Database, readers: int = 2) -> None:
        self.db = db
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="db-write")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="db-read")

    async def write(
        self, fn: Callable[Concatenate[Database, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        return await self._run(self._writer, fn, *args, **kwargs)

    async def read(
        self, fn: Callable[Concatenate[Database, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        return await self._run(self._readers, fn, *args, **kwargs)

    async def _run(
        self, pool: ThreadPoolExecutor, fn: Callable[..., R], *args: Any, **kwargs: Any
    ) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, functools.partial(fn, self.db, *args, **kwargs))

    def close(self) -> None:
        """Wait for calls already running, then stop the threads."""
        self._writer.shutdown(wait=True, cancel_futures=True)
        self._readers.shutdown(wait=True, cancel_futures=True)
