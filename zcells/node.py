"""A running cell's message loop: transport events in, the core's actions carried out.

`Node` decides nothing about messages: `zcells.core.CellCore` does. The loop
reads the transport, hands each event to the core with the time, and does
what the core returns (sends, answers, runs methods, settles this cell's
own calls), as httpcore drives h11. It also keeps the one timer the core
asks for and the heartbeat.

Rules kept here:

* A failure while carrying out one event is logged and counted; it never
  stops the loop.
* Every task the loop starts (heartbeats, each coroutine handler) belongs
  to the cell's `Supervisor`: when the loop stops, they stop with it, and
  a cancellation is never swallowed.
* Time comes from the injected `Clock`, never from the event loop or `time`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from zcells import logs, routing
from zcells.actions import Action, Answer, Placed, Refused, Run, Send, Settle
from zcells.clock import Clock, SystemClock, Timer
from zcells.core import SHRUNK_SIZE, CellCore, NodeSettings
from zcells.dispatch import Dispatcher
from zcells.errors import KeyRevoked, TooLarge, TransportClosed, WireError
from zcells.liveness import Liveness
from zcells.messages import CellResult, Response
from zcells.methods import MethodTable
from zcells.names import join_path
from zcells.neighbours import Neighbourhood
from zcells.peer import Peer
from zcells.records import Client, Neighbour
from zcells.supervisor import Supervisor
from zcells.transport import LinkChange, Received, Transport

__all__ = ["Node", "NodeSettings"]

log = logs.get_logger("node")


class Node:
    """One cell's message loop over a transport."""

    def __init__(
        self,
        settings: NodeSettings,
        transport: Transport,
        methods: MethodTable,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.clock = clock or SystemClock()
        self.core = CellCore(settings, methods, self.clock.now())
        self.dispatch = Dispatcher(methods, self.clock, self._spawn, self.core.counters)
        # Called with this cell's full path when a parent places it (after a start, or a
        # move to a new parent), so its own records can follow.
        self.on_placed: Callable[[str], None] | None = None
        # Called with the neighbour whenever a link to it comes up.
        self.on_link_up: Callable[[Peer], None] | None = None
        self._settling: dict[int, asyncio.Future[Any]] = {}  # this cell's own calls
        self._timer: Timer | None = None
        self._timer_at: float | None = None
        self._supervisor: Supervisor | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def methods(self) -> MethodTable:
        return self.core.methods

    def install(self, methods: MethodTable) -> None:
        """Serve `methods` from now on (handlers that call through this node come after it)."""
        self.core.methods = methods
        self.dispatch.methods = methods

    @property
    def neighbours(self) -> Neighbourhood:
        return self.core.neighbours

    @property
    def view(self) -> routing.View:
        return self.core.view

    @property
    def cell_type(self) -> str:
        return self.settings.cell_type

    @property
    def disabled(self) -> frozenset[str]:
        return self.core.neighbours.disabled

    @property
    def weights(self) -> Mapping[str, tuple[float, float]]:
        return self.core.neighbours.weights

    @property
    def problems(self) -> Mapping[str, str]:
        return self.core.neighbours.problems

    @property
    def counters(self) -> Any:
        return self.core.counters

    @property
    def started_at(self) -> float:
        return self.core.started_at

    def apply_registry(self, neighbours: list[Neighbour], clients: list[Client]) -> None:
        """Take a fresh read of the cells and clients tables: keyring, parents, view."""
        self.transport.apply(self.core.apply_registry(neighbours, clients, self.clock.now()))

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, tasks: Supervisor | None = None) -> None:
        """Serve until cancelled or the transport closes; its tasks go to `tasks`."""
        if tasks is None:
            async with Supervisor() as own:
                await self.run(own)
            return
        self._supervisor = tasks
        try:
            self._own(tasks.spawn(self._heartbeats(), name="heartbeats"))
            await self._serve()
        finally:
            self._supervisor = None
            for task in list(self._tasks):  # what this loop started stops with it
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None

    async def _serve(self) -> None:
        while True:
            try:
                event = await self.transport.recv()
            except TransportClosed:
                return
            try:
                self._on_event(event)
            except Exception:  # a bug while handling one event must not stop the cell
                self.core.counters["internal_errors"] += 1
                log.exception("event.failed")

    def _own(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, coro: Coroutine[Any, Any, None], peer: Peer | None = None) -> None:
        """Run a coroutine handler under the cell's supervisor."""
        if self._supervisor is None:  # not serving: nothing may outlive the loop
            coro.close()
            return
        self._own(self._supervisor.spawn(coro, name="handler"))

    def _on_event(self, event: Received | LinkChange) -> None:
        now, wall = self.clock.now(), self.clock.wall()
        if isinstance(event, LinkChange):
            logs.event(
                log,
                logging.INFO if event.up else logging.WARNING,
                "link.up" if event.up else "link.down",
                peer=event.peer,
                reason=event.reason,
            )
            self._carry_out(self.core.link_changed(event, wall))
            if event.up and self.on_link_up is not None:
                self.on_link_up(event.peer)
        elif event.error is not None:
            self._carry_out(self.core.bad_message(event.peer, event.error, now, wall))
        elif event.message is not None:
            self._carry_out(self.core.receive(event.peer, event.message, now, wall))

    async def _heartbeats(self) -> None:
        while True:
            await self.clock.sleep(self.settings.heartbeat_interval_s)
            self.beat()

    def beat(self) -> None:
        """Send heartbeats to every neighbour and move liveness on by the silence so far."""
        self._carry_out(self.core.beat(self.clock.now(), self.clock.wall()))

    def liveness(self) -> dict[Peer, Liveness]:
        return self.core.neighbours.liveness(self.clock.now())

    def silence(self) -> dict[Peer, float | None]:
        """Seconds since each neighbour was last heard (None: never), for the status view."""
        return self.core.neighbours.silence(self.clock.now())

    # -- carrying out the core's actions ------------------------------------------------------

    def _carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(action)
            elif isinstance(action, Answer):
                self._answer(action)
            elif isinstance(action, Run):
                self._run(action)
            elif isinstance(action, Settle):
                self._settle(action)
            elif isinstance(action, Refused):
                self._log_refusal(action)
            elif isinstance(action, Placed) and self.on_placed is not None:
                self.on_placed(action.path)
        self._arm()

    def _send(self, send: Send) -> None:
        try:
            self.transport.send(send.peer, send.message)
        except WireError as exc:
            error = self.core.as_own(send.peer, exc)
            if send.failed is not None:
                self._carry_out(self.core.send_failed(send.failed, error, self.clock.wall()))
            elif not send.quiet:
                self._log_send_failed(send.peer, error)

    def _answer(self, answer: Answer) -> None:
        try:
            size = self.transport.send(answer.peer, answer.response)
        except TooLarge as exc:  # said instead of each value that made it too large
            shrunk = self.core.too_large(answer, exc)
            self._send(Send(shrunk.peer, shrunk.response))
            size = SHRUNK_SIZE * len(answer.response.results)
        except WireError as exc:
            self._log_send_failed(answer.peer, self.core.as_own(answer.peer, exc))
            return
        self.core.answered(answer, size)

    def _run(self, run: Run) -> None:
        def done(result: CellResult) -> None:
            now, wall = self.clock.now(), self.clock.wall()
            self._carry_out(self.core.ran(run.token, result, now, wall))

        self.dispatch.run(run.request, run.peer, run.caller, run.method, run.deadline, done)

    def _settle(self, settle: Settle) -> None:
        future = self._settling.pop(settle.token, None)
        if future is None or future.done():
            return  # its caller gave up already
        if settle.error is not None:
            future.set_exception(settle.error)
        elif settle.response is not None:
            future.set_result(settle.response)
        else:
            future.set_result(settle.results)

    def _arm(self) -> None:
        """Keep one timer, at the core's next deadline."""
        deadline = self.core.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.clock.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        due = self._timer_at or 0.0
        self._timer = self._timer_at = None
        try:
            self._carry_out(self.core.tick(max(self.clock.now(), due), self.clock.wall()))
        except Exception:
            self.core.counters["internal_errors"] += 1
            log.exception("timer.failed")
            self._arm()

    def _log_refusal(self, refused: Refused) -> None:
        error, peer, request = refused.error, refused.peer, refused.request
        if request is not None:
            logs.limited(
                log,
                logging.INFO,
                "request.refused",
                peer,
                id=request.id.hex(),
                method=request.method[:64],
                path=join_path(request.path)[:200],
                peer=peer,
                code=error.code,
                error=error.message,
            )
        elif not isinstance(error, KeyRevoked):  # the transport said so already, once
            logs.limited(
                log,
                logging.WARNING,
                "message.refused",
                peer,
                peer=peer,
                code=error.code,
                error=error.message,
            )

    def _log_send_failed(self, peer: Peer, error: WireError) -> None:
        logs.limited(
            log,
            logging.WARNING,
            "send.failed",
            peer,
            peer=peer,
            code=error.code,
            error=error.message,
        )

    # -- calls this cell makes itself ---------------------------------------------------------

    async def call(
        self, method: str, body: Mapping[str, Any], target: str, timeout_s: float | None = None
    ) -> CellResult:
        """A targeted call from this cell; the result of the target cell."""
        timeout_s = self.settings.call_timeout_s if timeout_s is None else timeout_s
        now, wall = self.clock.now(), self.clock.wall()
        token, actions = self.core.call(method, body, target, timeout_s, now, wall)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._settling[token] = future
        self._carry_out(actions)
        response = await future
        return response.results[0]

    async def broadcast(
        self, method: str, body: Mapping[str, Any], timeout_s: float | None = None
    ) -> tuple[CellResult, ...]:
        """A broadcast from this cell to every cell below it (not itself): one result each.

        A child that does not answer in time is a `timed_out` result; the others are kept.
        """
        timeout_s = self.settings.call_timeout_s if timeout_s is None else timeout_s
        now, wall = self.clock.now(), self.clock.wall()
        token, actions = self.core.broadcast(method, body, timeout_s, now, wall)
        future: asyncio.Future[tuple[CellResult, ...]] = asyncio.get_running_loop().create_future()
        self._settling[token] = future
        self._carry_out(actions)
        return await future

    def statistics(self) -> dict[str, Any]:
        return {
            "cell": self.core.here(),
            "path": self.core.neighbours.known_path,
            **self.core.statistics(),
            "neighbours": {str(p): s.value for p, s in self.liveness().items()},
            "transport": self.transport.statistics(),
            **self.core.counters,
        }
