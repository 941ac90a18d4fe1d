"""The ZeroMQ transport: a cell's two CURVE ROUTERs, its DEALERs to parents, and API clients.

`ZmqTransport` keeps the contract of `zcells.transport` and passes the same
conformance suite as `MemoryTransport`; `ZmqClient` is a client's link to one
cell's api endpoint. Rules kept here (SECURITY.md §0, §1):

1. Authentication runs before any bind: the ZAP handler starts on this
   transport's own context first, and both ROUTERs set ZAP_ENFORCE_DOMAIN, so
   a missing handler refuses every handshake instead of admitting anyone.
2. A sender is who its ZAP User-Id says, nothing else: not a routing id, not
   a payload field. The User-Id is checked against the current keyring on
   every message, so a key removed or replaced while connected gets
   `KeyRevoked` on its next message.
3. Routing ids prove nothing and are never guessable (`zcells.sockets.ids`):
   the C library's rand() is seeded before each ROUTER is made, our DEALERs
   choose 16 random bytes, and a name routes only to an id its own
   authenticated message came on, while that connection is open. An answer
   goes to the connection its request came on while that is open, so two
   connections with one key each get their own answers. Routing
   ids are never logged. A parent link that goes down is dialled afresh on a
   new socket, so a new routing id never waits behind the parent's stale copy
   of the old one.
4. A message is exactly two frames; any other count is a `FrameError` before
   any decode. One bad message never ends a receive loop.
5. `send` never waits on a peer: ROUTER_MANDATORY and IMMEDIATE turn "nobody
   there" into `CellUnreachable` and a full pipe into `Busy`.
6. A parent's server key is pinned from our database, never learned. libzmq
   gives up on an endpoint once its handshake is refused, so a refused parent
   is dialled afresh after `refused_retry_ms`, or at once by `redial()`.
7. Every monitor socket is read all the time: libzmq's monitor send blocks
   once the monitor's pipe is full, which would stall the socket it watches.
8. No task or Future per message: each socket is read by a `Pump` from the
   event loop's reader callback, straight into one bounded `Inbox`, and a
   full inbox pauses the reading instead of dropping anything
   (`zcells.sockets.client`, where `ZmqClient` lives too; it is re-exported
   here). The socket options and the keyring live in `zcells.sockets.auth`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import zmq
from zmq.utils.monitor import parse_monitor_message

from zcells import codec, logs
from zcells.errors import (
    Busy,
    CellUnreachable,
    FrameError,
    KeyRevoked,
    ProtocolError,
    TransportBroken,
    TransportClosed,
)
from zcells.messages import Message, Request, Response
from zcells.peer import Peer, Role
from zcells.sockets.auth import DOMAIN_PREFIX, Keyring, SocketOptions, ZapHandler, parse_user_id
from zcells.sockets.client import (
    MONITORED,
    Inbox,
    Pump,
    Socket,
    ZmqClient,
    close_socket,
    monitor_event,
    next_state,
    send_now,
)
from zcells.sockets.ids import Routes, seed_router_ids
from zcells.sockets.keys import check_environment
from zcells.transport import (
    Event,
    Identity,
    LinkChange,
    ParentLink,
    Received,
    Topology,
    Transport,
)

__all__ = ["ZmqClient", "ZmqTransport"]

log = logs.get_logger("sockets.transport")

_COUNTERS: Final = ("received", "sent", "malformed", "frames_rejected", "revoked", "busy")
_LINK_COUNTERS: Final = ("unauthenticated", "unreachable", "handshake_refused", "parent_refused")
# Requests awaiting an answer whose connection is remembered; past this, the oldest
# is forgotten and its answer goes to the sender's latest connection instead.
ASKED_LIMIT: Final = 65536
# Bytes of received messages waiting for the cell's loop, over every peer: past this
# the reading pauses (RCVHWM, then TCP, hold senders back), as past `queue_size` messages.
INBOX_BYTES: Final = 64 << 20


def _log(level: int, event: str, **fields: Any) -> None:
    logs.event(log, level, event, **fields)


_SRCFD: Final = int(zmq.SRCFD)  # the connection a frame came on, to unbind it when it closes


def _size(frames: list[Any]) -> int:
    """The bytes of a received message's frames (a zmq.Frame or bytes each)."""
    total = 0
    for frame in frames:
        total += len(frame)
    return total


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id libzmq attached to a received frame; None when there is none."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) and value else None


