"""Where a cell's random ids come from: the operating system, or a seed.

Message ids, instance uuids and incident ids are drawn here, so a simulation
can replay a whole tree from one seed (`seeded`). The daemon never calls
`seeded`: its ids come from `os.urandom`.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class _Source:
    def __init__(self) -> None:
        self.draw: Callable[[int], bytes] = os.urandom
        # Called whenever the source changes: pools of ids drawn ahead refill from the new one.
        self.on_change: list[Callable[[], None]] = []

    def use(self, draw: Callable[[int], bytes]) -> None:
        self.draw = draw
        for refill in self.on_change:
            refill()


_SOURCE = _Source()


def token_bytes(n: int) -> bytes:
    return _SOURCE.draw(n)


def uuid4() -> str:
    """A random (version 4) uuid, as text."""
    return str(uuid.UUID(bytes=_SOURCE.draw(16), version=4))


def on_change(refill: Callable[[], None]) -> None:
    """Call `refill` whenever the source of random bytes changes."""
    _SOURCE.on_change.append(refill)


@contextmanager
def seeded(rng: random.Random) -> Iterator[None]:
    """Draw every id from `rng` inside the block: the same seed gives the same ids."""
    previous = _SOURCE.draw
    _SOURCE.use(rng.randbytes)
    try:
        yield
    finally:
        _SOURCE.use(previous)
