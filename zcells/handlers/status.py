"""The health of one cell, for `zcells status`: answered by every cell of a broadcast.

Each cell speaks for itself and for its links to its children, as it sees
them; the view puts the answers of a subtree together. Rules kept here:

* Reading is cheap and bounded: liveness and counters come from memory, the
  figures from one database read off the loop, and the message rate from a
  fixed ring of samples taken once a second (`MessageRate`).
* The servers counted are the cell's own instances at a compute cell and the
  index at the API cell; the answer says which (``source``).
* The backlog is the outbox rows some parent has not applied yet; a cell with
  no parent has none to report.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from zcells.clock import SYSTEM_CLOCK, Clock
from zcells.db import outbox as outbox_store
from zcells.db import status as status_store
from zcells.dbrunner import DbRunner
from zcells.messages import Kind
from zcells.methods import Call, Method
from zcells.node import Node
from zcells.peer import Role
from zcells.port import CellPort
from zcells.scheduling import CellScheduling
from zcells.upstream import Upstream


class MessageRate:
    """Messages per second over the last few seconds, from a running count of messages.

    `run` takes a sample (monotonic time, count) every `interval_s` into a ring
    that holds `window_s` worth, so memory and work stay fixed however long the
    cell runs and however often it is asked.
    """

    def __init__(
        self,
        count: Callable[[], int],
        *,
        window_s: float = 5.0,
        interval_s: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._count = count
        self.window_s = window_s
        self.interval_s = interval_s
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque(maxlen=round(window_s / interval_s) + 1)

    def sample(self) -> None:
        self._samples.append((self.clock.now(), self._count()))

    def per_second(self) -> float | None:
        """The rate from the oldest sample kept to now; None before the first sample."""
        if not self._samples:
            return None
        then, before = self._samples[0]
        elapsed = self.clock.now() - then
        if elapsed <= 0:
            return None
        return max(0, self._count() - before) / elapsed

    def statistics(self) -> dict[str, Any]:
        return {
            "samples": len(self._samples),
            "window_s": self.window_s,
            "per_second": self.per_second(),
        }

    async def run(self) -> None:
        while True:
            self.sample()
            await self.clock.sleep(self.interval_s)


def messages_seen(node: Node) -> int:
    """Messages this cell's transport has received and sent since it started."""
    counters = node.transport.statistics()
    return int(counters.get("received", 0)) + int(counters.get("sent", 0))


class StatusHandlers:
    """The `status` method: one cell's health record."""

    def __init__(
        self,
        node: CellPort,
        db: DbRunner,
        upstream: Upstream,
        rate: MessageRate,
        *,
        top: bool,
        scheduling: CellScheduling | None = None,
    ) -> None:
        self.node = node
        self.scheduling = scheduling
        self.db = db
        self.upstream = upstream
        self.rate = rate
        self.top = top

    async def status(self, call: Call) -> dict[str, Any]:
        """This cell's type, its children's liveness, hosts, servers, backlog and message rate."""
        parents = self.node.view.parents
        acked = self.upstream.acked
        after = min(acked.get(name, 0) for name in parents) if parents else None
        figures = await self.db.read(status_store.figures, after)
        now = self.node.clock.wall()
        silence = self.node.silence()
        liveness = self.node.liveness()
        children = {
            peer.name: {"state": liveness[peer].value, "heard_s_ago": _rounded(silence.get(peer))}
            for peer in sorted(liveness, key=lambda p: p.name)
            if peer.role is Role.CHILD
        }
        backlog = figures.backlog
        oldest = None if backlog is None else backlog.oldest_at
        return {
            "cell": call.cell,
            "cell_type": self.node.cell_type,
            "children": children,
            "hosts": figures.hosts.as_dict(),
            "servers": {"source": "index" if self.top else "own", "counts": figures.servers},
            "backlog": {
                "count": 0 if backlog is None else backlog.count,
                "oldest_s": None if oldest is None else _rounded(max(0.0, now - oldest)),
            },
            "msgs_per_s": _rounded(self.rate.per_second()),
            "scheduling": None if self.scheduling is None else self.scheduling.status(),
            "problems": await self._problems(),
        }

    async def _problems(self) -> list[str]:
        """What an operator must look at: refused hellos, held rows, a stream that is stuck."""
        problems = [f"parent {name}: {why}" for name, why in sorted(self.node.problems.items())]
        held = await self.db.read(outbox_store.held)
        problems += [
            f"{count} rows refused by parent {parent}, held aside" for parent, count in held.items()
        ]
        problems += [
            f"stream to parent {parent} stopped: {code}"
            for parent, code in sorted(self.upstream.blocked.items())
        ]
        return problems[:20]

    def methods(self) -> list[Method]:
        return [
            Method(
                "status",
                self.status,
                kinds=frozenset({Kind.TARGETED, Kind.BROADCAST}),
                allowed=frozenset({"admin", "parent"}),
            )
        ]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
