"""Global data that flows down: each cell streams its global log to every child.

Rules kept here (DESIGN.md §5; `zcells.upstream` is the same stream going up):

* The global log is the only source: the API cell writes a flavor or image
  change and its log row in one transaction (`zcells.db.catalog`), a cell
  below writes the rows it applied from its parent, under the same seqs, in
  the transaction that applied them. This module only reads and sends.
* When a stream starts, and after any failure, it first asks the child which
  seq it has applied (`global_progress`) and resumes right after it. The
  child applies a batch and records the seq in one transaction, and ignores
  rows at or below it, so a crash of either side at any point loses nothing
  and applies nothing twice.
* One batch in flight per child, in seq order, bounded in rows and in bytes
  so it always fits the child's frame limit. A child that answers a seq
  below the batch it was sent is asked again from the start.
* Log rows superseded by a later change of the same flavor or image are
  gone, so a child that was away gets only the newest of each: no gap to
  fill, since the rows it missed were replaced by rows it has not seen.
* A child that has applied more than the API cell ever logged holds a newer
  past than the API cell's database (restored from a backup): the API cell
  logs every row again past it (`catalog.renumber`). A middle cell never
  renumbers: its rows are the top's, and the top's renumbered rows will pass
  the child's seq when they arrive.
* Every change in this process rings the stream's bell; the log is also read
  when the bell has been quiet for `idle_s`, doubling up to `idle_max_s`
  while nothing is new (a change made by another process, a `zcells`
  command on the database, is sent within that).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from zcells import logs
from zcells.codec import packb
from zcells.db import catalog
from zcells.dbrunner import DbRunner
from zcells.errors import DatabaseError, SchemaError, UnknownCell, WireError
from zcells.globaldata import MAX_ROWS, MAX_SEQ
from zcells.names import child_path
from zcells.port import CellPort
from zcells.streams import Streams
from zcells.supervisor import Supervisor

log = logs.get_logger("downstream")

BATCH_ROWS = 200  # inside the child's MAX_ROWS
# Bytes of rows per batch, well inside the child's frame limit (max_message_bytes, 1 MiB by
# default): an image of 32 long properties takes some 40 kB, a batch of them is cut short.
BATCH_BYTES = 512 * 1024


class Downstream:
    """Streams this cell's global log to each of its children."""

    def __init__(
        self,
        node: CellPort,
        db: DbRunner,
        *,
        top: bool,
        batch_rows: int = BATCH_ROWS,
        batch_bytes: int = BATCH_BYTES,
        idle_s: float = 1.0,
        idle_max_s: float = 16.0,
        retry_s: float = 1.0,
        tasks: Supervisor | None = None,
    ) -> None:
        self.node = node
        self.db = db
        self.top = top  # only the API cell renumbers its log for a child that is ahead
        self.batch_rows = min(batch_rows, MAX_ROWS)
        self.batch_bytes = batch_bytes
        self.idle_s = idle_s
        self.idle_max_s = max(idle_s, idle_max_s)
        self.retry_s = retry_s
        self.tasks = tasks or Supervisor()
        self._streams = Streams(self.tasks, node.clock, "downstream")
        self._quiet_s: dict[str, float] = {}  # child -> how long the next idle wait lasts
        self.applied: dict[str, int] = {}  # child -> highest seq it has applied, as last heard
        self.blocked: dict[str, str] = {}  # child -> the error its stream last stopped on
        self.sent = 0

    def wake(self) -> None:
        """New rows are in the global log: stop waiting for them."""
        self._streams.wake()

    async def run(self) -> None:
        """Keep one stream per registered child; follow registry changes."""
        await self._streams.follow(
            lambda: self.node.view.children, self._stream, self._forget, self.retry_s
        )

    def _forget(self, child: str) -> None:
        for table in (self._quiet_s, self.applied, self.blocked):
            table.pop(child, None)

    async def _stream(self, child: str) -> None:
        applied: int | None = None
        while True:
            try:
                path = child_path(self.node.view.home_path(), child)
            except UnknownCell:  # no parent has said hello yet: this cell has no path
                await self.node.clock.sleep(self.retry_s)
                continue
            try:
                if applied is None:
                    applied = await self._progress(child, path)
                applied = await self._send_batch(child, path, applied)
                self.blocked.pop(child, None)
            except (WireError, DatabaseError) as exc:
                code = getattr(exc, "code", type(exc).__name__)
                self.blocked[child] = code
                logs.limited(
                    log,
                    logging.WARNING,
                    "downstream.retry",
                    child,
                    child=child,
                    code=code,
                    error=str(exc),
                )
                applied = None
                await self.node.clock.sleep(self.retry_s)

    async def _progress(self, child: str, path: str) -> int:
        answer = (await self.node.call("global_progress", {}, target=path)).unwrap()
        applied = _sequence(answer)
        self.applied[child] = applied
        logs.event(log, logging.INFO, "downstream.resume", child=child, after=applied)
        if self.top:
            last = await self.db.read(catalog.last_seq)
            if applied > last:
                count = await self.db.write(catalog.renumber, applied)
                logs.event(
                    log,
                    logging.WARNING,
                    "downstream.ahead",
                    child=child,
                    applied=applied,
                    logged=last,
                    action=f"logged {count} rows again past it",
                )
        return applied

    async def _send_batch(self, child: str, path: str, applied: int) -> int:
        """Send the rows after `applied`, or wait for some; the child's applied seq after."""
        bell = self._streams.bells[child]
        bell.clear()
        rows = await self.db.read(catalog.read_log, applied, self.batch_rows)
        if not rows:
            await self._idle(child, bell)
            return applied
        self._quiet_s.pop(child, None)
        wire = within_bytes([row.to_wire() for row in rows], self.batch_bytes)
        rows = rows[: len(wire)]
        answer = (await self.node.call("global_updates", {"rows": wire}, target=path)).unwrap()
        new = _sequence(answer)
        if new < rows[-1].seq:
            raise SchemaError(f"{child} applied up to {new} of a batch ending at {rows[-1].seq}")
        self.sent += len(rows)
        self.applied[child] = new
        return new

    async def _idle(self, child: str, bell: asyncio.Event) -> None:
        quiet_s = self._quiet_s.get(child, self.idle_s)
        try:
            async with self.node.clock.timeout(quiet_s):
                await bell.wait()
        except TimeoutError:
            self._quiet_s[child] = min(self.idle_max_s, quiet_s * 2)
        else:
            self._quiet_s.pop(child, None)


def within_bytes(rows: list[list[Any]], limit: int) -> list[list[Any]]:
    """The leading rows that take at most `limit` bytes on the wire; always at least the first."""
    total = 0
    for index, row in enumerate(rows):
        total += len(packb(row))
        if total > limit and index > 0:
            return rows[:index]
    return rows


def _sequence(answer: Any) -> int:
    value = answer.get("applied") if isinstance(answer, dict) else None
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise SchemaError("the child's answer has no applied sequence")
    return value
