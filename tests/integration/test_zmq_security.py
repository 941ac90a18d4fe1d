"""ZeroMQ-only security tests: the rows of SECURITY.md §5 that depend on libzmq itself.

Each test shows the refusal and then that a good peer is still served. The
transport under test is a real `ZmqTransport` T on loopback TCP; attackers are
bare pyzmq DEALERs (or raw TCP sockets) holding real CURVE keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import zmq
import zmq.asyncio

from tests.integration.test_transport_conformance import (
    WAIT_S,
    Keys,
    dial_raw,
    expect,
    heartbeat,
    hello,
    link_event,
    new_keys,
    next_event,
    response,
    targeted,
)
from tests.polling import until
from zcells import codec
from zcells.errors import Busy, CellUnreachable, FrameError, KeyRevoked, TooLarge
from zcells.messages import Response
from zcells.peer import Peer, Role
from zcells.sockets.auth import Keyring, ZapHandler, parse_user_id
from zcells.sockets.client import send_now
from zcells.sockets.ids import new_routing_id
from zcells.sockets.transport import ZmqClient, ZmqTransport
from zcells.transport import Identity, ParentLink, Received, Topology

CHILD = Role.CHILD


class Net:
    """T with children A, B, C and client K registered; S is a stranger to it."""

    def __init__(self, ctx: zmq.asyncio.Context, **options: Any) -> None:
        self.ctx = ctx
        self.keys = {name: new_keys() for name in ("T", "A", "B", "C", "K", "S")}
        self.t = self.transport("T", **options)
        self.opened: list[ZmqTransport] = [self.t]
        self.sockets: list[zmq.asyncio.Socket] = []

    def transport(self, name: str, **options: Any) -> ZmqTransport:
        keys = self.keys[name]
        identity = Identity(name, keys[0], keys[1], "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        return ZmqTransport(identity, linger_ms=100, **options)

    def topology(self, *children: str) -> Topology:
        return Topology(
            children={name: self.keys[name][0] for name in children},
            clients={"K": self.keys["K"][0]},
        )

    def endpoint(self, domain: str = "cells") -> str:
        return self.t.bound_endpoints[domain]

    async def child(self, name: str, **options: Any) -> ZmqTransport:
        """A child transport, linked to T, that T has heard from."""
        child = self.transport(name, **options)
        self.opened.append(child)
        await child.start()
        child.apply(Topology(parents={"T": ParentLink(self.endpoint(), self.keys["T"][0])}))
        await link_event(child, "T", up=True)
        child.send(Peer(Role.PARENT, "T"), canary := hello())
        assert await next_event(self.t) == Received(Peer(CHILD, name), message=canary)
        return child

    async def dealer(
        self, keys: Keys, domain: str = "cells", routing_id: bytes | None = None
    ) -> tuple[int, zmq.asyncio.Socket]:
        """A bare DEALER to T and how its handshake ended; closed with the world."""
        outcome, sock = await dial_raw(
            self.ctx, self.endpoint(domain), self.keys["T"][0], keys, routing_id=routing_id
        )
        self.sockets.append(sock)
        return outcome, sock

    async def good_dealer(
        self, name: str, domain: str = "cells", routing_id: bytes | None = None
    ) -> zmq.asyncio.Socket:
        outcome, sock = await self.dealer(self.keys[name], domain, routing_id)
        assert outcome == zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.Event(outcome).name
        return sock

    async def still_serves(self) -> None:
        """A registered client still gets through, and is the next thing T sees."""
        sock = await self.good_dealer("K", "api")
        await sock.send_multipart(codec.encode(canary := heartbeat()))
        assert await next_event(self.t) == Received(Peer(Role.CLIENT, "K"), message=canary)
        self.sockets.remove(sock)
        sock.close(linger=0)


@asynccontextmanager
async def net(**options: Any) -> AsyncIterator[Net]:
    ctx = zmq.asyncio.Context()
    world = Net(ctx, **options)
    try:
        await world.t.start()
        world.t.apply(world.topology("A", "B", "C"))
        yield world
    finally:
        for sock in world.sockets:
            sock.close(linger=0)
        for transport in reversed(world.opened):
            await transport.close()
        ctx.destroy(linger=0)


def run(scenario: Callable[[], Any]) -> None:
    asyncio.run(scenario())


class Records(logging.Handler):
    """Collects the formatted lines of one logger, whatever the global logging setup."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> Records:
        self.level = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


