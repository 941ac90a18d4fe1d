"""What the cell core asks its loop to do: the actions `CellCore` returns.

Each is a frozen record; the loop (`zcells.node`) carries them out in order
and reports back what only it can know: a run's result (`CellCore.ran`),
an answer's size on the wire (`answered`), a send that failed
(`send_failed`, with the `Failed` the `Send` carried).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from zcells.errors import WireError
from zcells.messages import CellResult, Message, Request, Response
from zcells.methods import Method
from zcells.peer import Peer


class SendKind(StrEnum):
    RELAY = "relay"  # a request passed on, or this cell's own call, with a relay waiting
    CAST = "cast"  # a request passed on that wants no answer
    GATHER = "gather"  # a broadcast passed on to one neighbour


@dataclass(frozen=True)
class Failed:
    """What the core needs to hear when a send fails, for the request it belonged to."""

    kind: SendKind
    via: Peer
    message_id: bytes  # the id of the message sent to `via`
    requester: Peer | None = None  # a cast's: to refuse it
    request: Request | None = None


@dataclass(frozen=True)
class Send:
    peer: Peer
    message: Message
    failed: Failed | None = None
    quiet: bool = False  # a failure is counted, not logged (heartbeats)


@dataclass(frozen=True)
class Answer:
    peer: Peer
    response: Response


@dataclass(frozen=True)
class Run:
    token: int
    request: Request  # stamped: its path ends with this cell
    peer: Peer
    caller: str
    method: Method
    deadline: float


@dataclass(frozen=True)
class Settle:
    """This cell's own call or broadcast is over: a response, results, or an error."""

    token: int
    response: Response | None = None
    results: tuple[CellResult, ...] = ()
    error: WireError | None = None


@dataclass(frozen=True)
class Refused:
    peer: Peer
    error: WireError
    request: Request | None = None  # None: a message that could not be read or an answer


@dataclass(frozen=True)
class Placed:
    path: str


Action = Send | Answer | Run | Settle | Refused | Placed
