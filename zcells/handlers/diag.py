"""Diagnostics: ping proves a route to a cell and back; stats reads its counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zcells.messages import Kind
from zcells.methods import Call, Method, Param


class DiagHandlers:
    """Methods that read nothing but the cell's own identity."""

    def __init__(self, cell_type: str, statistics: Callable[[], dict[str, Any]]) -> None:
        self.cell_type = cell_type
        self._statistics = statistics

    def ping(self, call: Call) -> dict[str, Any]:
        """Answer with this cell's full path and type, echoing any payload (like ping -s)."""
        answer = {"cell": call.cell, "cell_type": self.cell_type}
        if call.args["payload"] is not None:
            answer["payload"] = call.args["payload"]
        return answer

    def stats(self, call: Call) -> dict[str, Any]:
        """This cell's counters: messages, refusals, neighbours' liveness, links."""
        return {**self._statistics(), "cell": call.cell, "cell_type": self.cell_type}

    def methods(self) -> list[Method]:
        both = frozenset({Kind.TARGETED, Kind.BROADCAST})
        return [
            Method(
                "ping",
                self.ping,
                kinds=both,
                allowed=frozenset({"admin", "parent", "child"}),
                params={"payload": Param(dict, required=False)},
            ),
            Method("stats", self.stats, kinds=both, allowed=frozenset({"admin", "parent"})),
        ]
