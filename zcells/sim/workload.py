"""Clients that create, act on and delete servers at the API cell throughout a run.

Each client does one thing at a time, as a person at a terminal would, and
rides out every outage: a request that got no answer (the API cell was
down, or the answer was late) is sent again with the same request id until
it is answered, so every server the API cell made is one a client was told
about. What the clients were told is what the invariants are checked
against.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from zcells import entropy
from zcells.client import CellClient
from zcells.clock import Clock
from zcells.errors import WireError
from zcells.sim.tree import TOP, SimTree
from zcells.transport import MemoryClient

ACTIONS = ("stop", "start", "reboot")


@dataclass
class Told:
    """What the clients were told, across all of them."""

    created: dict[str, str] = field(default_factory=dict)  # uuid -> request id
    deleted: set[str] = field(default_factory=set)  # deletes the API cell accepted
    counts: Counter[str] = field(default_factory=Counter)


class SimClient:
    def __init__(
        self, tree: SimTree, name: str, rng: random.Random, told: Told, clock: Clock
    ) -> None:
        self.tree = tree
        self.name = name
        self.rng = rng
        self.told = told
        self.clock = clock
        self.unanswered: dict[str, Any] | None = None  # a create sent with no answer yet
        self.mean_gap_s = 3.0

    def _connect(self) -> CellClient:
        top = self.tree.cells[TOP]
        transport = MemoryClient(
            self.tree.network,
            top.identity.api_endpoint,
            top.identity.public_key,
            self.name,
            self.tree.client_keys[self.name],
        )
        return CellClient(transport, timeout_s=20.0, clock=self.clock)

    async def run(self, until: float) -> None:
        """Work until virtual time `until`, then finish what is unanswered."""
        while self.clock.now() < until:
            try:
                async with self._connect() as client:
                    while self.clock.now() < until:
                        await self.clock.sleep(self.rng.expovariate(1.0 / self.mean_gap_s))
                        await self._one(client)
            except (WireError, OSError):
                self.told.counts["client_reconnects"] += 1
                await self.clock.sleep(self.rng.uniform(0.5, 3.0))

    async def finish(self, attempts: int = 200) -> bool:
        """Send the unanswered create until it is answered; False if it never was."""
        for _ in range(attempts):
            if self.unanswered is None:
                return True
            try:
                async with self._connect() as client:
                    await self._create(client, self.unanswered)
            except (WireError, OSError):
                await self.clock.sleep(2.0)
        return self.unanswered is None

    async def _one(self, client: CellClient) -> None:
        alive = [u for u in self.told.created if u not in self.told.deleted]
        roll = self.rng.random()
        if self.unanswered is not None or roll < 0.5 or not alive:
            body = self.unanswered or {
                "name": f"{self.name}-{self.told.counts['creates_sent']}",
                "flavor": "m1.tiny",
                "image": "cirros",
                "count": 1,
                "request_id": entropy.uuid4(),
            }
            await self._create(client, body)
            return
        uuid = self.rng.choice(sorted(alive))
        action = "delete" if roll > 0.85 else self.rng.choice(ACTIONS)
        result = await client.call("server_action", {"uuid": uuid, "action": action})
        if result.ok:
            self.told.counts[f"{action}_accepted"] += 1
            if action == "delete":
                self.told.deleted.add(uuid)
        elif result.error is not None:
            self.told.counts[f"refused_{result.error.code}"] += 1

    async def _create(self, client: CellClient, body: dict[str, Any]) -> None:
        self.unanswered = body
        self.told.counts["creates_sent"] += 1
        result = await client.call("server_create", body)
        self.unanswered = None  # answered: a request id's first answer is final
        if result.ok:
            for uuid in result.value["servers"]:
                self.told.created[uuid] = body["request_id"]
            self.told.counts["creates_answered"] += 1
        elif result.error is not None:
            self.told.counts[f"create_refused_{result.error.code}"] += 1


async def run_clients(clients: list[SimClient], until: float) -> None:
    async with asyncio.TaskGroup() as tasks:
        for client in clients:
            tasks.create_task(client.run(until), name=client.name)
