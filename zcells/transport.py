"""The Transport contract, and an in-memory transport that keeps it.

A transport moves messages between this cell and its neighbours and clients.
Both implementations (this in-memory one for fast tests, the ZeroMQ one in
`zcells.sockets.transport`) pass the same conformance suite and go through
the real codec. The contract:

* `recv()` yields `Received` (a decoded message, or the `ProtocolError` that
  stopped it, always with the authenticated `Peer`) and `LinkChange` (a
  link to a parent came up or went down, or its handshake was refused).
* A peer's identity is its key: a key not in the current `Topology` never
  gets a message through, and a key removed from it is refused on its next
  message with `KeyRevoked`, open connection or not.
* `send()` is not a coroutine: it queues the message at once or raises. No
  live link raises `CellUnreachable`, a full queue `Busy`, a closed transport
  `TransportClosed`. So a cell can answer from any callback, in order.
* Frames above `max_frame_bytes` and messages of the wrong frame count never
  reach the codec's decoder. A message is never sent with a frame over the
  usable limit (`codec.usable_frame_bytes`: what the receiver takes under
  CURVE); `send()` raises `TooLarge` instead, so no link is ever dropped for it.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zcells import codec
from zcells.errors import (
    AccessDenied,
    CellUnreachable,
    KeyRevoked,
    ProtocolError,
    TransportBroken,
    TransportClosed,
    WireError,
)
from zcells.messages import Message
from zcells.peer import Peer, Role


@dataclass(frozen=True)
class Received:
    """A message from an authenticated peer, or why it could not be read."""

    peer: Peer
    message: Message | None = None
    error: WireError | None = None  # a ProtocolError, or KeyRevoked


@dataclass(frozen=True)
class LinkChange:
    """A link to a parent came up, went down, or was refused at the handshake."""

    peer: Peer
    up: bool
    reason: str = ""


Event = Received | LinkChange


@dataclass(frozen=True)
class ParentLink:
    endpoint: str
    public_key: str


@dataclass(frozen=True)
class Topology:
    """Who may talk to this cell, from its own database: the keyring and the parents to dial."""

    parents: Mapping[str, ParentLink] = field(default_factory=dict)
    children: Mapping[str, str] = field(default_factory=dict)  # name -> public key
    clients: Mapping[str, str] = field(default_factory=dict)  # name -> public key


@dataclass(frozen=True)
class Identity:
    """This cell's own name and key pair, and where it listens."""

    name: str
    public_key: str
    secret_key: str
    cells_endpoint: str
    api_endpoint: str


class Transport(ABC):
    max_frame_bytes: int

    @abstractmethod
    async def start(self) -> None:
        """Bind the endpoints; authentication is in place before any bind."""

    @abstractmethod
    def apply(self, topology: Topology) -> None:
        """Swap in a new keyring and dial or drop parents to match."""

    @abstractmethod
    def send(self, peer: Peer, message: Message) -> int:
        """Queue `message` for `peer` at once, never waiting on it; the bytes it took.

        A message with a frame over the receiver's limit is `TooLarge`, and
        never sent (see the module rules).
        """

    @abstractmethod
    async def recv(self) -> Event:
        """The next event; raises `TransportClosed` once closed."""

    @abstractmethod
    async def close(self) -> None:
        """Close every socket; pending sends are dropped after a short linger."""

    @abstractmethod
    def statistics(self) -> dict[str, Any]:
        """Counters for status views and benchmarks."""


class ClientTransport(ABC):
    """A client's single link to one cell's api endpoint, authenticated by the client key."""

    @abstractmethod
    async def connect(self) -> None:
        """Open the link; raises `AccessDenied` if the cell refuses the key."""

    @abstractmethod
    async def send(self, message: Message) -> None: ...

    @abstractmethod
    async def recv(self) -> Message:
        """The next message from the cell; raises `ProtocolError` for a malformed one."""

    @abstractmethod
    async def close(self) -> None: ...


# -- the in-memory implementation -------------------------------------------------------


class MemoryNetwork:
    """Listening in-memory transports by endpoint: a loopback network inside one process.

    It carries every message between two cells at once and lets any cell
    dial any other; a simulation's network overrides `carry`, `can_dial`
    and `lost` to delay, drop, duplicate or hold messages and cut links.
    """

    def __init__(self) -> None:
        self.bound: dict[str, MemoryTransport] = {}

    def carry(
        self, sender: str, receiver: str, link: _Conn, frames: list[bytes], deliver: Deliver
    ) -> None:
        """Take `frames` from cell `sender` to cell `receiver` over `link`."""
        deliver(frames)

    def can_dial(self, dialler: str, listener: str) -> bool:
        """Whether a handshake from `dialler` reaches `listener` now."""
        return True

    def lost(self, transport: MemoryTransport) -> None:
        """`transport` lost a link to a parent; it dials again when `redial()` is called."""