# -- the keyring itself (rows 1, 5, 6) ----------------------------------------------------


def test_keyring_admits_each_key_in_its_own_domain_only() -> None:
    child, client, shared, stranger = (new_keys()[0] for _ in range(4))
    ring = Keyring.from_topology(
        Topology(children={"A": child, "X": shared}, clients={"K": client, "Y": shared})
    )
    assert ring.callback("cells", child.encode()) and ring.callback("api", client.encode())
    assert not ring.callback("api", child.encode()) and not ring.callback("cells", client.encode())
    assert not ring.callback("cells", shared.encode()) and not ring.callback("api", shared.encode())
    assert not ring.callback("cells", stranger.encode()) and not ring.callback("nope", b"\xff")
    user = ring.user_id(child.encode())
    assert user == f"cell:A:{child}" and parse_user_id(user) == ("cell", "A", child)
    assert ring.peer(user) == Peer(Role.CHILD, "A")
    assert ring.peer(f"api:K:{client}") == Peer(Role.CLIENT, "K")
    assert ring.peer(f"cell:X:{shared}") is None and ring.peer(f"api:A:{child}") is None
    assert Keyring.from_topology(Topology(children={"A": stranger})).peer(user) is None
    assert Keyring.from_topology(Topology(clients={"A": child})).peer(user) is None
    assert parse_user_id("api:K:" + ":" * 40) == ("api", "K", ":" * 40)  # ':' is Z85 too
    for bad in ("", "cell:A", f"cell:A!B:{child}", f"root:A:{child}", "cell:A:short"):
        assert parse_user_id(bad) is None


# -- row 1: unknown CURVE key ------------------------------------------------------------


@pytest.mark.parametrize("domain", ["cells", "api"])
def test_unknown_key_is_refused_at_handshake(domain: str) -> None:
    async def scenario() -> None:
        async with net() as w:
            with Records("zcells.sockets.auth") as records:
                outcome, sock = await w.dealer(w.keys["S"], domain)
            assert outcome == zmq.EVENT_HANDSHAKE_FAILED_AUTH
            with pytest.raises(zmq.Again):  # IMMEDIATE: no completed link to queue on
                await sock.send_multipart(codec.encode(heartbeat()), flags=zmq.NOBLOCK)
            refusal = [line for line in records.lines if line.startswith("zap.refused")]
            assert len(refusal) == 1
            assert f"domain={domain}" in refusal[0] and "address=127.0.0.1" in refusal[0]
            assert w.keys["S"][0] in refusal[0]
            assert w.t.statistics()["handshake_refused"] == 1
            await w.still_serves()

    run(scenario)


def test_refused_parent_is_retried_after_backoff() -> None:
    """libzmq drops an endpoint after an auth refusal; the transport dials it again later."""

    async def scenario() -> None:
        async with net() as w:
            w.t.apply(w.topology("A"))
            c = w.transport("C", refused_retry_ms=200)
            w.opened.append(c)
            await c.start()
            c.apply(Topology(parents={"T": ParentLink(w.endpoint(), w.keys["T"][0])}))
            assert "refused" in (await link_event(c, "T", up=False)).reason
            w.t.apply(w.topology("A", "C"))
            await link_event(c, "T", up=True)
            c.send(Peer(Role.PARENT, "T"), canary := hello())
            assert await next_event(w.t) == Received(Peer(CHILD, "C"), message=canary)
            assert c.statistics()["parent_refused"] == 1

    run(scenario)


# -- row 2: the authenticator fails or is gone -------------------------------------------


