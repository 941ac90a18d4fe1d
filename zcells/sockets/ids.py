"""Routing ids no peer can guess, and who may be sent to on which connection.

Rules kept here (SECURITY.md §5 row 25, docs/protocol.md §2):

1. libzmq numbers the connections a ROUTER accepts without a routing id of
   their own from a counter that starts at the C library's ``rand()``, which
   nothing seeds: ``0x6b8b4567`` in every process. libzmq 4.3.5 asserts, and
   so aborts the whole process, when a peer-chosen routing id equals the
   number it assigns next. `seed_router_ids` seeds ``rand()`` from the
   operating system's random source before every ROUTER is made, so no peer
   can know where the counter stands.
2. Every DEALER zcells opens chooses its own routing id: 16 random bytes,
   the first never 0 (ids that start with 0 are libzmq's own). Another key
   cannot guess it, so it cannot take a cell's id while that cell is away.
3. A routing id names a peer only once that peer's own authenticated
   message came on it, and only while that connection is open: `Routes`
   binds (name, routing id, connection) from received messages, unbinds
   every id of a connection when libzmq reports it closed, and unbinds an id
   at once when another key speaks on it. A message for a peer goes only to
   an id bound to that peer. File descriptors are reused as soon as they are
   closed, so the transport reads every pending "closed" report before it
   makes a new binding: a late report for a connection's predecessor on the
   same descriptor must not unbind it.
"""

from __future__ import annotations

import ctypes
import secrets
from collections import OrderedDict
from typing import Final

ROUTING_ID_BYTES: Final = 16
# Connections whose bindings are kept; past this the oldest binding is forgotten
# (its peer is bound again by its next message). Bounded by open connections anyway.
MAX_BOUND: Final = 65536

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None)  # the process's own C library, the one libzmq calls
    _srand = _libc.srand
except (OSError, AttributeError):  # no srand to call: nothing to seed
    _libc = None


def seed_router_ids() -> bool:
    """Seed the C library's ``rand()`` unpredictably (rule 1); False if there is none."""
    if _libc is None:
        return False
    _srand(ctypes.c_uint(secrets.randbits(32)))
    return True


def new_routing_id() -> bytes:
    """A routing id for a DEALER of ours (rule 2)."""
    return bytes((secrets.randbelow(255) + 1,)) + secrets.token_bytes(ROUTING_ID_BYTES - 1)


class Routes:
    """The routing ids of one ROUTER bound to peer names by their own messages (rule 3).

    A name may speak on several connections at once (two terminals with one
    client key, or a cell and an impostor holding its key): it routes to the
    one it spoke on last, and to the one before when that closes.
    """

    def __init__(self, limit: int = MAX_BOUND) -> None:
        self._limit = limit
        self._owner: OrderedDict[bytes, tuple[str, int]] = OrderedDict()  # id -> (name, fd)
        self._ids: dict[str, OrderedDict[bytes, None]] = {}  # name -> its ids, latest last
        self._by_fd: dict[int, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def names(self) -> list[str]:
        return sorted(self._ids)

    def bound(self, name: str, routing_id: bytes, fd: int) -> bool:
        """Whether `routing_id` over connection `fd` is bound to `name` already."""
        return self._owner.get(routing_id) == (name, fd)

    def heard(self, name: str, routing_id: bytes, fd: int) -> None:
        """`name`'s authenticated message came on `routing_id`, over connection `fd`."""
        owner = self._owner.get(routing_id)
        if owner == (name, fd):
            self._owner.move_to_end(routing_id)
            self._ids[name].move_to_end(routing_id)
            return
        if owner is not None:
            self._unbind(routing_id)  # another key, or a new connection, took the id
        self._owner[routing_id] = (name, fd)
        self._by_fd.setdefault(fd, set()).add(routing_id)
        self._ids.setdefault(name, OrderedDict())[routing_id] = None
        if len(self._owner) > self._limit:
            self._unbind(next(iter(self._owner)))

    def latest(self, name: str) -> bytes | None:
        """The id `name` last spoke on among those still bound to it."""
        ids = self._ids.get(name)
        return next(reversed(ids)) if ids else None

    def owns(self, name: str, routing_id: bytes) -> bool:
        owner = self._owner.get(routing_id)
        return owner is not None and owner[0] == name

    def closed(self, fd: int) -> int:
        """Connection `fd` closed: unbind every id bound over it; how many."""
        gone = self._by_fd.pop(fd, set())
        for routing_id in gone:
            self._unbind(routing_id)
        return len(gone)

    def forget(self, name: str, routing_id: bytes) -> None:
        """A send to `routing_id` found no connection: it names nobody now."""
        if self.owns(name, routing_id):
            self._unbind(routing_id)

    def _unbind(self, routing_id: bytes) -> None:
        name, fd = self._owner.pop(routing_id)
        on_fd = self._by_fd.get(fd)
        if on_fd is not None:
            on_fd.discard(routing_id)
            if not on_fd:
                del self._by_fd[fd]
        ids = self._ids[name]
        del ids[routing_id]
        if not ids:
            del self._ids[name]
