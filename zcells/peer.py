"""Who is on the other end of a link, as established by its key.

A peer's name comes only from the authenticated ZAP User-Id (or, for a parent
we dial, from the server key we pinned); never from anything it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    PARENT = "parent"
    CHILD = "child"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class Peer:
    role: Role
    name: str
    # Peers key the cell core's tables, several lookups per message: hashed once.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.role.value, self.name)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.role.value}:{self.name}"
