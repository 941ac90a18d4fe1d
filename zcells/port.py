"""What the parts above the message loop may use of their cell: the `CellPort`.

Handlers, the builds, the upward stream and the orphan sweeper depend on
this small protocol, not on `zcells.node.Node`: where the cell sits, how
alive its neighbours are, its clock, and calls and broadcasts through the
tree. `Node` provides it; a test provides it with a scripted cell, as
httpx's `MockTransport` stands in for the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from zcells.clock import Clock
from zcells.liveness import Liveness
from zcells.messages import CellResult
from zcells.peer import Peer
from zcells.routing import View


class CellPort(Protocol):
    @property
    def clock(self) -> Clock: ...

    @property
    def view(self) -> View:
        """Where the cell sits: its parents' paths and its children."""

    @property
    def cell_type(self) -> str: ...

    @property
    def disabled(self) -> frozenset[str]:
        """Children the cell scheduler skips."""

    @property
    def weights(self) -> Mapping[str, tuple[float, float]]:
        """Each child's weight offset and scale, as the cells table holds them."""

    @property
    def problems(self) -> Mapping[str, str]:
        """Parents whose hello is refused, and why."""

    def liveness(self) -> dict[Peer, Liveness]: ...

    def silence(self) -> dict[Peer, float | None]:
        """Seconds since each neighbour was last heard (None: never)."""

    async def call(
        self, method: str, body: Mapping[str, Any], target: str, timeout_s: float | None = None
    ) -> CellResult:
        """A targeted call from this cell; the result of the target cell."""

    async def broadcast(
        self, method: str, body: Mapping[str, Any], timeout_s: float | None = None
    ) -> tuple[CellResult, ...]:
        """A broadcast to every cell below this one: one result each."""
