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
3. Children and clients set no routing id: the ROUTER assigns one, and a name
   routes to the id of its most recent authenticated message. Routing ids are
   never logged: libzmq 4.3.5 aborts the process when a peer-chosen id equals
   the next one it assigns, so they must stay unguessable.
4. A message is exactly two frames; any other count is a `FrameError` before
   any decode. One bad message never ends a receive loop.
5. `send` never waits on a peer: ROUTER_MANDATORY and IMMEDIATE turn "nobody
   there" into `CellUnreachable` and a full pipe into `Busy`.
6. A parent's server key is pinned from our database, never learned. libzmq
   gives up on an endpoint once its handshake is refused, so a refused parent
   is dialled afresh after `refused_retry_ms`, or at once by `redial()`.
7. Every monitor socket is read all the time: libzmq's monitor send blocks
   once the monitor's pipe is full, which would stall the socket it watches.

The module is longer than most because both classes share the link state
table (`_LINK_EVENTS`) and the non-blocking send (`_send_now`), and the
listening and dialling halves of a cell keep one event queue and one set of
counters; the socket options and the keyring live in `zcells.sockets.auth`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from zcells import codec, logs
from zcells.errors import (
    AccessDenied,
    Busy,
    CellUnreachable,
    FrameError,
    KeyRevoked,
    ProtocolError,
    TransportBroken,
    TransportClosed,
)
from zcells.messages import Message
from zcells.peer import Peer, Role
from zcells.sockets.auth import DOMAIN_PREFIX, Keyring, SocketOptions, ZapHandler, parse_user_id
from zcells.sockets.keys import check_environment
from zcells.transport import (
    ClientTransport,
    Event,
    Identity,
    LinkChange,
    ParentLink,
    Received,
    Topology,
    Transport,
)

log = logs.get_logger("sockets.transport")

