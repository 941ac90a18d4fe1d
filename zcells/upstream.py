"""State that flows up: each cell streams its outbox to every parent, resuming where it left off.

Rules kept here (DESIGN.md §4):

* The outbox is the only source: a change and its outbox row are written in
  one transaction by whoever changed the instance (or stored a child's rows,
  in a middle cell), and this module only reads, sends and trims.
* When the stream starts, and after any failure, the streamer first asks
  the parent which sequence it has applied (`progress`) and resumes right
  after it. The parent applies a batch and records the sequence in one
  transaction, so a crash of either side at any point loses nothing and
  applies nothing twice.
* A parent that gets a batch starting past what it applied (its database
  was restored while the link stayed up, or came back before any call
  failed) applies it and answers ``gap``; the cell then requeues as below.
* One batch in flight per parent, in sequence order, bounded in rows and in
  bytes so it always fits the parent's frame limit. While it is in flight the
  rows after it are read and the rows acked before it trimmed, so the next
  batch leaves as soon as the ack comes; a read ahead is used only if the
  parent acked the whole batch.
* A row is trimmed only once every parent has applied it.
* Every change in this process rings the stream's bell; the outbox is also
  read when the bell has been quiet for `idle_s`, doubling up to
  `idle_max_s` while it stays empty (a row written by another process, a
  `zcells` command, is sent within that), so a thousand idle cells do not
  read their outboxes every second.
* A row the parent refuses (a record outside this cell's subtree, say, after
  the subtree moved) is held aside in ``held_rows`` with the parent's
  reason, counted and shown by `zcells status`; the rest of the stream flows.
* If the rows a parent needs were trimmed already (its database was restored
  from an old backup, or it is a new parent), the cell requeues the current
  record of every instance it holds and asks its children to do the same, so
  the parent converges on the whole subtree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from zcells import logs
from zcells.db import outbox as outbox_store
from zcells.dbrunner import DbRunner
from zcells.errors import DatabaseError, SchemaError, WireError
from zcells.port import CellPort
from zcells.streams import Streams
from zcells.supervisor import Supervisor

log = logs.get_logger("upstream")

BATCH_ROWS = 1000
# Payload bytes per batch, well inside the parent's frame limit (max_message_bytes,
# 1 MiB by default) with room for the envelope: a batch of large records is cut short.
BATCH_BYTES = 512 * 1024

Rows = list[tuple[int, str, bytes]]  # outbox rows: (seq, kind, payload)


class Upstream:
    """Streams this cell's outbox to each of its parents."""

    def __init__(
        self,
        node: CellPort,
        db: DbRunner,
        *,
        resync_children: Callable[[], Awaitable[Any]],
        batch_rows: int = BATCH_ROWS,
        batch_bytes: int = BATCH_BYTES,
        idle_s: float = 1.0,
        idle_max_s: float = 16.0,
        tasks: Supervisor | None = None,
        retry_s: float = 1.0,
    ) -> None:
        self.node = node
        self.db = db
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes
        self.idle_s = idle_s
        self.tasks = tasks or Supervisor()
        self.idle_max_s = max(idle_s, idle_max_s)
        self._quiet_s: dict[str, float] = {}  # parent -> how long the next idle wait lasts
        self.retry_s = retry_s
        self._resync_children = resync_children
        self._streams = Streams(self.tasks, node.clock, "upstream")
        self.acked: dict[str, int] = {}  # parent -> highest sequence it applied
        self.sent = 0
        self.held = 0  # rows a parent refused, kept aside since start
        self.blocked: dict[str, str] = {}  # parent -> the error its stream last stopped on

    def wake(self) -> None:
        """New rows are in the outbox: stop waiting for them."""
        self._streams.wake()

    async def run(self) -> None:
        """Keep one stream per parent that has said hello; follow registry changes."""
        await self._streams.follow(
            lambda: self.node.view.parents, self._stream, self._forget, self.retry_s
        )

    def _forget(self, parent: str) -> None:
        for table in (self._quiet_s, self.acked, self.blocked):
            table.pop(parent, None)

    async def _stream(self, parent: str) -> None:
        applied: int | None = None
        ahead: Rows = []  # the rows after `applied`, read while the last batch was in flight
        while True:
            path = self.node.view.parents.get(parent)
            if path is None:
                await self.node.clock.sleep(self.retry_s)
                continue
            try:
                if applied is None:
                    ahead = []
                    applied = await self._progress(parent, path)
                    await self._check_gap(parent, applied)
                applied, ahead = await self._send_batch(parent, path, applied, ahead)
                self.blocked.pop(parent, None)
            except (WireError, DatabaseError) as exc:
                self.blocked[parent] = getattr(exc, "code", type(exc).__name__)
                logs.limited(
                    log,
                    logging.WARNING,
                    "upstream.retry",
                    parent,
                    parent=parent,
                    code=getattr(exc, "code", type(exc).__name__),
                    error=str(exc),
                )
                applied = None
                await self.node.clock.sleep(self.retry_s)

    async def _progress(self, parent: str, path: str) -> int:
        answer = (await self.node.call("progress", {}, target=path)).unwrap()
        applied = _sequence(answer)
        self.acked[parent] = applied
        logs.event(log, logging.INFO, "upstream.resume", parent=parent, after=applied)
        return applied

    async def _send_batch(
        self, parent: str, path: str, applied: int, ahead: Rows
    ) -> tuple[int, Rows]:
        """Send the rows after `applied` (`ahead` if read already), or wait for some.

        The parent's new sequence, and the rows after it if they were read
        while the batch was in flight.
        """
        bell = self._streams.bells[parent]
        bell.clear()
        rows = ahead or await self.db.read(outbox_store.read_outbox, applied, self.batch_rows)
        if not rows:
            quiet_s = self._quiet_s.get(parent, self.idle_s)
            try:
                async with self.node.clock.timeout(quiet_s):
                    await bell.wait()
            except TimeoutError:
                self._quiet_s[parent] = min(self.idle_max_s, quiet_s * 2)
            else:
                self._quiet_s.pop(parent, None)
            return applied, []
        self._quiet_s.pop(parent, None)
        rows = within_bytes(rows, self.batch_bytes)
        last = rows[-1][0]
        try:
            async with asyncio.TaskGroup() as tasks:
                call = tasks.create_task(
                    self.node.call("updates", {"rows": [list(row) for row in rows]}, target=path)
                )
                after = tasks.create_task(
                    self.db.read(outbox_store.read_outbox, last, self.batch_rows)
                )
                tasks.create_task(self._trim())  # what every parent acked before this batch
        except ExceptionGroup as group:
            raise group.exceptions[0] from None  # the first failure is the batch's
        answer = call.result().unwrap()
        new = _sequence(answer)
        self.sent += len(rows)
        await self._hold(parent, rows, answer)
        self.acked[parent] = new
        if isinstance(answer, dict) and answer.get("gap") is True:
            # The parent had applied less than this cell last heard (its database was
            # restored): the rows it lacks were trimmed here, so everything goes again.
            await self._requeue_everything(parent, new, rows[0][0])
            await self._trim()
            return new, []  # read afresh after the requeue
        ahead = after.result() if new == last else []
        if not ahead:
            await self._trim()  # nothing to send at once: trim what this ack allows now
        return new, ahead

    async def _hold(self, parent: str, rows: Rows, answer: Any) -> None:
        """Keep the rows the parent refused aside, with its reasons, before they are trimmed."""
        refused = answer.get("refused") if isinstance(answer, dict) else None
        if not refused:
            return
        sent = {row[0]: row for row in rows}
        held = []
        for item in refused if type(refused) is list else ():
            if type(item) is list and len(item) == 3 and type(item[0]) is int and item[0] in sent:
                seq, kind, payload = sent[item[0]]
                held.append((seq, kind, payload, str(item[1])[:64], str(item[2])[:255]))
        count = await self.db.write(outbox_store.hold, parent, held)
        self.held += count
        logs.event(log, logging.WARNING, "upstream.held", parent=parent, rows=count)

    async def _check_gap(self, parent: str, applied: int) -> None:
        """Whether rows the parent has not applied were trimmed already; if so, requeue all.

        A parent that has applied more than this cell ever wrote holds a newer
        past than this database (restored from a backup, or made anew): the
        counter moves past it, so new rows are not taken as seen, and
        everything is queued again.
        """
        last = await self.db.read(outbox_store.last_seq)  # first: rows may be added meanwhile
        if applied > last:
            await self.db.write(outbox_store.skip_seq, applied)
            await self._requeue_everything(parent, applied, last + 1)
            return
        rows = await self.db.read(outbox_store.read_outbox, applied, 1)
        first = rows[0][0] if rows else last + 1
        if first > applied + 1:
            await self._requeue_everything(parent, applied, first)

    async def _requeue_everything(self, parent: str, applied: int, first: int) -> None:
        logs.event(
            log,
            logging.WARNING,
            "upstream.gap",
            parent=parent,
            applied=applied,
            oldest_kept=first,
            action="requeue every instance of the subtree",
        )
        await self.db.write(outbox_store.requeue, None)
        await self._resync_children()

    async def _trim(self) -> None:
        parents = set(self.node.view.parents)
        if parents and parents <= self.acked.keys():
            upto = min(self.acked[name] for name in parents)
            await self.db.write(outbox_store.trim_outbox, upto)


def within_bytes(rows: Rows, limit: int) -> Rows:
    """The leading rows whose payloads fit in `limit` bytes; always at least the first."""
    total = 0
    for index, (_, _, payload) in enumerate(rows):
        total += len(payload)
        if total > limit and index > 0:
            return rows[:index]
    return rows


def _sequence(answer: Any) -> int:
    value = answer.get("applied") if isinstance(answer, dict) else None
    if type(value) is not int or not 0 <= value <= outbox_store.MAX_SEQ:
        raise SchemaError("the parent's answer has no applied sequence")
    return value
