"""The routing core: where a message goes next. Pure functions, no I/O, no clock.

Rules (docs/protocol.md explains them with examples):

1. A cell's full path is its ancestors' names and its own, joined by ``!``.
   A top cell's path is its name; a child learns its path from its parent.
2. A request's routing path lists the full paths of the cells it has
   visited, origin first. Each hop appends its own path; the hop count is
   the length of the path, and past the smaller of the sender's and this
   cell's `max_hop_count` the request fails with `MaxHopsExceeded`.
3. A cell speaks only for itself: a request from a neighbour must end its
   path with that neighbour's full path, travel down when it comes from a
   parent and up when it comes from a child, or it is refused. A client's
   request starts with an empty path.
4. Targeted: deliver when the target is this cell; go down to the child
   named by the next component when the target lies below; otherwise go up
   to the parent whose path shares the most with the target. A missing
   next hop is `UnknownCell` naming the cell where routing stopped.
5. Broadcast: run here (if asked) and fan out to every child (down) or
   every parent (up); each hop answers with one response holding one
   result per cell of its subtree, timed-out children included.
6. A response retraces the request's path backwards. Each hop that sent a
   request on remembers to which neighbour and for whom (`zcells.node`), and
   accepts an answer only from that neighbour for that message.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from zcells.errors import (
    CallTimeout,
    CellUnreachable,
    MaxHopsExceeded,
    RoutingInconsistency,
    SenderMismatch,
    UnknownCell,
    WireError,
)
from zcells.messages import (
    Broadcast,
    CellResult,
    Direction,
    Outcome,
    Request,
    Targeted,
    evolve,
)
from zcells.names import PATH_SEPARATOR
from zcells.peer import Peer, Role


def parent_of(path: str) -> str | None:
    head, sep, _ = path.rpartition(PATH_SEPARATOR)
    return head if sep else None


def is_below(path: str, ancestor: str) -> bool:
    """True when `path` is `ancestor` or lies in its subtree."""
    return path == ancestor or path.startswith(ancestor + PATH_SEPARATOR)


@dataclass(frozen=True)
class View:
    """What a cell knows of its neighbourhood when it routes.

    `parents` maps each parent's name to its full path, or None until that
    parent has said hello. A cell with no parents is a top cell.
    """

    name: str
    children: frozenset[str] = frozenset()
    parents: Mapping[str, str | None] = field(default_factory=dict)
    max_hop_count: int = 10

    @property
    def label(self) -> str:
        """How errors name this cell: its full path once known, else its name."""
        paths = self.paths
        return paths[0] if paths else self.name

    @functools.cached_property  # asked for every request; a view is replaced, never changed
    def paths(self) -> tuple[str, ...]:
        """This cell's full paths: one per parent that said hello, its name if a top cell."""
        if not self.parents:
            return (self.name,)
        return tuple(
            sorted(
                f"{p}{PATH_SEPARATOR}{self.name}" for p in self.parents.values() if p is not None
            )
        )

    def home_path(self, target: str | None = None) -> str:
        """The path this cell originates messages from: the one nearest to `target`."""
        paths = self.paths
        if not paths:
            raise UnknownCell(
                f"cell {self.name} does not know its place in the tree yet: "
                "no parent has said hello",
                self.name,
            )
        if target is not None and len(paths) > 1:
            return max(paths, key=lambda p: (_shared(p, target), p))
        return paths[0]


def _shared(a: str, b: str) -> int:
    """How many leading path components `a` and `b` share."""
    count = 0
    for x, y in zip(a.split(PATH_SEPARATOR), b.split(PATH_SEPARATOR), strict=False):
        if x != y:
            break
        count += 1
    return count


# -- decisions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Deliver:
    """Run the request here."""

    message: Targeted


@dataclass(frozen=True)
class Forward:
    """Send the message on to a neighbour."""

    to: Peer
    message: Targeted


@dataclass(frozen=True)
class Fanout:
    """Run a broadcast here (if `local`) and send it to each neighbour in `to`."""

    local: bool
    to: tuple[Peer, ...]
    message: Broadcast


# -- requests -----------------------------------------------------------------------------


