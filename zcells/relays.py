"""What a hop remembers of the requests it passed on: relays and gathers.

A relay lives by a transition table (`RELAY_TRANSITIONS`, as h11 keeps its
states): it waits until it is answered, expires, or fails, exactly once.
Any other move is a bug in the core and raises `RelayStateError`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from zcells import routing
from zcells.messages import Broadcast, Request, Response
from zcells.peer import Peer


class RelayState(StrEnum):
    WAITING = "waiting"
    ANSWERED = "answered"
    EXPIRED = "expired"
    FAILED = "failed"


class RelayEvent(StrEnum):
    RESPONSE = "response"
    DEADLINE = "deadline"
    SEND_FAILED = "send_failed"
    IMPLAUSIBLE = "implausible"  # answered for cells the neighbour does not hold


RELAY_TRANSITIONS: Final[dict[RelayState, dict[RelayEvent, RelayState]]] = {
    RelayState.WAITING: {
        RelayEvent.RESPONSE: RelayState.ANSWERED,
        RelayEvent.DEADLINE: RelayState.EXPIRED,
        RelayEvent.SEND_FAILED: RelayState.FAILED,
        RelayEvent.IMPLAUSIBLE: RelayState.FAILED,
    },
    RelayState.ANSWERED: {},
    RelayState.EXPIRED: {},
    RelayState.FAILED: {},
}


class RelayStateError(RuntimeError):
    """A relay was moved along a transition its table does not have: a bug in the core."""


@dataclass
class Relay:
    """A request this cell sent on to a neighbour, and whose answer it passes back.

    Kept under (neighbour, id of the message sent to it): only that neighbour's
    response to that message is accepted, which is how a response retraces
    the request's path hop by hop.
    """

    via: Peer
    target: str
    started: float
    deadline: float
    requester: Peer | None  # whom to answer; None for this cell's own call
    request: Request  # as the requester sent it
    own: int | None = None  # this cell's own call: its token
    state: RelayState = RelayState.WAITING

    @property
    def request_id(self) -> bytes:
        return self.request.id

    def move(self, event: RelayEvent) -> None:
        following = RELAY_TRANSITIONS[self.state].get(event)
        if following is None:
            raise RelayStateError(f"relay to {self.target}: no {event} when {self.state}")
        self.state = following


@dataclass
class Gather:
    """A broadcast this hop fanned out, collecting its subtree's answers."""

    sender: Peer | None  # None for this cell's own broadcast
    request: Broadcast
    aggregation: routing.Aggregation
    started: float
    deadline: float
    sent_at: dict[Peer, float] = field(default_factory=dict)
    own: int | None = None
    local: int | None = None  # the token of the local run, if any


Key = tuple[Peer, bytes]  # (peer, the id of its request)


class AnswerMemory:
    """The requests seen lately and the answers sent to them, bounded by count and by bytes.

    A duplicate of a request is answered again from here, never run twice; a
    duplicate of one whose answer was not kept (too large, or pushed out) is
    dropped unanswered. The oldest are forgotten first.
    """

    def __init__(self, count: int, total_bytes: int, answer_bytes: int) -> None:
        self.count = count
        self.total_bytes = total_bytes
        self.answer_bytes = answer_bytes  # a larger answer is not kept
        self.bytes = 0
        self._kept: OrderedDict[Key, tuple[Response, int] | None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def note(self, key: Key) -> tuple[bool, Response | None]:
        """Whether `key` was seen before, and its kept answer; a new one is noted."""
        kept = self._kept
        if key in kept:
            answer = kept[key]
            return True, None if answer is None else answer[0]
        kept[key] = None
        while len(kept) > self.count:
            self._forget_oldest()
        return False, None

    def keep(self, key: Key, response: Response, size: int) -> None:
        kept = self._kept
        if key not in kept or size > self.answer_bytes:
            return
        old = kept[key]
        if old is not None:
            self.bytes -= old[1]
        kept[key] = (response, size)
        self.bytes += size
        while self.bytes > self.total_bytes and kept:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, answer = self._kept.popitem(last=False)
        if answer is not None:
            self.bytes -= answer[1]
