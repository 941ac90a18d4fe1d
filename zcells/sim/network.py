"""The links between simulated cells, and what faults do to them.

Rules kept here:

* A link is the pair of cells it joins (`edge`); both directions share its
  faults. Without faults a link is a TCP connection: every message arrives
  after `latency_s`, in the order it was sent.
* Edge faults change one link for a while: `delay` adds latency, `jitter`
  lets later messages overtake earlier ones (reordering), `loss` drops and
  `duplicate` delivers twice, each with its own probability.
* A cut link (a partition, or either end frozen) holds what is sent on it,
  in order. If it is restored within `link_timeout_s` (ZeroMQ's heartbeat
  timeout) the held messages go through; a cut that lasts longer breaks
  the connection, as the heartbeat would: what was held is lost, both ends
  see the link go down, and the child dials again once it can.
* Every delivery is hashed, in order, with its virtual time, both ends and
  its bytes: two runs with the same seed have the same `trace_hash`.
* Every message on the wire is shown to `observers` before it is delivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from zcells.transport import Deliver, MemoryNetwork, MemoryTransport, _Conn

Edge = tuple[str, str]  # the two cell names, sorted


def edge(a: str, b: str) -> Edge:
    return (a, b) if a <= b else (b, a)


@dataclass
class EdgeFaults:
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0


@dataclass
class _Held:
    sender: str
    receiver: str
    link: _Conn
    frames: list[bytes]
    deliver: Deliver


Observer = Callable[[str, str, list[bytes]], None]

# What a cut link holds at most before it drops, as ZeroMQ's high-water mark would.
HELD_MAX = 1000


class SimNetwork(MemoryNetwork):
    """A `MemoryNetwork` with latency, faults, partitions and frozen cells, in virtual time."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        *,
        latency_s: float = 0.002,
        link_timeout_s: float = 15.0,
        redial_s: float = 1.0,
    ) -> None:
        super().__init__()
        self.loop = loop
        self.rng = rng
        self.latency_s = latency_s
        self.link_timeout_s = link_timeout_s
        self.redial_s = redial_s
        self.faults: dict[Edge, EdgeFaults] = {}
        self.cuts: dict[Edge, int] = {}  # edge -> how many faults hold it cut
        self.frozen: dict[str, int] = {}  # cell -> how many freezes hold it
        self.cells: dict[str, MemoryTransport] = {}  # the live transport of each cell
        self.observers: list[Observer] = []
        self.counters: Counter[str] = Counter()
        self._held: dict[Edge, list[_Held]] = {}
        self._cut_since: dict[Edge, float] = {}
        self._last_arrival: dict[tuple[str, str], float] = {}
        self._redial: dict[str, MemoryTransport] = {}
        self._redial_timer: asyncio.TimerHandle | None = None
        self._trace = hashlib.blake2b(digest_size=16)

    @property
    def trace_hash(self) -> str:
        return self._trace.hexdigest()

    # -- carrying messages --------------------------------------------------------------

    def carry(
        self, sender: str, receiver: str, link: _Conn, frames: list[bytes], deliver: Deliver
    ) -> None:
        for observe in self.observers:
            observe(sender, receiver, frames)
        key = edge(sender, receiver)
        if self._is_cut(key, sender, receiver):
            held = self._held.setdefault(key, [])
            if len(held) >= HELD_MAX:
                self.counters["dropped_held_full"] += 1
                return
            held.append(_Held(sender, receiver, link, frames, deliver))
            return
        faults = self.faults.get(key)
        delay = self.latency_s
        if faults is not None:
            if faults.loss and self.rng.random() < faults.loss:
                self.counters["lost"] += 1
                return
            delay += faults.delay_s
            if faults.jitter_s:
                delay += self.rng.uniform(0.0, faults.jitter_s)
        self._schedule(sender, receiver, link, frames, deliver, delay, in_order=faults is None)
        if faults is not None and faults.duplicate and self.rng.random() < faults.duplicate:
            self.counters["duplicated"] += 1
            self._schedule(sender, receiver, link, frames, deliver, delay * 1.5, in_order=False)

    def _schedule(
        self,
        sender: str,
        receiver: str,
        link: _Conn,
        frames: list[bytes],
        deliver: Deliver,
        delay: float,
        *,
        in_order: bool,
    ) -> None:
        at = self.loop.time() + delay
        if in_order:  # TCP: never before what was sent before it on this link
            at = max(at, self._last_arrival.get((sender, receiver), 0.0) + 1e-6)
            self._last_arrival[(sender, receiver)] = at
        self.loop.call_at(at, self._arrive, sender, receiver, link, frames, deliver)

    def _arrive(
        self, sender: str, receiver: str, link: _Conn, frames: list[bytes], deliver: Deliver
    ) -> None:
        if not link.open:
            self.counters["lost_with_link"] += 1
            return
        self.counters["delivered"] += 1
        trace = self._trace
        trace.update(struct.pack("!d", round(self.loop.time(), 6)))
        trace.update(f"{sender}>{receiver}:".encode())
        for frame in frames:
            trace.update(struct.pack("!I", len(frame)))
            trace.update(frame)
        deliver(frames)

    # -- who can reach whom ---------------------------------------------------------------

    def _is_cut(self, key: Edge, a: str, b: str) -> bool:
        return key in self.cuts or a in self.frozen or b in self.frozen

    def can_dial(self, dialler: str, listener: str) -> bool:
        return not self._is_cut(edge(dialler, listener), dialler, listener)

    def lost(self, transport: MemoryTransport) -> None:
        self._redial[transport.identity.name] = transport
        if self._redial_timer is None:
            self._redial_timer = self.loop.call_later(self.redial_s, self._dial_again)

    def _dial_again(self) -> None:
        self._redial_timer = None
        for name in sorted(self._redial):
            transport = self._redial[name]
            if self.cells.get(name) is not transport:  # crashed since: its successor dials
                del self._redial[name]
                continue
            transport.redial()
            if transport.parents_up():
                del self._redial[name]
        if self._redial:
            self._redial_timer = self.loop.call_later(self.redial_s, self._dial_again)

    def attach(self, name: str, transport: MemoryTransport) -> None:
        """`transport` is cell `name`'s from now on (a start or a restart)."""
        self.cells[name] = transport
        self.lost(transport)  # dial its parent as soon as the network lets it

    # -- faults -------------------------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        key = edge(a, b)
        self.cuts[key] = self.cuts.get(key, 0) + 1
        self._started_cut(key)

    def restore(self, a: str, b: str) -> None:
        key = edge(a, b)
        left = self.cuts.get(key, 0) - 1
        if left > 0:
            self.cuts[key] = left
            return
        self.cuts.pop(key, None)
        self._ended_cut(key)

    def freeze(self, cell: str, neighbours: list[str]) -> None:
        self.frozen[cell] = self.frozen.get(cell, 0) + 1
        for other in neighbours:
            self._started_cut(edge(cell, other))

    def thaw(self, cell: str, neighbours: list[str]) -> None:
        left = self.frozen.get(cell, 0) - 1
        if left > 0:
            self.frozen[cell] = left
            return
        self.frozen.pop(cell, None)
        for other in neighbours:
            self._ended_cut(edge(cell, other))

    def _started_cut(self, key: Edge) -> None:
        if key in self._cut_since:
            return
        since = self.loop.time()
        self._cut_since[key] = since
        self.loop.call_later(self.link_timeout_s, self._maybe_break, key, since)

    def _ended_cut(self, key: Edge) -> None:
        a, b = key
        if self._is_cut(key, a, b):
            return  # still held by another fault
        self._cut_since.pop(key, None)
        for held in self._held.pop(key, []):
            if held.link.open:
                self._schedule(
                    held.sender,
                    held.receiver,
                    held.link,
                    held.frames,
                    held.deliver,
                    self.latency_s,
                    in_order=True,
                )
            else:
                self.counters["lost_with_link"] += 1
        for name in key:
            transport = self.cells.get(name)
            if transport is not None and not transport.parents_up():
                self.lost(transport)

    def _maybe_break(self, key: Edge, since: float) -> None:
        """The heartbeat timed out across a cut link: the connection is gone."""
        if self._cut_since.get(key) != since:
            return  # restored (and perhaps cut again) since
        dropped = self._held.pop(key, [])
        self.counters["lost_with_link"] += len(dropped)
        self.counters["links_broken"] += 1
        for child, parent in (key, key[::-1]):
            transport = self.cells.get(child)
            if transport is not None:
                transport.lose_parent(parent, "heartbeat timed out")
