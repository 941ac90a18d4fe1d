"""The cell core: what a cell does with each message, as a state machine without I/O.

`CellCore` is to `zcells.node.Node` what h11's `Connection` is to httpcore:
it holds the relays, the broadcasts being gathered, the duplicate-request
memory, the in-flight counts and the client contexts, and it decides;
`Node` reads the transport, feeds the core, and carries out what it returns.
Every method takes the time (`now`, monotonic; `wall`, for what crosses the
wire) and returns a list of actions; none awaits, sends, reads a clock or
touches a socket.

It returns actions (`zcells.actions`), which the loop carries out in order
and reports on; `next_deadline()` is when the core next wants `tick(now)`.

Rules kept here:

* The routing core (`zcells.routing`) decides where a message goes; this
  module keeps what a hop must remember for the answer to come back.
* Every request gets exactly one answer when one is wanted: a result, a
  typed error or a timeout.
* A client's request is re-issued in the client's name: the context (client,
  project, role) comes from this cell's registry, never from the wire.
* Work is bounded: requests in flight per peer (`Busy` past the limit), the
  duplicate memory (by count and by bytes), and each request's deadline.
* The life of a relay is a transition table (`zcells.relays`).

The module is longer than most: requests, relays, broadcasts and this
cell's own calls share the relay and gather tables, the in-flight counts
and the answer path; split apart they would reach into one another's state.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from zcells import routing
from zcells.actions import (
    Action,
    Answer,
    Failed,
    Placed,
    Refused,
    Run,
    Send,
    SendKind,
    Settle,
)
from zcells.errors import (
    Busy,
    CallTimeout,
    CellUnreachable,
    Forbidden,
    InvalidRequest,
    SenderMismatch,
    StaleMessage,
    TooLarge,
    TransportError,
    WireError,
)
from zcells.messages import (
    Broadcast,
    CellResult,
    Direction,
    Hello,
    Message,
    Outcome,
    Request,
    RequestContext,
    Response,
    Targeted,
    evolve,
    new_message_id,
)
from zcells.methods import Method, MethodTable
from zcells.names import child_path
from zcells.neighbours import Neighbourhood
from zcells.peer import Peer, Role
from zcells.records import Client, Neighbour
from zcells.relays import AnswerMemory, Gather, Relay, RelayEvent
from zcells.transport import LinkChange, Topology

# What an answer's results cost on the wire once each value was replaced by TooLarge.
SHRUNK_SIZE: Final = 256


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


@dataclass(slots=True)
class _Running:
    """A method run here: whom to answer, or which gather takes its result."""

    peer: Peer
    request_id: bytes  # the id the peer used
    path: tuple[str, ...]
    want_response: bool
    started: float
    gather: bytes | None = None
    held: bool = False  # counted in flight for `peer`


class CellCore:
    """One cell's decisions about messages, without I/O."""

    def __init__(self, settings: NodeSettings, methods: MethodTable, now: float) -> None:
        self.settings = settings
        self.methods = methods
        self.neighbours = Neighbourhood(
            settings.name,
            settings.cell_type,
            max_hop_count=settings.max_hop_count,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            mute_after_s=settings.mute_after_s,
        )
        self.relays: dict[tuple[Peer, bytes], Relay] = {}
        self.gathers: dict[bytes, Gather] = {}
        self._running: dict[int, _Running] = {}
        self._in_flight: Counter[Peer] = Counter()
        self.recent = AnswerMemory(
            settings.remember_requests, settings.remember_bytes, settings.remember_answer_bytes
        )
        # (client, project, role) -> the context its requests carry, less the request id
        self._contexts: dict[tuple[str, str | None, str], RequestContext] = {}
        self._deadlines: list[tuple[float, int, str, Any]] = []  # (when, order, kind, key)
        self._order = itertools.count()
        self._tokens = itertools.count(1)
        self.counters: Counter[str] = Counter()
        self.started_at = now

    # -- the registry, links and heartbeats ------------------------------------------------

    def apply_registry(
        self, neighbours: list[Neighbour], clients: list[Client], now: float
    ) -> Topology:
        """A fresh read of the cells and clients tables; the transport's new keyring."""
        self._contexts.clear()
        return self.neighbours.apply(neighbours, clients, now)

    @property
    def view(self) -> routing.View:
        return self.neighbours.view

    def here(self) -> str:
        return self.neighbours.here

    def link_changed(self, change: LinkChange, wall: float) -> list[Action]:
        if change.up and change.peer.role is Role.PARENT:
            return [Send(change.peer, self.neighbours.hello_for(change.peer, wall))]
        return []

    def beat(self, now: float, wall: float) -> list[Action]:
        """Heartbeats to every neighbour; liveness moves on by the silence so far."""
        return [Send(p, m, quiet=True) for p, m in self.neighbours.beat(now, wall)]

    # -- what comes in ------------------------------------------------------------------------

    def receive(self, peer: Peer, message: Message, now: float, wall: float) -> list[Action]:
        """A message from an authenticated peer."""
        self.neighbours.heard(peer, now)
        if isinstance(message, Targeted | Broadcast):
            return self._on_request(peer, message, now, wall)
        if isinstance(message, Response):
            return self._on_response(peer, message, now, wall)
        before = self.neighbours.known_path
        if isinstance(message, Hello):
            outgoing = self.neighbours.on_hello(peer, message, wall)
        else:
            outgoing = self.neighbours.learn(peer, message.path, message.your_path, wall)
        actions: list[Action] = [Send(p, m) for p, m in outgoing]
        after = self.neighbours.known_path
        if after is not None and after != before:
            actions.append(Placed(after))
        return actions

    def bad_message(self, peer: Peer, error: WireError, now: float, wall: float) -> list[Action]:
        """A message from `peer` that could not be read (or a revoked key's)."""
        self.neighbours.heard(peer, now)
        return self._refused_message(peer, error, wall)

    def _refused_message(self, peer: Peer, error: WireError, wall: float) -> list[Action]:
        self.counters[f"refused_{error.code}"] += 1
        actions: list[Action] = [Refused(peer, error)]
        reply_to = getattr(error, "reply_to", None)
        if reply_to is not None:
            error.cell = error.cell or self.here()
            result = CellResult(self.here(), Outcome.ERROR, error=error)
            actions.append(self._answer(peer, reply_to, (), (result,), 0.0, wall))
        return actions

    # -- requests -----------------------------------------------------------------------------

    def _remember(self, peer: Peer, message: Request) -> list[Action] | None:
        """None for a new request; for one seen already, what to do (its kept answer, if any)."""
        seen, kept = self.recent.note((peer, message.id))
        if not seen:
            return None
        self.counters["duplicates"] += 1
        return [] if kept is None else [Send(peer, kept)]

    def _caller(self, peer: Peer) -> str:
        if peer.role is Role.CLIENT:
            client = self.neighbours.clients.get(peer.name)
            if client is None:
                raise Forbidden(f"client {peer.name} is not registered", self.here())
            return client.role
        return peer.role.value

    def _on_request(self, peer: Peer, message: Request, now: float, wall: float) -> list[Action]:
        seen = self._remember(peer, message)
        if seen is not None:
            return seen
        try:
            skew = abs(wall - message.sent_at)
            if skew > self.settings.max_clock_skew_s:
                raise StaleMessage(f"sent {skew:.0f}s away from this cell's clock", self.here())
            caller = self._caller(peer)
            in_flight = self._in_flight.get(peer, 0)
            if in_flight >= self.settings.max_in_flight_per_peer:
                raise Busy(f"{peer} has {in_flight} requests in flight", self.here())
            if peer.role is Role.CLIENT:
                message = self._as_client_request(peer, caller, message)
            elif peer.role is Role.CHILD and message.context is not None:
                message = evolve(message, context=None)  # children never speak for users
            view = self.neighbours.view
            stamped = routing.accept(view, peer, message)
            method = self.methods.resolve(message.kind, message.method, caller)
        except WireError as exc:
            return self._refuse(peer, message, exc, wall)
        deadline = now + min(message.timeout_ms / 1000.0, self.settings.call_timeout_s)
        if isinstance(stamped, Broadcast):
            fanout = routing.route_broadcast(view, stamped)
            return self._fan_out(peer, message, fanout, caller, method, now, deadline, wall)
        assert isinstance(stamped, Targeted)
        try:
            decision = routing.route_targeted(view, stamped, peer)
            if method.own_link:
                routing.check_own_link(stamped, decision, peer)
        except WireError as exc:
            return self._refuse(peer, message, exc, wall)
        if isinstance(decision, routing.Deliver):
            running = _Running(peer, message.id, stamped.path, message.want_response, now)
            return [self._run(running, stamped, peer, caller, method, deadline)]
        return self._forward(peer, message, decision, now, deadline, wall)

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

    def _refuse(self, peer: Peer, message: Request, error: WireError, wall: float) -> list[Action]:
        here = self._here_for(peer, message)
        self.counters[f"refused_{error.code}"] += 1
        error.cell = error.cell or here
        actions: list[Action] = [Refused(peer, error, message)]
        if message.want_response:
            result = CellResult(here, Outcome.ERROR, error=error)
            path = () if peer.role is Role.CLIENT else message.path  # a client's path is empty
            actions.append(self._answer(peer, message.id, path, (result,), 0.0, wall))
        return actions

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
                return child_path(parent_path, self.settings.name)
        return self.here()

    def _run(
        self,
        running: _Running,
        stamped: Request,
        peer: Peer,
        caller: str,
        method: Method,
        deadline: float,
    ) -> Run:
        token = next(self._tokens)
        # A plain function runs to its end before the next message is read: only a
        # coroutine handler (or the gather around a local run) is in flight for a while.
        if running.gather is None and method.is_coroutine:
            running.held = True
            self._hold(running.peer)
        self._running[token] = running
        return Run(token, stamped, peer, caller, method, deadline)

    def ran(self, token: int, result: CellResult, now: float, wall: float) -> list[Action]:
        """A method run here (`Run`) finished with `result`."""
        running = self._running.pop(token, None)
        if running is None:
            return []
        if running.gather is not None:
            gather = self.gathers.get(running.gather)
            if gather is None:  # finished (timed out) while the method ran
                return []
            gather.aggregation.add_local(result)
            return self._finish_gather(running.gather, now, wall) if gather.aggregation.done else []
        if running.held:
            self._release(running.peer)
        if not running.want_response:
            return []
        held_ms = (now - running.started) * 1000.0
        return [
            self._answer(running.peer, running.request_id, running.path, (result,), held_ms, wall)
        ]

    def _forward(
        self,
        peer: Peer,
        message: Request,
        decision: routing.Forward,
        now: float,
        deadline: float,
        wall: float,
    ) -> list[Action]:
        stamped = decision.message
        assert isinstance(stamped, Targeted)
        outgoing = self._outgoing(stamped, now, deadline, wall)
        if message.want_response:
            relay = Relay(decision.to, stamped.target, now, deadline, peer, message)
            self._watch(outgoing.id, relay)
            failed = Failed(SendKind.RELAY, decision.to, outgoing.id)
        else:  # nobody waits for it: a failure to send it is only refused (logged)
            failed = Failed(SendKind.CAST, decision.to, outgoing.id, peer, message)
        return [Send(decision.to, outgoing, failed)]

    def _outgoing(self, message: Request, now: float, deadline: float, wall: float) -> Request:
        """The copy of a request for the next hop: its own id, the time left for it."""
        remaining_ms = max(0, int((deadline - now) * 1000))
        return evolve(
            message,
            id=new_message_id(),
            sent_at=wall,
            timeout_ms=routing.forward_budget_ms(remaining_ms),
        )

    def _watch(self, message_id: bytes, relay: Relay) -> None:
        self.relays[(relay.via, message_id)] = relay
        self._hold(relay.requester)
        self._at(relay.deadline, "relay", (relay.via, message_id))

    def _take_relay(self, via: Peer, message_id: bytes, event: RelayEvent) -> Relay | None:
        relay = self.relays.pop((via, message_id), None)
        if relay is not None:
            relay.move(event)
            self._release(relay.requester)
        return relay

    def _expire_relay(self, key: tuple[Peer, bytes], now: float, wall: float) -> list[Action]:
        relay = self._take_relay(key[0], key[1], RelayEvent.DEADLINE)
        if relay is None:
            return []
        self.counters["timeouts"] += 1
        if relay.own is not None:
            error = CallTimeout("no response before the deadline", relay.target)
            return [Settle(relay.own, error=error)]
        if relay.requester is None:
            return []
        result = CellResult(relay.target, Outcome.TIMED_OUT)
        held_ms = (now - relay.started) * 1000.0
        return [self._answer(relay.requester, relay.request_id, (), (result,), held_ms, wall)]

    # -- broadcasts ---------------------------------------------------------------------------

    def _fan_out(
        self,
        peer: Peer,
        message: Request,
        fanout: routing.Fanout,
        caller: str,
        method: Method,
        now: float,
        deadline: float,
        wall: float,
    ) -> list[Action]:
        stamped = fanout.message
        assert isinstance(message, Broadcast)
        # Every cell below the origin runs the broadcast; `run_locally` is the origin's choice.
        outgoing = evolve(self._outgoing(stamped, now, deadline, wall), run_locally=True)
        gather = Gather(
            sender=peer,
            request=message,
            started=now,
            deadline=deadline,
            aggregation=routing.Aggregation(stamped.path[-1], fanout.to, fanout.local),
        )
        self._hold(peer)
        actions = self._start_gather(gather, outgoing, fanout.to, now)
        if fanout.local:
            running = _Running(peer, message.id, stamped.path, False, now, gather=outgoing.id)
            run = self._run(running, stamped, peer, caller, method, deadline)
            gather.local = run.token
            actions.append(run)
        elif gather.aggregation.done:
            actions += self._finish_gather(outgoing.id, now, wall)
        return actions

    def _start_gather(
        self, gather: Gather, outgoing: Request, to: tuple[Peer, ...], now: float
    ) -> list[Action]:
        """Send a broadcast on to `to`, collecting their answers until its deadline."""
        self.gathers[outgoing.id] = gather
        self._at(gather.deadline, "gather", outgoing.id)
        actions: list[Action] = []
        for neighbour in to:
            gather.sent_at[neighbour] = now
            actions.append(
                Send(neighbour, outgoing, Failed(SendKind.GATHER, neighbour, outgoing.id))
            )
        return actions

    def _finish_gather(self, message_id: bytes, now: float, wall: float) -> list[Action]:
        gather = self.gathers.pop(message_id, None)
        if gather is None:
            return []
        if gather.local is not None:
            self._running.pop(gather.local, None)  # a local run still going is not waited for
        self._release(gather.sender)
        results = gather.aggregation.finish()
        if gather.own is not None:
            return [Settle(gather.own, results=results)]
        if gather.sender is not None and gather.request.want_response:
            held_ms = (now - gather.started) * 1000.0
            return [
                self._answer(
                    gather.sender, gather.request.id, gather.request.path, results, held_ms, wall
                )
            ]
        return []

    # -- responses ----------------------------------------------------------------------------

    def _on_response(self, peer: Peer, response: Response, now: float, wall: float) -> list[Action]:
        gather = self.gathers.get(response.reply_to)
        if gather is not None and gather.aggregation.expects(peer):
            link_ms = (now - gather.sent_at[peer]) * 1000.0 - response.held_ms
            actions: list[Action] = []
            try:
                gather.aggregation.add(peer, response.results, max(0.0, link_ms))
            except WireError as exc:
                actions += self._refused_message(peer, exc, wall)
                gather.aggregation.fail(peer, exc)
            if gather.aggregation.done:
                actions += self._finish_gather(response.reply_to, now, wall)
            return actions
        relay = self.relays.get((peer, response.reply_to))
        if relay is None:
            # Late (its requester was answered with a timeout already), or not an
            # answer to anything this cell sent to that peer: never passed on.
            self.counters["unmatched_responses"] += 1
            return []
        if not self._plausible_answer(relay, response):
            self._take_relay(peer, response.reply_to, RelayEvent.IMPLAUSIBLE)
            error = SenderMismatch(f"{peer} answered for cells it does not hold", self.here())
            actions = self._refused_message(peer, error, wall)
            if relay.own is not None:
                actions.append(Settle(relay.own, error=error))
            elif relay.requester is not None:
                result = CellResult(self.here(), Outcome.ERROR, error=error)
                actions.append(
                    self._answer(relay.requester, relay.request_id, (), (result,), 0.0, wall)
                )
            return actions
        self._take_relay(peer, response.reply_to, RelayEvent.RESPONSE)
        if relay.own is not None:
            return [Settle(relay.own, response=response)]
        if relay.requester is None:
            return []
        held_ms = (now - relay.started) * 1000.0
        return [
            self._answer(
                relay.requester, relay.request_id, response.path, response.results, held_ms, wall
            )
        ]

    def _plausible_answer(self, relay: Relay, response: Response) -> bool:
        """One result, and from a child only for a cell in that child's subtree."""
        if len(response.results) != 1:
            return False
        if relay.via.role is Role.CHILD:
            below = child_path(self.here(), relay.via.name)
            return routing.is_below(response.results[0].cell, below)
        return True

    # -- answers ------------------------------------------------------------------------------

    def _answer(
        self,
        peer: Peer,
        reply_to: bytes,
        path: tuple[str, ...],
        results: tuple[CellResult, ...],
        held_ms: float,
        wall: float,
    ) -> Answer:
        response = Response(
            id=new_message_id(),
            reply_to=reply_to,
            path=path,
            results=results,
            sent_at=wall,
            held_ms=max(0.0, held_ms),
        )
        return Answer(peer, response)

    def answered(self, answer: Answer, size: int) -> None:
        """`answer` went out, `size` bytes: keep it for a duplicate of its request."""
        self.recent.keep((answer.peer, answer.response.reply_to), answer.response, size)

    def too_large(self, answer: Answer, error: TooLarge) -> Answer:
        """`answer` did not fit a frame: the same answer with each value said to be too large."""
        error.cell = self.here()
        self.counters["answers_too_large"] += 1
        shrunk = tuple(_shrunk(r, error) for r in answer.response.results)
        return Answer(answer.peer, evolve(answer.response, results=shrunk))

    def as_own(self, peer: Peer, error: WireError) -> WireError:
        """A send's failure as this cell reports it: a broken link is `CellUnreachable`."""
        if isinstance(error, TransportError):
            error = CellUnreachable(f"cannot reach {peer}: {error.message}", self.here())
        error.cell = self.here()
        self.counters[f"send_{error.code}"] += 1
        return error

    def send_failed(self, failed: Failed, error: WireError, wall: float) -> list[Action]:
        """A `Send` carrying `failed` could not be sent (`error` from `as_own`)."""
        if failed.kind is SendKind.GATHER:
            gather = self.gathers.get(failed.message_id)
            if gather is not None:
                gather.aggregation.fail(failed.via, error)
            return []
        if failed.kind is SendKind.CAST:
            assert failed.requester is not None and failed.request is not None
            return self._refuse(failed.requester, failed.request, error, wall)
        relay = self._take_relay(failed.via, failed.message_id, RelayEvent.SEND_FAILED)
        if relay is None:
            return []
        if relay.own is not None:
            return [Settle(relay.own, error=error)]
        assert relay.requester is not None
        return self._refuse(relay.requester, relay.request, error, wall)

    # -- calls this cell makes itself ---------------------------------------------------------

    def _own_fields(
        self, method: str, body: Mapping[str, Any], here: str, timeout_s: float, wall: float
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
            sent_at=wall,
            context=None,
        )

    def call(
        self,
        method: str,
        body: Mapping[str, Any],
        target: str,
        timeout_s: float,
        now: float,
        wall: float,
    ) -> tuple[int, list[Action]]:
        """A targeted call from this cell: its token, and the send. `Settle(token)` ends it."""
        here = self.view.home_path(target)
        fields = self._own_fields(method, body, here, timeout_s, wall)
        message = Targeted(**fields, target=target)
        decision = routing.route_targeted(self.view, message, None)
        if not isinstance(decision, routing.Forward):
            raise InvalidRequest("a cell does not call itself", here)
        token = next(self._tokens)
        deadline = now + timeout_s
        outgoing = self._outgoing(decision.message, now, deadline, wall)
        relay = Relay(decision.to, target, now, deadline, None, message, own=token)
        self._watch(outgoing.id, relay)
        return token, [
            Send(decision.to, outgoing, Failed(SendKind.RELAY, decision.to, outgoing.id))
        ]

    def broadcast(
        self, method: str, body: Mapping[str, Any], timeout_s: float, now: float, wall: float
    ) -> tuple[int, list[Action]]:
        """A broadcast from this cell to every cell below it (not itself): one result each.

        A child that does not answer in time is a `timed_out` result; the others are kept.
        """
        here = self.view.home_path()
        fields = self._own_fields(method, body, here, timeout_s, wall)
        message = Broadcast(**fields, run_locally=False)
        fanout = routing.route_broadcast(self.view, message)
        deadline = now + timeout_s
        outgoing = evolve(self._outgoing(message, now, deadline, wall), run_locally=True)
        token = next(self._tokens)
        gather = Gather(
            sender=None,
            request=message,
            started=now,
            deadline=deadline,
            aggregation=routing.Aggregation(here, fanout.to, False),
            own=token,
        )
        actions = self._start_gather(gather, outgoing, fanout.to, now)
        if gather.aggregation.done:
            actions += self._finish_gather(outgoing.id, now, wall)
        return token, actions

    # -- time ---------------------------------------------------------------------------------

    def _at(self, when: float, kind: str, key: Any) -> None:
        heapq.heappush(self._deadlines, (when, next(self._order), kind, key))

    def next_deadline(self) -> float | None:
        """When the core next wants `tick`; None when nothing waits on time."""
        deadlines = self._deadlines
        while deadlines and not self._live(deadlines[0]):
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def _live(self, entry: tuple[float, int, str, Any]) -> bool:
        when, _, kind, key = entry
        if kind == "relay":
            relay = self.relays.get(key)
            return relay is not None and relay.deadline == when
        gather = self.gathers.get(key)
        return gather is not None and gather.deadline == when

    def tick(self, now: float, wall: float) -> list[Action]:
        """Everything whose deadline is `now` or before: relays expire, gathers finish."""
        actions: list[Action] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            entry = heapq.heappop(deadlines)
            if not self._live(entry):
                continue
            _, _, kind, key = entry
            if kind == "relay":
                actions += self._expire_relay(key, now, wall)
            else:
                actions += self._finish_gather(key, now, wall)
        return actions

    # -- accounting ---------------------------------------------------------------------------

    def _hold(self, peer: Peer | None) -> None:
        """Count one more piece of work (run, relay or broadcast) for `peer`."""
        if peer is not None:
            self._in_flight[peer] += 1

    def _release(self, peer: Peer | None) -> None:
        if peer is not None:
            self._in_flight[peer] -= 1
            if self._in_flight[peer] <= 0:
                del self._in_flight[peer]

    def statistics(self) -> dict[str, Any]:
        return {
            "relays": len(self.relays),
            "gathers": len(self.gathers),
            "running": len(self._running),
            "in_flight": sum(self._in_flight.values()),
            "remembered": len(self.recent),
            "remembered_bytes": self.recent.bytes,
        }


def _shrunk(result: CellResult, error: TooLarge) -> CellResult:
    """`result` without its value, which made the answer too large to send."""
    if result.outcome is not Outcome.OK:
        return result
    return CellResult(result.cell, Outcome.ERROR, error=TooLarge(error.message, error.cell))