@pytest.mark.parametrize(
    ("owner", "method"),
    [(Keyring, "user_id"), (Keyring, "callback"), (ZapHandler, "curve_user_id")],
    ids=["keyring-lookup", "zap-callback", "curve-user-id"],
)
def test_zap_failure_refuses_then_recovers(
    monkeypatch: pytest.MonkeyPatch, owner: type, method: str
) -> None:
    original = getattr(owner, method)
    calls = {"n": 0}

    def fails_once(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected ZAP failure")
        return original(*args)

    monkeypatch.setattr(owner, method, fails_once)

    async def scenario() -> None:
        async with net() as w:
            outcome, _ = await w.dealer(w.keys["A"])
            assert outcome == zmq.EVENT_HANDSHAKE_FAILED_AUTH
            assert calls["n"] == 1
            sock = await w.good_dealer("A")  # the ZAP thread lived on
            await sock.send_multipart(codec.encode(canary := heartbeat()))
            assert await next_event(w.t) == Received(Peer(CHILD, "A"), message=canary)
            await w.still_serves()

    run(scenario)


def test_stopped_authenticator_fails_closed() -> None:
    """ZAP_ENFORCE_DOMAIN: no handler means no handshake. A request caught by the closing
    handler is never answered either; HANDSHAKE_IVL ends that one."""

    async def scenario() -> None:
        async with net(handshake_ivl_ms=500) as w:
            assert isinstance(w.t._zap, ZapHandler)
            w.t._zap.stop()
            for keys in (w.keys["S"], w.keys["A"]):
                outcome, _ = await w.dealer(keys)
                assert outcome != zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.Event(outcome).name
            client = ZmqClient(
                w.endpoint("api"), w.keys["T"][0], w.keys["K"], connect_timeout_s=2.0
            )
            with pytest.raises(CellUnreachable, match="handshake failed"):
                await client.connect()
            await client.close()
            stats = w.t.statistics()
            assert stats["received"] == 0 and stats["queue"] == 0

    run(scenario)


# -- row 4: routing-id spoofing ---------------------------------------------------------


async def _b_never_gets_a_traffic(w: Net, a: ZmqTransport, b: zmq.asyncio.Socket) -> None:
    w.t.send(Peer(CHILD, "A"), for_a := targeted())
    got = await expect(a, lambda e: isinstance(e, Received), "T's message at A")
    assert got == Received(Peer(Role.PARENT, "T"), message=for_a)
    assert await b.poll(0) == 0


@pytest.mark.parametrize("spoof", [b"A", b"cell:A", "A's own"])
def test_routing_id_spoofing_after_a(spoof: bytes | str) -> None:
    async def scenario() -> None:
        async with net() as w:
            a = await w.child("A")
            a_rid = w.t._listeners[CHILD].routes.latest("A")
            assert a_rid is not None
            b = await w.good_dealer("B", routing_id=a_rid if isinstance(spoof, str) else spoof)
            await b.send_multipart(codec.encode(from_b := heartbeat()))
            a.send(Peer(Role.PARENT, "T"), from_a := heartbeat())
            heard: list[Received] = []

            def done(event: Any) -> bool:
                heard.append(event)
                return isinstance(event, Received) and event.message == from_a

            await expect(w.t, done, "A's message")
            for event in heard:  # nothing B sent is ever taken for A's
                assert event.peer == Peer(CHILD, "B" if event.message == from_b else "A")
            await _b_never_gets_a_traffic(w, a, b)
            if isinstance(spoof, bytes):  # a fresh id: B is served as B
                if from_b not in [e.message for e in heard]:
                    event = await next_event(w.t)
                    assert event == Received(Peer(CHILD, "B"), message=from_b)
                w.t.send(Peer(CHILD, "B"), for_b := heartbeat())
                async with asyncio.timeout(WAIT_S):
                    assert codec.decode(await b.recv_multipart()) == for_b
            else:  # a taken id: libzmq ignores B's connection (ROUTER_HANDOVER=0)
                with pytest.raises(CellUnreachable):
                    w.t.send(Peer(CHILD, "B"), heartbeat())

    run(scenario)


@pytest.mark.parametrize("spoof", [b"A", b"cell:A"])
def test_routing_id_spoofing_before_a(spoof: bytes) -> None:
    async def scenario() -> None:
        async with net() as w:
            b = await w.good_dealer("B", routing_id=spoof)
            await b.send_multipart(codec.encode(from_b := heartbeat()))
            assert await next_event(w.t) == Received(Peer(CHILD, "B"), message=from_b)
            a = await w.child("A")
            await _b_never_gets_a_traffic(w, a, b)
            w.t.send(Peer(CHILD, "B"), for_b := heartbeat())
            async with asyncio.timeout(WAIT_S):
                assert codec.decode(await b.recv_multipart()) == for_b

    run(scenario)


def test_a_routing_id_names_a_peer_only_while_its_connection_is_open() -> None:
    """Row 25: B takes the routing id A used once A has gone, and gets nothing meant for A."""

    async def scenario() -> None:
        async with net() as w:
            rid = new_routing_id()
            a = await w.good_dealer("A", routing_id=rid)
            await a.send_multipart(codec.encode(from_a := heartbeat()))
            assert await next_event(w.t) == Received(Peer(CHILD, "A"), message=from_a)
            routes = w.t._listeners[CHILD].routes
            assert routes.latest("A") == rid
            w.sockets.remove(a)
            a.close(linger=0)
            await until(
                lambda: routes.latest("A") is None, WAIT_S, "T unbinding A's closed connection"
            )
            with pytest.raises(CellUnreachable):
                w.t.send(Peer(CHILD, "A"), heartbeat())

            b = await w.good_dealer("B", routing_id=rid)  # as if B had guessed A's id
            with pytest.raises(CellUnreachable):
                w.t.send(Peer(CHILD, "A"), heartbeat())
            await b.send_multipart(codec.encode(from_b := heartbeat()))
            assert await next_event(w.t) == Received(Peer(CHILD, "B"), message=from_b)
            with pytest.raises(CellUnreachable):  # B speaking on the id makes it B's, not A's
                w.t.send(Peer(CHILD, "A"), heartbeat())
            assert await b.poll(0) == 0
            w.t.send(Peer(CHILD, "B"), for_b := heartbeat())
            async with asyncio.timeout(WAIT_S):
                assert codec.decode(await b.recv_multipart()) == for_b
            await w.still_serves()

    run(scenario)


def test_our_dealers_choose_unguessable_routing_ids() -> None:
    """Row 25: a child of ours speaks on a random 16-byte id, never one T assigned."""

    async def scenario() -> None:
        async with net() as w:
            await w.child("A")
            await w.child("B")
            routes = w.t._listeners[CHILD].routes
            ids = [routes.latest("A"), routes.latest("B")]
            assert all(rid is not None and len(rid) == 16 and rid[0] != 0 for rid in ids)
            assert ids[0] != ids[1]

    run(scenario)


# -- answers go back on the connection that asked ----------------------------------------


def test_two_connections_with_one_client_key_each_get_their_own_answers() -> None:
    async def scenario() -> None:
        async with net() as w:
            client = Peer(Role.CLIENT, "K")
            first, second = await w.good_dealer("K", "api"), await w.good_dealer("K", "api")

            async def ask(sock: zmq.asyncio.Socket) -> bytes:
                await sock.send_multipart(codec.encode(request := targeted()))
                assert await next_event(w.t) == Received(client, message=request)
                return request.id

            async def answered(sock: zmq.asyncio.Socket, reply_to: bytes) -> None:
                async with asyncio.timeout(WAIT_S):
                    got = codec.decode(await sock.recv_multipart())
                assert isinstance(got, Response) and got.reply_to == reply_to

            asked_first = await ask(first)
            asked_second = await ask(second)  # second is now K's latest connection
            w.t.send(client, response(asked_first))
            await answered(first, asked_first)
            w.t.send(client, response(asked_second))
            await answered(second, asked_second)
            assert await first.poll(0) == 0 and await second.poll(0) == 0

            w.t.send(client, for_latest := heartbeat())  # not an answer: the latest connection
            async with asyncio.timeout(WAIT_S):
                assert codec.decode(await second.recv_multipart()) == for_latest

            asked_again = await ask(first)
            await ask(second)
            first_id = w.t._asked[(client, asked_again)]
            w.sockets.remove(first)
            first.close(linger=0)  # gone before its answer: the latest connection gets it
            await until(lambda: _gone(w.t, first_id), WAIT_S, "T noticing the closed connection")
            w.t.send(client, response(asked_again))
            await answered(second, asked_again)

    run(scenario)


def _gone(t: ZmqTransport, routing_id: bytes) -> bool:
    """Whether T's api ROUTER has dropped the connection with this routing id."""
    try:
        send_now(t._listeners[Role.CLIENT].socket, [routing_id, *codec.encode(heartbeat())])
    except zmq.ZMQError as exc:
        return exc.errno == zmq.EHOSTUNREACH
    return False


# -- row 6: revoked while connected ------------------------------------------------------


def test_revoked_key_cannot_handshake_again() -> None:
    async def scenario() -> None:
        async with net() as w:
            a = await w.child("A")
            w.t.apply(w.topology("B", "C"))
            a.send(Peer(Role.PARENT, "T"), heartbeat())
            event = await next_event(w.t)
            assert isinstance(event, Received) and isinstance(event.error, KeyRevoked)
            assert event.peer == Peer(CHILD, "A") and event.message is None
            outcome, _ = await w.dealer(w.keys["A"])
            assert outcome == zmq.EVENT_HANDSHAKE_FAILED_AUTH
            await w.child("C")
            await w.still_serves()

    run(scenario)


# -- row 7: frame counts -----------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3, 100_000])
def test_wrong_frame_count_is_rejected_before_decoding(count: int) -> None:
    async def scenario() -> None:
        async with net() as w:
            sock = await w.good_dealer("C")
            await sock.send_multipart([b"\x01"] * count)
            event = await next_event(w.t)
            assert isinstance(event, Received) and event.peer == Peer(CHILD, "C")
            assert event.message is None and isinstance(event.error, FrameError)
            assert f"got {count}" in str(event.error)
            await sock.send_multipart(codec.encode(good := hello()))
            assert await next_event(w.t) == Received(Peer(CHILD, "C"), message=good)
            stats = w.t.statistics()
            assert stats["frames_rejected_by_peer"] == {"child:C": 1}
            assert stats["received"] == 1 and stats["malformed"] == 0

    run(scenario)


# -- row 11: a frame over MAXMSGSIZE -----------------------------------------------------


def test_oversize_frame_drops_the_link_and_the_child_recovers() -> None:
    async def scenario() -> None:
        async with net(max_frame_bytes=2048) as w:
            c = await w.child("C", max_frame_bytes=1 << 20)  # C believes T takes more
            c.send(Peer(Role.PARENT, "T"), targeted({"blob": "x" * 5000}))
            assert (await link_event(c, "T", up=False)).reason == "disconnected"
            await link_event(c, "T", up=True)
            c.send(Peer(Role.PARENT, "T"), after := hello())
            assert await next_event(w.t) == Received(Peer(CHILD, "C"), message=after)
            assert w.t.statistics()["received"] == 2  # the two hellos, never the blob

    run(scenario)


def test_a_dealer_that_received_an_oversize_frame_dials_again() -> None:
    """Row 27: libzmq ends a DEALER's session for good on an oversize frame; we dial afresh."""

    async def scenario() -> None:
        async with net() as w:
            a = await w.child("A", max_frame_bytes=2048)
            w.t.send(Peer(CHILD, "A"), targeted({"blob": "x" * 5000}))
            await link_event(a, "T", up=False)
            await link_event(a, "T", up=True)  # a new socket, a new routing id
            a.send(Peer(Role.PARENT, "T"), after := hello())
            assert await next_event(w.t) == Received(Peer(CHILD, "A"), message=after)
            w.t.send(Peer(CHILD, "A"), small := heartbeat())
            got = await expect(a, lambda e: isinstance(e, Received), "T's heartbeat at A")
            assert got == Received(Peer(Role.PARENT, "T"), message=small)

    run(scenario)


def test_a_message_over_the_usable_frame_limit_is_never_sent() -> None:
    """Row 27: under CURVE the usable frame is smaller than MAXMSGSIZE; over it is TooLarge."""

    async def scenario() -> None:
        async with net(max_frame_bytes=4096) as w:
            a = await w.child("A", max_frame_bytes=4096)
            usable = codec.usable_frame_bytes(4096)
            sized = targeted({"blob": "x" * 256})  # a str16, like the blobs below
            room = usable - len(codec.encode(sized)[1]) + 256
            a.send(Peer(Role.PARENT, "T"), exact := targeted({"blob": "x" * room}))
            assert len(codec.encode(exact)[1]) == usable
            got = await expect(w.t, lambda e: isinstance(e, Received), "the largest that fits")
            assert got == Received(Peer(CHILD, "A"), message=exact)
            with pytest.raises(TooLarge):
                a.send(Peer(Role.PARENT, "T"), targeted({"blob": "x" * (room + 1)}))
            a.send(Peer(Role.PARENT, "T"), after := hello())  # the link never dropped
            assert await next_event(w.t) == Received(Peer(CHILD, "A"), message=after)

    run(scenario)


# -- row 17: a slow consumer -------------------------------------------------------------


def test_slow_consumer_makes_send_busy_not_blocked() -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError, match="hwm"):  # a CURVE ROUTER at 1 never delivers
            ZmqTransport(Identity("T", "", "", "", ""), hwm=1)
        async with net(hwm=2) as w:
            sock = await w.good_dealer("C")
            sock.rcvhwm = 1
            await sock.send_multipart(codec.encode(first := hello()))
            assert await next_event(w.t) == Received(Peer(CHILD, "C"), message=first)
            big = targeted({"blob": "x" * 65536})
            with pytest.raises(Busy):
                for _ in range(10_000):  # until libzmq's pipe and the kernel buffers are full
                    w.t.send(Peer(CHILD, "C"), big)
            assert w.t.statistics()["busy"] == 1
            await w.still_serves()

            async with asyncio.timeout(WAIT_S):
                while True:  # the consumer catches up, and the cell can send again
                    while sock.get(zmq.EVENTS) & zmq.POLLIN:
                        await sock.recv_multipart()
                    try:
                        w.t.send(Peer(CHILD, "C"), heartbeat())
                        break
                    except Busy:
                        await asyncio.sleep(0.01)

    run(scenario)