_COUNTERS: Final = ("received", "sent", "malformed", "frames_rejected", "revoked", "busy")
_LINK_COUNTERS: Final = ("unauthenticated", "unreachable", "handshake_refused", "parent_refused")
_FAILED: Final = "handshake failed: wrong server key, or no authenticator there"
# Monitor event -> (link state, reason). A link is connecting, up, down, refused or
# failed; only a change of state becomes a LinkChange (and a log line).
_LINK_EVENTS: Final[Mapping[int, tuple[str, str]]] = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: ("up", "connected"),
    zmq.EVENT_DISCONNECTED: ("down", "disconnected"),
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: ("refused", "handshake refused: our key is not accepted"),
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: ("failed", _FAILED),
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: ("failed", _FAILED),
}
_MONITORED: Final = (
    zmq.EVENT_MONITOR_STOPPED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    | (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
)


def _log(level: int, event: str, **fields: Any) -> None:
    logs.event(log, level, event, **fields)


def _next_state(current: str, event: int) -> tuple[str, str] | None:
    """The link's new (state, reason) after a monitor event, or None if nothing changed."""
    found = _LINK_EVENTS.get(event)
    if found is None or found[0] == current or (found[0] == "down" and current != "up"):
        return None  # a repeat, or the disconnect that ends a failed handshake
    return found


def _send_now(sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
    """Queue frames without waiting: pyzmq settles a NOBLOCK send on the spot.

    Raises `zmq.Again` when libzmq cannot take the message now, and any other
    `zmq.ZMQError` as it is. (A send would stay pending only behind a blocking
    send on the same socket, which this module never makes.)
    """
    done = sock.send_multipart(frames, flags=zmq.NOBLOCK)
    if not isinstance(done, asyncio.Future) or not done.done():
        raise RuntimeError("a non-blocking send did not settle at once")
    done.result()


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id libzmq attached to a received frame; None when there is none."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) and value else None


def _close(sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket | None, linger_ms: int) -> None:
    if monitor is not None:
        if not sock.closed:
            sock.disable_monitor()
        monitor.close(linger=0)
    sock.close(linger=linger_ms)


@dataclass(eq=False)
class _Listener:
    """One bound ROUTER and the routes it learned: name -> routing id."""

    role: Role
    domain: str
    socket: zmq.asyncio.Socket
    endpoint: str
    routes: dict[str, bytes] = field(default_factory=dict)


@dataclass(eq=False)
class _Parent:
    """Our DEALER to one parent, its monitor, and the tasks reading them."""

    link: ParentLink
    peer: Peer
    socket: zmq.asyncio.Socket
    monitor: zmq.asyncio.Socket
    state: str = "connecting"
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


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
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=queue_size)
        self._topology = Topology()
        self._keyring = Keyring()
        self._ctx: zmq.asyncio.Context | None = None
        self._zap: ZapHandler | None = None
        self._listeners: dict[Role, _Listener] = {}
        self._parents: dict[str, _Parent] = {}
        self._tasks: set[asyncio.Task[None]] = set()
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
        self._ctx = zmq.asyncio.Context()
        try:
            self._zap = ZapHandler(self._ctx, self._keyring)
            self._zap.start()
            self._bind(Role.CHILD, "cells", self.identity.cells_endpoint)
            self._bind(Role.CLIENT, "api", self.identity.api_endpoint)
        except BaseException:
            await self._shutdown()
            raise
        self._started = True
        for listener in self._listeners.values():
            self._spawn(self._serve(listener), f"serve-{listener.domain}")
        self._reconcile_parents()
        _log(logging.INFO, "transport.started", cell=self.identity.name, **self.bound_endpoints)

    def _bind(self, role: Role, domain: str, endpoint: str) -> None:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.ROUTER)
        try:  # every option before bind
            self.options.listener(sock, domain, self.identity.secret_key)
            sock.bind(endpoint)
            bound = sock.getsockopt(zmq.LAST_ENDPOINT)
        except (zmq.ZMQError, UnicodeError) as exc:
            sock.close(linger=0)
            why = exc.strerror if isinstance(exc, zmq.ZMQError) else "the key is not ASCII"
            raise TransportBroken(
                f"cannot listen on {endpoint} ({domain}): {why}", self.identity.name
            ) from exc
        text = bound.decode("ascii", "replace") if isinstance(bound, bytes) else endpoint
        self._listeners[role] = _Listener(role, domain, sock, text)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        were_up = [parent.peer for parent in self._parents.values() if parent.state == "up"]
        await self._shutdown()
        for peer in were_up:
            self._emit(LinkChange(peer, up=False, reason="closed"))
        while self._queue.full():  # what nobody read is dropped to make room for the end
            self._queue.get_nowait()
        self._queue.put_nowait(None)
        _log(logging.INFO, "transport.closed", cell=self.identity.name)

    async def _shutdown(self) -> None:
        """Stop every task, close every socket, stop ZAP, end the context; bounded by LINGER."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for parent in self._parents.values():
            _close(parent.socket, parent.monitor, self.options.linger_ms)
        for listener in self._listeners.values():
            listener.socket.close(linger=self.options.linger_ms)
        if self._zap is not None:
            self._zap.stop()
        if self._ctx is not None:
            self._ctx.destroy(linger=self.options.linger_ms)  # and anything left over
        self._parents.clear()
        self._listeners.clear()
        self._zap = self._ctx = None

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.identity.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = type(task.exception()).__name__
            _log(logging.ERROR, "transport.task_failed", task=task.get_name(), error=error)

    # -- events -------------------------------------------------------------------------

    async def recv(self) -> Event:
        event = None if self._closed and self._queue.empty() else await self._queue.get()
        if event is None:  # closed: leave the marker for the next reader too
            self._queue.put_nowait(None)
            raise TransportClosed("transport is closed", self.identity.name)
        return event

    def _emit(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.counters["dropped_queue_full"] += 1

    def statistics(self) -> dict[str, Any]:
        routes = {role: sorted(listener.routes) for role, listener in self._listeners.items()}
        return {
            **dict.fromkeys(_COUNTERS + _LINK_COUNTERS, 0),
            **self.counters,
            "handshake_refused": 0 if self._zap is None else self._zap.refused,
            "queue": self._queue.qsize(),
            "parents_up": sorted(n for n, p in self._parents.items() if p.state == "up"),
            "children": routes.get(Role.CHILD, []),
            "clients": routes.get(Role.CLIENT, []),
            "frames_rejected_by_peer": dict(self._frame_errors),
            "keys": len(self._keyring),
        }

    # -- receiving ----------------------------------------------------------------------

    async def _serve(self, listener: _Listener) -> None:
        """Read one ROUTER until cancelled; each message is judged on its own."""
        while True:
            try:
                frames = await listener.socket.recv_multipart(copy=False)
                event = self._from_router(listener, frames)
            except zmq.ZMQError as exc:
                if listener.socket.closed or exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
                    return
                self._failed("recv", listener.domain, exc)
                continue
            except Exception as exc:  # one message never ends the loop (SECURITY.md §0.8)
                self._failed("message", listener.domain, exc)
                continue
            if event is not None:
                await self._queue.put(event)  # a full queue holds the socket back

    def _failed(self, what: str, where: str, exc: Exception) -> None:
        self.counters[f"{what}_errors"] += 1
        _log(logging.ERROR, f"transport.{what}_failed", where=where, error=type(exc).__name__)

    def _from_router(self, listener: _Listener, frames: list[zmq.Frame]) -> Received | None:
        user_id = _user_id(frames[0])
        parsed = None if user_id is None else parse_user_id(user_id)
        if user_id is None or parsed is None or parsed[0] != DOMAIN_PREFIX[listener.domain]:
            self.counters["unauthenticated"] += 1
            _log(logging.WARNING, "transport.unauthenticated", domain=listener.domain)
            return None
        peer = Peer(listener.role, parsed[1])
        if not self._keyring.is_current(user_id):
            self.counters["revoked"] += 1
            _log(logging.WARNING, "transport.revoked", peer=peer, key=parsed[2])
            error = KeyRevoked(f"the key of {peer} is no longer registered", self.identity.name)
            return Received(peer, error=error)
        listener.routes[peer.name] = frames[0].bytes
        return self._frames_in(peer, frames[1:])

    def _frames_in(self, peer: Peer, frames: list[zmq.Frame] | list[bytes]) -> Received:
        """Count, then decode, the frames of one message from an authenticated peer."""
        if len(frames) != codec.FRAMES_PER_MESSAGE:
            self.counters["frames_rejected"] += 1
            self._frame_errors[str(peer)] += 1
            _log(logging.WARNING, "transport.frames_rejected", peer=peer, frames=len(frames))
            error = FrameError(
                f"expected {codec.FRAMES_PER_MESSAGE} frames, got {len(frames)}", self.identity.name
            )
            return Received(peer, error=error)
        raw = [f if isinstance(f, bytes) else f.bytes for f in frames]
        try:
            message = codec.decode(raw, self.max_frame_bytes)
        except ProtocolError as exc:
            self.counters["malformed"] += 1
            reply_to = "-" if exc.reply_to is None else exc.reply_to.hex()
            _log(
                logging.WARNING, "transport.malformed", peer=peer, code=exc.code, reply_to=reply_to
            )
            return Received(peer, error=exc)
        self.counters["received"] += 1
        return Received(peer, message=message)

    # -- sending ------------------------------------------------------------------------

    def send(self, peer: Peer, message: Message) -> None:
        if self._closed:
            raise TransportClosed("transport is closed", self.identity.name)
        frames = codec.encode(message)
        parent = self._parents.get(peer.name) if peer.role is Role.PARENT else None
        listener = None if peer.role is Role.PARENT else self._listeners.get(peer.role)
        routing_id = None if listener is None else listener.routes.get(peer.name)
        try:
            if parent is not None:
                _send_now(parent.socket, frames)
            elif listener is not None and routing_id is not None:
                _send_now(listener.socket, [routing_id, *frames])
            else:
                raise self._refuse(CellUnreachable, peer, "no link to it")
        except zmq.Again:  # a DEALER under IMMEDIATE says the same when it has no link
            if parent is not None and parent.state != "up":
                raise self._refuse(CellUnreachable, peer, f"the link is {parent.state}") from None
            raise self._refuse(Busy, peer, "its queue is full") from None
        except zmq.ZMQError as exc:
            if listener is None or exc.errno != zmq.EHOSTUNREACH:
                why = f"sending to {peer} failed: {exc.strerror}"
                raise TransportBroken(why, self.identity.name) from exc
            if listener.routes.get(peer.name) == routing_id:
                del listener.routes[peer.name]  # the connection that spoke for it is gone
            raise self._refuse(CellUnreachable, peer, "its connection is gone") from None
        self.counters["sent"] += 1

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
        monitor: zmq.asyncio.Socket | None = None
        try:
            keypair = (self.identity.public_key, self.identity.secret_key)
            self.options.dialler(sock, link.public_key, keypair)
            monitor = sock.get_monitor_socket(_MONITORED)
            sock.connect(link.endpoint)
        except (zmq.ZMQError, UnicodeError) as exc:
            _close(sock, monitor, 0)
            why = exc.strerror if isinstance(exc, zmq.ZMQError) else "a key is not ASCII"
            _log(
                logging.ERROR,
                "transport.dial_failed",
                parent=peer.name,
                endpoint=link.endpoint,
                error=why,
            )
            self._emit(LinkChange(peer, up=False, reason=f"cannot dial {link.endpoint}: {why}"))
            return
        parent = self._parents[peer.name] = _Parent(link, peer, sock, monitor, state)
        parent.tasks += [
            self._spawn(self._watch(parent), f"watch-{peer.name}"),
            self._spawn(self._serve_parent(parent), f"parent-{peer.name}"),
        ]

    def _drop_parent(self, name: str, reason: str) -> None:
        parent = self._parents.pop(name, None)
        if parent is None:
            return
        for task in parent.tasks:
            task.cancel()
        _close(parent.socket, parent.monitor, self.options.linger_ms)
        if parent.state == "up":
            self._emit(LinkChange(parent.peer, up=False, reason=reason))

    async def _watch(self, parent: _Parent) -> None:
        """Follow the DEALER's monitor; emit a LinkChange, and log, on each change of state."""
        while True:
            event = (await recv_monitor_message(parent.monitor))["event"]
            if event == zmq.EVENT_MONITOR_STOPPED:
                return
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # libzmq gives up on this endpoint
                self.counters["parent_refused"] += 1
                parent.tasks.append(self._spawn(self._redial_later(parent), "redial"))
            change = _next_state(parent.state, event)
            if change is None:
                continue
            parent.state, reason = change
            level = logging.WARNING if parent.state in ("refused", "failed") else logging.INFO
            _log(
                level,
                f"transport.parent_{parent.state}",
                parent=parent.peer.name,
                endpoint=parent.link.endpoint,
            )
            await self._queue.put(LinkChange(parent.peer, up=parent.state == "up", reason=reason))

    async def _redial_later(self, parent: _Parent) -> None:
        await asyncio.sleep(self.refused_retry_ms / 1000)
        if self._parents.get(parent.peer.name) is parent:
            self._redial(parent)

    async def _serve_parent(self, parent: _Parent) -> None:
        """Read one parent's DEALER until cancelled."""
        while True:
            try:
                frames = await parent.socket.recv_multipart()
            except zmq.ZMQError as exc:
                if parent.socket.closed or exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
                    return
                self._failed("recv", parent.peer.name, exc)
                continue
            await self._queue.put(self._frames_in(parent.peer, frames))