@dataclass(eq=False)
class _Listener:
    """One bound ROUTER, its monitor, their pumps, and the routes it learned (rule 3)."""

    role: Role
    domain: str
    socket: Socket
    monitor: Socket
    endpoint: str
    routes: Routes = field(default_factory=Routes)
    pump: Pump = field(init=False)
    watch: Pump = field(init=False)

    def stop(self, linger_ms: int) -> None:
        self.watch.stop()
        self.pump.stop()
        close_socket(self.socket, self.monitor, linger_ms)


@dataclass(eq=False)
class _Parent:
    """Our DEALER to one parent, its monitor, their pumps and any redial timer."""

    link: ParentLink
    peer: Peer
    socket: Socket
    monitor: Socket
    state: str = "connecting"
    pumps: list[Pump] = field(default_factory=list)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    def stop(self, linger_ms: int) -> None:
        for timer in self.timers:
            timer.cancel()
        for pump in self.pumps:
            pump.stop()
        close_socket(self.socket, self.monitor, linger_ms)


class ZmqTransport(Transport):
    """A cell's transport over ZeroMQ with CURVE and ZAP; see the module rules."""

    def __init__(
        self,
        identity: Identity,
        *,
        max_frame_bytes: int = codec.DEFAULT_MAX_FRAME_BYTES,
        heartbeat_ivl_ms: int = 5000,
        heartbeat_timeout_ms: int = 15000,
        handshake_ivl_ms: int = 5000,
        hwm: int = 1000,
        reconnect_ivl_ms: int = 100,
        reconnect_ivl_max_ms: int = 2000,
        queue_size: int = 10000,
        inbox_bytes: int = INBOX_BYTES,
        linger_ms: int = 500,
        refused_retry_ms: int = 30000,
    ) -> None:
        self.identity = identity
        self.max_frame_bytes = max_frame_bytes
        self.options = SocketOptions(
            max_frame_bytes=max_frame_bytes,
            hwm=hwm,
            linger_ms=linger_ms,
            heartbeat_ivl_ms=heartbeat_ivl_ms,
            heartbeat_timeout_ms=heartbeat_timeout_ms,
            handshake_ivl_ms=handshake_ivl_ms,
            reconnect_ivl_ms=reconnect_ivl_ms,
            reconnect_ivl_max_ms=reconnect_ivl_max_ms,
        )
        self.refused_retry_ms = refused_retry_ms
        self.counters: Counter[str] = Counter()
        self._frame_errors: Counter[str] = Counter()  # by peer
        self._inbox: Inbox[Event] = Inbox(queue_size, max_bytes=inbox_bytes)
        self._topology = Topology()
        self._keyring = Keyring()
        self._ctx: zmq.Context[Socket] | None = None
        self._zap: ZapHandler | None = None
        self._listeners: dict[Role, _Listener] = {}
        self._parents: dict[str, _Parent] = {}
        # (peer, request id) -> the routing id of the connection that asked
        self._asked: OrderedDict[tuple[Peer, bytes], bytes] = OrderedDict()
        self._started = False
        self._closed = False

    # -- life cycle ---------------------------------------------------------------------

    @property
    def bound_endpoints(self) -> dict[str, str]:
        """Where the ROUTERs listen, by ZAP domain, with any ``*`` port resolved."""
        return {listener.domain: listener.endpoint for listener in self._listeners.values()}

    async def start(self) -> None:
        """Start ZAP on a fresh context, then bind both ROUTERs, then dial the parents."""
        if self._closed:
            raise TransportClosed("transport is closed", self.identity.name)
        if self._started:
            return
        check_environment()
        self._ctx = zmq.Context()
        try:
            self._zap = ZapHandler(self._ctx, self._keyring)
            self._zap.start()
            self._bind(Role.CHILD, "cells", self.identity.cells_endpoint)
            self._bind(Role.CLIENT, "api", self.identity.api_endpoint)
        except BaseException:
            self._shutdown()
            raise
        self._started = True
        self._reconcile_parents()
        _log(logging.INFO, "transport.started", cell=self.identity.name, **self.bound_endpoints)

    def _bind(self, role: Role, domain: str, endpoint: str) -> None:
        assert self._ctx is not None
        seed_router_ids()  # before the ROUTER draws its first routing id (rule 3)
        sock = self._ctx.socket(zmq.ROUTER)
        monitor: Socket | None = None
        try:  # every option before bind
            self.options.listener(sock, domain, self.identity.secret_key)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED)
            sock.bind(endpoint)
            bound = sock.getsockopt(zmq.LAST_ENDPOINT)
        except (zmq.ZMQError, UnicodeError) as exc:
            close_socket(sock, monitor, 0)
            why = exc.strerror if isinstance(exc, zmq.ZMQError) else "the key is not ASCII"
            raise TransportBroken(
                f"cannot listen on {endpoint} ({domain}): {why}", self.identity.name
            ) from exc
        text = bound.decode("ascii", "replace") if isinstance(bound, bytes) else endpoint
        listener = _Listener(role, domain, sock, monitor, text)
        listener.watch = Pump(
            monitor, partial(self._connection_closed, listener), partial(self._failed, domain)
        )
        listener.pump = Pump(
            sock,
            partial(self._from_router, listener),
            partial(self._failed, domain),
            inbox=self._inbox,
            frame_first=True,
        )
        self._listeners[role] = listener

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        were_up = [parent.peer for parent in self._parents.values() if parent.state == "up"]
        self._shutdown()
        for peer in were_up:
            self._inbox.put(LinkChange(peer, up=False, reason="closed"))
        self._inbox.end()  # what nobody read is dropped only if the end needs its room
        _log(logging.INFO, "transport.closed", cell=self.identity.name)

    def _shutdown(self) -> None:
        """Stop every pump and timer, close every socket, stop ZAP, end the context.

        Bounded by LINGER; nothing here waits on the event loop.
        """
        for parent in self._parents.values():
            parent.stop(self.options.linger_ms)
        for listener in self._listeners.values():
            listener.stop(self.options.linger_ms)
        if self._zap is not None:
            self._zap.stop()
        if self._ctx is not None:
            self._ctx.destroy(linger=self.options.linger_ms)  # and anything left over
        self._parents.clear()
        self._listeners.clear()
        self._zap = self._ctx = None

    # -- events -------------------------------------------------------------------------

    async def recv(self) -> Event:
        event = None if self._closed and not self._inbox.size() else await self._inbox.get()
        if event is None:  # closed; the end marker stays for the next reader too
            raise TransportClosed("transport is closed", self.identity.name)
        return event

    def statistics(self) -> dict[str, Any]:
        routes = {role: listener.routes.names() for role, listener in self._listeners.items()}
        return {
            **dict.fromkeys(_COUNTERS + _LINK_COUNTERS, 0),
            **self.counters,
            "handshake_refused": 0 if self._zap is None else self._zap.refused,
            "queue": self._inbox.size(),
            "parents_up": sorted(n for n, p in self._parents.items() if p.state == "up"),
            "children": routes.get(Role.CHILD, []),
            "clients": routes.get(Role.CLIENT, []),
            "frames_rejected_by_peer": dict(self._frame_errors),
            "keys": len(self._keyring),
        }

    # -- receiving: each message is judged on its own, in the pump's callback -------------

    def _failed(self, where: str, what: str, exc: Exception) -> None:
        self.counters[f"{what}_errors"] += 1
        _log(logging.ERROR, f"transport.{what}_failed", where=where, error=type(exc).__name__)

    def _from_router(self, listener: _Listener, frames: list[Any], count: int) -> None:
        user_id = _user_id(frames[0])
        peer = None if user_id is None else self._keyring.peer(user_id)
        if peer is None or peer.role is not listener.role:
            self._stranger(listener, user_id)
            return
        first = frames[0]
        routing_id, fd = first.bytes, first.get(_SRCFD)
        if not listener.routes.bound(peer.name, routing_id, fd):
            listener.watch.read_now()  # a late "closed" for this fd's last user goes first
        listener.routes.heard(peer.name, routing_id, fd)
        received = self._frames_in(peer, frames[1:], count - 1)
        self._remember_asker(peer, received.message, routing_id)
        self._inbox.put(received, _size(frames))

    def _connection_closed(self, listener: _Listener, frames: list[Any], count: int) -> None:
        """A connection to this ROUTER closed: its routing ids name nobody now (rule 3)."""
        event = parse_monitor_message(frames)
        if event["event"] == zmq.EVENT_DISCONNECTED:
            listener.routes.closed(int(event["value"]))

    def _remember_asker(self, peer: Peer, message: Message | None, routing_id: bytes) -> None:
        """Note which connection sent a request that wants an answer (rule 3)."""
        if isinstance(message, Request) and message.want_response:
            asked = self._asked
            asked[(peer, message.id)] = routing_id
            if len(asked) > ASKED_LIMIT:
                asked.popitem(last=False)

    def _stranger(self, listener: _Listener, user_id: str | None) -> None:
        """A message whose User-Id is not a current key of this endpoint's role."""
        parsed = None if user_id is None else parse_user_id(user_id)
        if user_id is None or parsed is None or parsed[0] != DOMAIN_PREFIX[listener.domain]:
            self.counters["unauthenticated"] += 1
            logs.limited(
                log,
                logging.WARNING,
                "transport.unauthenticated",
                listener.domain,
                domain=listener.domain,
            )
            return
        peer = Peer(listener.role, parsed[1])
        self.counters["revoked"] += 1
        logs.limited(log, logging.WARNING, "transport.revoked", peer, peer=peer, key=parsed[2])
        error = KeyRevoked(f"the key of {peer} is no longer registered", self.identity.name)
        self._inbox.put(Received(peer, error=error))

    def _from_parent(self, peer: Peer, frames: list[bytes], count: int) -> None:
        self._inbox.put(self._frames_in(peer, frames, count), _size(frames))

    def _frames_in(self, peer: Peer, frames: list[bytes], count: int) -> Received:
        """Count, then decode, the frames of one message from an authenticated peer."""
        if count != codec.FRAMES_PER_MESSAGE:
            self.counters["frames_rejected"] += 1
            self._frame_errors[str(peer)] += 1
            logs.limited(
                log, logging.WARNING, "transport.frames_rejected", peer, peer=peer, frames=count
            )
            error = FrameError(
                f"expected {codec.FRAMES_PER_MESSAGE} frames, got {count}", self.identity.name
            )
            return Received(peer, error=error)
        try:
            message = codec.decode(frames, self.max_frame_bytes)
        except ProtocolError as exc:
            self.counters["malformed"] += 1
            reply_to = "-" if exc.reply_to is None else exc.reply_to.hex()
            logs.limited(
                log,
                logging.WARNING,
                "transport.malformed",
                peer,
                peer=peer,
                code=exc.code,
                reply_to=reply_to,
            )
            return Received(peer, error=exc)
        self.counters["received"] += 1
        return Received(peer, message=message)

    # -- sending ------------------------------------------------------------------------

    def send(self, peer: Peer, message: Message) -> int:
        if self._closed:
            raise TransportClosed("transport is closed", self.identity.name)
        frames = codec.encode_within(message, self.max_frame_bytes)
        size = len(frames[0]) + len(frames[1])
        if peer.role is Role.PARENT:
            parent = self._parents.get(peer.name)
            if parent is None:
                raise self._refuse(CellUnreachable, peer, "no link to it")
            self._to_parent(parent, frames)
            return size
        listener = self._listeners.get(peer.role)
        if listener is None:
            raise self._refuse(CellUnreachable, peer, "no link to it")
        routes = listener.routes
        latest = routes.latest(peer.name)
        if type(message) is Response:
            # An answer goes to the connection that asked while it is open (rule 3),
            # else to the latest one.
            asked = self._asked.pop((peer, message.reply_to), None)
            if (
                asked is not None
                and asked != latest
                and routes.owns(peer.name, asked)
                and self._routed(listener, peer, asked, frames)
            ):
                return size
        if latest is None:
            raise self._refuse(CellUnreachable, peer, "no link to it")
        while latest is not None:  # bounded: each failed try unbinds one routing id
            if self._routed(listener, peer, latest, frames):
                return size
            routes.forget(peer.name, latest)  # the connection that spoke for it is gone
            latest = routes.latest(peer.name)  # an earlier one still open, if any
        raise self._refuse(CellUnreachable, peer, "its connection is gone")

    def _to_parent(self, parent: _Parent, frames: list[bytes]) -> None:
        try:
            send_now(parent.socket, frames)
        except zmq.Again:  # a DEALER under IMMEDIATE says the same when it has no link
            if parent.state != "up":
                raise self._refuse(
                    CellUnreachable, parent.peer, f"the link is {parent.state}"
                ) from None
            raise self._refuse(Busy, parent.peer, "its queue is full") from None
        except zmq.ZMQError as exc:
            why = f"sending to {parent.peer} failed: {exc.strerror}"
            raise TransportBroken(why, self.identity.name) from exc
        finally:
            parent.pumps[-1].poke()  # the send may have consumed the socket's edge
        self.counters["sent"] += 1

    def _routed(
        self, listener: _Listener, peer: Peer, routing_id: bytes, frames: list[bytes]
    ) -> bool:
        """Send on one ROUTER connection; False if that connection is gone."""
        try:
            send_now(listener.socket, [routing_id, *frames])
        except zmq.Again:
            raise self._refuse(Busy, peer, "its queue is full") from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            why = f"sending to {peer} failed: {exc.strerror}"
            raise TransportBroken(why, self.identity.name) from exc
        finally:
            listener.pump.poke()  # the send may have consumed the socket's edge
        self.counters["sent"] += 1
        return True

    def _refuse(self, kind: type[CellUnreachable | Busy], peer: Peer, why: str) -> Exception:
        self.counters["unreachable" if kind is CellUnreachable else "busy"] += 1
        return kind(f"cannot send to {peer}: {why}", self.identity.name)

    # -- parents ------------------------------------------------------------------------

    def apply(self, topology: Topology) -> None:
        """Swap the keyring (for ZAP and the per-message check), then dial or drop parents.

        Before `start`, the topology is kept and its parents are dialled by `start`.
        """
        self._topology = topology
        self._keyring = Keyring.from_topology(topology)
        if self._zap is not None:
            self._zap.set_keyring(self._keyring)
        if self._started and not self._closed:
            self._reconcile_parents()

    def redial(self) -> None:
        """Dial parents that are missing, or whose last handshake was refused, right now."""
        if self._started and not self._closed:
            for parent in [p for p in self._parents.values() if p.state == "refused"]:
                self._redial(parent)
            self._reconcile_parents()

    def _redial(self, parent: _Parent) -> None:
        """A fresh DEALER for a refused parent; it stays refused until a handshake succeeds."""
        if self._parents.get(parent.peer.name) is parent:
            self._drop_parent(parent.peer.name, "redialled")
            self._dial(parent.peer, parent.link, state=parent.state)

    def _reconcile_parents(self) -> None:
        for name, parent in list(self._parents.items()):
            if self._topology.parents.get(name) != parent.link:
                self._drop_parent(name, "changed or removed in the cells table")
        for name, link in self._topology.parents.items():
            if name not in self._parents:
                self._dial(Peer(Role.PARENT, name), link)

    def _dial(self, peer: Peer, link: ParentLink, state: str = "connecting") -> None:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        monitor: Socket | None = None
        try:
            keypair = (self.identity.public_key, self.identity.secret_key)
            self.options.dialler(sock, link.public_key, keypair)
            monitor = sock.get_monitor_socket(MONITORED)
            sock.connect(link.endpoint)
        except (zmq.ZMQError, UnicodeError) as exc:
            close_socket(sock, monitor, 0)
            why = exc.strerror if isinstance(exc, zmq.ZMQError) else "a key is not ASCII"
            _log(
                logging.ERROR,
                "transport.dial_failed",
                parent=peer.name,
                endpoint=link.endpoint,
                error=why,
            )
            self._inbox.put(
                LinkChange(peer, up=False, reason=f"cannot dial {link.endpoint}: {why}")
            )
            return
        parent = self._parents[peer.name] = _Parent(link, peer, sock, monitor, state)

        failed = partial(self._failed, peer.name)
        parent.pumps += [  # the DEALER's pump last: sends poke it
            Pump(monitor, partial(self._watch, parent), failed),
            Pump(sock, partial(self._from_parent, peer), failed, inbox=self._inbox),
        ]

    def _drop_parent(self, name: str, reason: str) -> None:
        parent = self._parents.pop(name, None)
        if parent is None:
            return
        parent.stop(self.options.linger_ms)
        if parent.state == "up":
            self._inbox.put(LinkChange(parent.peer, up=False, reason=reason))

    def _watch(self, parent: _Parent, frames: list[Any], count: int) -> None:
        """One event from a DEALER's monitor: a LinkChange, and a log line, on a change of state."""
        event, value = monitor_event(frames, count)
        loop = asyncio.get_running_loop()
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # libzmq gives up on this endpoint
            self.counters["parent_refused"] += 1
            parent.timers.append(
                loop.call_later(self.refused_retry_ms / 1000, self._redial, parent)
            )
        change = next_state(parent.state, event, value)
        if change is None:
            return
        parent.state, reason = change
        if parent.state == "down":  # a new socket, a new routing id (rule 3)
            parent.timers.append(loop.call_later(0, self._redial, parent))
        level = logging.WARNING if parent.state in ("refused", "failed") else logging.INFO
        _log(
            level,
            f"transport.parent_{parent.state}",
            parent=parent.peer.name,
            endpoint=parent.link.endpoint,
        )
        self._inbox.put(LinkChange(parent.peer, up=parent.state == "up", reason=reason))
