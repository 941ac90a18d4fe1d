"""Blocking database calls, run off the event loop.

Rules kept here:

* The loop never waits on the database: every call runs in a worker thread
  (`InlineDbRunner`, for a simulation in virtual time, runs them on the loop).
* Writes run one at a time, in the order they were asked for, in one thread
  of their own: SQLite takes one writer anyway, and a single writer keeps
  "the outbox row after the change" true across concurrent handlers.
* Writes asked for while the writer is busy are committed together (a group
  commit): one transaction, each write under its own savepoint
  (`Database.group`). A commit that waits on the disk is the cost of a
  write, so under load many writes share one. Each caller still gets its own
  result or error, and only after the group's commit: nothing is answered
  before it is durable. A group that meets a database error (locked, full,
  a failed commit) is rolled back and each of its writes runs again alone.
* Reads run in a small pool of their own, so a long write batch never holds
  up a `server list` (SQLite's WAL lets readers run beside the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from zcells.db.engine import Database
from zcells.errors import DatabaseError

P = ParamSpec("P")
R = TypeVar("R")

GROUP_MAX = 100  # writes in one transaction at most


@dataclass
class _Write:
    call: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


# What a write came to: (its result, None) or (None, the error it raised).
_Outcome = tuple[Any, BaseException | None]


class DbRunner:
    """Runs `fn(db, ...)` off the loop: `await runner.write(fn, ...)` or `runner.read`."""

    def __init__(self, db: Database, readers: int = 2, group_max: int = GROUP_MAX) -> None:
        self.db = db
        self.group_max = group_max
        self._writes: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="db-write", daemon=True)
        self._writer.start()
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="db-read")
        self._closed = False

    async def write(
        self, fn: Callable[Concatenate[Database, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        if self._closed:
            raise RuntimeError("the database runner is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._writes.put(_Write(functools.partial(fn, self.db, *args, **kwargs), loop, future))
        return await future

    async def read(
        self, fn: Callable[Concatenate[Database, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._readers, functools.partial(fn, self.db, *args, **kwargs)
        )

    def close(self) -> None:
        """Wait for the writes already running, drop those queued, then stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._writes.put(None)
        self._writer.join()
        while True:
            try:
                left = self._writes.get_nowait()
            except queue.Empty:
                break
            if left is not None:
                with contextlib.suppress(RuntimeError):  # its loop is closed already
                    left.loop.call_soon_threadsafe(left.future.cancel)
        self._readers.shutdown(wait=True, cancel_futures=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread ----------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            first = self._writes.get()
            if first is None:
                return
            group, stop = [first], False
            while len(group) < self.group_max:
                try:
                    more = self._writes.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                group.append(more)
            # A write whose caller gave up before it ran is not run (as an executor skips it).
            live = [write for write in group if not write.future.cancelled()]
            try:
                outcomes = self._run_group(live)
            except Exception as exc:  # never lose the writer thread: every caller hears why
                outcomes = [(None, exc)] * len(live)
            _settle(live, outcomes)
            if stop:
                return

    def _run_group(self, writes: list[_Write]) -> list[_Outcome]:
        if len(writes) <= 1:
            return [_run(write) for write in writes]
        try:
            outcomes: list[_Outcome] = []
            with self.db.group() as each:
                for write in writes:
                    try:
                        outcomes.append((each(write.call), None))
                    except DatabaseError:
                        raise  # the group's transaction may be gone: run each alone
                    except Exception as exc:
                        outcomes.append((None, exc))
            return outcomes
        except DatabaseError:
            return [_run(write) for write in writes]


def _run(write: _Write) -> _Outcome:
    try:
        return write.call(), None
    except Exception as exc:
        return None, exc


def _settle(writes: list[_Write], outcomes: list[_Outcome]) -> None:
    """Hand each write its outcome on its own loop: one wake-up per loop, not per write."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], _Outcome]]] = {}
    for write, outcome in zip(writes, outcomes, strict=True):
        by_loop.setdefault(write.loop, []).append((write.future, outcome))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed while the write ran
            loop.call_soon_threadsafe(_set_outcomes, settled)


def _set_outcomes(settled: list[tuple[asyncio.Future[Any], _Outcome]]) -> None:
    for future, (result, error) in settled:
        if future.done():  # cancelled while it ran
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class InlineDbRunner(DbRunner):
    """Runs each call on the event loop's own thread, whole, when it is awaited.

    For a simulation: a worker thread would let real time and the operating
    system's scheduling into a run that must replay exactly from its seed.
    As with `DbRunner`, a write is committed before its caller goes on; the
    loop yields once before each call, so a caller looping on reads still
    lets the others run.
    """

    def __init__(self, db: Database) -> None:  # no threads: nothing of DbRunner's to start
        self.db = db
        self.group_max = 1
        self._closed = False

    async def write(
        self, fn: Callable[Concatenate[Database, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        if self._closed:
            raise RuntimeError("the database runner is closed")
        await asyncio.sleep(0)
        return fn(self.db, *args, **kwargs)

    async def read(
        self, fn: Callable[Concatenate[Database, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        await asyncio.sleep(0)
        return fn(self.db, *args, **kwargs)

    def close(self) -> None:
        self._closed = True