# -- row 16: slowloris -------------------------------------------------------------------


def _open_sockets() -> int:
    """Socket descriptors of this process (libzmq recycles its eventfds, so count only these)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


async def _closed_by_server(reader: asyncio.StreamReader) -> None:
    """Returns once the server has closed the connection (EOF or reset)."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(4096):
            pass


def test_slowloris_connections_are_closed_and_cells_still_served() -> None:
    async def scenario() -> None:
        async with net(handshake_ivl_ms=500) as w:
            c = await w.child("C")
            host, port = w.endpoint().removeprefix("tcp://").rsplit(":", 1)
            baseline = _open_sockets()
            streams = [await asyncio.open_connection(host, int(port)) for _ in range(100)]
            for i, (_, writer) in enumerate(streams):
                if i % 2:  # half send garbage, half say nothing
                    writer.write(os.urandom(64) + b"GET / HTTP/1.0\r\n\r\n")
            c.send(Peer(Role.PARENT, "T"), during := heartbeat())
            assert await next_event(w.t) == Received(Peer(CHILD, "C"), message=during)
            await w.still_serves()  # a fresh handshake gets through the flood too
            async with asyncio.timeout(WAIT_S):
                await asyncio.gather(*(_closed_by_server(reader) for reader, _ in streams))
            for _, writer in streams:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            await until(
                lambda: _open_sockets() <= baseline, WAIT_S, "socket descriptors back to baseline"
            )

    run(scenario)