def _sender_path(view: View, sender: Peer, here: str) -> str:
    """The full path a neighbour must have put last in the routing path."""
    if sender.role is Role.CHILD:
        return f"{here}{PATH_SEPARATOR}{sender.name}"
    parent_path = view.parents.get(sender.name)
    if parent_path is None:
        # Not an impersonation: the key is the parent's. The link is not ready (the parent
        # sent this before its answer to this cell's hello after a restart): try again.
        raise CellUnreachable(  # named by the receiving node as its parent knows it
            f"parent {sender.name} has not said hello yet: not linked into the tree yet"
        )
    return parent_path


def _check_chain(path: tuple[str, ...], label: str, *, down_allowed: bool) -> None:
    """Each hop of a routing path is a neighbour of the one before: up, then (from a parent) down.

    Only the last element is the sender's; the rest it could have made up, and
    a forged origin would have a reply, or an error, pin the wrong cell.
    """
    going_down = False
    for before, after in itertools.pairwise(path):
        if not going_down and parent_of(before) == after:
            continue
        if down_allowed and parent_of(after) == before:
            going_down = True
            continue
        raise SenderMismatch(
            f"the routing path goes from {before} to {after}, which are not neighbours "
            "in that direction",
            label,
        )


def _from_child(view: View, sender: Peer, message: Request, arrived_from: str) -> tuple[str, str]:
    """(this cell's path the child's request came up to, the path it must have put last)."""
    if message.direction is not Direction.UP:
        raise RoutingInconsistency("a message from a child must travel up", view.label)
    here = parent_of(arrived_from) or ""
    if view.parents and all(p is None for p in view.parents.values()):
        # Not an impersonation: this cell has just started and no parent has said
        # where it sits yet, so it cannot check the path. The child tries again.
        raise CellUnreachable(
            f"{view.name} is not linked into the tree yet: no parent has said hello",
            view.name,
        )
    if here not in view.paths:
        raise SenderMismatch(f"child {sender.name} claims path {arrived_from}", view.label)
    return here, _sender_path(view, sender, here)


def accept(view: View, sender: Peer, message: Request) -> Request:
    """Check a request against who sent it, and stamp this hop on it.

    Returns the message with this cell's path appended and the hop count
    raised; raises a `WireError` the sender should get back.
    """
    if sender.role is Role.CLIENT:
        if message.path or message.hops:
            raise SenderMismatch(
                "a client request must start with an empty routing path", view.label
            )
        target = message.target if isinstance(message, Targeted) else None
        here = view.home_path(target)
    else:
        if message.hops != len(message.path) or not message.path:
            raise RoutingInconsistency(
                f"hop count {message.hops} disagrees with a path of {len(message.path)}", view.label
            )
        arrived_from = message.path[-1]
        if sender.role is Role.PARENT:
            if message.direction is not Direction.DOWN:
                raise RoutingInconsistency("a message from a parent must travel down", view.label)
            expected = _sender_path(view, sender, "")
            here = f"{arrived_from}{PATH_SEPARATOR}{view.name}"
        else:
            here, expected = _from_child(view, sender, message, arrived_from)
        if arrived_from != expected:
            raise SenderMismatch(
                f"{sender} put {arrived_from} last in the routing path, expected {expected}",
                view.label,
            )
        if here in message.path:
            raise RoutingInconsistency(f"routing loop: {here} is already in the path", view.label)
        _check_chain(message.path, view.label, down_allowed=sender.role is Role.PARENT)
    limit = min(view.max_hop_count, message.max_hops)
    hops = message.hops + 1
    if hops > limit:
        raise MaxHopsExceeded(f"hop {hops} at {here} is past the limit of {limit}", here)
    return evolve(message, path=(*message.path, here), hops=hops)


def route_targeted(view: View, message: Targeted, sender: Peer | None) -> Deliver | Forward:
    """Where a stamped targeted request goes from this cell (`sender` None: from here)."""
    here, target = message.path[-1], message.target
    if target == here:
        return Deliver(message)
    if is_below(target, here):
        child = target[len(here) + 1 :].split(PATH_SEPARATOR, 1)[0]
        if child not in view.children:
            raise UnknownCell(f"cell {here} has no child {child!r} (routing to {target})", here)
        return Forward(Peer(Role.CHILD, child), _heading(message, Direction.DOWN))
    if sender is not None and sender.role is Role.PARENT:
        raise RoutingInconsistency(f"a parent sent {target} to {here}, outside its subtree", here)
    parent = _parent_towards(view, here, target)
    if parent is None:
        raise UnknownCell(f"no cell {target} in the tree (routing stopped at {here})", here)
    return Forward(Peer(Role.PARENT, parent), _heading(message, Direction.UP))