class ZmqClient(ClientTransport):
    """A client's CURVE link to one cell's api endpoint, with the cell's key pinned."""

    def __init__(
        self,
        endpoint: str,
        server_key: str,
        keypair: tuple[str, str],
        *,
        connect_timeout_s: float = 5.0,
        options: SocketOptions | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.server_key = server_key
        self.options = options or SocketOptions()
        self.connect_timeout_s = connect_timeout_s
        self._keypair = keypair
        self._ctx: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._state = "connecting"
        self._failure = ""
        self._changed = asyncio.Event()
        self._closed = False

    async def connect(self) -> None:
        """Dial and wait for the handshake: `AccessDenied` if refused, `CellUnreachable` if none."""
        if self._closed:
            raise TransportClosed(f"the client of {self.endpoint} is closed")
        if self._socket is not None:
            return
        check_environment()
        self._state, self._failure = "connecting", ""
        self._ctx = zmq.asyncio.Context()
        self._socket = sock = self._ctx.socket(zmq.DEALER)
        try:
            self.options.dialler(sock, self.server_key, self._keypair)
            self._monitor = sock.get_monitor_socket(_MONITORED)
            sock.connect(self.endpoint)
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._monitor))
            async with asyncio.timeout(self.connect_timeout_s):
                while self._state not in ("up", "refused"):
                    self._changed.clear()
                    await self._changed.wait()
            if self._state == "refused":
                raise AccessDenied(f"the cell at {self.endpoint} refused this client's key")
        except BaseException as exc:
            await self._teardown()
            if isinstance(exc, TimeoutError):
                why = f" ({self._failure})" if self._failure else ""
                raise CellUnreachable(
                    f"no handshake with the cell at {self.endpoint} within "
                    f"{self.connect_timeout_s} s{why}"
                ) from None
            if isinstance(exc, zmq.ZMQError | UnicodeError):
                raise TransportBroken(f"cannot dial {self.endpoint}: {exc}") from exc
            raise

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = (await recv_monitor_message(monitor))["event"]
            if event == zmq.EVENT_MONITOR_STOPPED:
                return
            change = _next_state(self._state, event)
            if change is not None:
                self._state = change[0]
                self._failure = change[1] if change[0] == "failed" else self._failure
                self._changed.set()

    def _live(self) -> zmq.asyncio.Socket:
        if self._closed:
            raise TransportClosed(f"the client of {self.endpoint} is closed")
        if self._socket is None:
            raise CellUnreachable(f"not connected to {self.endpoint}")
        return self._socket

    async def send(self, message: Message) -> None:
        sock = self._live()
        try:
            _send_now(sock, codec.encode(message))
        except zmq.Again:
            if self._state != "up":
                raise CellUnreachable(f"no live link to {self.endpoint}") from None
            raise Busy(f"the queue to {self.endpoint} is full") from None
        except zmq.ZMQError as exc:
            raise TransportBroken(f"sending to {self.endpoint} failed: {exc.strerror}") from exc

    async def recv(self) -> Message:
        sock = self._live()
        try:
            frames = await sock.recv_multipart()
        except asyncio.CancelledError:  # our caller's cancellation, or close() under us
            task = asyncio.current_task()
            if not self._closed or (task is not None and task.cancelling()):
                raise
            raise TransportClosed(f"the client of {self.endpoint} closed") from None
        except zmq.ZMQError as exc:
            kind = TransportClosed if self._closed else TransportBroken
            raise kind(f"receiving from {self.endpoint} failed: {exc.strerror}") from exc
        if len(frames) != codec.FRAMES_PER_MESSAGE:
            raise FrameError(f"expected {codec.FRAMES_PER_MESSAGE} frames, got {len(frames)}")
        return codec.decode(frames, self.options.max_frame_bytes)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._teardown()

    async def _teardown(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._socket is not None:
            _close(self._socket, self._monitor, self.options.linger_ms)
        if self._ctx is not None:
            self._ctx.destroy(linger=self.options.linger_ms)
        self._ctx = self._socket = self._monitor = self._watcher = None
        self._state = "closed"