def test_a_new_connection_on_a_reused_descriptor_keeps_its_route() -> None:
    """A closed connection is reported late, when its descriptor may serve the next already."""

    async def scenario() -> None:
        async with net() as w:
            client = Peer(Role.CLIENT, "K")
            watch = w.t._listeners[Role.CLIENT].watch
            asyncio.get_running_loop().remove_reader(watch._fd)  # reports wait, unread
            first = await w.good_dealer("K", "api")
            await first.send_multipart(codec.encode(hi := heartbeat()))
            assert await next_event(w.t) == Received(client, message=hi)
            w.sockets.remove(first)
            first.close(linger=0)
            await until(
                lambda: bool(watch.sock.get(zmq.EVENTS) & zmq.POLLIN), WAIT_S, "the close reported"
            )
            second = await w.good_dealer("K", "api")  # most likely on the same descriptor
            await second.send_multipart(codec.encode(asked := targeted()))
            assert await next_event(w.t) == Received(client, message=asked)
            asyncio.get_running_loop().add_reader(watch._fd, watch.read_now)
            watch.read_now()  # whatever was still unread
            w.t.send(client, response(asked.id))
            async with asyncio.timeout(WAIT_S):
                got = codec.decode(await second.recv_multipart())
            assert isinstance(got, Response) and got.reply_to == asked.id

    run(scenario)