Deliver = Callable[[list[bytes]], None]


@dataclass(eq=False)
class _Conn:
    """One accepted connection: who dialled, with which key, on which endpoint."""

    listener: MemoryTransport
    domain: str  # "cells" or "api"
    name: str
    key: str
    deliver: Callable[[list[bytes]], None]
    lost: Callable[[str], None] = lambda _parent: None
    open: bool = True

    def to_listener(self, frames: list[bytes]) -> None:
        self.listener.receive_from(self, frames)


class MemoryTransport(Transport):
    """A cell's transport between objects in one process, through the real codec."""

    def __init__(
        self,
        network: MemoryNetwork,
        identity: Identity,
        *,
        max_frame_bytes: int = codec.DEFAULT_MAX_FRAME_BYTES,
        queue_size: int = 1000,
    ) -> None:
        self.network = network
        self.identity = identity
        self.max_frame_bytes = max_frame_bytes
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=queue_size)
        self._topology = Topology()
        self._accepted: dict[tuple[str, str], _Conn] = {}  # (domain, name) -> conn
        self._dialled: dict[str, _Conn] = {}  # parent name -> our conn on its listener
        self._closed = False
        self.counters: Counter[str] = Counter()

    # listening side

    async def start(self) -> None:
        for endpoint in (self.identity.cells_endpoint, self.identity.api_endpoint):
            if endpoint in self.network.bound:
                raise TransportBroken(
                    f"cannot bind {endpoint}: address already in use", self.identity.name
                )
        for endpoint in (self.identity.cells_endpoint, self.identity.api_endpoint):
            self.network.bound[endpoint] = self

    def accept(
        self, endpoint: str, name: str, key: str, deliver: Callable[[list[bytes]], None]
    ) -> _Conn | None:
        """A dialler's handshake: admitted only if its key is registered for that endpoint."""
        domain = "cells" if endpoint == self.identity.cells_endpoint else "api"
        keyring = self._topology.children if domain == "cells" else self._topology.clients
        if self._closed or keyring.get(name) != key:
            self.counters["handshake_refused"] += 1
            return None
        old = self._accepted.get((domain, name))
        if old is not None:
            old.open = False
        conn = _Conn(self, domain, name, key, deliver)
        self._accepted[(domain, name)] = conn
        return conn

    def receive_from(self, conn: _Conn, frames: list[bytes]) -> None:
        """Frames arriving on an accepted connection; the key is checked on every message."""
        if self._closed or not conn.open:
            return
        role = Role.CHILD if conn.domain == "cells" else Role.CLIENT
        peer = Peer(role, conn.name)
        keyring = self._topology.children if role is Role.CHILD else self._topology.clients
        if keyring.get(conn.name) != conn.key:
            self.counters["revoked"] += 1
            self._emit(
                Received(
                    peer,
                    error=KeyRevoked(
                        f"the key of {peer} is no longer registered", self.identity.name
                    ),
                )
            )
            return
        self._receive(peer, frames)

    # dialling side

    def apply(self, topology: Topology) -> None:
        old = self._topology
        self._topology = topology
        for name in list(self._dialled):
            if old.parents.get(name) != topology.parents.get(name):
                self._drop_parent(name, "changed or removed in the cells table")
        self.redial()

    def redial(self) -> None:
        """Dial parents that are not up; the ZeroMQ transport retries by itself."""
        for name, link in self._topology.parents.items():
            if name not in self._dialled:
                self._dial(name, link)

    def _dial(self, name: str, link: ParentLink) -> None:
        server = self.network.bound.get(link.endpoint)
        peer = Peer(Role.PARENT, name)
        if server is None or not self.network.can_dial(self.identity.name, server.identity.name):
            return  # nothing listens there yet, or nothing gets through
        if server.identity.public_key != link.public_key:
            self._emit(LinkChange(peer, up=False, reason="server key does not match"))
            return
        conn = server.accept(
            link.endpoint,
            self.identity.name,
            self.identity.public_key,
            lambda frames: self._receive(peer, frames),
        )
        if conn is not None:
            conn.lost = lambda _parent: self._drop_parent(name, "parent closed")
        if conn is None:
            self._emit(LinkChange(peer, up=False, reason="handshake refused: key not accepted"))
            return
        self._dialled[name] = conn
        self._emit(LinkChange(peer, up=True, reason="connected"))

    def parents_up(self) -> bool:
        """Whether every parent in the topology has a live link."""
        return all(
            name in self._dialled and self._dialled[name].open for name in self._topology.parents
        )

    def lose_parent(self, name: str, reason: str) -> None:
        """The link to parent `name` broke (a network fault): both ends see it go."""
        self._drop_parent(name, reason)

    def _drop_parent(self, name: str, reason: str) -> None:
        conn = self._dialled.pop(name, None)
        if conn is not None:
            conn.open = False
            self._emit(LinkChange(Peer(Role.PARENT, name), up=False, reason=reason))
            if not self._closed:
                self.network.lost(self)

    # both

    def _emit(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.counters["dropped_queue_full"] += 1

    def _receive(self, peer: Peer, frames: list[bytes]) -> None:
        if self._closed:
            return
        try:
            message = codec.decode(frames, self.max_frame_bytes)
        except ProtocolError as exc:
            self.counters["malformed"] += 1
            self._emit(Received(peer, error=exc))
            return
        self.counters["received"] += 1
        self._emit(Received(peer, message=message))

    def send(self, peer: Peer, message: Message) -> int:
        if self._closed:
            raise TransportClosed("transport is closed", self.identity.name)
        frames = codec.encode_within(message, self.max_frame_bytes)
        if peer.role is Role.PARENT:
            conn = self._dialled.get(peer.name)
            if conn is None or not conn.open:
                raise CellUnreachable(f"no live link to {peer}", self.identity.name)
            self.network.carry(self.identity.name, peer.name, conn, frames, conn.to_listener)
        else:
            domain = "cells" if peer.role is Role.CHILD else "api"
            conn = self._accepted.get((domain, peer.name))
            if conn is None or not conn.open:
                raise CellUnreachable(f"no live link to {peer}", self.identity.name)
            if peer.role is Role.CHILD:
                self.network.carry(self.identity.name, peer.name, conn, frames, conn.deliver)
            else:
                conn.deliver(frames)
        self.counters["sent"] += 1
        return len(frames[0]) + len(frames[1])

    async def recv(self) -> Event:
        event = None if self._closed and self._queue.empty() else await self._queue.get()
        if event is None:  # closed: wake every later reader too
            self._queue.put_nowait(None)
            raise TransportClosed("transport is closed", self.identity.name)
        return event

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        while self._queue.full():  # what nobody read before the close is dropped
            self._queue.get_nowait()
        self._queue.put_nowait(None)
        for endpoint in (self.identity.cells_endpoint, self.identity.api_endpoint):
            if self.network.bound.get(endpoint) is self:
                del self.network.bound[endpoint]
        for conn in self._accepted.values():
            conn.open = False
            if conn.domain == "cells":  # the child sees its parent go, as over TCP
                conn.lost(self.identity.name)
        for name in list(self._dialled):
            self._drop_parent(name, "closed")

    def statistics(self) -> dict[str, Any]:
        return {
            "queue": self._queue.qsize(),
            "parents_up": sorted(self._dialled),
            "links_accepted": len(self._accepted),
            **self.counters,
        }


class MemoryClient(ClientTransport):
    """A client of an in-memory cell."""

    def __init__(
        self, network: MemoryNetwork, endpoint: str, server_key: str, name: str, public_key: str
    ) -> None:
        self.network = network
        self.endpoint = endpoint
        self.server_key = server_key
        self.name = name
        self.public_key = public_key
        self._queue: asyncio.Queue[list[bytes]] = asyncio.Queue()
        self._conn: _Conn | None = None

    async def connect(self) -> None:
        server = self.network.bound.get(self.endpoint)
        if server is None:
            raise CellUnreachable(f"nothing listens at {self.endpoint}")
        if server.identity.public_key != self.server_key:
            raise AccessDenied(f"the cell at {self.endpoint} does not have the expected key")
        self._conn = server.accept(
            self.endpoint, self.name, self.public_key, self._queue.put_nowait
        )
        if self._conn is None:
            raise AccessDenied(f"the cell at {self.endpoint} refused this client's key")

    async def send(self, message: Message) -> None:
        if self._conn is None or not self._conn.open:
            raise CellUnreachable(f"not connected to {self.endpoint}")
        frames = codec.encode_within(message, self._conn.listener.max_frame_bytes)
        self._conn.listener.receive_from(self._conn, frames)

    async def recv(self) -> Message:
        return codec.decode(await self._queue.get())

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.open = False
