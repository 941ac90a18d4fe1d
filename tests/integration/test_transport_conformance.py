"""One conformance suite for both transports: the in-memory one and the ZeroMQ one.

Each test builds the same small world through one `Backend` interface: a top
cell T (listening), a child cell C (dialling T as its parent) and a client K
of T, with real CURVE keys from `zmq.curve_keypair()`. The ZeroMQ backend runs
on loopback TCP with ephemeral ports; the memory backend on a `MemoryNetwork`.
Every wait is bounded by `asyncio.timeout`; nothing sleeps to wait for
convergence. There is no pytest-asyncio here: each test runs its scenario with
`asyncio.run` through `run()`.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from tests.polling import until
from zcells import codec
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
from zcells.messages import (
    CellResult,
    Direction,
    Heartbeat,
    Hello,
    Message,
    Outcome,
    Response,
    Targeted,
    new_message_id,
)
from zcells.peer import Peer, Role
from zcells.sockets.transport import ZmqClient, ZmqTransport
from zcells.transport import (
    ClientTransport,
    Event,
    Identity,
    LinkChange,
    MemoryClient,
    MemoryNetwork,
    MemoryTransport,
    ParentLink,
    Received,
    Topology,
    Transport,
)

WAIT_S = 5.0
Keys = tuple[str, str]  # (public, secret), z85 text


def new_keys() -> Keys:
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


# -- messages ---------------------------------------------------------------------------


def hello(cell_type: str = "compute") -> Hello:
    return Hello(id=new_message_id(), sent_at=time.time(), cell_type=cell_type, path="T!C")


def heartbeat() -> Heartbeat:
    return Heartbeat(id=new_message_id(), sent_at=time.time(), path="T!C", your_path="T")


def targeted(body: dict[str, Any] | None = None) -> Targeted:
    return Targeted(
        id=new_message_id(),
        method="status",
        body=body or {"verbose": True},
        direction=Direction.DOWN,
        path=("T",),
        hops=0,
        max_hops=8,
        want_response=True,
        timeout_ms=5000,
        sent_at=time.time(),
        context=None,
        target="T",
    )


def response(reply_to: bytes) -> Response:
    result = CellResult(cell="T", outcome=Outcome.OK, value={"state": "up", "load": 0.5})
    return Response(
        id=new_message_id(),
        reply_to=reply_to,
        path=("T",),
        results=(result,),
        sent_at=time.time(),
        held_ms=1.5,
    )


# -- waiting ----------------------------------------------------------------------------


async def expect(t: Transport, match: Callable[[Event], bool], what: str) -> Event:
    """Read events until one matches; fail after WAIT_S listing what came instead."""
    seen: list[Event] = []
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                event = await t.recv()
                if match(event):
                    return event
                seen.append(event)
    except TimeoutError:
        raise AssertionError(f"no {what} within {WAIT_S} s; saw {seen}") from None


async def next_event(t: Transport) -> Event:
    async with asyncio.timeout(WAIT_S):
        return await t.recv()


async def link_event(t: Transport, parent: str, *, up: bool) -> LinkChange:
    event = await expect(
        t,
        lambda e: isinstance(e, LinkChange) and e.peer.name == parent and e.up is up,
        f"link {'up' if up else 'down'} to {parent}",
    )
    assert isinstance(event, LinkChange)
    return event


# -- the one factory interface, two backends ---------------------------------------------


class Backend(ABC):
    """Builds transports, clients and raw injections for one implementation."""

    @abstractmethod
    def transport(self, name: str, keys: Keys, **options: Any) -> Transport: ...

    @abstractmethod
    def endpoint(self, t: Transport, domain: str) -> str:
        """Where a started transport listens for `domain` ("cells" or "api")."""

    @abstractmethod
    def client(self, endpoint: str, server_key: str, name: str, keys: Keys) -> ClientTransport: ...

    @abstractmethod
    async def inject_raw(self, t: Transport, name: str, keys: Keys, frames: list[bytes]) -> None:
        """Deliver raw frames to `t`'s cells endpoint as an accepted peer with `keys`."""

    @abstractmethod
    def redial(self, t: Transport) -> None: ...

    async def aclose(self) -> None:
        return None


