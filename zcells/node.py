"""A running cell's message loop: transport events in, routing decisions out.

Rules kept here:

* The routing core decides; this module only carries the decisions out, so
  every rule about where a message goes lives in `zcells.routing`.
* Every request gets exactly one answer when one is wanted: a result, a typed
  error, or a timeout. A failure while handling one message is answered or
  logged and counted; it never stops the loop.
* A client's request is re-issued by this cell in the client's name: the
  context (client, project, role) comes from this cell's own registry, never
  from the wire, and the response goes back to that client only.
* Work is bounded: requests in flight per peer (`Busy` past the limit), the
  duplicate-request memory, and each request's deadline.
* Time comes from the injected clocks; the heartbeat and expiry logic never
  reads the clock itself.

The module is longer than most: requests, relays, broadcasts and this cell's
own calls share the relay and gather tables, the per-peer in-flight counts
and the answer path, and each part is short; split apart they would reach
into one another's state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from zcells import logs, routing
from zcells.clock import Clock, SystemClock, Timer
from zcells.dispatch import Dispatcher
from zcells.errors import (
    Busy,
    CallTimeout,
    CellUnreachable,
    Forbidden,
    InvalidRequest,
    KeyRevoked,
    SenderMismatch,
    StaleMessage,
    TooLarge,
    TransportClosed,
    TransportError,
    WireError,
)
from zcells.liveness import Liveness
from zcells.messages import (
    Broadcast,
    CellResult,
    Direction,
    Heartbeat,
    Hello,
    Outcome,
    Request,
    RequestContext,
    Response,
    Targeted,
    evolve,
    new_message_id,
)
from zcells.methods import Method, MethodTable
from zcells.neighbours import Neighbourhood
from zcells.peer import Peer, Role
from zcells.records import Client, Neighbour
from zcells.transport import LinkChange, Received, Transport

log = logs.get_logger("node")


# What an answer's results cost on the wire once each value was replaced by TooLarge.
_SHRUNK_SIZE: Final = 256


def _shrunk(result: CellResult, error: TooLarge) -> CellResult:
    """`result` without its value, which made the answer too large to send."""
    if result.outcome is not Outcome.OK:
        return result
    return CellResult(result.cell, Outcome.ERROR, error=TooLarge(error.message, error.cell))


@dataclass(frozen=True)
class NodeSettings:
    name: str
    cell_type: str
    call_timeout_s: float = 60.0
    max_hop_count: int = 10
    heartbeat_interval_s: float = 5.0
    mute_after_s: float = 300.0
    max_in_flight_per_peer: int = 256
    max_clock_skew_s: float = 300.0
    remember_requests: int = 10_000
    remember_bytes: int = 16 << 20  # answers kept for duplicates, by their size on the wire
    remember_answer_bytes: int = 64 << 10  # a larger answer is not kept (a listing page, say)


@dataclass
class _Relay:
    """A request this cell sent on to a neighbour and whose answer it passes back.

    Kept under (neighbour, id of the message sent to it): only that neighbour's
    response to that message is accepted, which is how a response retraces
    the request's path hop by hop.
    """

    via: Peer
    target: str
    started: float
    requester: Peer | None  # whom to answer; None for this cell's own call
    request_id: bytes  # the id the requester used
    future: asyncio.Future[Response] | None = None
    handle: Timer | None = None


@dataclass
class _Gather:
    """A broadcast this hop fanned out, collecting its subtree's answers."""

    sender: Peer | None  # None for this cell's own broadcast
    request: Broadcast
    aggregation: routing.Aggregation
    started: float
    sent_at: dict[Peer, float] = field(default_factory=dict)
    handle: Timer | None = None
    future: asyncio.Future[tuple[CellResult, ...]] | None = None


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
        self.methods = methods
        self.clock = clock or SystemClock()
        self.neighbours = Neighbourhood(
            settings.name,
            settings.cell_type,
            max_hop_count=settings.max_hop_count,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            mute_after_s=settings.mute_after_s,
        )
        self._relays: dict[tuple[Peer, bytes], _Relay] = {}
        self._gathers: dict[bytes, _Gather] = {}
        self._in_flight: Counter[Peer] = Counter()
        # (peer, request id) -> the answer sent and its size, or None while unanswered
        self._recent: OrderedDict[tuple[Peer, bytes], tuple[Response, int] | None] = OrderedDict()
        self._recent_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # (client, project, role) -> the context its requests carry, less the request id
        self._contexts: dict[tuple[str, str | None, str], RequestContext] = {}
        self.counters: Counter[str] = Counter()
        self.dispatch = Dispatcher(methods, self.clock, self._spawn, self.counters)
        # Called with this cell's full path when a parent places it (after a start, or a
        # move to a new parent), so its own records can follow.
        self.on_placed: Callable[[str], None] | None = None
        self.started_at = self.clock.now()

    def install(self, methods: MethodTable) -> None:
        """Serve `methods` from now on (handlers that call through this node come after it)."""
        self.methods = methods
        self.dispatch.methods = methods

    # -- the registry -----------------------------------------------------------------------

    def apply_registry(self, neighbours: list[Neighbour], clients: list[Client]) -> None:
        """Take a fresh read of the cells and clients tables: keyring, parents, view."""
        self.transport.apply(self.neighbours.apply(neighbours, clients, self.clock.now()))
        self._contexts.clear()

    @property
    def view(self) -> routing.View:
        return self.neighbours.view

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled or the transport closes."""
        heartbeats = asyncio.create_task(self._heartbeat_loop(), name="heartbeats")
        try:
            while True:
                try:
                    event = await self.transport.recv()
                except TransportClosed:
                    return
                try:
                    self._on_event(event)
                except Exception:  # a bug while handling one event must not stop the cell
                    self.counters["internal_errors"] += 1
                    log.exception("event.failed")
        finally:
            heartbeats.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(heartbeats, *self._tasks, return_exceptions=True)
            handles = [r.handle for r in self._relays.values()]
            handles += [g.handle for g in self._gathers.values()]
            for handle in handles:
                if handle is not None:
                    handle.cancel()

    def _spawn(self, coro: Any, peer: Peer | None = None) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        self._hold(peer)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._release(peer)

        task.add_done_callback(done)

    def _hold(self, peer: Peer | None) -> None:
        """Count one more piece of work (handler, relay or broadcast) for `peer`."""
        if peer is not None:
            self._in_flight[peer] += 1

    def _release(self, peer: Peer | None) -> None:
        if peer is not None:
            self._in_flight[peer] -= 1
            if self._in_flight[peer] <= 0:
                del self._in_flight[peer]

    def _on_event(self, event: Received | LinkChange) -> None:
        if isinstance(event, LinkChange):
            self._on_link(event)
            return
        peer = event.peer
        self.neighbours.heard(peer, self.clock.now())
        if event.error is not None:
            self._on_bad_message(peer, event.error)
            return
        message = event.message
        if isinstance(message, Targeted | Broadcast):
            self._on_request(peer, message)
        elif isinstance(message, Response):
            self._on_response(peer, message)
        elif isinstance(message, Hello):
            before = self.neighbours.known_path
            self._send_all(self.neighbours.on_hello(peer, message, self.clock.wall()))
            self._placed(before)
        elif isinstance(message, Heartbeat):
            before = self.neighbours.known_path
            self._send_all(
                self.neighbours.learn(peer, message.path, message.your_path, self.clock.wall())
            )
            self._placed(before)

    def _placed(self, before: str | None) -> None:
        """Tell `on_placed` when a parent placed this cell, or placed it somewhere new."""
        after = self.neighbours.known_path
        if after is not None and after != before and self.on_placed is not None:
            self.on_placed(after)

    def _on_bad_message(self, peer: Peer, error: WireError) -> None:
        self.counters[f"refused_{error.code}"] += 1
        if not isinstance(error, KeyRevoked):  # the transport said so already, once
            logs.limited(
                log,
                logging.WARNING,
                "message.refused",
                peer,
                peer=peer,
                code=error.code,
                error=error.message,
            )
        reply_to = getattr(error, "reply_to", None)
        if reply_to is not None:
            error.cell = error.cell or self._here()
            self._answer(
                peer, reply_to, (), (CellResult(self._here(), Outcome.ERROR, error=error),), 0.0
            )

    # -- links, hellos, heartbeats ----------------------------------------------------------

    def _on_link(self, change: LinkChange) -> None:
        logs.event(
            log,
            logging.INFO if change.up else logging.WARNING,
            "link.up" if change.up else "link.down",
            peer=change.peer,
            reason=change.reason,
        )
        if change.up and change.peer.role is Role.PARENT:
            self._send_soon(change.peer, self.neighbours.hello_for(change.peer, self.clock.wall()))

    def _send_all(
        self, outgoing: list[tuple[Peer, Hello | Heartbeat]], quiet: bool = False
    ) -> None:
        for peer, message in outgoing:
            self._send_soon(peer, message, quiet=quiet)

    def _here(self) -> str:
        return self.neighbours.here

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.clock.sleep(self.settings.heartbeat_interval_s)
            self.beat()

    def beat(self) -> None:
        """Send heartbeats to every neighbour and move liveness on by the silence so far."""
        self._send_all(self.neighbours.beat(self.clock.now(), self.clock.wall()), quiet=True)

    def liveness(self) -> dict[Peer, Liveness]:
        return self.neighbours.liveness(self.clock.now())

    def silence(self) -> dict[Peer, float | None]:
        """Seconds since each neighbour was last heard (None: never), for the status view."""
        return self.neighbours.silence(self.clock.now())

    # -- sending ----------------------------------------------------------------------------

    def _send_soon(
        self,
        peer: Peer,
        message: Any,
        quiet: bool = False,
        on_error: Callable[[WireError], None] | None = None,
    ) -> None:
        """Send at once; a failure goes to `on_error` or the log, never up the stack.

        A failure is reported as this cell's: a broken or closed link to a
        neighbour is `CellUnreachable` to whoever asked.
        """
        try:
            self.transport.send(peer, message)
        except WireError as exc:
            self._send_failed(peer, exc, quiet, on_error)

    def _send_failed(
        self,
        peer: Peer,
        exc: WireError,
        quiet: bool = False,
        on_error: Callable[[WireError], None] | None = None,
    ) -> None:
        if isinstance(exc, TransportError):
            exc = CellUnreachable(f"cannot reach {peer}: {exc.message}", self._here())
        exc.cell = self._here()
        self.counters[f"send_{exc.code}"] += 1
        if on_error is not None:
            on_error(exc)
        elif not quiet:
            logs.limited(
                log,
                logging.WARNING,
                "send.failed",
                peer,
                peer=peer,
                code=exc.code,
                error=exc.message,
            )

    def _answer(
        self,
        peer: Peer,
        reply_to: bytes,
        path: tuple[str, ...],
        results: tuple[CellResult, ...],
        held_ms: float,
    ) -> None:
        response = Response(
            id=new_message_id(),
            reply_to=reply_to,
            path=path,
            results=results,
            sent_at=self.clock.wall(),
            held_ms=max(0.0, held_ms),
        )
        try:
            size = self.transport.send(peer, response)
        except TooLarge as exc:  # said instead of each value that made it too large
            exc.cell = self._here()
            self.counters["answers_too_large"] += 1
            response = evolve(response, results=tuple(_shrunk(r, exc) for r in results))
            self._send_soon(peer, response)
            size = _SHRUNK_SIZE * len(results)
        except WireError as exc:
            self._send_failed(peer, exc)
            return
        self._keep_answer(peer, reply_to, response, size)

    def _keep_answer(self, peer: Peer, reply_to: bytes, response: Response, size: int) -> None:
        """Keep an answer for a duplicate of its request, within `remember_bytes` in all."""
        key = (peer, reply_to)
        recent = self._recent
        if key not in recent or size > self.settings.remember_answer_bytes:
            return  # a duplicate of a request whose answer is not kept is dropped, unanswered
        old = recent[key]
        if old is not None:
            self._recent_bytes -= old[1]
        recent[key] = (response, size)
        self._recent_bytes += size
        while self._recent_bytes > self.settings.remember_bytes and recent:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, kept = self._recent.popitem(last=False)
        if kept is not None:
            self._recent_bytes -= kept[1]

    # -- requests ---------------------------------------------------------------------------

    def _caller(self, peer: Peer) -> str:
        if peer.role is Role.CLIENT:
            client = self.neighbours.clients.get(peer.name)
            if client is None:
                raise Forbidden(f"client {peer.name} is not registered", self._here())
            return client.role
        return peer.role.value

    def _remember(self, peer: Peer, message: Request) -> bool:
        """False when this request was seen already (its answer, if any, is sent again)."""
        key = (peer, message.id)
        if key in self._recent:
            self.counters["duplicates"] += 1
            kept = self._recent[key]
            if kept is not None:
                self._send_soon(peer, kept[0])
            return False
        self._recent[key] = None
        while len(self._recent) > self.settings.remember_requests:
            self._forget_oldest()
        return True

    def _on_request(self, peer: Peer, message: Request) -> None:
        started = self.clock.now()
        if not self._remember(peer, message):
            return
        try:
            skew = abs(self.clock.wall() - message.sent_at)
            if skew > self.settings.max_clock_skew_s:
                raise StaleMessage(f"sent {skew:.0f}s away from this cell's clock", self._here())
            caller = self._caller(peer)
            in_flight = self._in_flight.get(peer, 0)  # get: a Counter's __missing__ is Python
            if in_flight >= self.settings.max_in_flight_per_peer:
                raise Busy(f"{peer} has {in_flight} requests in flight", self._here())
            if peer.role is Role.CLIENT:
                message = self._as_client_request(peer, caller, message)
            elif peer.role is Role.CHILD and message.context is not None:
                message = evolve(message, context=None)  # children never speak for users
            view = self.neighbours.view
            stamped = routing.accept(view, peer, message)
            method = self.methods.resolve(message.kind, message.method, caller)
        except WireError as exc:
            self._refuse(peer, message, exc)
            return
        deadline = started + self._budget_s(message)
        if isinstance(stamped, Targeted):
            try:
                decision = routing.route_targeted(view, stamped, peer)
                if method.own_link:
                    routing.check_own_link(stamped, decision, peer)
            except WireError as exc:
                self._refuse(peer, message, exc)
                return
            if isinstance(decision, routing.Deliver):
                self._deliver(peer, message, stamped, caller, method, deadline)
            else:
                self._forward(peer, message, decision, started, deadline)
        else:
            fanout = routing.route_broadcast(view, stamped)
            self._fan_out(peer, message, fanout, caller, method, started, deadline)

    def _as_client_request(self, peer: Peer, role: str, message: Request) -> Request:
        client = self.neighbours.clients[peer.name]
        key = (peer.name, client.project, role)
        context = self._contexts.get(key)
        if context is None:  # checked once per client, not once per request
            context = RequestContext(
                request_id="-", client=peer.name, project=client.project, roles=(role,)
            )
            self._contexts[key] = context
        hex_id = message.id.hex()  # the request id reads as the uuid of the client's message id
        request_id = f"{hex_id[:8]}-{hex_id[8:12]}-{hex_id[12:16]}-{hex_id[16:20]}-{hex_id[20:]}"
        return evolve(
            message,
            context=evolve(context, request_id=request_id),
            max_hops=self.settings.max_hop_count,
        )

    def _budget_s(self, message: Request) -> float:
        return min(message.timeout_ms / 1000.0, self.settings.call_timeout_s)

    def _refuse(self, peer: Peer, message: Request, error: WireError) -> None:
        here = self._here_for(peer, message)
        self.counters[f"refused_{error.code}"] += 1
        error.cell = error.cell or here
        logs.limited(
            log,
            logging.INFO,
            "request.refused",
            peer,
            id=message.id.hex(),
            method=message.method[:64],
            path="!".join(message.path)[:200],
            peer=peer,
            code=error.code,
            error=error.message,
        )
        if message.want_response:
            result = CellResult(here, Outcome.ERROR, error=error)
            path = () if peer.role is Role.CLIENT else message.path  # a client's path is empty
            self._answer(peer, message.id, path, (result,), 0.0)

    def _here_for(self, peer: Peer, message: Request) -> str:
        """This cell's full path as the sender of `message` knows it.

        Under a parent, that is the parent's path as the parent said in its hello,
        not whatever the (possibly refused) message claims.
        """
        if peer.role is Role.PARENT:
            parent_path = self.view.parents.get(peer.name)
            if parent_path is None and message.path:  # no hello yet: as the parent names it
                parent_path = message.path[-1]
            if parent_path is not None:
                return f"{parent_path}!{self.settings.name}"
        return self._here()

    def _deliver(
        self,
        peer: Peer,
        message: Request,
        stamped: Request,
        caller: str,
        method: Method,
        deadline: float,
    ) -> None:
        started = self.clock.now()

        def answer(result: CellResult) -> None:
            if message.want_response:
                self._answer(
                    peer, message.id, stamped.path, (result,), (self.clock.now() - started) * 1000.0
                )

        self.dispatch.run(stamped, peer, caller, method, deadline, answer)

    def _forward(
        self,
        peer: Peer,
        message: Request,
        decision: routing.Forward,
        started: float,
        deadline: float,
    ) -> None:
        stamped = decision.message
        assert isinstance(stamped, Targeted)
        outgoing = self._outgoing(stamped, deadline)
        if message.want_response:
            relay = _Relay(
                via=decision.to,
                target=stamped.target,
                started=started,
                requester=peer,
                request_id=message.id,
            )
            self._watch(outgoing.id, relay, deadline)

        def failed(error: WireError) -> None:
            if self._drop_relay(decision.to, outgoing.id) is not None or not message.want_response:
                self._refuse(peer, message, error)

        self._send_soon(decision.to, outgoing, on_error=failed)

    def _outgoing(self, message: Request, deadline: float) -> Request:
        """The copy of a request for the next hop: its own id, the time left for it."""
        remaining_ms = max(0, int((deadline - self.clock.now()) * 1000))
        return evolve(
            message,
            id=new_message_id(),
            sent_at=self.clock.wall(),
            timeout_ms=routing.forward_budget_ms(remaining_ms),
        )

    def _watch(self, message_id: bytes, relay: _Relay, deadline: float) -> None:
        self._relays[(relay.via, message_id)] = relay
        self._hold(relay.requester)
        relay.handle = self.clock.call_at(
            deadline, functools.partial(self._expire_relay, relay.via, message_id)
        )

    def _drop_relay(self, via: Peer, message_id: bytes) -> _Relay | None:
        relay = self._relays.pop((via, message_id), None)
        if relay is not None:
            if relay.handle is not None:
                relay.handle.cancel()
            self._release(relay.requester)
        return relay

    def _expire_relay(self, via: Peer, message_id: bytes) -> None:
        relay = self._drop_relay(via, message_id)
        if relay is None:
            return
        self.counters["timeouts"] += 1
        if relay.future is not None and not relay.future.done():
            relay.future.set_exception(CallTimeout("no response before the deadline", relay.target))
        if relay.requester is not None:
            result = CellResult(relay.target, Outcome.TIMED_OUT)
            self._answer(
                relay.requester,
                relay.request_id,
                (),
                (result,),
                (self.clock.now() - relay.started) * 1000.0,
            )

    # -- broadcasts -------------------------------------------------------------------------

    def _fan_out(
        self,
        peer: Peer,
        message: Request,
        fanout: routing.Fanout,
        caller: str,
        method: Method,
        started: float,
        deadline: float,
    ) -> None:
        stamped = fanout.message
        assert isinstance(message, Broadcast)
        # Every cell below the origin runs the broadcast; `run_locally` is the origin's choice.
        outgoing = evolve(self._outgoing(stamped, deadline), run_locally=True)
        gather = _Gather(
            sender=peer,
            request=message,
            started=started,
            aggregation=routing.Aggregation(stamped.path[-1], fanout.to, fanout.local),
        )
        self._hold(peer)
        self._start_gather(gather, outgoing, fanout.to, deadline)
        if fanout.local:

            def local_done(result: CellResult) -> None:
                if outgoing.id in self._gathers:
                    gather.aggregation.add_local(result)
                    if gather.aggregation.done:
                        self._finish_gather(outgoing.id)

            self.dispatch.run(stamped, peer, caller, method, deadline, local_done)
        elif gather.aggregation.done:
            self._finish_gather(outgoing.id)

    def _start_gather(
        self, gather: _Gather, outgoing: Request, to: tuple[Peer, ...], deadline: float
    ) -> None:
        """Send a broadcast on to `to`, collecting their answers until `deadline`."""
        self._gathers[outgoing.id] = gather
        gather.handle = self.clock.call_at(
            deadline, functools.partial(self._finish_gather, outgoing.id)
        )
        for neighbour in to:
            gather.sent_at[neighbour] = self.clock.now()

            def failed(error: WireError, neighbour: Peer = neighbour) -> None:
                gather.aggregation.fail(neighbour, error)

            self._send_soon(neighbour, outgoing, on_error=failed)

    def _finish_gather(self, message_id: bytes) -> None:
        gather = self._gathers.pop(message_id, None)
        if gather is None:
            return
        if gather.handle is not None:
            gather.handle.cancel()
        self._release(gather.sender)
        results = gather.aggregation.finish()
        if gather.future is not None and not gather.future.done():
            gather.future.set_result(results)
        if gather.sender is not None and gather.request.want_response:
            self._answer(
                gather.sender,
                gather.request.id,
                gather.request.path,
                results,
                (self.clock.now() - gather.started) * 1000.0,
            )

    # -- responses --------------------------------------------------------------------------

    def _on_response(self, peer: Peer, response: Response) -> None:
        gather = self._gathers.get(response.reply_to)
        if gather is not None and gather.aggregation.expects(peer):
            link_ms = (self.clock.now() - gather.sent_at[peer]) * 1000.0 - response.held_ms
            try:
                gather.aggregation.add(peer, response.results, max(0.0, link_ms))
            except WireError as exc:
                self._on_bad_message(peer, exc)
                gather.aggregation.fail(peer, exc)
            if gather.aggregation.done:
                self._finish_gather(response.reply_to)
            return
        relay = self._drop_relay(peer, response.reply_to)
        if relay is None:
            # Late (its requester was answered with a timeout already), or not an
            # answer to anything this cell sent to that peer: never passed on.
            self.counters["unmatched_responses"] += 1
            logs.event(
                log,
                logging.DEBUG,
                "response.unmatched",
                peer=peer,
                reply_to=response.reply_to.hex(),
            )
            return
        if not self._plausible_answer(relay, response):
            self._refuse_answer(peer, relay)
            return
        if relay.future is not None and not relay.future.done():
            relay.future.set_result(response)
        if relay.requester is not None:
            self._answer(
                relay.requester,
                relay.request_id,
                response.path,
                response.results,
                (self.clock.now() - relay.started) * 1000.0,
            )

    def _plausible_answer(self, relay: _Relay, response: Response) -> bool:
        """One result, and from a child only for a cell in that child's subtree."""
        if len(response.results) != 1:
            return False
        if relay.via.role is Role.CHILD:
            child_path = f"{self._here()}!{relay.via.name}"
            return routing.is_below(response.results[0].cell, child_path)
        return True

    def _refuse_answer(self, peer: Peer, relay: _Relay) -> None:
        error = SenderMismatch(f"{peer} answered for cells it does not hold", self._here())
        self._on_bad_message(peer, error)
        if relay.future is not None and not relay.future.done():
            relay.future.set_exception(error)
        if relay.requester is not None:
            result = CellResult(self._here(), Outcome.ERROR, error=error)
            self._answer(relay.requester, relay.request_id, (), (result,), 0.0)

    # -- calls this cell makes itself ---------------------------------------------------------

    def _own_fields(
        self, method: str, body: Mapping[str, Any], here: str, timeout_s: float
    ) -> dict[str, Any]:
        """The fields of a request this cell starts: sent from `here`, down, wanting an answer."""
        return dict(
            id=new_message_id(),
            method=method,
            body=dict(body),
            direction=Direction.DOWN,
            path=(here,),
            hops=1,
            max_hops=self.settings.max_hop_count,
            want_response=True,
            timeout_ms=int(timeout_s * 1000),
            sent_at=self.clock.wall(),
            context=None,
        )

    async def call(
        self, method: str, body: Mapping[str, Any], target: str, timeout_s: float | None = None
    ) -> CellResult:
        """A targeted call from this cell; the result of the target cell."""
        timeout_s = self.settings.call_timeout_s if timeout_s is None else timeout_s
        here = self.view.home_path(target)
        message = Targeted(**self._own_fields(method, body, here, timeout_s), target=target)
        decision = routing.route_targeted(self.view, message, None)
        if not isinstance(decision, routing.Forward):
            raise InvalidRequest("a cell does not call itself", here)
        started = self.clock.now()
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        outgoing = self._outgoing(decision.message, started + timeout_s)
        self._watch(
            outgoing.id,
            _Relay(
                via=decision.to,
                target=target,
                started=started,
                requester=None,
                request_id=message.id,
                future=future,
            ),
            started + timeout_s,
        )
        try:
            self.transport.send(decision.to, outgoing)
        except WireError:
            self._drop_relay(decision.to, outgoing.id)
            raise
        response = await future
        return response.results[0]

    async def broadcast(
        self, method: str, body: Mapping[str, Any], timeout_s: float | None = None
    ) -> tuple[CellResult, ...]:
        """A broadcast from this cell to every cell below it (not itself): one result each.

        A child that does not answer in time is a `timed_out` result; the others are kept.
        """
        timeout_s = self.settings.call_timeout_s if timeout_s is None else timeout_s
        here = self.view.home_path()
        message = Broadcast(**self._own_fields(method, body, here, timeout_s), run_locally=False)
        started = self.clock.now()
        fanout = routing.route_broadcast(self.view, message)
        outgoing = evolve(self._outgoing(message, started + timeout_s), run_locally=True)
        future: asyncio.Future[tuple[CellResult, ...]] = asyncio.get_running_loop().create_future()
        gather = _Gather(
            sender=None,
            request=message,
            started=started,
            aggregation=routing.Aggregation(here, fanout.to, False),
            future=future,
        )
        self._start_gather(gather, outgoing, fanout.to, started + timeout_s)
        if gather.aggregation.done:
            self._finish_gather(outgoing.id)
        return await future

    def statistics(self) -> dict[str, Any]:
        return {
            "cell": self._here(),
            "path": self.neighbours.known_path,
            "relays": len(self._relays),
            "gathers": len(self._gathers),
            "in_flight": sum(self._in_flight.values()),
            "neighbours": {str(p): s.value for p, s in self.liveness().items()},
            "transport": self.transport.statistics(),
            **self.counters,
        }