def check_own_link(message: Targeted, decision: Deliver | Forward, sender: Peer) -> None:
    """A method a neighbour speaks for itself: it started at `sender` and ends here.

    Refused at the first hop, so a grandchild's `updates` addressed further up
    is never taken as its parent's.
    """
    if sender.role is Role.CLIENT or len(message.path) != 2:
        raise SenderMismatch(
            f"{message.method} is spoken by a neighbour for itself; "
            f"this one started at {message.path[0]}, not at {sender}",
            message.path[-1],
        )
    if not isinstance(decision, Deliver):
        raise RoutingInconsistency(
            f"{message.method} goes to the sender's own neighbour only, not on to {message.target}",
            message.path[-1],
        )


def _heading(message: Targeted, direction: Direction) -> Targeted:
    return message if message.direction is direction else evolve(message, direction=direction)


def _parent_towards(view: View, here: str, target: str) -> str | None:
    """The parent under which `here` sits that leads closest to `target`."""
    above = parent_of(here)
    candidates = [name for name, path in view.parents.items() if path == above]
    return min(candidates) if candidates else None


def route_broadcast(view: View, message: Broadcast) -> Fanout:
    """Where a stamped broadcast goes from this cell."""
    here = message.path[-1]
    if message.direction is Direction.DOWN:
        peers = tuple(Peer(Role.CHILD, c) for c in sorted(view.children))
    else:
        above = parent_of(here)
        peers = tuple(
            Peer(Role.PARENT, n)
            for n, p in sorted(view.parents.items())
            if p is not None and p == above
        )
    return Fanout(local=message.run_locally, to=peers, message=message)


def forward_budget_ms(timeout_ms: int) -> int:
    """The time a neighbour gets for a request this cell has `timeout_ms` for.

    Each hop keeps a margin, so a subtree reports (with its own timeouts as
    partial results) before the hop above gives up on it.
    """
    margin = min(1000, max(20, timeout_ms // 10))
    return max(0, timeout_ms - margin)


# -- broadcast aggregation -----------------------------------------------------------------


class Aggregation:
    """Collects one broadcast's results at one hop: its own and its subtree's.

    Every neighbour the broadcast went to answers once with a list of results,
    fails (its error stands for it), or is reported timed out at `finish`.
    """

    def __init__(self, here: str, waiting: tuple[Peer, ...], local: bool) -> None:
        self.here = here
        self._waiting = {peer: self._path_of(peer) for peer in waiting}
        self._local_pending = local
        self._results: list[CellResult] = []

    def _path_of(self, peer: Peer) -> str:
        if peer.role is Role.CHILD:
            return f"{self.here}{PATH_SEPARATOR}{peer.name}"
        return parent_of(self.here) or peer.name

    @property
    def done(self) -> bool:
        return not self._waiting and not self._local_pending

    def expects(self, peer: Peer) -> bool:
        return peer in self._waiting

    def add_local(self, result: CellResult) -> None:
        self._local_pending = False
        self._results.append(result)

    def add(self, peer: Peer, results: tuple[CellResult, ...], link_ms: float = 0.0) -> None:
        """A neighbour's answer for its subtree; each result must lie in that subtree.

        `link_ms` (the round trip to that neighbour, less the time it held the
        request) is added to each result's round trip.
        """
        root = self._waiting[peer]
        for result in results:
            if not is_below(result.cell, root) and not is_below(root, result.cell):
                raise SenderMismatch(
                    f"{peer} answered for {result.cell}, outside its subtree", self.here
                )
        del self._waiting[peer]
        self._results.extend(
            evolve(r, rtt_ms=None if r.rtt_ms is None else r.rtt_ms + link_ms) for r in results
        )

    def fail(self, peer: Peer, error: WireError) -> None:
        root = self._waiting.pop(peer)
        self._results.append(CellResult(root, Outcome.ERROR, error=error))

    def finish(self) -> tuple[CellResult, ...]:
        """Every result so far; neighbours still silent are reported timed out."""
        for root in self._waiting.values():
            self._results.append(CellResult(root, Outcome.TIMED_OUT))
        self._waiting.clear()
        if self._local_pending:
            self._local_pending = False
            self._results.append(
                CellResult(
                    self.here,
                    Outcome.ERROR,
                    error=CallTimeout("did not finish before the deadline", self.here),
                )
            )
        return tuple(sorted(self._results, key=lambda r: r.cell))