class MemoryBackend(Backend):
    def __init__(self) -> None:
        self.network = MemoryNetwork()
        self._serial = itertools.count()

    def transport(self, name: str, keys: Keys, **options: Any) -> Transport:
        n = next(self._serial)
        identity = Identity(
            name, keys[0], keys[1], f"mem://{name}.{n}/cells", f"mem://{name}.{n}/api"
        )
        return MemoryTransport(self.network, identity, **options)

    def endpoint(self, t: Transport, domain: str) -> str:
        assert isinstance(t, MemoryTransport)
        return t.identity.cells_endpoint if domain == "cells" else t.identity.api_endpoint

    def client(self, endpoint: str, server_key: str, name: str, keys: Keys) -> ClientTransport:
        return MemoryClient(self.network, endpoint, server_key, name, keys[0])

    async def inject_raw(self, t: Transport, name: str, keys: Keys, frames: list[bytes]) -> None:
        assert isinstance(t, MemoryTransport)
        conn = t.accept(t.identity.cells_endpoint, name, keys[0], lambda frames: None)
        assert conn is not None, "the raw peer's key was refused"
        t.receive_from(conn, frames)

    def redial(self, t: Transport) -> None:
        assert isinstance(t, MemoryTransport)
        t.redial()


class ZmqBackend(Backend):
    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.raw: dict[tuple[str, str], zmq.asyncio.Socket] = {}

    def transport(self, name: str, keys: Keys, **options: Any) -> Transport:
        identity = Identity(name, keys[0], keys[1], "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        return ZmqTransport(identity, linger_ms=100, **options)

    def endpoint(self, t: Transport, domain: str) -> str:
        assert isinstance(t, ZmqTransport)
        return t.bound_endpoints[domain]

    def client(self, endpoint: str, server_key: str, name: str, keys: Keys) -> ClientTransport:
        return ZmqClient(endpoint, server_key, keys, connect_timeout_s=WAIT_S)

    async def inject_raw(self, t: Transport, name: str, keys: Keys, frames: list[bytes]) -> None:
        assert isinstance(t, ZmqTransport)
        endpoint = self.endpoint(t, "cells")
        sock = self.raw.get((endpoint, keys[0]))
        if sock is None:
            sock = await raw_dealer(self.ctx, endpoint, t.identity.public_key, keys)
            self.raw[(endpoint, keys[0])] = sock
        await sock.send_multipart(frames)

    def redial(self, t: Transport) -> None:
        assert isinstance(t, ZmqTransport)
        t.redial()

    async def aclose(self) -> None:
        for sock in self.raw.values():
            sock.close(linger=0)
        self.ctx.destroy(linger=0)


async def dial_raw(
    ctx: zmq.asyncio.Context,
    endpoint: str,
    server_key: str,
    keys: Keys,
    *,
    routing_id: bytes | None = None,
) -> tuple[int, zmq.asyncio.Socket]:
    """A bare CURVE DEALER (IMMEDIATE, no linger) and the event that settled its handshake."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger, sock.immediate = 0, 1
    sock.curve_serverkey = server_key.encode("ascii")
    sock.curve_publickey, sock.curve_secretkey = keys[0].encode(), keys[1].encode()
    if routing_id is not None:
        sock.routing_id = routing_id
    monitor = sock.get_monitor_socket()
    sock.connect(endpoint)
    try:
        try:
            event = await handshake_outcome(monitor)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
    except BaseException:
        sock.close(linger=0)
        raise
    return event, sock


async def raw_dealer(
    ctx: zmq.asyncio.Context, endpoint: str, server_key: str, keys: Keys
) -> zmq.asyncio.Socket:
    """A bare CURVE DEALER whose handshake succeeded."""
    event, sock = await dial_raw(ctx, endpoint, server_key, keys)
    if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
        sock.close(linger=0)
        raise AssertionError(f"raw handshake to {endpoint} ended with {zmq.Event(event).name}")
    return sock


async def handshake_outcome(monitor: zmq.asyncio.Socket) -> int:
    """The first monitor event that settles a handshake, one way or the other."""
    settled = (
        zmq.EVENT_HANDSHAKE_SUCCEEDED,
        zmq.EVENT_HANDSHAKE_FAILED_AUTH,
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    )
    async with asyncio.timeout(WAIT_S):
        while True:
            event = (await recv_monitor_message(monitor))["event"]
            if event in settled:
                return int(event)


# -- the world --------------------------------------------------------------------------


@dataclass
class World:
    """T listens; C is T's child; K is T's client. Keys for a stranger S too."""

    backend: Backend
    t: Transport
    c: Transport
    keys: dict[str, Keys]
    closing: list[Transport | ClientTransport] = field(default_factory=list)

    def topology_of_t(self, **changes: Any) -> Topology:
        base: dict[str, Any] = {
            "children": {"C": self.keys["C"][0]},
            "clients": {"K": self.keys["K"][0]},
        }
        return Topology(**{**base, **changes})

    def parent_link(self, domain: str = "cells") -> ParentLink:
        return ParentLink(self.backend.endpoint(self.t, domain), self.keys["T"][0])

    async def cell(self, name: str, keys: Keys, **options: Any) -> Transport:
        """Another started transport, closed with the world."""
        cell = self.backend.transport(name, keys, **options)
        self.closing.append(cell)
        await cell.start()
        return cell

    def client(
        self, name: str = "K", keys: Keys | None = None, domain: str = "api"
    ) -> ClientTransport:
        client = self.backend.client(
            self.backend.endpoint(self.t, domain), self.keys["T"][0], name, keys or self.keys[name]
        )
        self.closing.append(client)
        return client

    async def connect_child(self) -> None:
        """Dial C to T and wait for the link, then let T learn C from its hello."""
        self.c.apply(Topology(parents={"T": self.parent_link()}))
        await link_event(self.c, "T", up=True)
        self.c.send(Peer(Role.PARENT, "T"), hello())
        event = await next_event(self.t)
        assert isinstance(event, Received) and event.peer == Peer(Role.CHILD, "C")


async def build_world(backend: Backend) -> World:
    keys = {name: new_keys() for name in ("T", "C", "K", "S")}
    world = World(
        backend, backend.transport("T", keys["T"]), backend.transport("C", keys["C"]), keys
    )
    world.closing += [world.t, world.c]
    await world.t.start()
    await world.c.start()
    world.t.apply(world.topology_of_t())
    return world


Scenario = Callable[[World], Awaitable[None]]


def run(backend_class: type[Backend], scenario: Scenario) -> None:
    """Run one scenario in a fresh event loop, closing everything it opened."""

    async def main() -> None:
        backend = backend_class()
        try:
            world = await build_world(backend)
            try:
                await scenario(world)
            finally:
                for item in reversed(world.closing):
                    await item.close()
        finally:
            await backend.aclose()

    asyncio.run(main())


@pytest.fixture(params=[MemoryBackend, ZmqBackend], ids=["memory", "zmq"])
def backend(request: pytest.FixtureRequest) -> type[Backend]:
    return request.param  # type: ignore[no-any-return]


def conformance(scenario: Scenario) -> Callable[[type[Backend]], None]:
    """Turn `async def test_x(w: World)` into a test run once per backend."""

    def test(backend: type[Backend]) -> None:
        run(backend, scenario)

    test.__name__, test.__doc__ = scenario.__name__, scenario.__doc__
    return test


# -- 1. a child dials its parent ----------------------------------------------------------


@conformance
async def test_child_and_parent_exchange_messages(w: World) -> None:
    w.c.apply(Topology(parents={"T": w.parent_link()}))
    up = await link_event(w.c, "T", up=True)
    assert up.peer == Peer(Role.PARENT, "T")
    sent_up: list[Message] = [hello(), heartbeat(), targeted()]
    for message in sent_up:
        w.c.send(Peer(Role.PARENT, "T"), message)
    for message in sent_up:
        assert await next_event(w.t) == Received(Peer(Role.CHILD, "C"), message=message)
    sent_down: list[Message] = [hello("api"), heartbeat(), response(new_message_id())]
    for message in sent_down:
        w.t.send(Peer(Role.CHILD, "C"), message)
    for message in sent_down:
        got = await expect(w.c, lambda e: isinstance(e, Received), "a message from T")
        assert got == Received(Peer(Role.PARENT, "T"), message=message)


# -- 2. a client asks, the cell answers ---------------------------------------------------


@conformance
async def test_client_request_and_response(w: World) -> None:
    k = w.client()
    await k.connect()
    request = targeted({"query": "load", "limit": 3})
    await k.send(request)
    assert await next_event(w.t) == Received(Peer(Role.CLIENT, "K"), message=request)
    answer = response(request.id)
    w.t.send(Peer(Role.CLIENT, "K"), answer)
    async with asyncio.timeout(WAIT_S):
        assert await k.recv() == answer


# -- 3. nobody there ----------------------------------------------------------------------


@conformance
async def test_send_to_absent_peers_is_unreachable(w: World) -> None:
    with pytest.raises(CellUnreachable):
        w.t.send(Peer(Role.CHILD, "nobody"), heartbeat())
    with pytest.raises(CellUnreachable):
        w.t.send(Peer(Role.CLIENT, "K"), heartbeat())  # registered, never connected
    with pytest.raises(CellUnreachable):
        w.c.send(Peer(Role.PARENT, "T"), heartbeat())  # not in C's topology
    await w.connect_child()
    with pytest.raises(CellUnreachable):
        w.c.send(Peer(Role.PARENT, "elsewhere"), heartbeat())
    assert w.t.statistics()["received"] == 1


# -- 4. unknown keys ----------------------------------------------------------------------


@conformance
async def test_unknown_child_key_is_refused(w: World) -> None:
    await w.connect_child()
    stranger = await w.cell("S", w.keys["S"])
    stranger.apply(Topology(parents={"T": w.parent_link()}))
    refused = await link_event(stranger, "T", up=False)
    assert "refused" in refused.reason
    with pytest.raises(CellUnreachable):
        stranger.send(Peer(Role.PARENT, "T"), hello())
    canary = heartbeat()
    w.c.send(Peer(Role.PARENT, "T"), canary)
    assert await next_event(w.t) == Received(Peer(Role.CHILD, "C"), message=canary)


@conformance
async def test_unknown_client_key_is_denied(w: World) -> None:
    with pytest.raises(AccessDenied, match="refused"):
        await w.client("S", w.keys["S"]).connect()
    good = w.client()
    await good.connect()
    await good.send(canary := heartbeat())
    assert await next_event(w.t) == Received(Peer(Role.CLIENT, "K"), message=canary)


@conformance
async def test_refused_child_gets_in_once_registered(w: World) -> None:
    w.t.apply(w.topology_of_t(children={}))
    w.c.apply(Topology(parents={"T": w.parent_link()}))
    assert "refused" in (await link_event(w.c, "T", up=False)).reason
    w.t.apply(w.topology_of_t())
    w.backend.redial(w.c)
    await link_event(w.c, "T", up=True)
    w.c.send(Peer(Role.PARENT, "T"), canary := hello())
    assert await next_event(w.t) == Received(Peer(Role.CHILD, "C"), message=canary)


# -- 5. keys are per role -----------------------------------------------------------------


@conformance
async def test_keys_only_open_their_own_endpoint(w: World) -> None:
    as_client = await w.cell("C", w.keys["C"])  # the child's key, dialling the api endpoint
    as_client.apply(Topology(parents={"T": w.parent_link("api")}))
    assert "refused" in (await link_event(as_client, "T", up=False)).reason
    with pytest.raises(AccessDenied):  # the client's key on the cells endpoint
        await w.client("K", domain="cells").connect()
    await w.connect_child()  # both keys still work where they belong
    k = w.client()
    await k.connect()
    await k.send(canary := heartbeat())
    assert await next_event(w.t) == Received(Peer(Role.CLIENT, "K"), message=canary)


# -- 6. revocation ------------------------------------------------------------------------


@conformance
async def test_revoked_key_is_refused_on_next_message(w: World) -> None:
    await w.connect_child()
    w.t.apply(w.topology_of_t(children={}))
    w.c.send(Peer(Role.PARENT, "T"), heartbeat())
    event = await next_event(w.t)
    assert isinstance(event, Received) and event.peer == Peer(Role.CHILD, "C")
    assert event.message is None and isinstance(event.error, KeyRevoked)
    assert w.t.statistics()["revoked"] == 1


@conformance
async def test_replaced_key_is_revoked_for_the_old_link(w: World) -> None:
    await w.connect_child()
    w.t.apply(w.topology_of_t(children={"C": new_keys()[0]}))
    w.c.send(Peer(Role.PARENT, "T"), heartbeat())
    event = await next_event(w.t)
    assert isinstance(event, Received) and event.peer == Peer(Role.CHILD, "C")
    assert event.message is None and isinstance(event.error, KeyRevoked)


# -- 7. malformed frames ------------------------------------------------------------------


@conformance
async def test_malformed_frames_are_reported_and_serving_goes_on(w: World) -> None:
    good = hello()
    header, body = codec.encode(good)
    cases: list[tuple[list[bytes], type[ProtocolError]]] = [
        ([header], FrameError),
        ([header, body, body], FrameError),
        ([b"\xc1garbage", body], ProtocolError),
        ([header, b"\x92\x01"], ProtocolError),
    ]
    for frames, error in cases:
        await w.backend.inject_raw(w.t, "C", w.keys["C"], frames)
        event = await next_event(w.t)
        assert isinstance(event, Received) and event.peer == Peer(Role.CHILD, "C")
        assert event.message is None and isinstance(event.error, error), event
    await w.backend.inject_raw(w.t, "C", w.keys["C"], [header, body])
    assert await next_event(w.t) == Received(Peer(Role.CHILD, "C"), message=good)
    stats = w.t.statistics()
    assert stats["received"] == 1 and stats["malformed"] >= 2


# -- 8. close -----------------------------------------------------------------------------


@conformance
async def test_close_refuses_further_use(w: World) -> None:
    await w.connect_child()
    await w.t.close()  # bounded by LINGER: a close never waits on a peer
    with pytest.raises(TransportClosed):
        w.t.send(Peer(Role.CHILD, "C"), heartbeat())
    with pytest.raises(TransportClosed):
        await next_event(w.t)
    await w.t.close()  # twice is fine

    def parent_gone() -> bool:
        try:
            w.c.send(Peer(Role.PARENT, "T"), heartbeat())
        except CellUnreachable:
            return True
        except Busy:  # ZeroMQ: the pipe is gone before C's monitor reports it
            return False
        return False

    await until(parent_gone, WAIT_S, "C's sends to the closed T fail as unreachable")


@conformance
async def test_parent_close_is_a_link_down(w: World) -> None:
    await w.connect_child()
    await w.t.close()
    down = await link_event(w.c, "T", up=False)
    assert down.reason
    assert w.c.statistics()["parents_up"] == []


def test_zmq_endpoint_in_use_is_a_clear_error() -> None:
    async def scenario(w: World) -> None:
        taken = w.backend.endpoint(w.t, "cells")
        keys = w.keys["S"]
        second = ZmqTransport(Identity("S", keys[0], keys[1], taken, "tcp://127.0.0.1:*"))
        with pytest.raises(TransportBroken, match=re.escape(taken)):
            await second.start()
        await second.close()
        await w.connect_child()  # the first owner is unharmed

    run(ZmqBackend, scenario)


# -- 9. statistics ------------------------------------------------------------------------


@conformance
async def test_statistics_count_traffic(w: World) -> None:
    before = w.t.statistics()
    await w.connect_child()
    w.t.send(Peer(Role.CHILD, "C"), heartbeat())
    after = w.t.statistics()
    assert isinstance(after, dict)
    assert after["received"] == before.get("received", 0) + 1
    assert after["sent"] == before.get("sent", 0) + 1
    assert w.c.statistics()["parents_up"] == ["T"]
