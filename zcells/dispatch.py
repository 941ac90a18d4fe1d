"""Running a method at this cell: arguments, handler, deadline, and the result it makes.

Rules kept here:

* Only the cell that runs a method decodes and checks the request body
  against the method's parameters.
* A plain-function handler runs inline, at once, and is not started after
  its deadline; a coroutine handler runs as a task under the deadline.
* Whatever a handler does, one `CellResult` comes out: its value, its typed
  error, `CallTimeout`, or `InternalError` naming an incident id that the
  cell's log has the traceback for. Nothing else crosses the wire.
* A value nested deeper than a response may carry is `TooLarge` here, where
  it is made, not a refusal at the next hop that leaves the caller waiting.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from zcells import entropy, logs
from zcells.clock import Clock
from zcells.codec import MAX_VALUE_DEPTH, nests_deeper
from zcells.errors import CallTimeout, InternalError, TooLarge, WireError
from zcells.messages import CellResult, Outcome, Request
from zcells.methods import Call, Method, MethodTable
from zcells.peer import Peer

log = logs.get_logger("node")

Spawn = Callable[[Coroutine[Any, Any, None], Peer | None], None]


class Dispatcher:
    def __init__(
        self, methods: MethodTable, clock: Clock, spawn: Spawn, counters: Counter[str]
    ) -> None:
        self.methods = methods
        self.clock = clock
        self.spawn = spawn
        self.counters = counters

    def run(
        self,
        stamped: Request,
        peer: Peer,
        caller: str,
        method: Method,
        deadline: float,
        done: Callable[[CellResult], None],
    ) -> None:
        """Run `method` for `stamped` here and hand its result to `done`."""
        here = stamped.path[-1]
        try:
            args = self.methods.arguments(method, stamped.body)
        except WireError as exc:
            exc.cell = exc.cell or here
            done(CellResult(here, Outcome.ERROR, error=exc))
            return
        call = Call(
            method=stamped.method,
            args=args,
            sender=peer,
            caller=caller,
            context=stamped.context,
            cell=here,
            deadline=deadline,
        )
        started = self.clock.now()
        if not method.is_coroutine:
            if started > deadline:  # no time left: do not start what cannot finish
                error = CallTimeout(f"{stamped.method} arrived after its deadline", here)
                done(CellResult(here, Outcome.ERROR, error=error))
                return
            try:
                value = method.handler(call)
            except Exception as exc:
                done(self._failed(stamped, here, exc))
                return
            done(self._succeeded(here, value, started))
            return

        async def run_async() -> None:
            try:
                async with self.clock.timeout(max(0.0, deadline - started)):
                    value = await method.handler(call)
            except TimeoutError:
                error = CallTimeout(f"{stamped.method} did not finish in time", here)
                done(CellResult(here, Outcome.ERROR, error=error))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                done(self._failed(stamped, here, exc))
            else:
                done(self._succeeded(here, value, started))

        self.spawn(run_async(), peer)

    def _succeeded(self, here: str, value: Any, started: float) -> CellResult:
        self.counters["handled"] += 1
        if nests_deeper(value, MAX_VALUE_DEPTH):  # the next hop would refuse the whole answer
            self.counters["answers_too_deep"] += 1
            error = TooLarge(f"the answer nests deeper than {MAX_VALUE_DEPTH} levels", here)
            return CellResult(here, Outcome.ERROR, error=error)
        return CellResult(here, Outcome.OK, value=value, rtt_ms=(self.clock.now() - started) * 1e3)

    def _failed(self, stamped: Request, here: str, exc: Exception) -> CellResult:
        if isinstance(exc, WireError):
            exc.cell = exc.cell or here
            return CellResult(here, Outcome.ERROR, error=exc)
        incident = entropy.token_bytes(6).hex()
        log.error(
            "handler.failed id=%s method=%s incident=%s",
            stamped.id.hex(),
            stamped.method,
            incident,
            exc_info=exc,
        )
        self.counters["handler_errors"] += 1
        return CellResult(
            here,
            Outcome.ERROR,
            error=InternalError(
                f"{stamped.method} failed; see the cell log for incident {incident}", here
            ),
        )
